"""Find a training checkpoint and check that every file an export needs is there and whole.

A source is a run directory (`<run>/checkpoints/latest` names the checkpoint), the
`checkpoints/` folder itself, or one checkpoint folder (`step_XXXXXXXX/`). `inspect`
reads only headers and the small rank-0 DeepSpeed model-states file, so a missing or
truncated file is reported, by name, before any weight is read.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pretrain.config import RunConfig, validate
from pretrain.export.errors import ExportError, IncompleteFileError
from pretrain.export.folders import resolve_checkpoint_dir
from pretrain.export.safetensors_io import read_header
from pretrain.parallel import shard_files
from pretrain.slots.table import TABLE_FILENAME

SLOT_TABLE = TABLE_FILENAME


@dataclass
class CheckpointSource:
    checkpoint_dir: Path
    cfg: RunConfig
    zero_stage: int
    dp_world_size: int
    bf16: bool
    step: int
    tokens_seen: int
    model_states: Path  # rank 0's DeepSpeed model-states file
    optim_files: list[Path] = field(default_factory=list)
    value_files: list[Path] = field(default_factory=list)
    slot_table: Path | None = None
    dataset_dir: Path | None = None
    tokenizer: Path | None = None
    run_id: str = ""  # the training run (its slot tables carry the same id); "" before run ids existed
    skipped_steps: int = 0  # updates the run skipped up to this checkpoint (0 before they were counted)

    @property
    def num_value_tables(self) -> int:
        return self.cfg.model.memory.num_value_tables


def check_torch_zip(path: Path) -> None:
    """A torch.save file is a zip archive: check its directory and that every member's bytes are present."""
    if not path.is_file():
        raise IncompleteFileError(f"missing file {path}")
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                end = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + info.compress_size
                if end > size:
                    raise IncompleteFileError(f"{path} is truncated (member {info.filename} ends past the file)")
    except zipfile.BadZipFile as err:
        raise IncompleteFileError(f"{path} is truncated or not a torch checkpoint file ({err})") from None


def _load_small(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise IncompleteFileError(f"cannot read {path} ({err})") from None


def load_run_config(path: Path) -> RunConfig:
    """The saved run config, validated (`validate`: values only). Not `load_config`: that also
    checks that data.dir exists, which it need not where the export runs (see --dataset-dir)."""
    from omegaconf import OmegaConf

    try:
        merged = OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.load(path))
        cfg: RunConfig = OmegaConf.to_object(merged)
    except Exception as err:  # omegaconf raises assorted errors for bad YAML and unknown keys
        raise IncompleteFileError(f"cannot read the run config {path} ({err})") from None
    # a run started before a01ec3f could train with an empty run_dir or cache_dir (the directory it started
    # in), which a new config may no longer name; its saved config means '.'
    cfg.train.run_dir = cfg.train.run_dir or "."
    cfg.data.cache_dir = cfg.data.cache_dir or "."
    return validate(cfg)


def find_dataset_dir(cfg: RunConfig, dataset_dir: str | Path | None) -> Path:
    """The dataset folder the run trained on (for tokenizer.model, manifest.json, probes)."""
    if dataset_dir is not None:
        path = Path(dataset_dir)
    elif cfg.data.dir:
        path = Path(cfg.data.dir)
    elif cfg.data.sources:  # a mixture: every source has the same tokenizer (checked at training start)
        path = Path(cfg.data.sources[0].dir)
    else:
        from pretrain.data import prepare_embedded_dataset

        # Returns the cached embedded corpus; rebuilds it (deterministically) when absent.
        path = prepare_embedded_dataset(cfg.data, cfg.data.seq_len, show_progress=False)
    if not (path / "tokenizer.model").is_file():
        raise ExportError(
            f"the run's dataset folder {path} has no tokenizer.model: pass dataset_dir= "
            "(--dataset-dir) pointing at the prepared dataset the run used"
        )
    return path


def inspect(source: str | Path, dataset_dir: str | Path | None = None) -> CheckpointSource:
    """Locate the checkpoint and check every file the export will read; raise naming the first bad one."""
    ckpt = resolve_checkpoint_dir(source)
    config_path = ckpt / "config.yaml"
    if not config_path.is_file():
        raise IncompleteFileError(f"incomplete checkpoint: missing file {config_path}")
    cfg = load_run_config(config_path)
    candidates = [ckpt / "mp_rank_00_model_states.pt", ckpt / "zero_pp_rank_0_mp_rank_00_model_states.pt"]
    model_states = next((p for p in candidates if p.is_file()), None)
    if model_states is None:
        raise IncompleteFileError(
            f"incomplete checkpoint: missing file {candidates[0]} (or {candidates[1].name} for ZeRO stage 3)"
        )
    check_torch_zip(model_states)
    states = _load_small(model_states)
    ds = states.get("ds_config", {})
    stage = int(ds.get("zero_optimization", {}).get("stage", 0))
    world = int(states.get("dp_world_size", 1))
    bf16 = bool(ds.get("bf16", {}).get("enabled", False))
    src = CheckpointSource(
        ckpt, cfg, stage, world, bf16, int(states.get("step", 0)), int(states.get("tokens_seen", 0)), model_states
    )
    src.run_id = str(states.get("run_id", ""))
    src.skipped_steps = int(states.get("skipped_steps", 0))
    del states
    if stage == 3:
        for r in range(world):
            check_torch_zip(ckpt / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt")
    if stage > 0:
        # DeepSpeed names them bf16_zero_pp_rank_* under bf16 with ZeRO 1/2, zero_pp_rank_* otherwise
        tail = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
        found = sorted(ckpt.glob("*" + tail))
        prefix = found[0].name[: -len(tail)] if found else ("bf16_" if bf16 and stage < 3 else "")
        src.optim_files = [ckpt / f"{prefix}zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(world)]
        for path in src.optim_files:
            check_torch_zip(path)
    if src.num_value_tables:
        if not any(shard_files.FILE_RE.match(p.name) for p in ckpt.iterdir()):
            expected = shard_files.shard_file_name(0, 0, cfg.model.memory.parallel_size)
            raise IncompleteFileError(
                f"incomplete checkpoint: missing value-shard file {ckpt / expected} "
                "(no values.t*.s*-of-*.safetensors at all)"
            )
        try:
            P = shard_files.saved_parallel_size(ckpt, src.num_value_tables)
        except shard_files.ShardFileError as err:
            raise IncompleteFileError(f"incomplete checkpoint: {err}") from None
        src.value_files = [
            ckpt / shard_files.shard_file_name(t, s, P) for t in range(src.num_value_tables) for s in range(P)
        ]
        for path in src.value_files:
            header, _ = read_header(path)
            if "weight" not in header:
                raise IncompleteFileError(f"{path} holds no 'weight' tensor: not a value-shard file")
    table = ckpt / SLOT_TABLE
    if cfg.slots.enabled and cfg.model.memory.enabled or table.exists():
        read_header(table)
        src.slot_table = table
    src.dataset_dir = find_dataset_dir(cfg, dataset_dir)
    src.tokenizer = src.dataset_dir / "tokenizer.model"
    return src
