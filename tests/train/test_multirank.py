"""The trainer on 2 gloo ranks: exact resume (ZeRO 1, 2) and equivalence with world 1 (ZeRO 0-3)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.train.helpers import assert_same_parameters, assert_same_tables, run_ranks, tiny_config

STEPS = 5


def _run(rank: int, run_dir: str, cache: str, overrides: list[str]) -> list[float]:
    from pretrain.train import train
    from tests.train.helpers import fixed_batches

    return train(tiny_config(Path(run_dir), Path(cache), *overrides), loaders=fixed_batches).losses


def _world2_suite(rank: int, root: str, cache: str) -> dict:
    """Everything the world-2 tests need, in one process pair (start-up is the slow part)."""
    out = {}
    for stage in (0, 1, 2, 3):
        out[f"equiv{stage}"] = _run(
            rank, f"{root}/equiv{stage}", cache, [f"train.zero_stage={stage}", f"train.max_steps={STEPS}"]
        )
    out["p2"] = _run(
        rank, f"{root}/p2", cache, ["train.zero_stage=1", f"train.max_steps={STEPS}", "model.memory.parallel_size=2"]
    )
    for stage in (1, 2):
        out[f"straight{stage}"] = _run(
            rank, f"{root}/straight{stage}", cache, [f"train.zero_stage={stage}", "train.max_steps=4"]
        )
        first = _run(
            rank,
            f"{root}/split{stage}",
            cache,
            [f"train.zero_stage={stage}", "train.max_steps=4", "train.stop_after=2"],
        )
        second = _run(rank, f"{root}/split{stage}", cache, [f"train.zero_stage={stage}", "train.max_steps=4"])
        out[f"split{stage}"] = first + second
    return out


@pytest.fixture(scope="module")
def world2(tmp_path_factory, data_cache):
    root = tmp_path_factory.mktemp("world2")
    results = run_ranks(2, _world2_suite, (str(root), str(data_cache)), root / "results")
    assert results[0] == results[1]  # every rank logs the same (all-reduced) loss
    return root, results[0]


@pytest.fixture(scope="module")
def world1_losses(tmp_path_factory, data_cache) -> list[float]:
    """The reference: the run on world 1 (default ZeRO stage, P = 1), trained once for both comparisons."""
    from pretrain.train import train
    from tests.train.helpers import fixed_batches

    run_dir = tmp_path_factory.mktemp("world1") / "w1"
    return train(tiny_config(run_dir, data_cache, f"train.max_steps={STEPS}"), loaders=fixed_batches).losses


def test_world2_matches_world1_for_every_zero_stage(world2, world1_losses):
    reference = world1_losses
    _, results = world2
    for stage in (0, 1, 2, 3):
        got = results[f"equiv{stage}"]
        assert len(got) == STEPS
        torch.testing.assert_close(
            torch.tensor(got), torch.tensor(reference), rtol=1e-5, atol=0, msg=f"ZeRO stage {stage}"
        )


def test_world2_memory_parallel_matches_world1(world2, world1_losses):
    torch.testing.assert_close(torch.tensor(world2[1]["p2"]), torch.tensor(world1_losses), rtol=1e-5, atol=0)


@pytest.mark.parametrize("run", ["equiv1", "p2"])
def test_world2_slot_counts_are_conserved(world2, run):
    """Every token's accesses are counted exactly once over both ranks (P = 1 and P = 2)."""
    from pretrain.slots import load_table
    from tests.train.helpers import TINY

    root, _ = world2
    table = load_table(root / run / "checkpoints")
    opts = dict(o.split("=") for o in TINY)
    tokens = STEPS * int(opts["train.global_batch"]) * int(opts["data.seq_len"])
    per_layer = tokens * int(opts["model.memory.heads"]) * int(opts["model.memory.k"])
    assert table.num_tokens == tokens
    for layer, counts in table.counts.items():
        assert int(counts.sum()) == per_layer, layer
        assert int(table.doc_freq[layer].max()) <= table.num_documents


@pytest.mark.parametrize("stage", [1, 2])
def test_world2_resume_is_exact(world2, stage):
    root, results = world2
    assert results[f"split{stage}"] == results[f"straight{stage}"]
    assert_same_parameters(root / f"straight{stage}", root / f"split{stage}")
    assert_same_tables(root / f"straight{stage}", root / f"split{stage}")


@pytest.mark.parametrize("run", ["equiv0", "equiv3", "p2", "split1"])
def test_world2_checksums_cover_every_file(world2, run):
    """Each rank sums every second file of a checkpoint: together they cover all of them, and each
    sum matches the file's bytes (binascii's CRC-32 of the whole file, read at once)."""
    import binascii
    import json

    root, _ = world2
    for folder in sorted((root / run / "checkpoints").glob("step_*")):
        sums = json.loads((folder / "checksums.json").read_text())["files"]
        files = {p.name: p for p in folder.iterdir() if p.name != "checksums.json"}
        assert set(sums) == set(files), folder
        for name, path in files.items():
            data = path.read_bytes()
            assert sums[name] == {"bytes": len(data), "crc32": binascii.crc32(data)}, path


def test_torchrun_two_ranks_memory_parallel(tmp_path, data_cache):
    """The real launcher: `torchrun --nproc-per-node 2 -m pretrain.train` with P = 2 and ZeRO 2."""
    import os
    import subprocess
    import sys

    from pretrain.distributed import free_port
    from tests.train.helpers import TINY

    run_dir = tmp_path / "run"
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env["OMP_NUM_THREADS"] = "1"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(free_port()),
        "-m",
        "pretrain.train",
        *TINY,
        f"train.run_dir={run_dir}",
        f"data.cache_dir={data_cache}",
        "train.max_steps=3",
        "train.zero_stage=2",
        "model.memory.parallel_size=2",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "finished at step 3" in proc.stdout
    ckpt = run_dir / "checkpoints" / "step_00000003"
    assert sorted(p.name for p in ckpt.glob("values.*")) == [
        "values.t0.s0-of-2.safetensors",
        "values.t0.s1-of-2.safetensors",
    ]
    assert (ckpt / "slot_frequencies.safetensors").is_file()


def test_world2_zero3_rank_files_and_slot_table_name_one_run(world2):
    """ZeRO-3 saves the run's state in every rank's model-states file: each rank drew its own run
    id, so the files disagreed; they now all carry the id the slot table (rank 0's) carries."""
    from pretrain.slots import load_table

    root, _ = world2
    folders = sorted((root / "equiv3" / "checkpoints").glob("step_*"))
    assert folders, "the ZeRO-3 run saved no checkpoint to compare"
    for folder in folders:
        files = sorted(folder.glob("zero_pp_rank_*_mp_rank_00_model_states.pt"))
        ids = [torch.load(f, map_location="cpu", weights_only=True)["run_id"] for f in files]
        assert len(ids) == 2 and set(ids) == {load_table(folder).metadata["run_id"]}, folder
