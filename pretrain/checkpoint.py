"""Checkpoints: DeepSpeed engine state + value shards + per-rank train state, atomically.

Layout under `<run_dir>/checkpoints/`:
  step_00000100/                 one complete checkpoint (a DeepSpeed tag)
    <DeepSpeed files>            dense params, ZeRO shards, optimizer, LR scheduler, client state
    values.t<table>.s<shard>-of-<P>.safetensors
                                 memory value shards + their optimizer state (pretrain.parallel)
    rank_00000.pt                per-rank state: data loader position, RNG states, slot counters
    slot_frequencies.safetensors the reduced slot-frequency table (pretrain.slots)
    config.yaml                  the resolved run config
    checksums.json               size and CRC-32 of every file above (pretrain.checksums), written last
  latest                         the tag of the newest complete checkpoint
  zero_to_fp32.py, zero_to_torch.py
                                 DeepSpeed's recovery scripts (ZeRO 1-3), replaced whole at each save

A checkpoint is written under `.tmp-<tag>` and renamed to `<tag>` only when every rank
has finished; `latest` is replaced last. A crash mid-write leaves the previous
checkpoint and `latest` untouched; stale temporary folders are removed at the next save. A
write that fails on one rank (its disk, its quota) is raised on every rank, naming that rank.
Per-rank files hold tensors and plain Python values only, loaded with weights_only=True.

Resume trusts no file of a checkpoint: before anything is loaded, `verify` checks that every
file the resume will read is present, whole and readable (the export's checks plus the
per-rank files), `Checkpointer.verify` that no file differs from the size and CRC-32 it was
written with, and DeepSpeed's own loads run under torch's weights-only unpickler, so a
pickle payload planted in a checkpoint is refused, never executed. A damaged newest
checkpoint is refused with a message naming the file and the newest checkpoint that passes
the same checks (no silent fallback: the user decides; see the README's "Resuming").

A checkpoint written by another number of ranks is re-partitioned on load (pretrain.resharding):
the dense state through DeepSpeed's universal checkpoint, the per-rank items by their
`load_resharded` from all old ranks' files.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
from pathlib import Path

import torch
from omegaconf import OmegaConf

from pretrain.checksums import checksum_problem, unreadable, write_checksums
from pretrain.config import ConfigError, RunConfig, config_to_dict, model_differences, save_config
from pretrain.data.sources import mixture_change
from pretrain.distributed import barrier, first_problem, refusal_shared
from pretrain.files import TEMP_MARK, atomic_write, discard, flush_to_disk, replace_with, temp_path_beside
from pretrain.lr_schedule import check_resumed_schedule
from pretrain.refused_writes import describe, is_write_failure

TMP_PREFIX = ".tmp-"
_TAG = re.compile(r"^[A-Za-z0-9_.-]+$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be resumed from (missing, truncated, unreadable or unsafe file) or
    could not be written (a full disk); the message names the file and what to do."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def step_of(ckpt_dir: Path) -> int | None:
    """The step a checkpoint folder named by `tag_for` was saved at; None for another name."""
    match = re.fullmatch(r"step_(\d+)", Path(ckpt_dir).name)
    return int(match.group(1)) if match else None


def rank_file(ckpt_dir: Path, rank: int) -> Path:
    return ckpt_dir / f"rank_{rank:05d}.pt"


def checkpoint_folders(root: str | Path) -> list[Path]:
    """The checkpoint folders (named by `tag_for`) under `root`, oldest step first."""
    steps = {p: step_of(p) for p in Path(root).glob("step_*") if p.is_dir()}
    return sorted((p for p, s in steps.items() if s is not None), key=steps.get)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint folder under `root` (the one `latest` names), or None
    where `root` holds no checkpoint. A `latest` that is missing while checkpoint folders are
    there, empty, or naming no folder is refused (CheckpointError): a run would otherwise
    start afresh beside, and later overwrite, checkpoints it was meant to resume from."""
    root = Path(root)
    latest = root / "latest"
    folders = checkpoint_folders(root)
    newest = f"(the newest folder here is {folders[-1].name})" if folders else "(there is none here)"
    afresh = f"to start afresh, move {root} aside or use a new train.run_dir"
    if not latest.is_file():
        if not folders:
            return None
        raise CheckpointError(
            f"{root} holds checkpoints ({', '.join(p.name for p in folders[-3:])}) but no 'latest' file naming the "
            f"one to resume from (a run stopped between renaming its first checkpoint and writing latest, or "
            f"latest was deleted): write the folder's name into {latest} {newest}; {afresh}"
        )
    tag = latest.read_text().strip()
    if not tag:
        raise CheckpointError(
            f"{latest} is empty (it should name a checkpoint folder such as {tag_for(100)}): "
            f"write the newest complete folder's name into it {newest}; {afresh}"
        )
    if not _TAG.match(tag) or tag in (".", ".."):
        raise CheckpointError(f"{latest} names {tag!r}, which is not a checkpoint folder name under {root}")
    path = root / tag
    if not path.is_dir():
        raise CheckpointError(
            f"{latest} names checkpoint {tag!r} but {path} is missing: write the name of a complete checkpoint "
            f"folder into {latest} {newest}; {afresh}"
        )
    return path


def model_fingerprint(cfg: RunConfig) -> dict:
    """The parts of the config a checkpoint's tensors depend on."""
    return config_to_dict(cfg.model)


def check_compatible(saved: dict, cfg: RunConfig, ckpt_dir: Path) -> None:
    """Refuse a checkpoint whose model config differs (the tensors would not fit). How the
    model runs may change: the memory-parallel size (value shards are re-sharded on load) and
    the memory kernel (a GPU run's checkpoint resumed on CPU with model.memory.kernel=torch)."""
    diffs = model_differences(saved, model_fingerprint(cfg))
    if not diffs:
        return
    listed = [f"model.{key}: checkpoint {a!r} vs config {b!r}" for key, (a, b) in diffs.items()]
    data = cfg.data.dir or ", ".join(str(s.dir) for s in cfg.data.sources)
    # model.vocab_size follows the data's tokenizer unless set: a data folder prepared again with another
    # tokenizer shows up here, not as a change of the config the user wrote
    cause = (
        f" (model.vocab_size follows the tokenizer of the training data, {data}, unless set: was it prepared "
        "again with another tokenizer? A run resumes only on the data it started on)"
        if "vocab_size" in diffs and data
        else ""
    )
    raise ConfigError(
        f"checkpoint {ckpt_dir} was written for a different model config ({'; '.join(listed[:5])}){cause}; "
        f"use the original config, or a new train.run_dir to start afresh"
    )


def _attempt(fn, *args) -> Exception | None:
    """fn(*args); the exception it raised, or None."""
    try:
        fn(*args)
    except Exception as err:  # judged by Checkpointer._agree, on every rank
        return err
    return None


class _RecordingWrites:
    """DeepSpeed's checkpoint engine, whose `save` records the first failed write instead of
    raising it, so that DeepSpeed's save runs on to its closing barrier on this rank as on the
    others (raised out of it, the rank left them waiting there), and flushes each file it wrote to
    disk. The flush is the writing rank's: on a filesystem shared by nodes, rank 0's flush at the
    commit reaches what the server holds, not what another node's cache has yet to send."""

    def __init__(self, inner):
        self.inner, self.failure = inner, None

    def save(self, state_dict, path: str):
        if self.failure is None:
            try:
                self.inner.save(state_dict, path)
                flush_to_disk(path)
            except Exception as err:
                self.failure = err

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _save_deepspeed(engine, save_dir: str, tag: str, client_state: dict) -> Exception | None:
    """DeepSpeed's save of `engine` under `save_dir/tag`; the first failure, returned. Its collectives
    (a barrier, the tag's check) come before its writes, and one barrier after them; a write that
    fails outside its checkpoint engine (rank 0's copy of its recovery script) is met there by this
    rank's own barrier."""
    recording = _RecordingWrites(engine.checkpoint_engine)
    engine.checkpoint_engine = recording
    engine._copy_recovery_script = _RecoveryScripts(engine._copy_recovery_script)
    try:
        engine.save_checkpoint(save_dir, tag=tag, client_state=client_state, save_latest=False)
    except Exception as err:
        if not is_write_failure(err):
            raise
        barrier()  # DeepSpeed's closing one, where the other ranks wait
        return recording.failure or err
    finally:
        engine.checkpoint_engine = recording.inner
        del engine._copy_recovery_script  # the class's method again
    return recording.failure


class _RecoveryScripts:
    """DeepSpeed's copy of its recovery scripts (zero_to_fp32.py, ...) into the checkpoints folder,
    made atomic. At every ZeRO save rank 0 copied them over the previous copies in place, outside
    any step folder: a crash mid-copy left a truncated script there. DeepSpeed's own copy now fills
    a temporary folder beside them, and each script is moved into place whole."""

    def __init__(self, copy):
        self.copy = copy

    def __call__(self, save_path: str) -> None:
        save_path = Path(save_path)
        tmp = temp_path_beside(save_path / "recovery-scripts")  # a kill's leftover: removed at the next save
        tmp.mkdir()
        try:
            self.copy(str(tmp))
            for script in sorted(tmp.iterdir()):
                replace_with(script, save_path / script.name)
        finally:
            discard(tmp)


class Checkpointer:
    """Saves and restores complete training checkpoints under `<run_dir>/checkpoints`."""

    def __init__(self, run_dir: str | Path, rank: int, keep: int, world_size: int = 1):
        self.root = Path(run_dir) / "checkpoints"
        self.rank, self.keep, self.world_size = rank, keep, world_size
        self.saved_step: int | None = None  # the step of this process's last complete save
        self.saved_world: int | None = None  # ranks that wrote the checkpoint `verify` passed
        self.schedule_change: str | None = None  # how that checkpoint's learning-rate schedule was changed
        self.mixture_change: str | None = None  # and its training data (data.sources)
        self.engine = self.memory_parallel = self.train_state = self.rank_state = None
        self.writers: list = []

    def track(self, engine, memory_parallel, train_state, rank_state, writers=()) -> None:
        """Declare what every checkpoint holds: the DeepSpeed engine, the value shards, the run's
        `train_state` (saved as DeepSpeed's client state), this rank's `rank_state` (one file per
        rank) and `writers`, objects whose `write(folder)` adds files of their own (a collective:
        every rank calls it, after DeepSpeed's save and this rank's own files; also after one of those failed)."""
        self.engine, self.memory_parallel = engine, memory_parallel
        self.train_state, self.rank_state, self.writers = train_state, rank_state, list(writers)

    def save(self, step: int, cfg: RunConfig) -> Path:
        """Write a checkpoint of the tracked items for `step` on every rank; return its final folder.

        A failure on any rank (a full disk, a refused write, an error in a writer) is raised on
        every rank, naming that rank and its cause, at the next of the save's four agreements
        (after preparing the folder, writing, summing, committing): a failing rank still takes
        part in the collectives of its stage, so that none is left waiting in one for a rank that
        has left. Nothing committed is touched before the last stage."""
        tag = tag_for(step)
        tmp_tag = TMP_PREFIX + tag
        tmp_dir, final_dir = self.root / tmp_tag, self.root / tag
        self._agree(tag, tmp_dir, _attempt(self._prepare) if self.rank == 0 else None)
        self._agree(tag, tmp_dir, self._write(tmp_tag, tmp_dir, cfg))  # after it, every rank's files are whole
        self._agree(tag, tmp_dir, _attempt(write_checksums, tmp_dir, self.rank, self.world_size))
        committing = _attempt(self._commit, tmp_dir, final_dir, tag) if self.rank == 0 else None
        self._agree(tag, tmp_dir, committing, committed=final_dir)
        self.saved_step = step
        return final_dir

    def _prepare(self) -> None:
        self._remove_stale_temporaries()
        self.root.mkdir(parents=True, exist_ok=True)

    def _commit(self, tmp_dir: Path, final_dir: Path, tag: str) -> None:
        replace_with(tmp_dir, final_dir)
        atomic_write(self.root / "latest", tag)
        prune_checkpoints(self.root, self.keep, tag)

    def _write(self, tmp_tag: str, tmp_dir: Path, cfg: RunConfig) -> Exception | None:
        """Every tracked item of this rank into the unfinished checkpoint `tmp_dir`. The first
        failure is returned, not raised; the writing that holds collectives (DeepSpeed's save, the
        writers) runs on after it."""
        client_state = dict(self.train_state.state_dict(), model_config=model_fingerprint(cfg))
        failure = _save_deepspeed(self.engine, str(self.root), tmp_tag, client_state)
        if failure is None:
            failure = _attempt(self.memory_parallel.save, tmp_dir)
        if failure is None:
            failure = _attempt(_atomic_torch_save, self.rank_state.state_dict(), rank_file(tmp_dir, self.rank))
        if failure is None and self.rank == 0:
            failure = _attempt(save_config, cfg, tmp_dir / "config.yaml")
        for writer in self.writers:
            problem = _attempt(writer.write, tmp_dir)
            failure = failure if failure is not None else problem
        return failure

    def _agree(self, tag: str, tmp_dir: Path, failure: Exception | None, committed: Path | None = None) -> None:
        """Raise on every rank where a stage of the save of `tag` failed on any (a collective):
        this rank's own failure as it was where it is not a refused write (a fault of the code,
        with its traceback), otherwise a CheckpointError naming the failing rank, its cause, and
        the checkpoint that is kept. `committed`: the final folder, at the commit stage, where a
        failure may follow its rename (`latest` not written)."""
        mine = None
        if failure is not None:
            if is_write_failure(failure):
                refused = describe(failure, self.root, "give train.run_dir a filesystem with room", self._size())
                mine = f"{refused.reason}\n{refused.fix}, then run again\n{refused.detail}"
            else:
                mine = f"{type(failure).__name__}: {failure}\nSee that rank's traceback; fix it, then run again\n"
        agreed = first_problem(mine)
        if agreed is None:
            return
        if failure is not None and not is_write_failure(failure):
            raise failure
        cause, fix, detail = agreed.message.rsplit("\n", 2)
        if len(agreed.ranks) > 1:
            cause = f"rank {agreed.rank}: {cause}"
        renamed = committed is not None and committed.is_dir() and not tmp_dir.exists()
        message = self._write_failure(tag, tmp_dir, agreed.who(), cause, fix, renamed)
        raise CheckpointError(f"{message}. {detail}" if detail else message) from failure

    def _size(self) -> int | None:
        """The bytes of the newest complete checkpoint, what the next one will need about; None
        where there is none."""
        try:
            previous = latest_checkpoint(self.root)
        except (CheckpointError, OSError):
            return None
        if previous is None:
            return None
        try:
            return sum(p.stat().st_size for p in previous.rglob("*") if p.is_file())
        except OSError:
            return None

    def _write_failure(self, tag: str, tmp_dir: Path, who: str, cause: str, fix: str, renamed: bool = False) -> str:
        try:
            previous = latest_checkpoint(self.root)
        except CheckpointError:
            previous = None
        latest = self.root / "latest"
        if renamed:  # the folder is whole; `latest` (or the pruning after it) failed
            done = f"{who} could not write checkpoint {tag} ({cause}) after its folder was complete: {self.root / tag}"
            if previous is None:  # a resume refuses checkpoint folders without `latest`
                return (
                    f"{done} holds the whole checkpoint, but {latest} was not written. {fix}, and write '{tag}' "
                    f"into {latest}: the run resumes from it (it refuses to start while {latest} is missing)"
                )
            if previous.name == tag:
                return f"{done} is complete and {latest} names it. {fix}: the run resumes from {tag}"
            return (
                f"{done} holds the whole checkpoint, but {latest} still names {previous.name}. {fix}: the run "
                f"resumes from {previous.name}; to resume from {tag} instead, write '{tag}' into {latest}"
            )
        kept = (
            f"{self.root / 'latest'} still names {previous.name}, which is complete"
            if previous is not None
            else "there is no earlier checkpoint"
        )
        return (
            f"{who} could not write checkpoint {tag} in {self.root} ({cause}); nothing else was changed: {kept}, and "
            f"the unfinished {tmp_dir.name} is removed at the next save. {fix}: the run resumes from "
            f"{previous.name if previous else 'the start'}"
        )

    def verify(self, ckpt_dir: Path, cfg: RunConfig, dataset_dir: Path | None = None):
        """Refuse a checkpoint that a resume on this world size could not read whole
        (CheckpointError naming the file and the newest complete checkpoint) or whose model
        config differs (ConfigError). Records the world size that saved it; loads nothing.
        Returns what `export.source.inspect` read of it (its step, tokens seen, ...).

        Each rank reads its own files: a refusal on one rank (its file of the checkpoint damaged)
        is raised on every rank, naming it (a collective)."""
        with refusal_shared(CheckpointError):
            try:
                saved = verify(ckpt_dir, self.world_size, dataset_dir, self.rank)
            except CheckpointError as err:
                raise CheckpointError(_refusal(ckpt_dir, str(err), self.world_size, dataset_dir, self.rank)) from None
        problem = checksum_problem(ckpt_dir, self.rank, self.world_size)  # a collective: each rank reads a share
        if problem is not None:
            raise CheckpointError(_refusal(ckpt_dir, problem, self.world_size, dataset_dir, self.rank))
        with refusal_shared(CheckpointError, ConfigError):
            self.saved_world = saved.dp_world_size
            check_zero_stage_change(saved.cfg.train.zero_stage, cfg.train.zero_stage, ckpt_dir)
            check_dtype_change(saved.cfg.train.dtype, cfg.train.dtype, ckpt_dir)
            saved_config = ckpt_dir / "config.yaml"
            check_compatible(OmegaConf.to_container(OmegaConf.load(saved_config))["model"], cfg, ckpt_dir)
            self.schedule_change = check_resumed_schedule(saved.cfg, cfg, saved.step, ckpt_dir.name)
            change = mixture_change(saved.cfg.data, cfg.data)
            self.mixture_change = f"data.sources changed from step {saved.step}: {change}" if change else None
        return saved

    def reshards(self) -> bool:
        """True if the checkpoint `verify` passed last was saved by another number of ranks than this run's."""
        return self.saved_world is not None and self.saved_world != self.world_size

    def needs_universal_load(self, ckpt_dir: Path | None) -> bool:
        """True if resuming `ckpt_dir` needs DeepSpeed's universal checkpoint (`checkpoint.load_universal`)."""
        from pretrain.resharding import dense_state_is_partitioned

        return ckpt_dir is not None and self.reshards() and dense_state_is_partitioned(ckpt_dir)

    def load(self, ckpt_dir: Path) -> str | None:
        """Restore every tracked item from `ckpt_dir`; on another world size (or data layout:
        workers, micro-batch, shuffle buffer), re-partition them and return a line saying what changed.

        Call `verify` first. Every file is read with the weights-only unpickler, DeepSpeed's too."""
        from pretrain.export.dense import weights_only_loads

        def read(rank: int) -> dict:  # memory-mapped: a reshard reads only the tensors it uses
            return torch.load(rank_file(ckpt_dir, rank), map_location="cpu", weights_only=True, mmap=True)

        # all old ranks' states when the world size changed, or the data layout did (workers, micro-batch)
        own = None if self.reshards() else read(self.rank)
        reshard = own is None or self.rank_state.needs_reshard(own)
        rank_states = [read(r) for r in range(self.saved_world)] if reshard else [own]
        dense_dir = self._universal_form(ckpt_dir) if self.needs_universal_load(ckpt_dir) else ckpt_dir
        group_settings = [{k: v for k, v in g.items() if k != "params"} for g in self.engine.optimizer.param_groups]
        with weights_only_loads():  # DeepSpeed's own torch.load passes weights_only=False
            _, client_state = self.engine.load_checkpoint(
                str(dense_dir.parent), tag=dense_dir.name, load_optimizer_states=True, load_lr_scheduler_states=True
            )
        if client_state is None:
            raise CheckpointError(f"DeepSpeed could not load the checkpoint in {dense_dir} (missing files?)")
        if dense_dir != ckpt_dir:
            self._repair_universal_load(group_settings)
        self.memory_parallel.load(ckpt_dir)
        self.train_state.load_state_dict(client_state)
        if not reshard:
            self.rank_state.load_state_dict(rank_states[0])
            return None
        merged = self.rank_state.load_resharded(rank_states)
        if not self.reshards():
            return f"the data layout changed (data.num_workers, train.micro_batch or data.shuffle_buffer), re-planned: {merged}"
        dense = "DeepSpeed universal checkpoint" if dense_dir != ckpt_dir else "whole in the model states"
        return (
            f"re-partitioned from {self.saved_world} ranks to {self.world_size}: dense state {dense}; "
            f"value shards re-split; {merged}"
        )

    def _repair_universal_load(self, group_settings: list[dict]) -> None:
        """Undo two faults of DeepSpeed's ZeRO-3 universal load (deepspeed 0.19,
        `load_hp_checkpoint_state_from_checkpoint_dir_stage3`), found by tests/train/test_world_change.py:
        it gives every parameter group the first group's settings (weight decay on the norms and
        keys; ours come from the config, so they are put back), and it stores one `step` tensor in
        every sub-group's state, which the fused AdamW then increments once per sub-group."""
        for group, settings in zip(self.engine.optimizer.param_groups, group_settings):
            group.update(settings)
        base = getattr(self.engine.optimizer, "optimizer", self.engine.optimizer)
        for state in base.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()

    def _universal_form(self, ckpt_dir: Path) -> Path:
        """Rank 0 converts, every rank waits; a failed conversion is raised on every rank."""
        from pretrain.resharding import convert_to_universal, universal_dir

        with refusal_shared(CheckpointError):
            if self.rank == 0:
                convert_to_universal(ckpt_dir, self.saved_world)
        return universal_dir(ckpt_dir)

    def unfinished(self) -> list[Path]:
        """Checkpoints whose writing was cut off (`.tmp-step_*`: a run killed or out of disk while
        saving), which a resume ignores; removed at the next save."""
        return sorted(p for p in self.root.glob(TMP_PREFIX + "step_*") if p.is_dir()) if self.root.is_dir() else []

    def _remove_stale_temporaries(self) -> None:
        """Unfinished checkpoints and universal conversions, and the temporaries of atomic writes
        a killed process left (`.<name>.tmp-<pid>@<host>-…`, pretrain.files)."""
        if self.root.is_dir():
            for stale in [*self.root.glob(TMP_PREFIX + "*"), *self.root.glob(f".*{TEMP_MARK}*")]:
                discard(stale)


# ZeRO 1 and 2 save the same partitioned optimizer state, so a resume may switch between them;
# ZeRO 0 and 3 lay theirs out otherwise, and DeepSpeed cannot load one stage's as another's.
ZERO_STAGES_INTERCHANGEABLE = {1, 2}


def check_zero_stage_change(saved: int, now: int, ckpt_dir: Path) -> None:
    """Refuse (ConfigError) a resume at another ZeRO stage DeepSpeed cannot load, before loading:
    it would fail inside DeepSpeed's load (0 -> 1: FileNotFoundError, 1 -> 0: AttributeError,
    2 -> 3: AssertionError)."""
    if saved != now and not {saved, now} <= ZERO_STAGES_INTERCHANGEABLE:
        raise ConfigError(
            f"{ckpt_dir.name} was saved at train.zero_stage={saved}; it resumes at that stage, or between "
            f"1 and 2 (their optimizer states are laid out alike), not at {now}: set train.zero_stage={saved}, "
            "or start a new run (train.run_dir, or train.init_from to keep the weights) at the new stage"
        )


def check_dtype_change(saved: str, now: str, ckpt_dir: Path) -> None:
    """Refuse (ConfigError) a resume in another train.dtype, before loading: DeepSpeed keeps the
    optimizer state of each precision in another layout and failed inside its load (fp32 -> bf16:
    KeyError 'dynamic_loss_scale'; bf16 -> fp32: KeyError 'param_groups')."""
    if saved != now:
        raise ConfigError(
            f"{ckpt_dir.name} was saved at train.dtype={saved}; it resumes only at that precision, not at {now} "
            f"(DeepSpeed lays out each precision's optimizer state otherwise): set train.dtype={saved}, or start a "
            "new run in the new precision from this one's weights (memlayers-export, then train.init_from)"
        )


def prune_checkpoints(root: Path, keep: int, saved: str) -> list[Path]:
    """Delete all but the `keep` newest checkpoints up to `saved` (the tag just written, which
    is always kept); return what was deleted. Checkpoints of later steps than `saved` are left
    alone: they belong to a run that was rolled back (`latest` set to an earlier checkpoint),
    and each is replaced when this run saves that step again. Only folders named by `tag_for`
    count: one moved aside beside them (`step_00000010.damaged`) is neither a checkpoint kept
    nor one to delete. Ordered by step number (a 9-digit step sorts after an 8-digit one).

    Each is renamed to `.tmp-pruned-<tag>` before it is deleted: a deletion cut short (a kill)
    leaves a temporary, removed at the next save, never a half-deleted `step_*` folder, which
    looked like a checkpoint (one without checksums.json is resumed from unchecked)."""
    last = step_of(Path(saved))
    timeline = [p for p in checkpoint_folders(root) if step_of(p) <= last]
    old = timeline[: max(0, len(timeline) - max(1, keep))]
    for folder in old:
        doomed = folder.with_name(f"{TMP_PREFIX}pruned-{folder.name}")
        try:
            os.replace(folder, doomed)
        except OSError:
            doomed = folder  # removed in place, as far as it goes
        shutil.rmtree(doomed, ignore_errors=True)
    return old


def verify(ckpt_dir: Path, world_size: int, dataset_dir: Path | None = None, rank: int | None = None):
    """Check every file a resume with `world_size` ranks reads: present, whole, readable with
    the weights-only unpickler; return what `export.source.inspect` found (the saving world
    size, step, config). The
    per-rank files `rank` reads (ours, and ZeRO's optimizer and stage-3 model states) are parsed
    weights-only: its own, or all of them when the world size changed (DeepSpeed's on rank 0, which
    converts them); the others are checked for completeness. Raises CheckpointError naming the first bad file."""
    from pretrain.export.dense import weights_only_loads
    from pretrain.export.errors import ExportError
    from pretrain.export.source import check_torch_zip, inspect

    try:
        # config, DeepSpeed files (model states read weights-only), value shards, table
        source = inspect(ckpt_dir, dataset_dir)
        saved_world = source.dp_world_size
        for other in range(saved_world):
            check_torch_zip(rank_file(ckpt_dir, other))
        if rank is not None:
            readers = [rank] if saved_world == world_size else range(saved_world)
            for other in readers:
                path = rank_file(ckpt_dir, other)
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # parsed; tensors not read
            # DeepSpeed's partitioned files, parsed where its load reads them: this rank's own, or all
            # of them on rank 0, which converts them alone when the world size changed
            readers = [rank] if saved_world == world_size else range(saved_world) if rank == 0 else []
            partitioned = [source.optim_files[r] for r in readers if source.optim_files]
            if source.zero_stage == 3:
                partitioned += [ckpt_dir / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in readers]
            with weights_only_loads():
                for path in partitioned:
                    torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except ExportError as err:
        raise CheckpointError(str(err)) from None
    except OSError as err:  # raised on the rank that met it (its node's mount, a flaky read): told to all by the caller
        raise CheckpointError(unreadable(err)) from None
    except (pickle.UnpicklingError, RuntimeError) as err:
        raise CheckpointError(
            f"{path} cannot be read as tensors and plain values (refused, nothing in it executed): {err}"
        ) from None
    return source


def _refusal(ckpt_dir: Path, problem: str, world_size: int, dataset_dir: Path | None, rank: int | None = None) -> str:
    """The message for a damaged checkpoint: the file, and the newest earlier checkpoint that passes
    the checks `rank`'s resume would make of it."""
    step = step_of(ckpt_dir)
    older = [p for p in checkpoint_folders(ckpt_dir.parent) if p != ckpt_dir and (step is None or step_of(p) < step)]
    older.reverse()  # the newest first
    usable = None
    for candidate in older:
        try:
            verify(candidate, world_size, dataset_dir, rank)
        except CheckpointError:
            continue
        if checksum_problem(candidate, collective=False) is None:  # on one rank only, maybe: no collective
            usable = candidate
            break
    if usable is not None:
        fix = (
            f"to resume from the previous complete checkpoint, move {ckpt_dir} aside and write "
            f"'{usable.name}' into {ckpt_dir.parent / 'latest'}"
        )
    else:
        fix = f"no earlier complete checkpoint exists: restore {ckpt_dir} from a copy, or use a new train.run_dir"
    return f"cannot resume from checkpoint {ckpt_dir}: {problem}. Nothing was loaded or changed; {fix}"


def _torch_save_to(obj, path: Path) -> None:
    # through a Python file object: torch's own file writer (given a path) drops the errno of a
    # refused write, which is then the context of its RuntimeError
    with open(path, "wb") as file:
        torch.save(obj, file)


def _atomic_torch_save(obj, path: Path) -> None:
    atomic_write(path, lambda tmp: _torch_save_to(obj, tmp))
