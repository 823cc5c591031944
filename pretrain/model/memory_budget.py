"""Per-GPU memory of a training run, from its config: does it fit, and with which settings.

`estimate_memory(cfg, world_size, micro_batch)` adds up, in bytes per GPU (Psi the parameters
DeepSpeed trains: everything but the value tables; N the world size; e the parameter dtype's
bytes, 2 for bf16, 4 for fp32):

Dense model states at the optimizer step (DeepSpeed 0.19's optimizers, measured on CPU in
tests/model/test_memory_budget.py):
  parameters   e Psi (ZeRO 3: / N)
  gradients    fp32, ZeRO 0: 4 Psi; bf16, ZeRO 0: 2 Psi + 4 Psi (the bf16 gradients and the fp32
               copies the step reads); ZeRO 1: max(e Psi during backward, 4 Psi / N at the step);
               ZeRO 2-3: 4 Psi / N
  fp32 master  bf16, ZeRO 0: 4 Psi; ZeRO >= 1 (fp32 too: DeepSpeed clones the partition): 4 Psi / N
  Adam moments 8 Psi (ZeRO >= 1: / N)
  ZeRO bucket  ZeRO 1-2: DeepSpeed allocates reduce_bucket_size (5e8) elements of the gradient dtype
               during backward (stage_1_and_2.setup_buckets; taken from its source: on a CPU the
               allocation touches no page, so it is not measured)
Value pool (pretrain/parallel: fp32 shards outside DeepSpeed, whatever train.dtype), per table
of N_s slots and width v, P = model.memory.parallel_size:
  shard        4 N_s v / P
  gradient     adamw: 4 N_s v / P (dense); sparse_*: row entries of (4 v / P + 8) bytes, on any
               device: one lookup per table and step keeps the bag's gradient, min(N_s, P T H k)
               rows (a lookup's rows are its distinct slots); with more, each lookup's rows are added
               into a buffer that holds each row read once (pretrain/parallel/held_rows.py; torch's
               CUDA sparse add would concatenate every lookup's rows), with room for half as many
               again, and an (N_s,) int64 row map: min(N_s, 1.5 D) rows + 8 N_s bytes,
               D = min(N_s, accumulation steps x lookups x min(N_s, P T H k)) the rows a step can read
  gradient add (transient, in backward, one table at a time; none with one lookup) sparse_*: the
               lookup's own gradient (min(N_s, P T H k) rows, 25 bytes of row ids and masks each)
               and a growth of the buffer (a new one of at most the bound above)
  moments      adamw / sparse_adamw: (4 + 4) N_s v / P, the first moment 2 bytes under
               optim.value_momentum_dtype=bfloat16; sparse_rowwise_adamw: m + 4 N_s
Activations of one micro-batch (T = B S tokens): the bytes autograd saves for backward,
op by op as pretrain/model runs them (tests/model/test_memory_budget.py measures them with
saved_tensors_hooks, each storage once). `device` picks the op that differs: RMSNorm is one
fused op on CUDA (saves its input and rstd), a composite of fp32 ops on the CPU (saves the fp32
input, rstd and the normalised fp32 rows): torch's rms_norm calls _fused_rms_norm whenever the
weight's dtype is the input's (aten/src/ATen/native/layer_norm.cpp), which has a CUDA kernel and
decomposes on the CPU. Under P > 1 the bag saves the memory group's gathered
(P T, H, k) indices and weights instead of this rank's. train.activation_checkpointing keeps only the
(T, dim) input of each checkpointed block (P > 1 memory blocks also keep the lookup tape:
gathered indices and weights (P T, H, k) and the exchanged (T, v) output).
Backward transient: the bf16/fp32 logits (T, vocab) the trainer holds plus the fp32
gradients of the log-probabilities and logits (8 T vocab bytes) while the loss backward runs,
or one checkpointed block's recomputed activations, whichever is larger.
train.compile: the compiled objective saves the logits themselves (e T vocab, the ones the
trainer holds) and two fp32 values per token instead of fp32 log-probabilities, and its backward
writes only the logits' gradient (e T vocab). Compiled blocks are counted as eager ones, an upper
bound: inductor's partitioner recomputes pointwise ops instead of saving them (measured on the
CPU at the test's shape, AC none: 0.63x the eager blocks' bytes in bf16, 0.78x in fp32; AC full
is exact, the blocks keeping only their inputs either way).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pretrain.model.accounting import config_parameters

GiB = 1024**3
DEEPSPEED_REDUCE_BUCKET = 500_000_000  # elements: DeepSpeed's default zero_optimization.reduce_bucket_size
NOT_COUNTED = (
    "not counted: the CUDA context and kernels (~0.5-1 GiB), NCCL buffers, allocator fragmentation and "
    "cached blocks, torch.compile / Triton workspaces, ZeRO-3 gathered-parameter buffers, the data loader"
)


@dataclass
class MemoryEstimate:
    """Bytes per GPU by item; `total` is their sum."""

    dense: dict[str, int]
    values: dict[str, int]
    activations: dict[str, int]
    settings: dict = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.dense.values()) + sum(self.values.values()) + sum(self.activations.values())


def param_bytes(dtype: str) -> int:
    return {"bf16": 2, "fp16": 2, "fp32": 4}[dtype]


def dense_states(trained: int, dtype: str, zero_stage: int, world_size: int) -> dict[str, int]:
    """DeepSpeed's dense model states per GPU at the optimizer step (the module docstring's table)."""
    e, N, psi = param_bytes(dtype), world_size, trained
    low = e < 4
    if zero_stage == 0:
        grads = (e + 4) * psi if low else 4 * psi
        master = 4 * psi if low else 0
        moments = 8 * psi
    else:
        during_backward = e * psi if zero_stage == 1 else 0
        grads = max(during_backward, -(-4 * psi // N))
        master = -(-4 * psi // N)
        moments = -(-8 * psi // N)
    return {
        "parameters": e * psi if zero_stage < 3 else -(-e * psi // N),
        "gradients": grads,
        "fp32_master": master,
        "adam_moments": moments,
        "zero_bucket": DEEPSPEED_REDUCE_BUCKET * e if zero_stage in (1, 2) else 0,
    }


def value_states(cfg, micro_batch: int, seq_len: int, accumulation_steps: int) -> dict[str, int]:
    """The value shards, their gradients and optimizer state on one GPU (pretrain/parallel)."""
    m, model = cfg.model.memory, cfg.model
    if not m.enabled:
        return {}
    P, v, slots = m.parallel_size, model.value_dim, m.num_slots
    tables = m.num_value_tables
    shard = 4 * slots * v // P
    optimizer = cfg.optim.value_optimizer
    adding = 0
    if optimizer == "adamw":
        grads = tables * shard
    else:
        row = 4 * v // P + 8  # the gradient row and its int64 row id
        lookups = accumulation_steps * len(m.layers) // tables  # per table and step
        per_lookup = min(slots, P * micro_batch * seq_len * m.heads * m.k)
        distinct = min(slots, lookups * per_lookup)
        capacity = min(slots, distinct + distinct // 2)  # held_rows.HeldRows._reserve
        if lookups > 1:  # a buffer with its row map from the second lookup on
            grads = tables * (capacity * row + 8 * slots)
            adding = per_lookup * (row + 25) + capacity * row
        else:  # the one lookup's gradient as the bag made it
            grads = tables * per_lookup * row
    first = (2 if cfg.optim.value_momentum_dtype == "bfloat16" and optimizer != "adamw" else 4) * slots * v // P
    second = 4 * slots if optimizer == "sparse_rowwise_adamw" else shard
    return {
        "value_shards": tables * shard,
        "value_gradients": grads,
        "value_gradient_add": adding,
        "value_moments": tables * (first + second + 4),
    }


def _norm_saved(width: int, e: int, device: str, weight: bool = True) -> int:
    """Bytes an RMSNorm over rows of `width` saves per row, its output (saved by its consumer) not included."""
    if device == "cuda":
        return e * width + 4  # fused: input, rstd
    return 4 * width + 4 + (4 * width if weight else 0)  # composite: fp32 input, rstd, normalised fp32 rows


def block_activations(cfg, e: int, device: str, memory: bool) -> int:
    """Bytes one block saves per token (mode none)."""
    model, m = cfg.model, cfg.model.memory
    d, hd = model.dim, model.head_dim
    attention = _norm_saved(d, e, device) + e * d  # attention_norm, its output (wq/wk/wv's input)
    attention += e * hd * (2 * model.n_heads + 2 * model.kv_heads) + 4 * model.n_heads  # q, k, v, out, logsumexp
    ffn_input = _norm_saved(d, e, device) + e * d
    if not memory:
        return attention + ffn_input + 4 * e * model.hidden_dim  # w1 out, silu out, w3 out, product
    heads, half = m.heads, m.k_dim // 2
    query = e * heads * m.k_dim  # the scoring op's query
    if m.qk_norm:
        query += heads * 2 * _norm_saved(half, e, device)
    slots = heads * m.k * (4 + 8)  # the scoring's fp32 weights and int64 indices
    if m.parallel_size > 1:  # the bag saves the memory group's gathered indices and weights
        slots += m.parallel_size * heads * m.k * (8 + e)
    elif e == 2:
        slots += heads * m.k * 2  # the weights cast to bf16 for the bag
    return attention + ffn_input + query + slots + 4 * e * model.value_dim


def key_norm_activations(cfg, e: int, device: str) -> int:
    """Bytes one memory layer's normalised half-keys save (independent of the batch)."""
    m = cfg.model.memory
    if not m.qk_norm:
        return 0
    rows, half = m.heads * m.n_keys, m.k_dim // 2
    if device == "cuda":
        per_set = rows * (4 + e * half)  # rstd, the normalised keys (the input is the parameter)
    elif e == 4:
        per_set = rows * (4 + 4 * half)  # rstd, the normalised keys (keys.float() is the parameter)
    else:
        per_set = rows * (4 * half + 4 + e * half)  # fp32 copy, rstd, the keys cast back for scoring
    return 2 * per_set


def checkpointed_blocks(cfg) -> list[int]:
    """The blocks train.activation_checkpointing recomputes: the trainer's own choice
    (pretrain/parallel/activation_checkpointing.checkpointed_layers) over stand-ins for the blocks."""
    from types import SimpleNamespace

    from pretrain.parallel.activation_checkpointing import checkpointed_layers

    model, t = cfg.model, cfg.train
    blocks = [SimpleNamespace(is_memory=i in model.memory.layers) for i in range(model.n_layers)]
    return checkpointed_layers(blocks, t.activation_checkpointing, t.activation_checkpointing_layers)


def activations(cfg, micro_batch: int, seq_len: int, device: str = "cuda") -> dict[str, int]:
    """Saved activations and the backward's transient peak of one micro-batch, bytes."""
    model, m = cfg.model, cfg.model.memory
    e, T, d, V = param_bytes(cfg.train.dtype), micro_batch * seq_len, model.dim, model.vocab_size
    kept = set(checkpointed_blocks(cfg))
    blocks, tape, largest_recompute = 0, 0, 0
    for i in range(model.n_layers):
        memory = i in m.layers
        inside = T * block_activations(cfg, e, device, memory) + (key_norm_activations(cfg, e, device) if memory else 0)
        if i in kept:
            blocks += e * T * d  # the block's input
            largest_recompute = max(largest_recompute, inside)
            if memory and m.parallel_size > 1:
                P = m.parallel_size
                tape += P * T * m.heads * m.k * (8 + e) + 4 * T * model.value_dim
        else:
            blocks += inside
    head = T * (_norm_saved(d, e, device) + e * d)  # final norm, the output layer's input
    if cfg.train.compile:  # pretrain/parallel/compile.py compile_objective: no fp32 copy of the logits
        # the logits themselves (the ones the trainer holds), int64 targets and embedding ids, the
        # fp32 row max and log-sum-exp, the mean's divisor; backward writes the logits' gradient
        loss = T * (e * V + 8 + 8 + 8) + 4
        loss_backward = e * T * V
    else:
        loss = T * (4 * V + 8 + 8) + 4  # fp32 log-probs, int64 targets and embedding ids, total_weight
        loss_backward = e * T * V + 8 * T * V  # the logits held + fp32 gradients of log-probs and logits
    return {
        "blocks": blocks + tape,
        "head_and_loss": head + loss,
        "backward_transient": max(loss_backward, largest_recompute),
    }


def estimate_memory(
    cfg, world_size: int = 1, micro_batch: int | None = None, seq_len: int | None = None, device: str = "cuda"
) -> MemoryEstimate:
    """Per-GPU bytes of cfg's run on `world_size` GPUs with `micro_batch` sequences of `seq_len`
    (defaults: train.micro_batch, data.seq_len); the module docstring gives the formulas."""
    t = cfg.train
    micro_batch = micro_batch or t.micro_batch
    seq_len = seq_len or cfg.data.seq_len
    counts = config_parameters(cfg.model)
    trained = counts.total - counts.memory_values
    accumulation = max(1, t.global_batch // (micro_batch * world_size))
    return MemoryEstimate(
        dense=dense_states(trained, t.dtype, t.zero_stage, world_size),
        values=value_states(cfg, micro_batch, seq_len, accumulation),
        activations=activations(cfg, micro_batch, seq_len, device),
        settings={
            "world_size": world_size,
            "micro_batch": micro_batch,
            "seq_len": seq_len,
            "dtype": t.dtype,
            "zero_stage": t.zero_stage,
            "activation_checkpointing": t.activation_checkpointing,
            "memory_parallel_size": cfg.model.memory.parallel_size,
            "value_optimizer": cfg.optim.value_optimizer,
            "accumulation_steps": accumulation,
            "device": device,
        },
    )


def largest_micro_batch(cfg, gpu_bytes: int, world_size: int = 1, seq_len: int | None = None, limit: int = 1024) -> int:
    """The largest micro-batch whose estimate fits in `gpu_bytes` (0: not even one sequence)."""
    best = 0
    for b in range(1, limit + 1):
        if estimate_memory(cfg, world_size, b, seq_len).total > gpu_bytes:
            break
        best = b
    return best
