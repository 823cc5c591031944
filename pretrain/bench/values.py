"""Benchmark of the value-pool update: dense (adamw) vs row-sparse (sparse_adamw) against N.

Two measurements, each side by side in one process so that their ratios hold even on a
shared, noisy machine (the variants alternate, and each reports the median):

* `step_sweep`: one full training step -- forward, backward, the value path
  (reduce_gradients, clip_grad_norm, step, zero_grad) and the trainer's AdamW on the dense
  weights -- of a one-layer memory model, for each pool size N at a fixed batch.
  Memory is read from the kernel (Linux /proc/self/status, VmRSS and VmHWM, the
  high-water mark reset through /proc/self/clear_refs before each step, after the C
  heap's free pages were returned with malloc_trim so that reused memory counts):
  `step_peak` is the process's peak resident memory during the step, `step_extra` that peak minus the
  resident memory just before the step (what the step itself allocates: gradients,
  temporaries), `resident` the memory held between steps (table + optimizer state).
  With device "cuda" the kernels are Triton's and the memory is torch.cuda's allocator
  peak above what was allocated before the step.
* `layer_compare`: forward + backward of one memory layer at N slots, memlayers' dense
  and sparse value gradients and, when importable, lucidrains' `product-key-memory`
  0.3.0 `PKM` at the same shapes (install it outside the project's environment).
"""

from __future__ import annotations

import dataclasses
import gc
import statistics
import time
from dataclasses import dataclass

import torch

from pretrain import peak_memory
from pretrain.bench.model import memory_model_config
from pretrain.config import OptimConfig
from pretrain.dense_optimizer import build_dense_optimizer
from pretrain.model.config import ModelConfig
from pretrain.model.objective import language_model_loss
from pretrain.parallel.groups import init_memory_groups
from pretrain.parallel.memory_parallel import build_sharded_model

# optim.value_optimizer[:bf16] (":bf16": optim.value_momentum_dtype=bfloat16)
VARIANTS = ("adamw", "sparse_adamw", "sparse_rowwise_adamw", "sparse_rowwise_adamw:bf16")
SPARSE_VARIANTS = VARIANTS[1:]
PKM_INSTALL = (
    "pip install --no-deps --target /tmp/pkm product-key-memory==0.3.0 colt5-attention local-attention "
    "hyper-connections  (einops must be importable), then run with PYTHONPATH=/tmp/pkm"
)


@dataclass
class StepSpec:
    n_keys: tuple[int, ...] = (64, 256, 1024, 4096)  # N = n_keys**2: 4K, 64K, 1M, 16.7M slots
    v_dim: int = 64
    dim: int = 256
    heads: int = 4
    k: int = 32
    k_dim: int = 64
    batch: int = 4
    seq_len: int = 256
    micro_batches: int = 1  # backward passes accumulated per step (rows_read: the last one's)
    repeats: int = 3
    dense_max_slots: int = 1 << 20  # the dense path needs another N x v_dim gradient: skip it above this
    variants: tuple[str, ...] = VARIANTS
    device: str = "cpu"  # "cuda": Triton kernels, memory from torch.cuda's allocator statistics


def _model_config(spec: StepSpec, n_keys: int) -> ModelConfig:
    return memory_model_config(
        dim=spec.dim,
        n_layers=1,
        seq_len=spec.seq_len,
        n_keys=n_keys,
        heads=spec.heads,
        k=spec.k,
        k_dim=spec.k_dim,
        v_dim=spec.v_dim,
    )


class _StepRunner:
    """One model + optimizers for one (N, variant); `step()` runs one full training step."""

    def __init__(self, spec: StepSpec, n_keys: int, variant: str):
        cfg = _model_config(spec, n_keys)
        optimizer, _, momentum = variant.partition(":")
        self.optim = dataclasses.replace(
            OptimConfig(), value_optimizer=optimizer, value_momentum_dtype="bfloat16" if momentum else "float32"
        )
        kernel = "torch" if spec.device == "cpu" else "auto"
        self.model, self.values = build_sharded_model(
            cfg, init_memory_groups(1), self.optim, kernel=kernel, device=spec.device
        )
        self.dense = build_dense_optimizer(self.model, self.optim)  # the trainer's (fused AdamW)
        gen = torch.Generator().manual_seed(0)
        shape = (spec.micro_batches, spec.batch, spec.seq_len + 1)
        self.tokens = torch.randint(0, cfg.vocab_size, shape, generator=gen).to(spec.device)

    def resident_bytes(self) -> int:
        """Weights, value shards and both optimizers' states: what stays allocated between steps."""
        tensors = [*self.model.parameters(), *self.values.parameters()]
        for opt in (self.dense, self.values.optimizer):
            tensors += [t for st in opt.state.values() for t in st.values() if torch.is_tensor(t)]
        return sum(t.numel() * t.element_size() for t in tensors)

    def step(self) -> None:
        for tokens in self.tokens:  # the sparse paths add each micro-batch's rows to the held ones
            language_model_loss(self.model(tokens[:, :-1]), tokens[:, 1:]).backward()
        self.values.reduce_gradients()
        self.values.clip_grad_norm(self.optim.grad_clip)
        self.dense.step()
        self.values.step(1.0)
        self.dense.zero_grad(set_to_none=True)
        self.values.zero_grad()


def value_bytes_per_slot(variant: str, v_dim: int) -> int:
    """Bytes one value slot holds in `variant` (fp32 table): the row, its optimizer state (two
    fp32 moments; the row-wise second moment is one fp32 per row; ":bf16" stores the first in
    bf16), and for dense adamw the dense fp32 gradient it keeps between backward and step."""
    optimizer, _, momentum = variant.partition(":")
    first = 2 if momentum else 4
    if optimizer == "adamw":
        return 4 * v_dim * 4  # row, two moments, gradient
    if optimizer == "sparse_adamw":
        return (4 + first + 4) * v_dim
    return (4 + first) * v_dim + 4  # sparse_rowwise_adamw


def pool_bytes(spec: StepSpec, n_keys: int) -> int:
    """What the value pools of every variant built together at N = n_keys**2 hold: step_sweep
    builds them side by side, so this is the least memory the N needs (temporaries come on top)."""
    slots = n_keys * n_keys
    variants = [v for v in spec.variants if v != "adamw" or slots <= spec.dense_max_slots]
    return sum(slots * value_bytes_per_slot(v, spec.v_dim) for v in variants)


def available_bytes(device: str) -> int:
    """Free memory on `device`: the CUDA device's free bytes, or the kernel's MemAvailable."""
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 1 << 62  # not Linux: no check


def step_sweep(spec: StepSpec, progress=None) -> list[dict]:
    """One record per (N, variant): median step wall and CPU seconds, memory in bytes.

    For each N the variants are built together and their steps alternate, so that load
    from other processes hits both alike. Memory per variant: `resident` is the bytes of
    its tensors held between steps (weights, value shards, optimizer states),
    `step_extra` the rise of the process's resident memory during its step above the
    level before it (gradients and temporaries), `step_peak` their sum. Each repeat runs
    a timed step and then a memory step per variant (two steps, so that the memory
    measurement's heap trim does not slow the timed one).
    """
    records = []
    for n in spec.n_keys:
        slots = n * n
        variants = [v for v in spec.variants if v != "adamw" or slots <= spec.dense_max_slots]
        runners = {v: _StepRunner(spec, n, v) for v in variants}
        for runner in runners.values():
            runner.step()  # warm-up: allocates the optimizer state
        walls, cpus, extras = ({v: [] for v in variants} for _ in range(3))
        # what lives now (the models, the process's modules) is left out of the collections below:
        # each then frees the previous steps' garbage alone, not also walks a heap that a large
        # process (a test session) made take 0.5 s a collection
        gc.collect()
        gc.freeze()
        try:
            _measure(spec, runners, walls, cpus, extras)
        finally:
            gc.unfreeze()
        for variant, runner in runners.items():
            resident = runner.resident_bytes()
            extra = statistics.median(extras[variant])
            records.append(
                {
                    "slots": slots,
                    "n_keys": n,
                    "variant": variant,
                    "step_s": statistics.median(walls[variant]),
                    "step_cpu_s": statistics.median(cpus[variant]),
                    "step_peak": resident + extra,
                    "step_extra": extra,
                    "resident": resident,
                    "rows_read": _rows_read(runner),
                    "step_times_s": walls[variant],  # the raw samples the medians are of
                    "step_cpu_times_s": cpus[variant],
                    "step_extra_samples": extras[variant],
                }
            )
            if progress is not None:
                progress(records[-1])
        del runners
        gc.collect()
    return records


def _measure(spec: StepSpec, runners: dict, walls: dict, cpus: dict, extras: dict) -> None:
    """`spec.repeats` x (a timed step, then a memory step) of each runner, appended per variant."""
    for _ in range(spec.repeats):
        for variant, runner in runners.items():
            gc.collect()
            w0, c0 = time.perf_counter(), time.process_time()
            runner.step()
            if spec.device != "cpu":
                torch.cuda.synchronize()
            walls[variant].append(time.perf_counter() - w0)
            cpus[variant].append(time.process_time() - c0)
            # memory on a step of its own: the heap trim that makes the RSS high-water
            # mark see reused memory also makes the step fault in its temporaries, which
            # a training loop (no trim) does not pay, so that step is not timed
            before = peak_memory.start(spec.device)
            runner.step()
            extras[variant].append(max(peak_memory.peak(spec.device) - before, 0))


def _rows_read(runner: _StepRunner) -> int:
    return sum(layer.last_indices.unique().numel() for layer in runner.model.memory_layers())


@dataclass
class LayerSpec:
    n_keys: int = 1024
    dim: int = 256  # the value width too: product-key-memory's values are model-dim wide
    heads: int = 4
    k: int = 32
    k_dim: int = 256  # product-key-memory's dim_head (128) is the half-key width
    batch: int = 4
    seq_len: int = 256
    repeats: int = 5


def _memlayers_layer(spec: LayerSpec, value_grad: str):
    from pretrain.model.memory import MemoryPlus
    from pretrain.parallel.values import PartitionedValueTable

    cfg = memory_model_config(
        dim=spec.dim, n_layers=1, seq_len=spec.seq_len, n_keys=spec.n_keys, heads=spec.heads, k=spec.k, k_dim=spec.k_dim
    )
    layer = MemoryPlus(cfg)
    table = PartitionedValueTable(
        spec.n_keys**2, spec.dim, init_memory_groups(1), kernel="torch", value_grad=value_grad
    )
    return (lambda x: layer(x, table)), [*layer.parameters(), table.shard]


def _pkm_layer(spec: LayerSpec):
    try:
        from product_key_memory import PKM
    except ImportError:
        return None
    layer = PKM(spec.dim, heads=spec.heads, num_keys=spec.n_keys, topk=spec.k, dim_head=spec.k_dim // 2)
    return layer, list(layer.parameters())


def layer_compare(spec: LayerSpec) -> list[dict]:
    """Median forward+backward wall and CPU seconds of one memory layer per implementation,
    the implementations interleaved (gradients set to None before each, as an optimizer would)."""
    torch.manual_seed(0)
    runs = {"memlayers dense": _memlayers_layer(spec, "sorted"), "memlayers sparse": _memlayers_layer(spec, "sparse")}
    pkm = _pkm_layer(spec)
    if pkm is not None:
        runs["product-key-memory 0.3.0"] = pkm
    x = torch.randn(spec.batch, spec.seq_len, spec.dim, generator=torch.Generator().manual_seed(1))
    grad = torch.randn_like(x)
    walls: dict[str, list[float]] = {name: [] for name in runs}
    cpus: dict[str, list[float]] = {name: [] for name in runs}
    for rep in range(spec.repeats + 1):
        for name, (fn, params) in runs.items():
            for p in params:
                p.grad = None
            w0, c0 = time.perf_counter(), time.process_time()
            fn(x).backward(grad)
            if rep:  # the first round warms up
                walls[name].append(time.perf_counter() - w0)
                cpus[name].append(time.process_time() - c0)
    return [
        {
            "layer": name,
            "fwd_bwd_s": statistics.median(walls[name]),
            "fwd_bwd_cpu_s": statistics.median(cpus[name]),
            "fwd_bwd_times_s": walls[name],
            "fwd_bwd_cpu_times_s": cpus[name],
        }
        for name in runs
    ]
