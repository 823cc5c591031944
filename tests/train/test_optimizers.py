"""`Optimizers` built from its four parts: which object takes the dense gradients' norm."""

from types import SimpleNamespace

from pretrain.config import OptimConfig
from pretrain.optimizers import Optimizers


def test_the_norm_is_taken_here_only_where_deepspeed_steps_the_optimizer_itself():
    dense = SimpleNamespace()
    plain = Optimizers(SimpleNamespace(optimizer=dense), dense, SimpleNamespace(tables=[]), OptimConfig())
    assert plain.measures_dense and not hasattr(dense, "step_norm")

    wrapped_dense = SimpleNamespace()
    wrapper = SimpleNamespace(_global_grad_norm=3.5)
    wrapped = Optimizers(SimpleNamespace(optimizer=wrapper), wrapped_dense, SimpleNamespace(tables=[]), OptimConfig())
    assert not wrapped.measures_dense
    assert wrapped_dense.step_norm() == 3.5
    assert not wrapped.has_values
