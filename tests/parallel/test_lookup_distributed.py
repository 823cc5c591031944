"""One P = 2 lookup on 2 gloo ranks against a float64 brute-force bag over the full table.

The ranks of the memory group hold different token counts (uneven, and one rank with
none) and indices that repeat; the output, the weights' gradient and the value shard's
gradient (dense and sparse) must equal those of sum_j w_j * table[i_j] on one process.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pretrain.parallel import init_memory_groups
from pretrain.parallel.values import PartitionedValueTable
from pretrain.spawn import run_gloo

N, D, H, K, SEED = 11, 8, 2, 3, 3
CASES = {"uneven": (3, 5), "empty0": (0, 3), "empty1": (4, 0)}


def inputs(case: str, rank: int):
    """This rank's (indices, weights, output gradient): few distinct rows, so indices repeat."""
    T = CASES[case][rank]
    g = torch.Generator().manual_seed(10 * rank + len(case))
    idx = torch.randint(0, 4, (T, H, K), generator=g)
    return (
        idx,
        torch.randn(T, H, K, generator=g, dtype=torch.float64),
        torch.randn(T, D, generator=g, dtype=torch.float64),
    )


def worker(rank: int, world: int, out_dir: str) -> None:
    groups, res = init_memory_groups(2), {}
    for case in CASES:
        for value_grad in ("sorted", "sparse"):
            table = PartitionedValueTable(
                N, D, groups, seed=SEED, kernel="torch", dtype=torch.float64, value_grad=value_grad
            )
            idx, w, grad_out = inputs(case, rank)
            w.requires_grad_(True)
            out = table(idx, w)
            (out * grad_out).sum().backward()
            vgrad = table.shard.grad
            pre = f"{case}.{value_grad}."
            res[pre + "out"], res[pre + "wgrad"] = out.detach(), w.grad
            res[pre + "vgrad"] = vgrad.to_dense() if vgrad.is_sparse else vgrad
            res[pre + "shard"] = table.shard.detach()
    save_file({k: v.contiguous() for k, v in res.items()}, str(Path(out_dir) / f"rank{rank}.safetensors"))


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    root = tmp_path_factory.mktemp("lookup")
    run_gloo(worker, 2, str(root))
    return [load_file(str(root / f"rank{r}.safetensors")) for r in range(2)]


@pytest.mark.parametrize("value_grad", ["sorted", "sparse"])
@pytest.mark.parametrize("case", list(CASES))
def test_p2_lookup_equals_brute_force_bag(world2, case, value_grad):
    pre = f"{case}.{value_grad}."
    table = torch.cat([world2[r][pre + "shard"] for r in range(2)], dim=1).requires_grad_(True)
    for r in range(2):
        idx, w, grad_out = inputs(case, r)
        w.requires_grad_(True)
        out = (w[..., None] * table[idx]).sum((1, 2))
        (out * grad_out).sum().backward()
        torch.testing.assert_close(world2[r][pre + "out"], out.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(world2[r][pre + "wgrad"], w.grad, rtol=1e-12, atol=1e-12)
    # each shard's gradient covers the tokens of the whole group
    vgrad = torch.cat([world2[r][pre + "vgrad"] for r in range(2)], dim=1)
    torch.testing.assert_close(vgrad, table.grad, rtol=1e-12, atol=1e-12)
