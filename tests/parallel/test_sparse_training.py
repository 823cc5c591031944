"""The trainer with optim.value_optimizer=sparse_adamw: exact resume (N + N steps == 2N, bitwise)."""

from __future__ import annotations

import pytest

from tests.train.helpers import assert_resume_is_exact

SPARSE = "optim.value_optimizer=sparse_adamw"


@pytest.mark.slow
def test_sparse_optimizer_resume_is_exact(tmp_path, data_cache):
    opts = ("train.max_steps=4", SPARSE)  # global batch 8, micro batch 4: two accumulated micro-batches
    a = assert_resume_is_exact(tmp_path, data_cache, opts, stop_after=2, steps=4)
    assert any(k.endswith(":exp_avg") for k in a)
    # lazy Adam: with 256 slots some rows were never read, and their moments are still zero
    moments = [v for k, v in a.items() if k.endswith(":exp_avg")]
    assert any(m.abs().sum(1).eq(0).any() for m in moments)
