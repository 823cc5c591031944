"""The training objective compiled (inductor, CPU, as under train.compile) against eager and
float64: cross-entropy, z term and the gradient of their sum, with ignored positions, in fp32
and bf16 logits, traced as one graph."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend

from pretrain.model import training_objective
from pretrain.parallel.compile import compile_objective


def _float64_reference(logits: torch.Tensor, targets: torch.Tensor, z_weight: float):
    """CE and z written out in float64 over the kept positions."""
    x = logits.detach().double().flatten(0, 1).requires_grad_()
    t = targets.flatten()
    keep = t != -100
    log_z = x.exp().sum(-1).log()
    ce = (log_z - x.gather(1, t.clamp(min=0)[:, None]).squeeze(1))[keep].mean()
    z = log_z[keep].pow(2).mean()
    (grad,) = torch.autograd.grad(ce + z_weight * z, x)
    return ce.detach(), z.detach(), grad.view_as(logits)


def _run(objective, logits, targets, z_weight):
    x = logits.clone().requires_grad_()
    out = objective(x, targets, z_weight)
    (grad,) = torch.autograd.grad(out.total, x)
    return out, grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("z_weight", [0.0, 1e-2])
def test_compiled_objective_matches_eager_and_float64(dtype, z_weight):
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 7, 301, generator=gen) * 3).to(dtype)
    targets = torch.randint(0, 301, (2, 7), generator=gen)
    targets[0, :3] = -100  # ignored: in neither term nor the gradient
    counter = CompileCounterWithBackend("inductor")
    compiled = compile_objective(training_objective, backend=counter)
    eager_out, eager_grad = _run(training_objective, logits, targets, z_weight)
    out, grad = _run(compiled, logits, targets, z_weight)
    assert counter.frame_count == 1  # one graph: no break at the masking
    assert grad.dtype == dtype and (out.z is None) == (z_weight == 0)
    torch.testing.assert_close(out.loss, eager_out.loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(out.total, eager_out.total, rtol=1e-5, atol=0)
    if z_weight:
        torch.testing.assert_close(out.z, eager_out.z, rtol=1e-5, atol=0)
    # the gradient in the logits' dtype: fp32 to 1e-5; bf16 within its own rounding of the same values
    tol = dict(rtol=1e-5, atol=1e-8) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-6)
    torch.testing.assert_close(grad.float(), eager_grad.float(), **tol)
    assert torch.all(grad[0, :3] == 0)
    ce64, z64, grad64 = _float64_reference(logits.float(), targets, z_weight)
    assert out.loss.item() == pytest.approx(ce64.item(), rel=1e-6)
    if z_weight:
        assert out.z.item() == pytest.approx(z64.item(), rel=1e-6)
    torch.testing.assert_close(grad.double(), grad64, **tol)


def test_eager_objective_is_the_plain_cross_entropy_without_z():
    """z_weight 0: the logged loss and the differentiated total are F.cross_entropy itself."""
    logits, targets = torch.randn(3, 4, 9), torch.randint(0, 9, (3, 4))
    out = training_objective(logits, targets)
    assert out.z is None and out.total is out.loss
    assert torch.equal(out.loss, F.cross_entropy(logits.flatten(0, 1), targets.flatten()))
