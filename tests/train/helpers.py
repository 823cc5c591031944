"""Shared pieces of the trainer tests: a tiny config, a fixed-global-batch loader, rank spawning,
a fake clock, and the comparisons of two runs' checkpoints (weights, slot tables)."""

from __future__ import annotations

import json
import time as real_time
from pathlib import Path

import torch

from pretrain.config import load_config
from pretrain.spawn import run_gloo

TINY = [
    "model.dim=32",
    "model.n_layers=2",
    "model.n_heads=2",
    "model.max_seq_len=32",
    "model.memory.layers=[1]",
    "model.memory.n_keys=16",
    "model.memory.heads=2",
    "model.memory.k=4",
    "model.memory.k_dim=16",
    "data.seq_len=32",
    "data.vocab_size=384",
    "data.synthetic.num_entities=40",
    "model.vocab_size=384",
    "train.global_batch=8",
    "train.micro_batch=4",
    "train.log_every=1",
    "train.eval_every=1000",
    "train.eval_batches=2",
    "train.probe_limit=8",
    "train.checkpoint_every=1000",
    "optim.warmup_steps=2",
    "slots.log_every=2",
]


def tiny_config(run_dir: Path, cache_dir: Path, *overrides: str):
    return load_config(None, [*TINY, f"train.run_dir={run_dir}", f"data.cache_dir={cache_dir}", *overrides])


class FixedGlobalBatches:
    """The same global batch sequence for any world size: rank r reads rows of its slice.

    Stands in for ShardLoader so that world 1 and world 2 see identical global batches
    (the real loader splits rows by reader, so their batches differ by design).
    """

    def __init__(
        self, rank: int, world_size: int, micro_batch: int, global_batch: int, seq_len: int, vocab: int, seed: int = 7
    ):
        self.rank, self.world, self.micro = rank, world_size, micro_batch
        self.global_batch, self.seq_len, self.vocab, self.seed = global_batch, seq_len, vocab, seed
        self.position = 0  # micro-batches consumed by this rank

    def _global(self, step: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + step)
        return torch.randint(0, self.vocab, (self.global_batch, self.seq_len + 1), generator=gen)

    def __iter__(self):
        from pretrain.data import Batch

        per_rank = self.global_batch // self.world
        gas = per_rank // self.micro
        while True:
            step, micro = divmod(self.position, gas)
            first_row = self.rank * per_rank + micro * self.micro
            rows = self._global(step)[first_row:][: self.micro]
            # globally unique, contiguous documents of 5 tokens
            global_rows = torch.arange(first_row, first_row + self.micro).unsqueeze(1)
            doc_ids = step * 100_000 + global_rows * 100 + torch.arange(self.seq_len) // 5
            self.position += 1
            yield Batch(tokens=rows[:, :-1], targets=rows[:, 1:], doc_ids=doc_ids)

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]

    def load_resharded(self, states: list[dict]) -> str:
        """Continue at the same global step on another world size (every old rank was at the same one)."""
        old_per_step = self.global_batch // len(states) // self.micro
        steps = {s["position"] // old_per_step for s in states}
        assert len(steps) == 1, f"old ranks at different steps {steps}"
        self.position = steps.pop() * (self.global_batch // self.world // self.micro)
        return f"fixed batches at step {self.position}"


def fixed_batches(cfg, dataset, split, rank, world_size, loop, **kwargs):
    """A loader factory for `train(..., loaders=fixed_batches)`: FixedGlobalBatches for the train
    split, the real loader for validation."""
    from pretrain.build import build_loader

    if split != "train":
        return build_loader(cfg, dataset, split, rank, world_size, loop, **kwargs)
    return FixedGlobalBatches(
        rank, world_size, cfg.train.micro_batch, cfg.train.global_batch, cfg.data.seq_len, cfg.model.vocab_size
    )


def _record(rank: int, world: int, fn, args: tuple, out_dir: str) -> None:
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(fn(rank, *args)))


def run_ranks(world: int, fn, args: tuple, out_dir: Path) -> list:
    """Run fn(rank, *args) on `world` spawned gloo ranks (127.0.0.1); return their JSON results."""
    out_dir.mkdir(parents=True, exist_ok=True)
    run_gloo(_record, world, fn, args, str(out_dir), deepspeed_comm=True)
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(world)]


def one_rank_results(fn) -> dict:
    """fn(rank, world, out) run on one spawned gloo rank (DeepSpeed's comm backend) filling `out`,
    a dict shared with this process; what it filled."""
    import torch.multiprocessing as mp

    out = mp.Manager().dict()
    run_gloo(fn, 1, out, deepspeed_comm=True)
    return dict(out)


def world2_suite(tmp_path_factory, name: str, suite, data_cache) -> tuple[Path, dict]:
    """Run suite(rank, root, cache) on 2 gloo ranks; both must return the same results.
    Returns (root, rank 0's results)."""
    root = tmp_path_factory.mktemp(name)
    results = run_ranks(2, suite, (str(root), str(data_cache)), root / "results")
    assert results[0] == results[1]
    return root, results[0]


def final_parameters(run_dir: Path) -> dict[str, torch.Tensor]:
    """Dense weights (DeepSpeed model states) + value shards of the latest checkpoint."""
    from safetensors.torch import load_file

    from pretrain.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(Path(run_dir) / "checkpoints")
    states = torch.load(ckpt / "mp_rank_00_model_states.pt", weights_only=True, map_location="cpu")
    params = {k: v.float() for k, v in states["module"].items()}
    for shard in sorted(ckpt.glob("values*.safetensors")):
        params.update({f"{shard.name}:{k}": v for k, v in load_file(shard).items()})
    return params


def final_fp32_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """fp32 dense weights (assembled from the ZeRO partitions) and every value shard file of the
    latest checkpoint."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    from pretrain.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(run_dir / "checkpoints")
    weights = dict(get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name))
    for shard in sorted(ckpt.glob("values*.safetensors")):
        weights.update({f"{shard.name}:{k}": v for k, v in load_file(shard).items()})
    return weights


def assert_same_parameters(run_a: Path, run_b: Path) -> dict[str, torch.Tensor]:
    """The latest checkpoints of two runs hold bitwise the same `final_parameters`; run_a's."""
    a, b = final_parameters(run_a), final_parameters(run_b)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    return a


def assert_resume_is_exact(root: Path, cache: Path, opts: tuple, stop_after: int, steps: int, tables: bool = True):
    """Trained straight to `steps` (root/a), and stopped after `stop_after` then resumed (root/b):
    the same losses bitwise, the same final parameters and (with `tables`) slot tables. Returns
    the straight run's final parameters."""
    from pretrain.checkpoint import latest_checkpoint
    from pretrain.train import train

    straight = train(tiny_config(root / "a", cache, *opts))
    first = train(tiny_config(root / "b", cache, *opts, f"train.stop_after={stop_after}"))
    assert first.step == stop_after
    assert latest_checkpoint(root / "b" / "checkpoints").name == f"step_{stop_after:08d}"
    second = train(tiny_config(root / "b", cache, *opts))
    assert second.step == steps
    assert first.losses + second.losses == straight.losses  # bitwise: same floats
    params = assert_same_parameters(root / "a", root / "b")
    if tables:
        assert_same_tables(root / "a", root / "b")
    return params


def assert_same_tables(run_a: Path, run_b: Path) -> None:
    """Slot-frequency tables of two runs' latest checkpoints are identical."""
    from pretrain.slots import load_table

    a, b = load_table(Path(run_a) / "checkpoints"), load_table(Path(run_b) / "checkpoints")
    assert (a.num_documents, a.num_tokens, a.step) == (b.num_documents, b.num_tokens, b.step)
    assert a.counts.keys() == b.counts.keys()
    for layer in a.counts:
        assert torch.equal(a.counts[layer], b.counts[layer]), layer
        assert torch.equal(a.doc_freq[layer], b.doc_freq[layer]), layer


def train_p2_variants(
    root: str, cache: str, stages: tuple, steps: int, variants: dict[str, str], *extra: str, evals: dict | None = None
) -> dict:
    """{"z<stage>-<name>": losses} of one run per ZeRO stage and variant (its override, then `extra`):
    the tiny config with memory parallelism P = 2, two micro-batches a step, `fixed_batches`; each run
    under root/z<stage>-<name>; `evals`, if given, gets each run's final evaluation by the same key.
    Run on every rank of a `world2_suite`."""
    from pretrain.train import train

    out = {}
    for stage in stages:
        for name, override in variants.items():
            cfg = tiny_config(
                Path(root) / f"z{stage}-{name}",
                Path(cache),
                f"train.zero_stage={stage}",
                f"train.max_steps={steps}",
                "train.micro_batch=2",  # 2 micro-batches per step
                "model.memory.parallel_size=2",
                override,
                *extra,
            )
            result = train(cfg, loaders=fixed_batches)
            out[f"z{stage}-{name}"] = result.losses
            if evals is not None:
                evals[f"z{stage}-{name}"] = result.eval
    return out


def file_hashes(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `root`."""
    from pretrain.files import file_sha256

    root = Path(root)
    return {str(p.relative_to(root)): file_sha256(p) for p in sorted(root.rglob("*")) if p.is_file()}


def assert_nothing_lost(before: dict[str, str], root: Path) -> None:
    """Every file recorded in `before` is still under `root` with the same bytes."""
    after = file_hashes(root)
    lost = sorted(set(before) - set(after))
    changed = sorted(k for k in before if k in after and before[k] != after[k])
    assert not lost and not changed, f"lost {lost}, changed {changed}"


class FakeClock:
    """time.perf_counter for pretrain.trainer (the loop) that moves only when told (`advance`); the rest of
    the time module as it is."""

    def __init__(self):
        self.now = 1000.0

    def perf_counter(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def __getattr__(self, name):
        return getattr(real_time, name)


def _record_outcome(rank: int, world: int, port: int, fn, args: tuple, out_dir: str, done, environ: dict) -> None:
    """One rank of `run_ranks_outcome`: fn's result or error and the seconds it took, recorded;
    then the process waits for `done`, as a failed rank under NCCL stays in the group until its
    job step ends (a gloo rank that exits breaks its peers' collectives at once, which would hide a hang)."""
    import os
    import time
    import traceback

    os.environ.clear()  # a forked rank has the fork server's environment: the caller's instead
    os.environ.update(environ)
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(1)
    start = time.monotonic()
    try:
        outcome = {"result": fn(rank, *args)}
    except BaseException as err:  # noqa: BLE001 (recorded for the test to judge)
        outcome = {"error": type(err).__name__, "message": str(err), "traceback": traceback.format_exc()}
    outcome["seconds"] = time.monotonic() - start
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(outcome))
    done.wait(600)
    os._exit(0)  # no teardown: a peer may still wait in a collective


def run_ranks_outcome(world: int, fn, args: tuple, out_dir: Path, timeout: float) -> list[dict | None]:
    """Run fn(rank, *args) on `world` spawned processes (the trainer makes the gloo group), each
    recording {"result"} or {"error", "message"} with its "seconds"; None for a rank still busy
    after `timeout` seconds (waiting in a collective for a peer that will never come). No rank
    leaves before all have recorded or the time is up."""
    import os
    import time

    from pretrain.distributed import free_port
    from pretrain.spawn import rank_context

    out_dir.mkdir(parents=True, exist_ok=True)
    # forked from run_gloo's server, which imported torch, DeepSpeed and the trainer once: a spawned
    # rank took 3-5 s of CPU importing them, each
    context = rank_context()
    done = context.Event()
    port = free_port()
    environ = dict(os.environ)
    procs = [
        context.Process(target=_record_outcome, args=(r, world, port, fn, args, str(out_dir), done, environ))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    files = [out_dir / f"rank{r}.json" for r in range(world)]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not all(f.is_file() for f in files):
        time.sleep(0.2)
    done.set()
    for p in procs:
        p.join(10)
        if p.is_alive():
            p.kill()
            p.join()
    return [json.loads(f.read_text()) if f.is_file() else None for f in files]


def rank_results(world: int, fn, args: tuple, out_dir: Path, timeout: float) -> list:
    """`run_ranks_outcome`, every rank required to have returned within `timeout` seconds (a rank
    still busy waits in a collective its peer never joined; a rank that raised is shown with its
    traceback); their results."""
    ranks = run_ranks_outcome(world, fn, args, out_dir, timeout)
    for rank, outcome in enumerate(ranks):
        assert outcome is not None, f"rank {rank} still waits after {timeout} s (a collective its peer never joined)"
        assert "result" in outcome, f"rank {rank}: {outcome['error']}: {outcome['message']}\n{outcome['traceback']}"
    return [o["result"] for o in ranks]
