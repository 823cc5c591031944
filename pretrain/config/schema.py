"""The run configuration's schema: one dataclass per section (model, data, optim, train, slots)
with each key's type, default and meaning. The model section is pretrain/model/config.py's.
String choices are `Literal` types, checked from the annotation (model/config.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from pretrain.model.config import ModelConfig


@dataclass
class SyntheticConfig:
    """The embedded fact-world corpus (pretrain.data.synthetic)."""

    num_entities: int = 2000
    docs_per_entity: int = 4
    new_fact_fraction: float = 0.1  # entities held out as "new facts" for finetuning studies
    seed: int = 1234
    qa_docs_per_entity: int = 2  # question/answer documents per entity, phrased like the probes


@dataclass
class SourceConfig:
    """One prepared dataset of a weighted mixture (pretrain.data.mixture)."""

    dir: str = ""
    weight: float = 1.0  # sequences are drawn in proportion to the weights
    name: str = ""  # for logs and per-source metrics; "" = the directory's name


@dataclass
class EvalSourceConfig:
    """A prepared dataset evaluated at every evaluation but never trained on (data.eval_sources)."""

    dir: str = ""
    name: str = ""  # heldout_loss/<name>; "" = the directory's name


@dataclass
class DataConfig:
    dir: str = ""  # prepared shards (tools/prepare_data); "" = build the embedded corpus under cache_dir
    sources: list[SourceConfig] = field(default_factory=list)  # a weighted mixture instead of data.dir
    # held-out corpora (same tokenizer and seq_len): heldout_loss/<name> at every evaluation, read
    # from their validation split, or their training split when they have none
    eval_sources: list[EvalSourceConfig] = field(default_factory=list)
    cache_dir: str = ".cache/data"
    seq_len: int = 128  # with data.dir/data.sources: the datasets' seq_len unless set explicitly
    num_workers: int = 0
    shuffle_buffer: int = 0
    on_corrupt: Literal["error", "skip"] = "error"
    # attention stays within each document of a packed sequence (a block-causal mask from the
    # batch's document ids), in training and validation; false: plain causal across documents
    document_masking: bool = False
    vocab_size: int = 512  # tokenizer trained for the embedded corpus
    val_fraction: float = 0.05  # documents of the embedded corpus held out for validation
    min_shards: int = 8  # the embedded corpus has at least this many shards per split
    sequences_per_shard: int = 1024  # upper bound on sequences per shard of the embedded corpus
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class OptimConfig:
    lr: float = 3e-3
    value_lr: float = 1e-3  # the anchor's fixed learning rate for memory values
    # follow: the dense schedule's warm-up and decay | constant: value_lr throughout
    # (cosine: this setting's name for follow before optim.decay_shape existed; still read)
    value_lr_schedule: Literal["follow", "constant", "cosine"] = "follow"
    # adamw: dense value gradients + AdamW over whole shards | sparse_adamw: only the rows read
    # this step (row-sparse gradients, lazy Adam; pretrain/parallel/sparse_adamw.py) |
    # sparse_rowwise_adamw: the same with one second moment per row (optimizer state N d + N)
    value_optimizer: Literal["adamw", "sparse_adamw", "sparse_rowwise_adamw"] = "adamw"
    # storage of the value pool's first moment (sparse optimizers only): bfloat16 halves it;
    # updates are computed in fp32 and rounded to nearest when stored
    value_momentum_dtype: Literal["float32", "bfloat16"] = "float32"
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # bound on the gradient norm (dense and values each); 0 or less: no clipping
    z_loss: float = 0.0  # weight of mean log(Z)^2 of the output softmax added to the loss (PaLM: 1e-4)
    # The schedule (pretrain/lr_schedule.py): linear warm-up, a stable phase, a decay to
    # lr * min_lr_ratio over the last decay_fraction of train.max_steps. decay_fraction=1
    # decays from the end of warm-up (classic cosine); < 1 is warmup-stable-decay (WSD),
    # which a resume may extend (a larger train.max_steps) until its decay begins.
    warmup_steps: int = 20
    decay_shape: Literal["cosine", "linear", "sqrt", "none"] = "cosine"  # sqrt: 1 - sqrt(progress); none: constant
    decay_fraction: float = 1.0
    min_lr_ratio: float = 0.1
    # resume even where the new schedule gives steps already taken other learning rates
    # (e.g. a lower lr after a loss spike); without it such a resume is refused
    allow_schedule_change: bool = False


@dataclass
class TrainConfig:
    run_dir: str = "runs/tiny"
    seed: int = 0
    max_steps: int = 300
    global_batch: int = 16  # sequences per optimizer step, over all data-parallel ranks
    micro_batch: int = 16  # sequences per rank per forward
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    zero_stage: int = 0
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 8
    probe_limit: int = 200  # fact probes answered per evaluation
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    nan_policy: Literal["stop", "skip"] = "stop"  # stop (save and exit) | skip (drop the step, count it)
    max_skipped_steps: int = 20
    stop_after: int = 0  # checkpoint and exit after this step (a time slice); 0 = run to max_steps
    # an export folder (memlayers-export) whose weights a new run starts from (pretrain/init_from.py);
    # "" = random initialisation. A run that has a checkpoint resumes from it instead.
    init_from: str = ""
    # none | full | memory | selective (pretrain/parallel/activation_checkpointing.py says what each keeps)
    activation_checkpointing: Literal["none", "full", "memory", "selective"] = "none"
    activation_checkpointing_layers: list[int] = field(default_factory=list)  # selective: these blocks
    compile: bool = False  # torch.compile each block (pretrain/parallel/compile.py)
    # MFU's denominator: a GPU's dense bf16 peak in FLOP/s (e.g. 2.25e15 for a B200). null: from
    # the GPU's name (pretrain/metrics.py PEAK_BF16_FLOPS); a GPU not named there logs MFU n/a
    peak_flops: Optional[float] = None
    # Hang detection (pretrain/watchdog.py): a rank that finishes no step, evaluation or checkpoint
    # for hang_timeout_s (startup_timeout_s until its first step) writes where it is stuck to
    # run_dir/hangs/ and the job ends; rank 0 requeues it once per checkpoint. 0 turns it off.
    hang_timeout_s: float = 600.0
    startup_timeout_s: float = 1800.0  # start-up, resume (a universal conversion), compilation
    # how long the ranks wait for each other at the start (pretrain/distributed.py); above the time
    # a job's nodes take to start, which can be a minute or more apart
    rendezvous_timeout_s: float = 600.0
    requeue_on_hang: bool = True
    # how long a rank waits, once another rank's process on its node has ended, for an error of its
    # own before it stops with the lost-rank line (pretrain/lost_peer.py LocalPeerWatch)
    lost_peer_grace_s: float = 20.0


@dataclass
class SlotsConfig:
    enabled: bool = True
    granularity: str = "document"  # document | sequence | chunk:<n_tokens>
    sample_batches: int = 0  # raw slot indices of this many batches kept (reservoir)
    log_every: int = 50


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    slots: SlotsConfig = field(default_factory=SlotsConfig)
