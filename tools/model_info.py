"""Print a config's model size: parameter counts, training FLOPs per token and the memory per GPU.

The model is built on the meta device, so paper-scale configs cost no memory:

  python tools/model_info.py --config configs/memory_373m.yaml [key.sub=value ...] [--json]
  memlayers-model-info --config configs/tiny.yaml model.memory.layers=[]
  memlayers-model-info --config configs/smf_1p3b.yaml --world-size 8 --micro-batch 4 \
      train.activation_checkpointing=full --gpu-memory 80

The memory estimate (pretrain/model/memory_budget.py) takes train.zero_stage, train.dtype,
train.activation_checkpointing, model.memory.parallel_size and optim.value_optimizer from the
config and its overrides.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.cli import positive_int, positive_number  # noqa: E402
from pretrain.config import RunConfig, load_config  # noqa: E402
from pretrain.model.accounting import count_parameters, flops_per_token, human_count  # noqa: E402
from pretrain.model.config import ConfigError  # noqa: E402
from pretrain.model.memory_budget import NOT_COUNTED, GiB, estimate_memory, largest_micro_batch  # noqa: E402
from pretrain.words import counted  # noqa: E402

PARAMETER_ROWS = [
    ("dense", "everything outside the memory layers"),
    ("memory_values", "value tables (sparse: not active)"),
    ("memory_keys", "product half-keys"),
    ("memory_other", "query projections and norms, gates, output projections"),
    ("active", "used by every token: all but the values"),
    ("total", ""),
]


def model_info(
    cfg: RunConfig, seq_len: int | None = None, world_size: int = 1, micro_batch: int | None = None, gpu_gib: float = 80
) -> dict:
    """Parameter counts (built on the meta device), training FLOPs per token and memory per GPU of cfg's run."""
    import torch  # here, not at the top: --help and a refused config do not wait for it

    from pretrain.model import Transformer

    with torch.device("meta"):
        model = Transformer(cfg.model)
    counts = count_parameters(model)
    seq_len = seq_len or cfg.data.seq_len
    parameters = {name: getattr(counts, name) for name, _ in PARAMETER_ROWS}
    estimate = estimate_memory(cfg, world_size, micro_batch, seq_len)
    memory = {
        **estimate.settings,
        "dense": estimate.dense,
        "values": estimate.values,
        "activations": estimate.activations,
        "total": estimate.total,
        "gpu_bytes": int(gpu_gib * GiB),
        "fits": estimate.total <= gpu_gib * GiB,
        "largest_micro_batch": largest_micro_batch(cfg, int(gpu_gib * GiB), world_size, seq_len),
        "not_counted": NOT_COUNTED,
    }
    return {
        "parameters": parameters,
        "seq_len": seq_len,
        "flops_per_token": flops_per_token(cfg.model, seq_len),
        "memory_per_gpu": memory,
    }


def format_info(info: dict, cfg: RunConfig, title: str) -> str:
    m, model = cfg.model.memory, cfg.model
    shape = f"{counted(model.n_layers, 'layer')}, dim {model.dim}, {counted(model.n_heads, 'head')}, vocab {model.vocab_size}"
    if m.enabled:
        shape += (
            f"; memory in layers {list(m.layers)}: {m.num_slots:,} slots, k={m.k}, {counted(m.heads, 'head')}, "
            f"value dim {model.value_dim}, {'shared' if m.shared_values else 'per-layer'} values"
        )
    lines = [title, f"  {shape}", "parameters"]
    for name, note in PARAMETER_ROWS:
        n = info["parameters"][name]
        lines.append(f"  {name:<14}{n:>16,}  {human_count(n, '.2f', billion='B'):>8}  {note}".rstrip())
    lines.append(f"training FLOPs per token (forward + backward, seq_len {info['seq_len']})")
    for name, n in info["flops_per_token"].items():
        lines.append(f"  {name:<14}{int(n):>16,}  {human_count(n, '.2f'):>8}")
    return "\n".join(lines + format_memory(info["memory_per_gpu"]))


def format_memory(m: dict) -> list[str]:
    ac, P = m["activation_checkpointing"], m["memory_parallel_size"]
    lines = [
        f"memory per GPU (estimate: {m['world_size']} GPU(s), micro-batch {m['micro_batch']} x {m['seq_len']}, "
        f"{m['dtype']}, ZeRO {m['zero_stage']}, activation checkpointing {ac}, memory parallel {P}, "
        f"{m['value_optimizer']})"
    ]
    for section in ("dense", "values", "activations"):
        for name, n in m[section].items():
            lines.append(f"  {name:<20}{n / GiB:>9.2f} GiB")
    verdict = "fits" if m["fits"] else "does not fit"
    lines.append(f"  {'total':<20}{m['total'] / GiB:>9.2f} GiB  {verdict} in {m['gpu_bytes'] / GiB:g} GiB")
    best = m["largest_micro_batch"]
    lines.append(f"  largest micro-batch that fits: {best}" if best else "  not even micro-batch 1 fits")
    lines.append(f"  {m['not_counted']}")
    return lines


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML config, e.g. configs/tiny.yaml")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    parser.add_argument("--seq-len", type=positive_int, default=None, help="for FLOPs (default: data.seq_len)")
    parser.add_argument("--world-size", type=positive_int, default=1, help="GPUs of the run (memory estimate)")
    parser.add_argument("--micro-batch", type=positive_int, default=None, help="default: train.micro_batch")
    parser.add_argument(
        "--gpu-memory",
        type=positive_number(what="number of GiB"),
        default=80.0,
        help="GiB per GPU for fits / largest micro-batch",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        parser.error(str(err))
    try:
        info = model_info(cfg, args.seq_len, args.world_size, args.micro_batch, args.gpu_memory)
    except ConfigError as err:
        parser.error(str(err))
    print(json.dumps(info) if args.json else format_info(info, cfg, args.config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
