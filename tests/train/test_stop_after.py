"""train.stop_after on a resumed run: a stop at or before the checkpoint's step trains nothing."""

from __future__ import annotations

import torch

import pretrain.build as build_module
from pretrain.config import load_config
from pretrain.train import main, train
from tests.train.helpers import TINY, file_hashes


def test_stop_after_at_or_before_the_resumed_step_trains_nothing(tmp_path, data_cache, monkeypatch, capsys):
    """Before, the loop (which stops when the step equals train.stop_after) never met the number
    and trained on to train.max_steps: a time-slice job started again with the same stop_after
    ran the whole rest of the run. Now the run stops before building the model, saying so with
    both numbers, and returns the checkpoint's state; the run directory is left as it was."""
    run = tmp_path / "run"
    args = [*TINY, f"train.run_dir={run}", f"data.cache_dir={data_cache}", "train.max_steps=4"]
    first = train(load_config(None, [*args, "train.stop_after=2"]))
    assert first.step == 2 and first.checkpoint == str(run / "checkpoints" / "step_00000002")
    before = file_hashes(run)

    def build_model(*_, **__):
        raise AssertionError("the model is built although there is nothing to train")

    monkeypatch.setattr(build_module, "build_model", build_model)
    for stop_after in (2, 1):
        capsys.readouterr()
        result = train(load_config(None, [*args, f"train.stop_after={stop_after}"]))
        assert (
            f"train.stop_after={stop_after} is not after step 2 of the checkpoint {first.checkpoint} this run "
            "resumes from: nothing trained, nothing written. To go on, set train.stop_after above 2 "
            "(or 0 to run to train.max_steps=4)"
        ) in capsys.readouterr().out
        assert (result.step, result.tokens_seen, result.skipped_steps, result.losses) == (2, first.tokens_seen, 0, [])
        assert (result.checkpoint, result.slot_table) == (first.checkpoint, first.slot_table)
        assert result.slot_table is not None
        assert file_hashes(run) == before
    # the command line exits 0 with that line alone (the process group kept for the tests after this one)
    monkeypatch.setattr(torch.distributed, "destroy_process_group", lambda: None)
    assert main([*args, "train.stop_after=2"]) == 0
    out = capsys.readouterr().out
    assert "train.stop_after=2 is not after step 2" in out and "finished" not in out
    assert file_hashes(run) == before


def test_a_run_stopped_by_stop_after_is_not_called_finished(tmp_path, data_cache, monkeypatch, capsys):
    """The command line printed 'finished at step 4' for a run stopped by train.stop_after=4 of
    train.max_steps=200 (docs/own-corpus.md's mixture recipe cut short so): it now names both steps and
    how to go on."""
    run = tmp_path / "run"
    args = [*TINY, f"train.run_dir={run}", f"data.cache_dir={data_cache}", "train.max_steps=4"]
    monkeypatch.setattr(torch.distributed, "destroy_process_group", lambda: None)
    assert main([*args, "train.stop_after=2"]) == 0
    out = capsys.readouterr().out
    assert "finished" not in out
    assert (
        f"stopped at step 2 of 4 (train.stop_after); checkpoint {run / 'checkpoints' / 'step_00000002'}; to go on, "
        "run again with train.stop_after above 2 (or 0 to run to train.max_steps=4)"
    ) in out
    assert main(args) == 0
    assert f"finished at step 4; checkpoint {run / 'checkpoints' / 'step_00000004'}" in capsys.readouterr().out
