"""MemoryParallel: the value shards' optimizer, gradient reduction, clipping, checkpoints.

`build_sharded_model` builds the model on the meta device and wraps it in
`MemoryParallel(model, groups, optim_cfg)`, which swaps the value tables for partitioned
ones; the remaining (dense) parameters go to DeepSpeed. Per optimizer step
(`pretrain.optimizers.Optimizers` makes these calls): forward/backward of every
micro-batch, `reduce_gradients()`, `clip_grad_norm(max_norm)`, `step(lr_multiplier)`,
`zero_grad()`.

`optim.value_optimizer` picks the update: `adamw` (default) keeps dense (N, v_dim / P)
gradients and torch's fused AdamW over whole shards (the paper's semantics);
`sparse_adamw` makes the bag's backward hand over only the rows read (coalesced sparse
COO gradients, `row_grads`) and applies lazy Adam to those rows (`sparse_adamw`), so a
step costs O(rows read) instead of O(N); `sparse_rowwise_adamw` does the same with one
second moment per row (N floats instead of N x v_dim: the pool's optimizer state
halves). The calls above are the same for all: the trainer does not know which one
runs. `adamw` and `sparse_adamw` keep the same optimizer state, so their checkpoints are
interchangeable; the row-wise state loads only into the row-wise optimizer.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn as nn

from pretrain.config import OptimConfig
from pretrain.dense_optimizer import squared_norm
from pretrain.model.config import ConfigError, ModelConfig, choices_message, literal_fields
from pretrain.parallel import accounting, held_rows, row_grads, shard_files
from pretrain.parallel.groups import MemoryGroups
from pretrain.parallel.sparse_adamw import SparseAdamW
from pretrain.parallel.values import PartitionedValueTable, parallelize_memory

if TYPE_CHECKING:
    from pretrain.model.transformer import Transformer

VALUE_OPTIMIZERS = literal_fields(OptimConfig)["value_optimizer"]  # the config's Literal: one list of choices


class MemoryParallel:
    """The partitioned value tables of one model on this rank, and their optimizer (AdamW, or the
    lazy `SparseAdamW` under a sparse optim.value_optimizer)."""

    def __init__(
        self,
        model: nn.Module,
        groups: MemoryGroups,
        optim_cfg: OptimConfig,
        kernel: str = "auto",
        device: torch.device | str | None = None,
        seed: int | None = None,
    ):
        self.groups, self.optim_cfg = groups, optim_cfg
        self.value_optimizer = optim_cfg.value_optimizer
        if self.value_optimizer not in VALUE_OPTIMIZERS:
            raise ConfigError(choices_message("optim.value_optimizer", self.value_optimizer, VALUE_OPTIMIZERS))
        self.sparse = self.value_optimizer != "adamw"
        self.tables: list[PartitionedValueTable] = parallelize_memory(
            model, groups, kernel=kernel, device=device, seed=seed, value_grad="sparse" if self.sparse else "sorted"
        )
        self._step_bytes = 0  # bytes received this step by the reductions (the lookups count their own)
        self._replica_bytes = 0  # of them, by the sparse replica exchange and row-wise sums (measured)
        self._lookups: list[tuple[int, int, int, int]] = []  # (tokens, H*k, weight bytes, out bytes)
        self.last_step_comm_bytes = 0  # set by `step`: the closed step's traffic and lookups
        self.last_step_lookups: list[tuple[int, int, int, int]] = []
        if self.tables:
            # on the model, not on the tables: the tables run inside compiled blocks, where
            # dynamo would guard on this list's length and recompile the block every step
            model.register_forward_pre_hook(self._record_lookups)
        self.optimizer = self._make_optimizer() if self.tables else None

    def _make_optimizer(self) -> torch.optim.Optimizer:
        """The shards' optimizer for optim.value_optimizer, without weight decay."""
        o = self.optim_cfg
        if self.sparse:
            return SparseAdamW(
                self.parameters(),
                lr=o.value_lr,
                betas=(o.beta1, o.beta2),
                eps=o.eps,
                second_moment="row" if self.value_optimizer == "sparse_rowwise_adamw" else "element",
                row_sq_mean=self._row_sq_mean,
                momentum_dtype=getattr(torch, o.value_momentum_dtype),
            )
        # fused: one kernel over the whole shard (12x faster than foreach on CPU at 16K x 128)
        return torch.optim.AdamW(
            self.parameters(), lr=o.value_lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=0.0, fused=True
        )

    def _record_lookups(self, model, args) -> None:
        """One lookup per memory layer and model forward: (tokens, H*k, weight bytes, out
        bytes). An activation checkpoint's replay re-runs blocks, never the model's
        forward, so it records nothing (it moves no bytes). Forwards without autograd
        (evaluation) are not a step's lookups: they would count into the next step."""
        if not torch.is_grad_enabled():
            return
        tokens = args[0].numel()
        for i, layer in enumerate(model.memory_layers()):
            table = model.value_table_for(i)
            weight_bytes = layer.query_proj.weight.element_size()  # the softmax weights' dtype
            self._lookups.append((tokens, layer.heads * layer.k, weight_bytes, table.shard.element_size()))

    def _row_sq_mean(self, sq_sums: torch.Tensor, shard: torch.Tensor) -> torch.Tensor:
        """Mean of g^2 over each full row from this shard's column sums: summed over the
        memory group, whose ranks hold the same rows (every rank of a group merges the
        group's lookups and the same replicas), in the same ascending order."""
        table = next(t for t in self.tables if t.shard is shard)
        P = self.groups.parallel_size
        if P > 1:
            # The row count rides along (a rank with other rows would make the sums meaningless),
            # as the float64 sum of the counts, exact up to 2^53 (float32 drops units past 2^24).
            both = torch.cat([sq_sums.double(), sq_sums.new_tensor([sq_sums.numel()], dtype=torch.float64)])
            dist.all_reduce(both, op=dist.ReduceOp.SUM, group=self.groups.memory_group)
            if int(both[-1]) != P * sq_sums.numel():
                raise RuntimeError(
                    f"sparse_rowwise_adamw: the ranks of a memory group hold different row sets "
                    f"({int(both[-1])} rows summed over {P} ranks, {sq_sums.numel()} here)"
                )
            sq_sums = both[:-1].to(sq_sums.dtype)
            received = 2 * (P - 1) * 8 * (sq_sums.numel() + 1) // P  # ring all-reduce, float64
            self._step_bytes += received
            self._replica_bytes += received  # measured, as the replicas'

        return sq_sums / table.v_dim

    def parameters(self) -> list[nn.Parameter]:
        """This rank's value shards (leaf tensors outside the model's parameters)."""
        return [t.shard for t in self.tables]

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    def reduce_gradients(self) -> None:
        """Sum shard gradients over the replica group and divide by the world size.

        Each shard's gradient already covers every token of its memory group (each rank's
        loss being its local mean); DeepSpeed averages dense gradients over the world, so
        this makes the value gradient that of the world-mean loss too.
        """
        g = self.groups
        if self.sparse:
            self._reduce_row_gradients()
            return
        for p in self.parameters():
            if p.grad is None:  # keep collectives matched across ranks
                p.grad = torch.zeros_like(p)
            if g.replica_group is not None:
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM, group=g.replica_group)
            if g.world_size > 1:  # x / 1 == x: skip a pass over the (N, d) gradient
                p.grad.div_(g.world_size)
        self._step_bytes += accounting.replica_reduction_bytes(self.shard_bytes(), g.num_replicas)

    def _reduce_row_gradients(self) -> None:
        """Sparse form of reduce_gradients: merge each shard's rows, sum them over replicas."""
        g = self.groups
        self._replica_bytes = 0
        for p in self.parameters():
            rows, grad_rows = row_grads.rows_of(p.grad, p.shape[1], p)  # each row once, ascending
            p.grad = None
            held_rows.release(p)  # the buffer the lookups added into: `rows_of` copied it (or views it)
            if g.replica_group is not None:
                rows, grad_rows, received = row_grads.reduce_over_replicas(rows, grad_rows, g.replica_group)
                self._replica_bytes += received
            if g.world_size > 1:
                grad_rows = grad_rows.div(g.world_size)
            p.grad = row_grads.as_sparse(rows, grad_rows, p.shape)
        self._step_bytes += self._replica_bytes

    def _grad_values(self) -> list[torch.Tensor]:
        """The gradient entries: whole dense gradients, or the merged rows of sparse ones."""
        return [p.grad._values() if p.grad.is_sparse else p.grad for p in self.parameters() if p.grad is not None]

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Clip by the L2 norm of the full (logical) tables' gradients; return that norm.

        With sparse gradients the rows not read hold zeros, so the norm of the merged
        rows (after reduce_gradients, each row once) is the same norm."""
        grads = self._grad_values()
        if not grads:
            return torch.zeros(())
        sq = squared_norm(grads)  # float64: a float32 norm of the whole table drifts low on the CPU
        P = self.groups.parallel_size
        if P > 1:
            dist.all_reduce(sq, op=dist.ReduceOp.SUM, group=self.groups.memory_group)
            self._step_bytes += accounting.norm_reduction_bytes(P, sq.element_size())
        norm = sq.sqrt()
        if max_norm and max_norm > 0:
            coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
            for g in grads:
                g.mul_(coef.to(g.dtype))
        return norm

    def step(self, lr_multiplier: float = 1.0, skip: bool = False) -> None:
        """The optimizer's step with lr = optim.value_lr * lr_multiplier (none if `skip`: a
        non-finite loss or gradient norm); closes the step's traffic count either way."""
        if self.optimizer is not None and not skip:
            for group in self.optimizer.param_groups:
                group["lr"] = self.optim_cfg.value_lr * lr_multiplier
            self.optimizer.step()
        self.last_step_comm_bytes = self._step_bytes + sum(t.counter.take() for t in self.tables)
        self.last_step_lookups, self._lookups, self._step_bytes = self._lookups, [], 0

    # ----------------------------------------------------------------- accounting
    def grad_bytes(self) -> int:
        """Bytes of the shards' gradients now: dense (N, v_dim / P), or sparse rows + row ids."""
        total = 0
        for p in self.parameters():
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                total += p.grad._values().numel() * p.grad.element_size() + p.grad._indices().numel() * 8
            else:
                total += p.grad.numel() * p.grad.element_size()
        return total

    def shard_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())

    def accounting(self) -> dict:
        """Per-rank memory of the value shards and their AdamW state, and traffic per step."""
        P, g = self.groups.parallel_size, self.groups
        shard = self.shard_bytes()
        expected = sum(t.num_slots * t.v_dim // P * t.shard.element_size() for t in self.tables)
        assert shard == expected, f"value shards hold {shard} bytes, expected N*d/P*elem = {expected}"
        state = self.optimizer.state if self.optimizer is not None else {}
        opt = sum(v.numel() * v.element_size() for s in state.values() for v in s.values() if torch.is_tensor(v))
        lookups = self.last_step_lookups
        # the sparse replica exchange depends on the rows read: it is taken as measured
        replicas = self._replica_bytes if self.sparse else accounting.replica_reduction_bytes(shard, g.num_replicas)
        v_dim = self.tables[0].v_dim if self.tables else 0
        lookup_traffic = sum(accounting.lookup_bytes(T, hk, 1, v_dim, P, wb, ob) for T, hk, wb, ob in lookups)
        estimate = lookup_traffic + replicas + accounting.norm_reduction_bytes(P)  # assumes clip_grad_norm ran
        return {
            "parallel_size": P,
            "num_replicas": g.num_replicas,
            "position": g.position,
            "value_shard_bytes": shard,
            "value_table_bytes_full": shard * P,
            "value_grad_bytes": self.grad_bytes(),
            "optimizer_state_bytes": opt,
            "comm_bytes_last_step": self.last_step_comm_bytes,
            "comm_bytes_last_step_estimate": estimate if lookups else 0,
            "lookups_last_step": len(lookups),
        }

    # ----------------------------------------------------------------- checkpoints
    def save(self, checkpoint_dir: str | Path) -> list[Path]:
        """Write this rank's shard files (replica 0 only); return the paths written."""
        g = self.groups
        if g.group_index != 0:
            return []
        checkpoint_dir = Path(checkpoint_dir)
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for i, t in enumerate(self.tables):
            st = self.optimizer.state.get(t.shard, {}) if self.optimizer is not None else {}
            # missing moments (no step yet) are written as zeros by write_shard, never allocated whole
            moments = {name: st.get(name) for name in self._moment_names()}
            step = float(st["step"]) if "step" in st else 0.0
            path = checkpoint_dir / shard_files.shard_file_name(i, g.position, g.parallel_size)
            meta = dict(
                table=i,
                shard=g.position,
                parallel_size=g.parallel_size,
                num_slots=t.num_slots,
                v_dim=t.v_dim,
                col_start=t.col_start,
                col_end=t.col_end,
                seed=t.seed,
            )
            shard_files.write_shard(path, t.shard, moments, step, meta)
            written.append(path)
        return written

    def load(self, checkpoint_dir: str | Path) -> None:
        """Load this rank's columns (and AdamW state) from shard files saved with any P."""
        if not self.tables:  # a model without memory layers saved no shard files
            return
        checkpoint_dir = Path(checkpoint_dir)
        saved_p = shard_files.saved_parallel_size(checkpoint_dir, len(self.tables))
        for i, t in enumerate(self.tables):
            weight, step, meta = shard_files.read_columns(checkpoint_dir, i, saved_p, t.col_start, t.col_end, "weight")
            if int(meta["num_slots"]) != t.num_slots or int(meta["v_dim"]) != t.v_dim:
                raise shard_files.ShardFileError(
                    f"value table {i} in {checkpoint_dir} is {meta['num_slots']} x {meta['v_dim']}, the model's is "
                    f"{t.num_slots} x {t.v_dim} (model.memory.n_keys / v_dim differ from the checkpoint's)"
                )
            with torch.no_grad():
                t.shard.copy_(weight)
            del weight  # before the moments are read: one shard-sized copy at a time
            if self.optimizer is None:
                continue
            self.optimizer.state.pop(t.shard, None)
            if step > 0:
                state = {"step": torch.tensor(step, dtype=torch.float32, device=t.shard.device)}
                for name in self._moment_names():
                    if name in shard_files.ROW_TENSORS:
                        moment = shard_files.read_rows(checkpoint_dir, i, saved_p, name)
                    else:
                        moment = shard_files.read_columns(checkpoint_dir, i, saved_p, t.col_start, t.col_end, name)[0]
                    dtype = getattr(self.optimizer, "momentum_dtype", None) if name == "exp_avg" else None
                    # a column range inside one saved shard is a strided view of it: torch's fused
                    # CPU AdamW reads non-contiguous state as if contiguous (wrong moments)
                    state[name] = moment.to(t.shard.device, dtype or t.shard.dtype).contiguous()
                self.optimizer.state[t.shard] = state

    def _moment_names(self) -> tuple[str, ...]:
        if self.value_optimizer == "sparse_rowwise_adamw":
            return ("exp_avg", "exp_avg_sq_row")
        return ("exp_avg", "exp_avg_sq")


def build_sharded_model(
    cfg: ModelConfig,
    groups: MemoryGroups,
    optim_cfg: OptimConfig,
    kernel: str = "auto",
    device: torch.device | str = "cpu",
    seed: int = 0,
    value_seed: int | None = None,
    reseed: Callable[[int], object] = torch.manual_seed,
) -> tuple[Transformer, MemoryParallel]:
    """(model, MemoryParallel), the trainer's and the benchmarks': the `Transformer` on the meta
    device, its value tables swapped for this rank's column shards (table i drawn from seed
    `value_seed` + i; None: the model's own table seeds, 0 + i), then the dense part
    materialised on `device` and drawn after `reseed(seed)` (the trainer's also seeds Python's
    and NumPy's generators), so that no rank ever holds the full value pool. Same seed on every
    rank: identical dense weights, nothing broadcast."""
    from pretrain.model.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(cfg)
    values = MemoryParallel(model, groups, optim_cfg, kernel=kernel, device=device, seed=value_seed)
    model.to_empty(device=device)
    reseed(seed)
    model.reset_parameters()
    return model, values
