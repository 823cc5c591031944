"""The dense (non-value) weights of a DeepSpeed checkpoint as an fp32 state dict.

ZeRO stage 0 in fp32 keeps the exact weights in the model-states file. Otherwise the
fp32 master weights live in the ZeRO optimizer partitions, which DeepSpeed's
`zero_to_fp32` merges (stages 1-3, any data-parallel size). Those files pickle three
small DeepSpeed classes; they are loaded with torch's weights-only unpickler forced on
and exactly those classes allowed, never with the general unpickler.
"""

from __future__ import annotations

import contextlib
import os

import torch

from pretrain.export.errors import IncompleteFileError
from pretrain.export.source import CheckpointSource


@contextlib.contextmanager
def weights_only_loads():
    """Force every torch.load inside (including DeepSpeed's own) to the weights-only unpickler."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals([LossScaler, ZeroStageEnum, fragment_address]):
            yield
    finally:
        if previous is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous


def dense_state_dict(src: CheckpointSource) -> dict[str, torch.Tensor]:
    """{name: fp32 tensor} for every module parameter DeepSpeed saved (value tables excluded)."""
    if src.zero_stage == 0:
        try:
            states = torch.load(src.model_states, map_location="cpu", weights_only=True)
        except Exception as err:
            raise IncompleteFileError(f"cannot read {src.model_states} ({err})") from None
        if src.bf16:
            return _stage0_bf16_masters(src, states)
        return {k: v.float() for k, v in states["module"].items()}
    import io
    from contextlib import redirect_stdout

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ckpt = src.checkpoint_dir
    try:
        with weights_only_loads(), redirect_stdout(io.StringIO()):  # zero_to_fp32 prints progress lines
            lazy = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name, lazy_mode=True)
            return {k: (v.contiguous() if hasattr(v, "contiguous") else v).float() for k, v in lazy.items()}
    except (OSError, RuntimeError, ValueError, KeyError) as err:
        raise IncompleteFileError(f"cannot read the ZeRO stage-{src.zero_stage} weights in {ckpt}: {err}") from err


def _stage0_bf16_masters(src: CheckpointSource, states: dict) -> dict[str, torch.Tensor]:
    """bf16 without ZeRO: DeepSpeed keeps fp32 copies as lists per optimizer group, in the order
    the trainer's dense_param_groups built them; rebuild that order on a meta-device model."""
    import torch.nn as nn

    from pretrain.dense_optimizer import dense_param_groups
    from pretrain.model import Transformer

    with torch.device("meta"):
        model = Transformer(src.cfg.model)
    model.values = nn.ModuleList()  # the value tables are not engine parameters
    names = {id(p): n for n, p in model.named_parameters()}
    groups = dense_param_groups(model, src.cfg.optim)
    masters = states["optimizer"]["fp32_groups"]
    out = {}
    for group, tensors in zip(groups, masters, strict=True):
        for param, tensor in zip(group["params"], tensors, strict=True):
            if tensor.shape != param.shape:
                raise IncompleteFileError(
                    f"{src.model_states}: fp32 copy of {names[id(param)]} has shape "
                    f"{tuple(tensor.shape)}, expected {tuple(param.shape)}"
                )
            out[names[id(param)]] = tensor.float()
    return out
