"""Resuming on another number of ranks: 2 -> 1 and 1 -> 2, ZeRO 0, 1 and 3, and P = 2 -> 1.

Every run sees the same global batches (FixedGlobalBatches), so a run that stops at step 2
and resumes on another world size must continue as the uninterrupted world-1 run does:
losses and final weights within the tolerance of the world-2 vs world-1 equivalence tests
(the reduction order differs), the saved slot counts exactly conserved, and the dense
optimizer moments re-partitioned, not reset (a reset would change the steps after resume).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.train.helpers import run_ranks, tiny_config

STEPS, STOP = 4, 2
CASES = {  # name: overrides of both halves (ZeRO stage, and the world-2 half's memory-parallel size)
    "zero0": ["train.zero_stage=0"],
    "zero1": ["train.zero_stage=1"],
    "zero3": ["train.zero_stage=3"],
}


def _train(run_dir: Path, cache: Path, *overrides: str):
    from pretrain.train import train
    from tests.train.helpers import fixed_batches

    return train(tiny_config(run_dir, cache, f"train.max_steps={STEPS}", *overrides), loaders=fixed_batches)


def _world2_halves(rank: int, root: str, cache: str) -> dict:
    """On 2 ranks: finish the runs world 1 started, and start the runs world 1 will finish."""
    root, cache, out = Path(root), Path(cache), {}
    for name, opts in CASES.items():
        out[f"1to2/{name}"] = _train(root / f"1to2-{name}", cache, *opts).losses
        out[f"2to1/{name}"] = _train(root / f"2to1-{name}", cache, *opts, f"train.stop_after={STOP}").losses
    out["straight"] = _train(root / "straight-world2", cache, "train.zero_stage=3").losses
    out["2to1/p2"] = _train(
        root / "2to1-p2", cache, "train.zero_stage=1", "model.memory.parallel_size=2", f"train.stop_after={STOP}"
    ).losses
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_cache):
    """{run: losses of both halves} for every case and direction, and the world-1 reference."""
    root = tmp_path_factory.mktemp("world-change")
    first = {
        name: _train(root / f"1to2-{name}", data_cache, *opts, f"train.stop_after={STOP}").losses
        for name, opts in CASES.items()
    }
    results = run_ranks(2, _world2_halves, (str(root), str(data_cache)), root / "results")
    assert results[0] == results[1]
    world2 = results[0]
    losses = {f"1to2/{name}": first[name] + world2[f"1to2/{name}"] for name in CASES}
    for name, opts in {**CASES, "p2": ["train.zero_stage=1"]}.items():
        second = _train(root / f"2to1-{name}", data_cache, *opts)
        losses[f"2to1/{name}"] = world2[f"2to1/{name}"] + second.losses
    losses["reference"] = _train(root / "reference", data_cache).losses
    return root, losses


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """fp32 dense weights (any ZeRO stage) and whole value tables of a run's latest checkpoint."""
    from pretrain.checkpoint import latest_checkpoint
    from pretrain.export.dense import dense_state_dict
    from pretrain.export.source import inspect
    from pretrain.parallel import MemoryParallel

    ckpt = latest_checkpoint(run_dir / "checkpoints")
    return {**dense_state_dict(inspect(ckpt)), **MemoryParallel.consolidate(ckpt)}


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in b)


@pytest.mark.slow
@pytest.mark.parametrize("run", [f"{d}/{n}" for d in ("1to2", "2to1") for n in CASES] + ["2to1/p2"])
def test_resume_on_another_world_size_continues_the_run(runs, run):
    """Losses as in the world-2 vs world-1 tests; weights no further from the world-1 run than an
    uninterrupted world-2 run is (its reduction order differs; ZeRO 3 shows it most)."""
    root, losses = runs
    assert len(losses[run]) == STEPS
    torch.testing.assert_close(torch.tensor(losses[run]), torch.tensor(losses["reference"]), rtol=1e-5, atol=0)
    want = _weights(root / "reference")
    noise = _max_diff(_weights(root / "straight-world2"), want)
    assert noise < 1e-6  # the two worlds agree; a lost optimizer state moves weights by ~lr = 3e-3
    got = _weights(root / run.replace("/", "-"))
    assert got.keys() == want.keys()
    for key in want:
        diff = float((got[key] - want[key]).abs().max())
        assert diff <= 4 * noise + 1e-7, (
            f"{key}: {diff:.3g} from the world-1 run, an uninterrupted world-2 run {noise:.3g}"
        )


@pytest.mark.slow
@pytest.mark.parametrize("run", ["1to2/zero1", "2to1/zero3", "2to1/p2"])
def test_slot_counts_survive_a_world_change_exactly(runs, run):
    """Counts and document frequencies summed over the ranks equal the uninterrupted run's."""
    from tests.train.test_trainer import assert_same_tables

    root, _ = runs
    assert_same_tables(root / run.replace("/", "-"), root / "reference")


def test_a_failed_conversion_names_the_way_out_and_changes_nothing(tmp_path):
    """DeepSpeed's converter failing (here: optimizer files that are not checkpoints) is a
    CheckpointError that says to resume on the saving world size, and leaves no folder behind."""
    from pretrain.checkpoint import CheckpointError
    from pretrain.resharding import convert_to_universal, universal_dir
    from tests.train.helpers import file_hashes

    ckpt = tmp_path / "checkpoints" / "step_00000002"
    ckpt.mkdir(parents=True)
    for rank in range(2):
        (ckpt / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"not a checkpoint")
    before = file_hashes(tmp_path)
    with pytest.raises(CheckpointError, match=r"resume with the number of ranks that saved it \(2\)"):
        convert_to_universal(ckpt, saved_world=2, workers=1)
    assert file_hashes(tmp_path) == before
    assert not universal_dir(ckpt).exists() and sorted(p.name for p in ckpt.parent.iterdir()) == [ckpt.name]
