"""The first training step's line names the seconds an op's JIT build took in it (the trainer's part of
kernels/shared_builds.py's build timing; here, not in tests/kernels/, which runs without the trainer's
dependencies in the triton 3.6 check)."""

from __future__ import annotations

from tests.kernels.test_shared_builds import checkout


def test_the_first_steps_line_names_an_op_built_in_it(tmp_path, monkeypatch):
    """The first training step's line put all its time down to 'compilation, start-up', also when most
    of it was the JIT build of an op the step loaded first (said in a `building ...` line above it). A load
    that builds (or waits for another process's build) is now timed, and the line names it with its
    seconds; a load of a finished build is not."""
    import time
    from types import SimpleNamespace

    from kernels.shared_builds import BuildInputs, builds_since, load_shared_op
    from pretrain.trainer import Trainer

    source, _ = checkout(tmp_path, "checkout", 9)
    inputs = BuildInputs("shared_build_test", [source])
    step_start = time.perf_counter()
    load_shared_op(inputs, root=tmp_path / "ext", say=lambda line: None)
    built = builds_since(step_start)
    assert [name for name, _ in built] == [inputs.name] and 0 < built[0][1] < time.perf_counter() - step_start
    later = time.perf_counter()
    load_shared_op(inputs, root=tmp_path / "ext", say=lambda line: None)  # finished: nothing to time
    assert builds_since(later) == []

    lines = []
    trainer = SimpleNamespace(
        clock=SimpleNamespace(settle=lambda: None),
        interval_start=step_start,
        metrics=SimpleNamespace(scalars=lambda values, step: None, line=lines.append),
        state=SimpleNamespace(step=1),
    )
    Trainer.leave_out_first_step(trainer)
    assert lines == [
        f"step 1: this run's first step took {trainer.first_step_time:.2f} s ({built[0][1]:.1f} s on the build of "
        f"{inputs.name}; the rest compilation, start-up), left out of tokens/s, MFU and the data-wait share"
    ]
    trainer.interval_start = later  # a step that built nothing: as before
    Trainer.leave_out_first_step(trainer)
    assert lines[1].endswith("s (compilation, start-up), left out of tokens/s, MFU and the data-wait share")
