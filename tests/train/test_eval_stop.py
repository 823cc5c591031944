"""A stop signal that lands during an evaluation ends it at the next batch, on every rank at the same
batch, and the run checkpoints as at any stop. The evaluation used to run to its end first (on a real
run thousands of validation rows and 1,350 fact probes): under SIGTERM Slurm kills the job KillWait
(often 30 s) after the signal, before the checkpoint the signal promises."""

from __future__ import annotations

import json
from pathlib import Path

from tests.train.helpers import run_ranks_outcome, tiny_config

SIGNALLED_RANK = 1


def _stop_in_the_evaluation(rank: int, run: str, cache: str) -> dict:
    """Train with an evaluation after every step; SIGTERM reaches one rank only, during the first
    evaluation's first forward. The run's result, the evaluation's forwards on this rank, the eval
    scalars logged and the log's lines."""
    import os
    import signal

    import torch

    from pretrain.metrics import MetricsLogger
    from pretrain.slurm import StopSignal
    from pretrain.train import train

    lines, eval_scalars, eval_forwards = [], [], []
    MetricsLogger.line = lambda self, text: lines.append(text)
    real_scalars = MetricsLogger.scalars

    def scalars(self, values, step):
        eval_scalars.extend(k for k in values if k.startswith("eval/"))
        real_scalars(self, values, step)

    MetricsLogger.scalars = scalars

    def count(module, args):
        if type(module).__name__ == "Transformer" and not module.training:  # the evaluation puts the model in eval mode
            eval_forwards.append(1)
            if rank == SIGNALLED_RANK and len(eval_forwards) == 1:
                os.kill(os.getpid(), signal.SIGTERM)

    torch.nn.modules.module.register_module_forward_pre_hook(count)
    cfg = tiny_config(
        Path(run), Path(cache), "train.max_steps=3", "train.eval_every=1", "train.eval_batches=4", "train.zero_stage=1"
    )
    with StopSignal() as stop:
        result = train(cfg, stop)
    return {
        "step": result.step,
        "stopped_by_signal": result.stopped_by_signal,
        "requeued": result.requeued,
        "eval": result.eval,
        "checkpoint": result.checkpoint,
        "eval_forwards": len(eval_forwards),
        "eval_scalars": eval_scalars,
        "lines": lines,
    }


def test_a_stop_signal_during_the_evaluation_ends_it_at_the_next_batch(tmp_path, data_cache):
    run = tmp_path / "run"
    outcomes = run_ranks_outcome(2, _stop_in_the_evaluation, (str(run), str(data_cache)), tmp_path / "out", 300)
    assert all(o is not None and "result" in o for o in outcomes), json.dumps(outcomes, indent=1)[-4000:]
    results = [o["result"] for o in outcomes]
    for r in results:
        # each rank: the forward the signal landed in, none after (2 validation batches and a fact
        # recall forward per rank without the check)
        assert r["eval_forwards"] == 1, r
        assert (r["step"], r["stopped_by_signal"], r["requeued"]) == (1, True, False)
        assert r["checkpoint"] == str(run / "checkpoints" / "step_00000001")
        assert r["eval"] == {}  # an interrupted evaluation is no result
        assert r["eval_scalars"] == []
    assert (run / "checkpoints" / "step_00000001").is_dir()
    lines = results[0]["lines"]  # rank 0 logs; the signal reached rank 1 only
    interrupted = [line for line in lines if "evaluation at step 1" in line]
    assert len(interrupted) == 1 and "stop signal" in interrupted[0] and "not logged" in interrupted[0], lines
    assert not any(line.startswith("eval ") for line in lines), lines
    assert any(line.startswith("stopping at step 1 (signal)") for line in lines), lines
