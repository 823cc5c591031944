"""Resuming on another number of ranks: 2 -> 1 and 1 -> 2, ZeRO 0, 1 and 3, bf16, and P = 2 -> 1.

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

from tests.train.helpers import assert_same_tables, run_ranks, tiny_config

STEPS, STOP = 4, 2
CASES = {  # name: overrides of both halves
    "zero0": ["train.zero_stage=0"],
    "zero1": ["train.zero_stage=1"],
    "zero3": ["train.zero_stage=3"],
    "zero1-bf16": ["train.zero_stage=1", "train.dtype=bf16"],
}
P2 = ["train.zero_stage=1", "model.memory.parallel_size=2"]  # the world-2 half of "2to1/p2"; P = 1 after
RUNS = [f"{d}/{n}" for d in ("1to2", "2to1") for n in CASES] + ["2to1/p2"]


def _baselines(run: str) -> tuple[str, str]:
    """The uninterrupted runs `run` is compared with: on world 1 (the reference), and on world 2
    (its distance to the reference is the noise of another reduction order)."""
    name = run.split("/")[1]
    return ("world1-zero1", "world2-p2") if name == "p2" else (f"world1-{name}", f"world2-{name}")


def _train(run_dir: Path, cache: Path, *overrides: str):
    from pretrain.train import train
    from tests.train.helpers import fixed_batches

    return train(tiny_config(run_dir, cache, f"train.max_steps={STEPS}", *overrides), loaders=fixed_batches)


def _world2_part(rank: int, root: str, cache: str) -> dict:
    """On 2 ranks: finish the runs world 1 started, start the runs world 1 will finish, and the
    uninterrupted world-2 runs."""
    root, cache, out = Path(root), Path(cache), {}
    for name, opts in {**CASES, "p2": P2}.items():
        if name in CASES:
            out[f"1to2/{name}"] = _train(root / f"1to2-{name}", cache, *opts).losses
        out[f"2to1/{name}"] = _train(root / f"2to1-{name}", cache, *opts, f"train.stop_after={STOP}").losses
        out[f"world2-{name}"] = _train(root / f"world2-{name}", cache, *opts).losses
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_cache):
    """{run: losses} of every case in both directions (both halves) and of the uninterrupted runs."""
    root = tmp_path_factory.mktemp("world-change")
    losses = {}
    for name, opts in CASES.items():
        losses[f"1to2/{name}"] = _train(root / f"1to2-{name}", data_cache, *opts, f"train.stop_after={STOP}").losses
        losses[f"world1-{name}"] = _train(root / f"world1-{name}", data_cache, *opts).losses
    results = run_ranks(2, _world2_part, (str(root), str(data_cache)), root / "results")
    assert results[0] == results[1]
    world2 = results[0]
    for name in CASES:
        losses[f"1to2/{name}"] += world2[f"1to2/{name}"]
    for name, opts in {**CASES, "p2": ["train.zero_stage=1"]}.items():
        losses[f"2to1/{name}"] = world2[f"2to1/{name}"] + _train(root / f"2to1-{name}", data_cache, *opts).losses
    return root, losses


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """fp32 dense weights (any ZeRO stage) and whole value tables of a run's latest checkpoint."""
    from pretrain.checkpoint import latest_checkpoint
    from pretrain.export.dense import dense_state_dict
    from pretrain.export.source import inspect
    from pretrain.parallel import shard_files

    ckpt = latest_checkpoint(run_dir / "checkpoints")
    return {**dense_state_dict(inspect(ckpt)), **shard_files.consolidate(ckpt)}


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in b)


@pytest.mark.slow
@pytest.mark.parametrize("run", RUNS)
def test_resume_on_another_world_size_continues_the_run(runs, run):
    """Losses as in the world-2 vs world-1 tests; weights no further from the uninterrupted
    world-1 run than the uninterrupted world-2 run is (bitwise where the two worlds agree bitwise)."""
    root, losses = runs
    reference, other_world = _baselines(run)
    assert len(losses[run]) == STEPS
    torch.testing.assert_close(torch.tensor(losses[run]), torch.tensor(losses[reference]), rtol=1e-5, atol=0)
    want = _weights(root / reference)
    noise = _max_diff(_weights(root / other_world), want)
    assert noise < 1e-6  # the two worlds agree; a lost optimizer state moves weights by ~lr = 3e-3
    got = _weights(root / run.replace("/", "-"))
    assert got.keys() == want.keys()
    for key in want:
        diff = float((got[key] - want[key]).abs().max())
        assert diff <= 4 * noise, f"{key}: {diff:.3g} from the world-1 run, the world-2 run {noise:.3g}"


@pytest.mark.slow
@pytest.mark.parametrize("run", ["1to2/zero1", "2to1/zero3", "2to1/p2"])
def test_slot_counts_survive_a_world_change_exactly(runs, run):
    """Counts and document frequencies summed over the ranks equal the uninterrupted run's."""
    root, _ = runs
    assert_same_tables(root / run.replace("/", "-"), root / _baselines(run)[0])


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


@pytest.mark.parametrize("change", ["data.num_workers=2", "train.micro_batch=2"])
def test_resume_with_another_data_layout_replans_the_epoch(tmp_path, data_cache, capsys, change):
    """Workers 0 -> 2, or micro-batch 4 -> 2 (global batch 8 kept), on the same world: the real
    loader re-plans the rest of the epoch (no row of it is lost; the loader tests check
    coverage) and every token is counted once."""
    from pretrain.slots import load_table
    from pretrain.train import train

    run = tmp_path / "run"
    train(tiny_config(run, data_cache, f"train.max_steps={STEPS}", f"train.stop_after={STOP}"))
    result = train(tiny_config(run, data_cache, f"train.max_steps={STEPS}", change))
    assert result.step == STEPS and len(result.losses) == STEPS - STOP
    assert "the data layout changed (data.num_workers, train.micro_batch or data.shuffle_buffer)" in (
        capsys.readouterr().out
    )
    table = load_table(run / "checkpoints")
    assert table.num_tokens == STEPS * 8 * 32  # train.global_batch x data.seq_len of tests/train/helpers.TINY
