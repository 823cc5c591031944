"""`validate(cfg)`: the config's values and combinations, a pure function of the config (no
environment, no file system), each refusal naming the key and the fix. Export calls it alone."""

from __future__ import annotations

import dataclasses
import math

from pretrain.config.schema import DataConfig, OptimConfig, RunConfig, SlotsConfig, TrainConfig
from pretrain.model.config import ConfigError, check_choices, default_hint

INT64_MAX = 2**63 - 1  # torch and numpy compute with 64-bit integers: a larger count, size or seed overflows there


def validate(cfg: RunConfig) -> RunConfig:
    """Check values and combinations; raise ConfigError naming the key and the fix.

    A pure function of the config: no environment, no file system (see `check_datasets`
    and `check_runtime` for those).
    """
    check_integer_range(cfg)
    cfg.model.validate("model")
    check_choices(cfg)
    _check_precision_and_checkpointing(cfg)
    _check_optimizer(cfg.optim)
    _check_steps_and_batch(cfg.train)
    _check_cadences(cfg)
    _check_timing(cfg.train)
    _check_data(cfg)
    _check_slots(cfg.slots)
    return cfg


def check_integer_range(section, prefix: str = "") -> None:
    """Every integer key (and each integer of a list) fits a 64-bit integer: YAML reads any number of
    digits, and such a value failed only after the model was built (torch.manual_seed, the rotary
    table, an embedding's size: a traceback), or the start-up ran on without end (model.n_layers)."""
    for f in dataclasses.fields(section):
        value, key = getattr(section, f.name), f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(value):
            check_integer_range(value, key)
            continue
        items = value if isinstance(value, list) else [value]
        if any(isinstance(v, int) and not isinstance(v, bool) and abs(v) > INT64_MAX for v in items):
            raise ConfigError(
                f"{key}={value} is beyond the 64-bit integers torch and numpy compute with (at most 2**63 - 1 = "
                f"{INT64_MAX}): set a realistic value" + default_hint(key, type(section))
            )


def _check_precision_and_checkpointing(cfg: RunConfig) -> None:
    """ZeRO stage, the training dtype with memory layers, and which blocks recompute."""
    t = cfg.train
    if t.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"train.zero_stage={t.zero_stage} must be 0, 1, 2 or 3")
    if t.dtype == "fp16" and cfg.model.memory.enabled:
        raise ConfigError(
            "train.dtype=fp16 is not supported with memory layers: the value pool is optimised outside "
            "DeepSpeed and would receive loss-scaled gradients; use bf16 (no loss scaling) or fp32"
        )
    if t.activation_checkpointing_layers and t.activation_checkpointing != "selective":
        raise ConfigError(
            "train.activation_checkpointing_layers is only read with "
            "train.activation_checkpointing=selective: set that mode or drop the list"
        )
    bad = [i for i in t.activation_checkpointing_layers if not 0 <= i < cfg.model.n_layers]
    if bad:
        raise ConfigError(
            f"train.activation_checkpointing_layers={list(t.activation_checkpointing_layers)} "
            f"names blocks {bad} outside 0..{cfg.model.n_layers - 1} (model.n_layers)"
        )


def _check_steps_and_batch(t: TrainConfig) -> None:
    """Step counts, the batch sizes and the seed (the world size is checked by `check_runtime`)."""
    if not t.run_dir:  # "" trained into the directory the run started in: checkpoints/, config.yaml, tensorboard/
        raise ConfigError(
            "train.run_dir is empty: name the run's directory (e.g. train.run_dir=runs/tiny), where its checkpoints, "
            "config and logs go ('.' for the directory the run starts in)"
        )
    for key in ("max_steps", "micro_batch", "global_batch"):
        if getattr(t, key) <= 0:
            raise ConfigError(
                f"train.{key}={getattr(t, key)} must be positive" + default_hint(f"train.{key}", TrainConfig)
            )
    if t.global_batch % t.micro_batch:
        nearest = max(t.micro_batch, round(t.global_batch / t.micro_batch) * t.micro_batch)
        raise ConfigError(
            f"train.global_batch={t.global_batch} is not divisible by train.micro_batch={t.micro_batch}: "
            f"choose global_batch as a multiple of micro_batch (e.g. train.global_batch={nearest}), or a "
            "micro_batch that divides it"
        )
    if t.stop_after < 0 or t.probe_limit < 0:
        raise ConfigError(
            f"train.stop_after={t.stop_after} (0: run to train.max_steps) and train.probe_limit={t.probe_limit} "
            "(fact probes per evaluation) must be >= 0"
        )
    if t.seed < 0:  # the trainer's numpy seeding refused it with a traceback after the start-up
        raise ConfigError(f"train.seed={t.seed} must be >= 0 (e.g. train.seed={-t.seed})")
    if t.max_skipped_steps < 0:  # -1 stopped at the first skip, which is train.nan_policy=stop
        raise ConfigError(
            f"train.max_skipped_steps={t.max_skipped_steps} must be >= 0 (non-finite steps skipped before the run "
            "stops; to stop at the first one, set train.nan_policy=stop)"
        )


def _check_timing(t: TrainConfig) -> None:
    """The seconds the run waits before it calls a rank hung, and the peak its FLOP/s are measured against."""
    # inf failed at start-up with an OverflowError traceback (the process group's timeout); NaN turned
    # hang detection off without a word (no comparison with NaN is true)
    if not (math.isfinite(t.hang_timeout_s) and t.hang_timeout_s >= 0):
        raise ConfigError(
            f"train.hang_timeout_s={t.hang_timeout_s} must be a number of seconds >= 0, 0 turning hang detection "
            "off" + default_hint("train.hang_timeout_s", TrainConfig)
        )
    if not (math.isfinite(t.startup_timeout_s) and t.startup_timeout_s > 0):
        raise ConfigError(
            f"train.startup_timeout_s={t.startup_timeout_s} must be a number of seconds > 0 (train.hang_timeout_s=0 "
            "turns hang detection off)" + default_hint("train.startup_timeout_s", TrainConfig)
        )
    if not (math.isfinite(t.rendezvous_timeout_s) and t.rendezvous_timeout_s > 0):
        raise ConfigError(
            f"train.rendezvous_timeout_s={t.rendezvous_timeout_s} must be > 0, the seconds the ranks wait for each "
            "other at the start" + default_hint("train.rendezvous_timeout_s", TrainConfig)
        )
    if not (math.isfinite(t.lost_peer_grace_s) and t.lost_peer_grace_s > 0):
        raise ConfigError(
            f"train.lost_peer_grace_s={t.lost_peer_grace_s} must be > 0, the seconds a rank waits for an error of "
            "its own after another rank's process on its node ended"
            + default_hint("train.lost_peer_grace_s", TrainConfig)
        )
    if t.peak_flops is not None and not (math.isfinite(t.peak_flops) and t.peak_flops > 0):
        raise ConfigError(
            f"train.peak_flops={t.peak_flops} must be a GPU's dense bf16 peak in FLOP/s (e.g. 9.89e14 for "
            "an H100 SXM), or null to take it from the GPU's name"
        )


def _check_data(cfg: RunConfig) -> None:
    """The data section's own values; those of the embedded corpus only when it is the one read."""
    d = cfg.data
    if d.seq_len <= 0 or d.seq_len > cfg.model.max_seq_len:
        raise ConfigError(
            f"data.seq_len={d.seq_len} must be in 1..model.max_seq_len={cfg.model.max_seq_len}"
            + (
                f": set model.max_seq_len={d.seq_len} (data.seq_len follows the prepared dataset)"
                if d.seq_len > cfg.model.max_seq_len and (d.dir or d.sources)
                else ""
            )
        )
    if d.num_workers < 0:
        raise ConfigError(f"data.num_workers={d.num_workers} must be >= 0")
    if d.shuffle_buffer < 0:
        raise ConfigError(f"data.shuffle_buffer={d.shuffle_buffer} must be >= 0 (sequences; 0: one batch at a time)")
    if not (d.dir or d.sources):
        _check_embedded(d)


def _check_slots(s: SlotsConfig) -> None:
    if s.sample_batches < 0:  # was a ValueError traceback once the model and engine were built
        raise ConfigError(f"slots.sample_batches={s.sample_batches} must be >= 0 (0: no background sample)")
    g = s.granularity  # a pattern, not a fixed set of choices: checked here, parsed by slots/granularity.py
    # a chunk beyond 64 bits failed in the first step's unit ids (an OverflowError traceback after the build)
    if not (
        g in ("document", "sequence") or (g.startswith("chunk:") and g[6:].isdigit() and 0 < int(g[6:]) <= INT64_MAX)
    ):
        raise ConfigError(
            f"slots.granularity={g!r} must be document, sequence or chunk:<n_tokens> (e.g. chunk:64; a chunk as "
            "long as a sequence counts as sequence)"
        )


def _check_embedded(d: DataConfig) -> None:
    """The embedded corpus's settings (no data.dir or data.sources), which the job reads only
    when it builds the corpus."""
    if not d.cache_dir:  # "" built the corpus into the directory the run started in
        raise ConfigError(
            "data.cache_dir is empty: name the folder the embedded corpus is built in (e.g. data.cache_dir=.cache/data; "
            "'.' for the directory the run starts in), or set data.dir to a prepared dataset"
        )
    if not d.val_fraction > 0 or d.min_shards <= 0:  # `not >` refuses NaN too
        raise ConfigError(
            f"data.val_fraction={d.val_fraction} and data.min_shards={d.min_shards} "
            "must be positive for the embedded corpus"
        )
    if d.val_fraction >= 1:
        raise ConfigError(
            f"data.val_fraction={d.val_fraction} must be below 1 for the embedded corpus: it is the share of "
            "documents held out for validation (e.g. 0.05), the rest are trained on"
        )
    if d.sequences_per_shard <= 0:
        raise ConfigError(
            f"data.sequences_per_shard={d.sequences_per_shard} must be positive for the embedded corpus "
            "(at most this many sequences per shard, e.g. 1024)"
        )
    from pretrain.data.tokenizer import MIN_VOCAB_SIZE  # numpy and sentencepiece, not torch

    if d.vocab_size < MIN_VOCAB_SIZE:  # refused only by the tokenizer's training, after torch and the process group
        raise ConfigError(
            f"data.vocab_size={d.vocab_size} is too small for the embedded corpus's tokenizer: its byte fallback needs "
            f">= {MIN_VOCAB_SIZE} pieces (256 bytes + 4 specials; e.g. data.vocab_size=512)"
        )
    from pretrain.data.errors import DataError
    from pretrain.data.synthetic import check_world_settings  # the standard library only

    s = d.synthetic  # refused only when the job built the corpus, after torch and the process group
    try:
        check_world_settings(s.num_entities, s.docs_per_entity, s.qa_docs_per_entity, s.new_fact_fraction)
    except DataError as err:
        raise ConfigError(str(err)) from None


def _check_optimizer(o: OptimConfig) -> None:
    """The optimizers' settings and the learning-rate schedule."""
    if o.value_momentum_dtype != "float32" and o.value_optimizer == "adamw":
        raise ConfigError(
            f"optim.value_momentum_dtype={o.value_momentum_dtype} needs a sparse value optimizer: set "
            "optim.value_optimizer=sparse_rowwise_adamw (or sparse_adamw), or value_momentum_dtype=float32"
        )
    if not (math.isfinite(o.lr) and o.lr >= 0 and math.isfinite(o.value_lr) and o.value_lr >= 0):
        raise ConfigError(f"optim.lr={o.lr} and optim.value_lr={o.value_lr} must be >= 0 and finite")
    if not (math.isfinite(o.z_loss) and o.z_loss >= 0):
        raise ConfigError(f"optim.z_loss={o.z_loss} must be >= 0 and finite (0: off; PaLM used 1e-4)")
    for key, beta in (("optim.beta1", o.beta1), ("optim.beta2", o.beta2)):
        if not 0.0 <= beta < 1.0:  # AdamW's own check, which would fail only after the model is built
            raise ConfigError(f"{key}={beta} must be in [0, 1) (AdamW's moment decay; e.g. 0.9 and 0.95)")
    if not (math.isfinite(o.eps) and o.eps >= 0) or not (math.isfinite(o.weight_decay) and o.weight_decay >= 0):
        raise ConfigError(
            f"optim.eps={o.eps} and optim.weight_decay={o.weight_decay} must be >= 0 and finite (e.g. 1e-8 and 0.1)"
        )
    # NaN turned clipping off without a word (no comparison with it is true); <= 0 is off by design, as in
    # DeepSpeed's gradient_clipping, and a run started with -1 must still resume with it
    if math.isnan(o.grad_clip):
        raise ConfigError(
            "optim.grad_clip=nan must be a number: the bound on the gradient norm (e.g. 1.0; 0 or less: no clipping)"
        )
    if o.warmup_steps < 0:
        raise ConfigError(f"optim.warmup_steps={o.warmup_steps} must be >= 0 (0: no warm-up)")
    if not 0.0 < o.decay_fraction <= 1.0:
        raise ConfigError(
            f"optim.decay_fraction={o.decay_fraction} must be in (0, 1]: the share of train.max_steps the "
            "decay takes (1: from the end of warm-up); for no decay set optim.decay_shape=none"
        )
    if not 0.0 <= o.min_lr_ratio <= 1.0:
        raise ConfigError(
            f"optim.min_lr_ratio={o.min_lr_ratio} must be in [0, 1] (the decay ends at lr * min_lr_ratio)"
        )


def _check_cadences(cfg: RunConfig) -> None:
    """Every "every N steps" setting is used as a modulus and must be positive; keeping no
    checkpoint would delete the one just written."""
    cadences = {
        "train.log_every": cfg.train.log_every,
        "train.eval_every": cfg.train.eval_every,
        "train.checkpoint_every": cfg.train.checkpoint_every,
        "slots.log_every": cfg.slots.log_every,
    }
    for key, value in cadences.items():
        if value <= 0:
            raise ConfigError(
                f"{key}={value} must be >= 1 (a number of steps); to do it rarely, set it above "
                f"train.max_steps={cfg.train.max_steps}"
            )
    if cfg.train.keep_checkpoints < 1:
        raise ConfigError(
            f"train.keep_checkpoints={cfg.train.keep_checkpoints} would delete every checkpoint, "
            "including the one just written: keep at least 1"
        )
    if cfg.train.eval_batches < 1:
        raise ConfigError(f"train.eval_batches={cfg.train.eval_batches} must be >= 1")
