"""Time a config's memory layer, its whole model and each sublayer kind, forward+backward on
one micro-batch, with the memory on the Triton and on the PyTorch path (tools/bench_kernels.py
--layer, the `layer` stage of tools/gpu_check.sh)."""

from __future__ import annotations

from pathlib import Path

import torch

from kernels import benchmark as kb
from pretrain.model.accounting import layer_kinds
from pretrain.model.memory import MemoryPlus, ValueTable
from pretrain.model.objective import language_model_loss, training_objective
from pretrain.model.transformer import Transformer


def bench_layer(
    config: Path,
    device: torch.device,
    dtype_name: str,
    timed,
    rows: list,
    batch: int = 0,
    seq: int = 0,
    say=print,
    compiled: bool = True,
) -> list[dict]:
    """A whole MemoryPlus layer (query projection, scoring, bag, gate, output projection)
    forward+backward, and the whole model's forward+backward on one micro-batch, each
    with the memory on the Triton and on the PyTorch path (same weights, same inputs).

    The layer's share of a training step is estimated as (memory layers x one layer's
    time) / the model's forward+backward: the optimizer step and the data-parallel
    communication are not in the denominator (tools/bench_train.py measures whole steps).

    `dtype_name`: bf16 or fp32; `timed(fn)` -> (per-call ms, attempts); `rows` receives each
    row as it is measured (a list, or one that prints); batch/seq 0 take the config's
    micro_batch and seq_len; `compiled`: also the whole model compiled as train.compile compiles
    it (`compiled_model_row`). A config without memory layers is a ValueError.
    """
    from pretrain.config import load_config

    cfg = load_config(config)
    model_cfg = cfg.model
    if not model_cfg.memory.enabled:
        raise ValueError(f"{config}: model.memory.layers is empty; pick a config with memory layers")
    batch, seq = batch or cfg.train.micro_batch, seq or cfg.data.seq_len
    dtype = kb.DTYPES[dtype_name]
    paths = ("triton", "torch") if device.type == "cuda" else ("torch",)
    m = model_cfg.memory
    shape = {
        "config": str(config),
        "batch": batch,
        "seq": seq,
        "dim": model_cfg.dim,
        "heads": m.heads,
        "k": m.k,
        "n_keys": m.n_keys,
        "k_dim": m.k_dim,
        "v_dim": model_cfg.value_dim,
        "dtype": dtype_name,
    }
    layer_ms = memory_layer_rows(model_cfg, device, dtype, paths, timed, rows, shape, say)
    model_ms = model_rows(model_cfg, device, dtype, paths, layer_ms, timed, rows, shape, say, compiled)
    add_speedups(rows)
    for path in paths:
        say(
            f"{path:6s}: memory layer fwd+bwd {layer_ms[path]:.3f} ms, model fwd+bwd {model_ms[path]:.3f} ms, "
            f"{len(m.layers)} memory layers ~ {100 * len(m.layers) * layer_ms[path] / model_ms[path]:.1f}% of it"
        )
    return list(rows)


def _materialise(module, model_cfg, device: torch.device, dtype: torch.dtype):
    """`module`, built on the meta device, drawn on `device` (a 1M-row table drawn on the CPU takes long)."""
    module = module.to_empty(device=device)
    for name, p in module.named_parameters():
        if name.endswith("keys1") or name.endswith("keys2"):
            continue
        torch.nn.init.normal_(p, std=model_cfg.value_dim**-0.5 if p.shape[0] == model_cfg.memory.num_slots else 0.02)
    for layer in module.modules():
        if isinstance(layer, MemoryPlus):
            layer.reset_keys()
        elif isinstance(layer, torch.nn.RMSNorm):
            layer.reset_parameters()
    return module.to(dtype)


def _set_path(module, path: str) -> None:
    """Every memory layer and value table in `module` on the `path` kernels (triton or torch)."""
    for sub in module.modules():
        if isinstance(sub, (MemoryPlus, ValueTable)):
            sub.kernel = path


def memory_layer_rows(model_cfg, device, dtype, paths, timed, rows: list, shape: dict, say=print) -> dict[str, float]:
    """One MemoryPlus layer and its table, forward+backward on a (batch, seq) input per path, each
    followed by its parts' rows (`memory_part_rows`), appended to `rows`; {path: the layer's p50 ms}."""
    m = model_cfg.memory
    with torch.device("meta"):
        layer, table = MemoryPlus(model_cfg), ValueTable(m.num_slots, model_cfg.value_dim)
    layer, table = _materialise(layer, model_cfg, device, dtype), _materialise(table, model_cfg, device, dtype)
    x = torch.randn(shape["batch"], shape["seq"], model_cfg.dim, device=device, dtype=dtype, requires_grad=True)
    probe = torch.randn_like(x)
    inputs = [x, *layer.parameters(), table.weight]
    layer_ms = {}
    for path in paths:
        _set_path(layer, path)
        _set_path(table, path)
        t, attempts = timed(lambda: torch.autograd.grad(layer(x, table), inputs, probe))
        layer_ms[path] = kb.percentiles(t)["p50"]
        rows.append(kb.record(f"memory_layer_fwd_bwd_{path}", t, None, None, attempts=attempts, **shape))
        rows.extend(memory_part_rows(layer, table, x, path, layer_ms[path], timed, shape, say))
    return layer_ms


def model_rows(
    model_cfg, device, dtype, paths, layer_ms: dict, timed, rows: list, shape: dict, say=print, compiled: bool = True
) -> dict[str, float]:
    """The whole model's forward+backward per path (with the memory layers' estimated share, from
    `layer_ms`), then on the first path its sublayer kinds (`layer_kind_rows`) and, with
    `compiled`, the compiled model (`compiled_model_row`), appended to `rows`; {path: p50 ms}."""
    m = model_cfg.memory
    with torch.device("meta"):
        model = Transformer(model_cfg)
    model = _materialise(model, model_cfg, device, dtype)
    tokens = torch.randint(0, model_cfg.vocab_size, (shape["batch"], shape["seq"] + 1), device=device)
    params = [p for p in model.parameters() if p.requires_grad]
    model_ms = {}
    for path in paths:
        _set_path(model, path)
        t, attempts = timed(
            lambda: torch.autograd.grad(language_model_loss(model(tokens[:, :-1]), tokens[:, 1:]), params)
        )
        model_ms[path] = kb.percentiles(t)["p50"]
        share = len(m.layers) * layer_ms[path] / model_ms[path]
        rows.append(
            kb.record(
                f"model_fwd_bwd_{path}",
                t,
                None,
                None,
                attempts=attempts,
                memory_layers=len(m.layers),
                memory_share_estimate=share,
                **shape,
            )
        )
    _set_path(model, paths[0])  # the loop above left the model on the last path
    rows.extend(layer_kind_rows(model, tokens, paths[0], model_ms[paths[0]], timed, shape, say))
    if compiled:
        rows.append(compiled_model_row(model, tokens, params, paths[0], model_ms[paths[0]], timed, shape, say))
    return model_ms


def add_speedups(rows: list) -> None:
    """Give each Triton row its `speedup` over the PyTorch row of the same name (the layer, its
    parts, the model). Rows with no such twin get none: the sublayer kinds are timed on one path,
    and `kind_unattributed_*` has no p50."""
    torch_ms = {r["name"].removesuffix("_torch"): r.get("p50") for r in rows if r["name"].endswith("_torch")}
    for row in rows:
        if not row["name"].endswith("_triton"):
            continue
        twin = torch_ms.get(row["name"].removesuffix("_triton"))
        if twin is not None and twin > 0 and row.get("p50", 0) > 0:  # a part's `rest` is a difference
            row["speedup"] = twin / row["p50"]


def compiled_model_row(model, tokens, params, path: str, eager_ms: float, timed, shape: dict, say=print) -> dict:
    """The whole model's forward+backward compiled as train.compile compiles it (each block,
    and the objective on its own: pretrain.parallel.compile), against the eager time measured
    before. A compiled training step (tools/bench_train.py) minus this row is what the step adds
    around the model: optimizer steps, DeepSpeed's gradient handling, the value update.

    The row also holds `grad_max_rel_diff`, the largest gradient difference to eager (relative to
    each gradient's largest entry): in fp32 a compiled model that computed something else is seen
    here; in bf16 a few percent is expected (inductor rounds once where eager rounds after each
    op, and a query rounded otherwise can select another top-k slot).
    `model` is compiled in place (its blocks' forwards replaced); build a new one to go on eager."""
    from pretrain.parallel.compile import apply_compile, compile_objective

    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    eager = torch.autograd.grad(language_model_loss(model(inputs), targets), params)
    apply_compile(model)
    objective = compile_objective(training_objective)

    def fwd_bwd():
        return torch.autograd.grad(objective(model(inputs), targets).total, params)

    diff = max(
        ((c.float() - e.float()).abs().max() / e.float().abs().max().clamp_min(1e-30)).item()
        for c, e in zip(fwd_bwd(), eager)  # the first call compiles
    )
    t, attempts = timed(fwd_bwd)
    row = kb.record(f"model_fwd_bwd_{path}_compiled", t, None, None, attempts=attempts, **shape)
    row.update(compile_speedup=eager_ms / row["p50"], grad_max_rel_diff=diff)
    say(
        f"{path:6s}: model fwd+bwd compiled {row['p50']:.3f} ms ({row['compile_speedup']:.2f}x eager); "
        f"largest gradient difference to eager {diff:.1e} of the gradient's largest entry"
    )
    return row


def memory_part_rows(layer, table, x, path: str, layer_ms: float, timed, shape: dict, say=print) -> list[dict]:
    """Where one memory layer's forward+backward goes, each part timed alone on the layer's own
    inputs: `scoring` (query projection, product-key top-k and softmax; gradients of x, the
    projection and both key sets), `bag` (the weighted sum of value rows; gradients of the
    table and the weights), and the `rest` of the layer's time (gate and output projections,
    SiLU, casts; negative when the parts alone are slower than inside the layer)."""
    scoring_inputs = [x, layer.query_proj.weight, layer.keys1, layer.keys2, *layer.query_norm.parameters()]
    with torch.no_grad():
        weights, indices = layer.search(x)
    weights = weights.detach().requires_grad_(True)
    score_probe = torch.randn_like(weights)
    bag_probe = torch.randn(indices.shape[0], table.weight.shape[1], device=x.device, dtype=x.dtype)
    parts = {
        "scoring": lambda: torch.autograd.grad(layer.search(x)[0], scoring_inputs, score_probe),
        "bag": lambda: torch.autograd.grad(table(indices, weights), [table.weight, weights], bag_probe),
    }
    rows, attributed = [], 0.0
    for part, run in parts.items():
        t, attempts = timed(run)
        row = kb.record(f"memory_part_{part}_fwd_bwd_{path}", t, None, None, attempts=attempts, **shape)
        row["share_of_layer"] = row["p50"] / layer_ms
        attributed += row["p50"]
        rows.append(row)
    rows.append(
        {"name": f"memory_part_rest_{path}", "p50": layer_ms - attributed, "share_of_layer": 1 - attributed / layer_ms}
    )
    say(f"one memory layer ({path} path, {layer_ms:.3f} ms forward+backward), parts timed alone:")
    for row in rows:
        part = row["name"].removeprefix("memory_part_").removesuffix(f"_{path}").removesuffix("_fwd_bwd")
        say(f"  {part:<8} {row['p50']:9.3f} ms {100 * row['share_of_layer']:6.1f}%")
    return rows


def layer_kind_rows(model, tokens, path: str, model_ms: float, timed, shape: dict, say=print) -> list[dict]:
    """Where the model's forward+backward goes: each sublayer kind (pretrain.model.layer_kinds)
    timed alone on the same micro-batch, forward+backward with its norm: attention, SwiGLU FFN,
    memory (on `path`), and the output head (embedding, final norm, output layer, loss).
    Rows: one layer's time, x its count, the share of the whole model's time and TFLOP/s on
    the counted FLOPs; a last row holds what the kinds leave unattributed (residual adds,
    launch gaps; negative when timing alone is slower than inside the model)."""
    cfg, (batch, seq) = model.cfg, (tokens.shape[0], tokens.shape[1] - 1)
    blocks = list(model.layers)
    dense_block = next((b for b in blocks if not b.is_memory), None)
    memory_block = next((b for b in blocks if b.is_memory), None)
    x = torch.randn(batch, seq, cfg.dim, device=tokens.device, dtype=next(model.parameters()).dtype)
    x.requires_grad_(True)
    probe = torch.randn_like(x)
    freqs = model.rotary(seq, x.device)

    def grads(out, *modules):
        leaves = [x] + [p for mod in modules for p in mod.parameters() if p.requires_grad]
        return torch.autograd.grad(out, leaves, probe if out.dim() else None)

    run = {
        "attention": lambda b=blocks[0]: grads(b.attention(b.attention_norm(x), freqs), b.attention_norm, b.attention),
        "output_head": lambda: grads(
            language_model_loss(model.output(model.norm(x + model.tok_embeddings(tokens[:, :-1]))), tokens[:, 1:]),
            model.tok_embeddings,
            model.norm,
            model.output,
        ),
    }
    if dense_block is not None:
        run["ffn"] = lambda b=dense_block: grads(b.ffn(b.ffn_norm(x)), b.ffn_norm, b.ffn)
    if memory_block is not None:
        table = model.value_table_for(0)
        run["memory"] = lambda b=memory_block: grads(b.ffn(b.ffn_norm(x), table), b.ffn_norm, b.ffn, table)
    rows, attributed = [], 0.0
    for kind in layer_kinds(cfg, seq):
        if kind.count == 0:
            continue
        t, attempts = timed(run[kind.name])
        flops = kind.flops_per_token * batch * seq
        row = kb.record(f"kind_{kind.name}_fwd_bwd_{path}", t, None, None, flops, attempts=attempts, **shape)
        row.update(count=kind.count, total_ms=kind.count * row["p50"], share=kind.count * row["p50"] / model_ms)
        attributed += row["total_ms"]
        rows.append(row)
    rows.append(
        {"name": f"kind_unattributed_{path}", "total_ms": model_ms - attributed, "share": 1 - attributed / model_ms}
    )
    say(f"where the model's forward+backward goes ({path} path, {model_ms:.3f} ms, sublayers timed alone):")
    for row in rows:
        kind = row["name"].removeprefix("kind_").removesuffix(f"_{path}").removesuffix("_fwd_bwd")
        each = f"{row['count']:3d} x {row['p50']:8.3f} ms" if "count" in row else " " * 18
        rate = f"{row['tflop_s']:8.1f} TFLOP/s" if "tflop_s" in row else ""
        say(f"  {kind:<13} {each} = {row['total_ms']:9.3f} ms {100 * row['share']:6.1f}% {rate}")
    return rows
