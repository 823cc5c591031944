"""What a resume may not change from the checkpoint it reads: the model (its tensors would not
fit), the ZeRO stage (but 1 <-> 2), the training precision and the value optimizer's second moment
(element-wise or row-wise); each refused with a ConfigError
naming the setting and the fix, before anything is loaded."""

from __future__ import annotations

from pathlib import Path

from pretrain.config import ConfigError, RunConfig, config_to_dict, model_differences


def model_fingerprint(cfg: RunConfig) -> dict:
    """The parts of the config a checkpoint's tensors depend on."""
    return config_to_dict(cfg.model)


def check_compatible(saved: dict, cfg: RunConfig, ckpt_dir: Path) -> None:
    """Refuse a checkpoint whose model config differs (the tensors would not fit). How the
    model runs may change: the memory-parallel size (value shards are re-sharded on load) and
    the memory kernel (a GPU run's checkpoint resumed on CPU with model.memory.kernel=torch)."""
    diffs = model_differences(saved, model_fingerprint(cfg))
    if not diffs:
        return
    listed = [f"model.{key}: checkpoint {a!r} vs config {b!r}" for key, (a, b) in diffs.items()]
    data = cfg.data.dir or ", ".join(str(s.dir) for s in cfg.data.sources)
    # model.vocab_size follows the data's tokenizer unless set: a data folder prepared again with another
    # tokenizer shows up here, not as a change of the config the user wrote
    cause = (
        f" (model.vocab_size follows the tokenizer of the training data, {data}, unless set: was it prepared "
        "again with another tokenizer? A run resumes only on the data it started on)"
        if "vocab_size" in diffs and data
        else ""
    )
    raise ConfigError(
        f"checkpoint {ckpt_dir} was written for a different model config ({'; '.join(listed[:5])}){cause}; "
        f"use the original config, or a new train.run_dir to start afresh"
    )


# ZeRO 1 and 2 save the same partitioned optimizer state, so a resume may switch between them;
# ZeRO 0 and 3 lay theirs out otherwise, and DeepSpeed cannot load one stage's as another's.
ZERO_STAGES_INTERCHANGEABLE = {1, 2}


def check_zero_stage_change(saved: int, now: int, ckpt_dir: Path) -> None:
    """Refuse (ConfigError) a resume at another ZeRO stage DeepSpeed cannot load, before loading:
    it would fail inside DeepSpeed's load (0 -> 1: FileNotFoundError, 1 -> 0: AttributeError,
    2 -> 3: AssertionError)."""
    if saved != now and not {saved, now} <= ZERO_STAGES_INTERCHANGEABLE:
        raise ConfigError(
            f"{ckpt_dir.name} was saved at train.zero_stage={saved}; it resumes at that stage, or between "
            f"1 and 2 (their optimizer states are laid out alike), not at {now}: set train.zero_stage={saved}, "
            "or start a new run (train.run_dir, or train.init_from to keep the weights) at the new stage"
        )


def check_dtype_change(saved: str, now: str, ckpt_dir: Path) -> None:
    """Refuse (ConfigError) a resume in another train.dtype, before loading: DeepSpeed keeps the
    optimizer state of each precision in another layout and failed inside its load (fp32 -> bf16:
    KeyError 'dynamic_loss_scale'; bf16 -> fp32: KeyError 'param_groups')."""
    if saved != now:
        raise ConfigError(
            f"{ckpt_dir.name} was saved at train.dtype={saved}; it resumes only at that precision, not at {now} "
            f"(DeepSpeed lays out each precision's optimizer state otherwise): set train.dtype={saved}, or start a "
            "new run in the new precision from this one's weights (memlayers-export, then train.init_from)"
        )


# the value optimizers by the second moment their checkpoints hold; a resume may switch only within one kind
VALUE_OPTIMIZER_KINDS = {"element-wise": ("adamw", "sparse_adamw"), "row-wise": ("sparse_rowwise_adamw",)}


def check_value_optimizer_change(saved: str, now: str, ckpt_dir: Path) -> None:
    """Refuse (ConfigError) a resume whose optim.value_optimizer keeps the other kind of second
    moment (row-wise vs element-wise), before anything is built: the value shards' load failed
    after the model was built, with a traceback (ShardFileError) that did not say which optimizer
    saved them."""
    kind = next(k for k, names in VALUE_OPTIMIZER_KINDS.items() if saved in names)
    if now not in VALUE_OPTIMIZER_KINDS[kind]:
        raise ConfigError(
            f"{ckpt_dir.name} was saved with optim.value_optimizer={saved}, whose {kind} second moment {now} "
            f"cannot load: set optim.value_optimizer={' or '.join(VALUE_OPTIMIZER_KINDS[kind])}, or start a new "
            "run (train.run_dir, or train.init_from to keep the weights) with the new optimizer"
        )
