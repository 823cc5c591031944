"""`average_exports`: several exports of one model -> an export of their weighted mean.

Checkpoint averaging (LAWA, the averaged end of a warmup-stable-decay run) smooths the
noise of the last steps at no training cost. Every input must be an export of the same model
(config.json's "model" but for how it runs, the same tokenizer, the same tensors); the mean is
taken in float64 and written in the inputs' dtype, one row block (64 MiB of float64) of one
tensor at a time, so neither the value pool nor the dense weights are ever held whole. Everything beside the weights (tokenizer, modeling code, probes, the
slot-frequency table) comes from the input with the latest step: the slot table counts every
access of the run up to that step, which is what sparse memory finetuning needs.

Inputs of different training runs (config.json's run_id) are refused unless `allow_other_runs`:
independently trained weights do not average into a working model, and the kept slot table
counts one run's accesses only. Runs that share a start (`train.init_from` of one export, a
model soup) are the legitimate case; they are averaged with a warning naming the runs and the
table kept.
"""

from __future__ import annotations

import json
import math
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from pretrain.config import model_differences
from pretrain.export.errors import ExportError
from pretrain.export.folders import check_export_dir
from pretrain.export.safetensors_io import DTYPES, StreamWriter, read_header, read_rows
from pretrain.export.writer import check_output_folder
from pretrain.files import atomic_directory, file_sha256
from pretrain.progress_bars import progress_bar

WEIGHTS = "model.safetensors"
REQUIRED = ("config.json", WEIGHTS, "tokenizer.model")
BLOCK_BYTES = 64 << 20  # rows read per input at once


@dataclass
class ExportInput:
    dir: Path
    config: dict
    header: dict
    data_start: int
    step: int

    @property
    def run_id(self) -> str:
        """The training run's id ("" for exports written before run ids existed)."""
        return str(self.config.get("memlayers", {}).get("run_id", ""))

    @property
    def tensors(self) -> dict:
        return {k: v for k, v in self.header.items() if k != "__metadata__"}


def _read_input(path: Path) -> ExportInput:
    check_export_dir(path, REQUIRED)
    try:
        config = json.loads((path / "config.json").read_text())
        config["model"]
    except (ValueError, KeyError) as err:
        raise ExportError(f"{path}/config.json is not an export config (no 'model' section: {err})") from None
    header, start = read_header(path / WEIGHTS)
    step = config.get("memlayers", {}).get("step", header.get("__metadata__", {}).get("step", -1))
    return ExportInput(path, config, header, start, int(step))


def check_inputs(
    dirs: list[str | Path], weights: list[float] | None, allow_other_runs: bool = False
) -> tuple[list[ExportInput], list[float]]:
    """Every input read and compared before any weight is: same model, tokenizer and tensors, and
    (unless `allow_other_runs`) the same training run."""
    if len(dirs) < 2:
        raise ExportError(f"averaging needs at least two exports, got {len(dirs)}")
    weights = [1.0] * len(dirs) if weights is None else [float(w) for w in weights]
    if len(weights) != len(dirs):
        raise ExportError(f"--weights has {len(weights)} values for {len(dirs)} exports: give one per export")
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise ExportError(f"--weights {weights} must be non-negative with a positive sum")
    inputs = [_read_input(Path(d)) for d in dirs]
    first = inputs[0]
    tokenizer = file_sha256(first.dir / "tokenizer.model")
    for other in inputs[1:]:
        diffs = model_differences(first.config["model"], other.config["model"])
        if diffs:
            listed = "; ".join(f"model.{k}: {a!r} vs {b!r}" for k, (a, b) in list(diffs.items())[:5])
            raise ExportError(
                f"{other.dir} holds another model than {first.dir} ({listed}): average exports of one run"
            )
        if file_sha256(other.dir / "tokenizer.model") != tokenizer:
            raise ExportError(f"{other.dir} has another tokenizer.model than {first.dir}: average exports of one run")
        a, b = first.tensors, other.tensors
        mismatched = sorted(
            n for n in set(a) | set(b) if (a.get(n) or {}).get("shape") != (b.get(n) or {}).get("shape")
        )
        if mismatched:
            raise ExportError(
                f"{other.dir}/{WEIGHTS} and {first.dir}/{WEIGHTS} differ in tensors {mismatched[:4]}: re-export both"
            )
        dtypes = {n: (a[n]["dtype"], b[n]["dtype"]) for n in a if a[n]["dtype"] != b[n]["dtype"]}
        if dtypes:
            name, (x, y) = next(iter(dtypes.items()))
            raise ExportError(
                f"{first.dir} and {other.dir} were exported in different dtypes ({name}: {x} vs {y}): "
                "export both with the same --dtype"
            )
    if not allow_other_runs:
        other = next((i for i in inputs[1:] if i.run_id != first.run_id), None)
        if other is not None:
            kept = latest_input(inputs)
            raise ExportError(
                f"{first.dir} (run {_run_name(first)}) and {other.dir} (run {_run_name(other)}) come from different "
                "training runs: independently trained weights do not average into a working model, and the slot "
                f"table kept ({kept.dir}'s) counts one run's accesses only; average exports of one run, or pass "
                "--allow-other-runs if the runs share their start (a model soup of runs begun with train.init_from "
                "from one export)"
            )
    return inputs, weights


def latest_input(inputs: list[ExportInput]) -> ExportInput:
    """The input whose files beside the weights (slot table, tokenizer, probes) the average keeps."""
    return max(inputs, key=lambda i: i.step)


def _run_name(export: ExportInput) -> str:
    return export.run_id or "<none: exported before run ids>"


def _warn_of_other_runs(inputs: list[ExportInput], latest: ExportInput) -> None:
    runs = ", ".join(f"{i.dir}: run {_run_name(i)}" for i in inputs)
    warnings.warn(
        f"averaging exports of different training runs ({runs}): the slot table and run_id kept are "
        f"{latest.dir}'s (run {_run_name(latest)}, step {latest.step}, the latest input), which count that "
        "run's slot accesses only, not the averaged model's",
        stacklevel=2,
    )


def average_exports(
    dirs: list[str | Path],
    out_dir: str | Path,
    weights: list[float] | None = None,
    force: bool = False,
    show_progress: bool = True,
    allow_other_runs: bool = False,
) -> Path:
    """Write to `out_dir` the export whose every tensor is sum_i w_i x_i / sum_i w_i. Exports of
    different training runs are refused unless `allow_other_runs` (then a UserWarning names them)."""
    out_dir = Path(out_dir)
    check_output_folder(out_dir, force, sources=dirs)
    inputs, weights = check_inputs(dirs, weights, allow_other_runs)
    total = sum(weights)
    share = [w / total for w in weights]
    latest = latest_input(inputs)
    if len({i.run_id for i in inputs}) > 1:
        _warn_of_other_runs(inputs, latest)
    names = sorted(latest.tensors, key=lambda n: latest.tensors[n]["data_offsets"][0])
    specs = [(n, tuple(latest.tensors[n]["shape"]), DTYPES[latest.tensors[n]["dtype"]]) for n in names]
    metadata = {
        "format": "pt",
        "step": str(latest.step),
        "averaged_from": json.dumps(
            [{"dir": str(i.dir), "step": i.step, "weight": w, "run_id": i.run_id} for i, w in zip(inputs, share)]
        ),
    }
    nbytes = sum(e["data_offsets"][1] - e["data_offsets"][0] for e in latest.tensors.values())
    with atomic_directory(out_dir) as tmp:
        bar = progress_bar(total=nbytes, unit="B", unit_scale=True, desc="average", disable=not show_progress)
        with bar, StreamWriter(tmp / WEIGHTS, specs, metadata=metadata) as writer:
            for name, shape, dtype in specs:
                for block in _mean_row_blocks(inputs, share, name, shape):
                    writer.write(block.to(dtype))
                    bar.update(block.numel() * torch.empty((), dtype=dtype).element_size())
        for item in latest.dir.iterdir():
            if item.name not in (WEIGHTS, "config.json", "README.md") and item.is_file():
                shutil.copyfile(item, tmp / item.name)
        config = dict(latest.config)
        config["memlayers"] = {**config.get("memlayers", {}), "averaged_from": json.loads(metadata["averaged_from"])}
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "README.md").write_text(_card(latest, inputs, share))
    return out_dir


def _mean_row_blocks(inputs: list[ExportInput], share: list[float], name: str, shape: tuple[int, ...]):
    total_rows = shape[0] if shape else 1  # read_rows reads a 0-d tensor as one row
    rows = max(1, BLOCK_BYTES // (8 * math.prod(shape[1:])))  # rows of the float64 accumulator
    for r0 in range(0, total_rows, rows):
        r1 = min(r0 + rows, total_rows)
        acc = None
        for src, w in zip(inputs, share):
            part = read_rows(src.dir / WEIGHTS, src.header, src.data_start, name, r0, r1).to(torch.float64) * w
            acc = part if acc is None else acc.add_(part)
        yield acc


def _card(latest: ExportInput, inputs: list[ExportInput], share: list[float]) -> str:
    card = (latest.dir / "README.md").read_text() if (latest.dir / "README.md").is_file() else ""
    rows = "\n".join(f"| {i.dir} | {i.step} | {w:.4f} |" for i, w in zip(inputs, share))
    return (
        f"{card.rstrip()}\n\n## Averaged weights\n\nThe weights are the weighted mean of these exports "
        f"(memlayers-average; everything else is from step {latest.step}):\n\n"
        f"| export | step | weight |\n|---|---|---|\n{rows}\n"
    )
