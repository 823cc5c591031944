"""`check_runtime(cfg, world_size, device_type)`: what depends on where the run starts (the device,
the kernels available, the world size, a row for each of ranks x data.num_workers); the trainer
and tools/submit call it. `check_world(cfg, world_size)`: its part that needs no device (the start
of a rank, before torch, calls it)."""

from __future__ import annotations

from pretrain.config.schema import RunConfig
from pretrain.model.config import ConfigError


def check_runtime(cfg: RunConfig, world_size: int | None = None, device_type: str | None = None) -> RunConfig:
    """What depends on where the run starts: the device (fp16 and the Triton kernels on CPU)
    and, when `world_size` is given, the launched world (batch and memory-parallel divisibility).

    `device_type` None: this machine's (cuda if available, else cpu).
    """
    if device_type is None:
        import torch

        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    t = cfg.train
    if t.dtype == "fp16" and device_type == "cpu":
        raise ConfigError("train.dtype=fp16 is not supported on CPU (DeepSpeed refuses it): use bf16 or fp32")
    if cfg.model.memory.enabled and cfg.model.memory.kernel == "triton" and device_type == "cpu":
        from kernels.triton_common import INTERPRETING

        if not INTERPRETING:
            raise ConfigError(
                "model.memory.kernel=triton needs a CUDA device (this run is on CPU): use "
                "model.memory.kernel=auto or torch, or set TRITON_INTERPRET=1 to interpret the kernels (slow)"
            )
    if cfg.data.document_masking and cfg.model.document_attention == "flex" and device_type == "cpu":
        raise ConfigError(
            "model.document_attention=flex trains on CUDA only (torch's FlexAttention has no backward on CPU): "
            "use model.document_attention=sdpa on CPU"
        )
    if world_size is not None:
        check_world(cfg, world_size)
    return cfg


def check_world(cfg: RunConfig, world_size: int) -> RunConfig:
    """What depends on the launched world alone (batch and memory-parallel divisibility, a row for each
    of ranks x data.num_workers): known from the launcher's environment before torch is imported."""
    t = cfg.train
    per_step = t.micro_batch * world_size
    if t.global_batch % per_step:
        # A smaller micro_batch keeps the run's global batch (more accumulation), where one fits.
        fits = [m for m in range(t.micro_batch - 1, 0, -1) if t.global_batch % (m * world_size) == 0]
        nearest = max(per_step, round(t.global_batch / per_step) * per_step)
        keep = f"set train.micro_batch={fits[0]} (the same global batch), or " if fits else ""
        raise ConfigError(
            f"train.global_batch={t.global_batch} is not divisible by train.micro_batch={t.micro_batch} x "
            f"world size {world_size}: {keep}choose global_batch as a multiple of {per_step} (e.g. "
            f"train.global_batch={nearest})"
        )
    parallel = cfg.model.memory.parallel_size
    if world_size % parallel:
        fits = max(p for p in range(1, min(parallel, world_size) + 1) if world_size % p == 0)
        raise ConfigError(
            f"model.memory.parallel_size={parallel} must divide the world size {world_size}: set "
            f"model.memory.parallel_size={fits} (a checkpoint re-shards to any parallel_size), or launch a "
            f"multiple of {parallel} ranks"
        )
    if cfg.data.dir or cfg.data.sources:  # the prepared datasets' rows go round ranks x workers
        from pretrain.data.checks import check_readers
        from pretrain.data.errors import DataError
        from pretrain.data.sources import resolve_sources

        try:
            check_readers(resolve_sources(cfg.data), world_size, cfg.data.num_workers)
        except DataError as err:
            raise ConfigError(str(err)) from None
    return cfg
