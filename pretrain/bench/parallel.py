"""CPU benchmark of memory parallelism: step time, per-rank memory and traffic for P = 1 vs P > 1.

Each configuration (world size W, group size P) trains the same model on the same
global batch with W spawned gloo ranks: DeepSpeed (ZeRO `zero_stage`) for the dense
parameters, MemoryParallel for the values. Rank 0 reports the median step time after
one warm-up step (each step's time kept beside it); every rank reports its value-shard bytes,
AdamW-state bytes, peak RSS and the bytes it received per step.
"""

from __future__ import annotations

import json
import resource
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pretrain.bench.model import memory_model_config
from pretrain.config import OptimConfig
from pretrain.model.config import ModelConfig
from pretrain.model.objective import language_model_loss
from pretrain.parallel.groups import init_memory_groups
from pretrain.parallel.memory_parallel import build_sharded_model
from pretrain.spawn import run_gloo


@dataclass
class BenchSpec:
    n_keys: int = 128  # N = n_keys**2 slots
    v_dim: int = 256
    dim: int = 128
    n_layers: int = 2
    heads: int = 4
    k: int = 16
    global_batch: int = 8
    seq_len: int = 64
    steps: int = 5
    zero_stage: int = 1

    def model_config(self) -> ModelConfig:
        return memory_model_config(
            dim=self.dim,
            n_layers=self.n_layers,
            seq_len=self.seq_len,
            n_keys=self.n_keys,
            heads=self.heads,
            k=self.k,
            k_dim=64,
            v_dim=self.v_dim,
        )


def _worker(rank: int, world: int, spec: BenchSpec, parallel_size: int, out_path: str, show_progress: bool) -> None:
    import deepspeed
    import torch.distributed as dist

    cfg, optim = spec.model_config(), OptimConfig()
    model, mp = build_sharded_model(cfg, init_memory_groups(parallel_size), optim, kernel="torch")
    opt = torch.optim.AdamW(model.parameters(), lr=optim.lr, weight_decay=optim.weight_decay)
    per_rank = spec.global_batch // world
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=opt,
        config={
            "train_batch_size": spec.global_batch,
            "train_micro_batch_size_per_gpu": per_rank,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": optim.grad_clip,
            "zero_optimization": {"stage": spec.zero_stage},
            "steps_per_print": 10**9,
        },
    )
    gen = torch.Generator().manual_seed(rank)
    times = []
    steps = range(spec.steps + 1)
    if show_progress and rank == 0:
        from tqdm import tqdm

        steps = tqdm(steps, desc=f"W={world} P={parallel_size}", leave=False)
    for _ in steps:
        tokens = torch.randint(0, cfg.vocab_size, (per_rank, spec.seq_len + 1), generator=gen)
        dist.barrier()
        t0 = time.perf_counter()
        mp.zero_grad()
        loss = language_model_loss(engine(tokens[:, :-1]), tokens[:, 1:])
        engine.backward(loss)
        mp.reduce_gradients()
        mp.clip_grad_norm(optim.grad_clip)
        engine.step()
        mp.step(1.0)
        dist.barrier()
        times.append(time.perf_counter() - t0)
    acc = mp.accounting()
    acc.update(
        rank=rank,
        world_size=world,
        **step_timing(times),
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        loss=loss.item(),
    )
    Path(out_path, f"rank{rank}.json").write_text(json.dumps(acc))


def step_timing(times: list[float]) -> dict:
    """A rank's step times (seconds, the warm-up step first): each timed step's, the warm-up's, and
    the median of the timed ones, which the report prints."""
    return {"step_times_s": times[1:], "warmup_step_s": times[0], "step_time_median_s": statistics.median(times[1:])}


def check_configs(spec: BenchSpec, configs: list[tuple[int, int]]) -> None:
    """ValueError naming the first (world size, P) configuration `spec` cannot run, or the model
    setting it cannot build (a ConfigError)."""
    for world, P in configs:
        if world < 1 or P < 1 or world % P or spec.v_dim % P or spec.global_batch % world:
            raise ValueError(
                f"configuration W={world}, P={P}: P must divide the world size and --v-dim={spec.v_dim}, "
                f"and the world size must divide --global-batch={spec.global_batch}"
            )
    if spec.steps < 1:
        raise ValueError(f"--steps {spec.steps}: time at least one step (after the warm-up step)")
    spec.model_config()  # its ConfigError (--k above --n-keys, say) here, not in every spawned rank


def run_bench(spec: BenchSpec, configs: list[tuple[int, int]], show_progress: bool = True) -> list[dict]:
    """Run each (world size, P) configuration; return one record per rank per configuration."""
    check_configs(spec, configs)
    records = []
    for world, P in configs:
        with tempfile.TemporaryDirectory() as tmp:
            run_gloo(_worker, world, spec, P, tmp, show_progress, deepspeed_comm=True)
            records += [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]
    return records


def format_report(records: list[dict]) -> str:
    mib = 2**20
    lines = [
        f"{'W':>2} {'P':>2} {'rank':>4} {'step s':>8} {'shard MiB':>10} {'adam MiB':>9} "
        f"{'full MiB':>9} {'recv KiB/step':>13} {'estimate':>10} {'peak RSS MiB':>12}"
    ]
    for r in records:
        lines.append(
            f"{r['world_size']:>2} {r['parallel_size']:>2} {r['rank']:>4} {r['step_time_median_s']:>8.3f} "
            f"{r['value_shard_bytes'] / mib:>10.1f} {r['optimizer_state_bytes'] / mib:>9.1f} "
            f"{r['value_table_bytes_full'] / mib:>9.1f} {r['comm_bytes_last_step'] / 1024:>13.1f} "
            f"{r['comm_bytes_last_step_estimate'] / 1024:>10.1f} {r['peak_rss_bytes'] / mib:>12.0f}"
        )
    relative = relative_step_times(records)
    if len(relative) > 1:
        lines.append(
            "step time relative to the first configuration: "
            + ", ".join(f"W={r['world_size']} P={r['parallel_size']}: {r['relative']:.2f}x" for r in relative)
        )
    return "\n".join(lines)


def relative_step_times(records: list[dict]) -> list[dict]:
    """Rank 0's median step time of each configuration over the first configuration's."""
    firsts = [r for r in records if r["rank"] == 0]
    if not firsts or not firsts[0]["step_time_median_s"]:
        return []
    base = firsts[0]["step_time_median_s"]
    return [
        {"world_size": r["world_size"], "parallel_size": r["parallel_size"], "relative": r["step_time_median_s"] / base}
        for r in firsts
    ]
