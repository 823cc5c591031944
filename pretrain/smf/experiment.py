"""The learning-vs-forgetting sweep: every method and setting finetuned from one export.

Each run starts from a fresh load of the export, finetunes on the new facts and is
evaluated every few epochs (new-fact recall = learning; old-fact recall and validation
loss = forgetting), so every run contributes a trajectory to the frontier. Results are
rewritten (atomically) after each run: a crash keeps what was measured.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from pretrain.data import Tokenizer
from pretrain.export import load
from pretrain.export.perplexity import trained_with_document_masking
from pretrain.files import atomic_write
from pretrain.progress_bars import progress_bar
from pretrain.slots import SlotTable, load_export_for_tfidf
from pretrain.smf.dataset import FinetuneSet
from pretrain.smf.evaluation import LearningForgettingEval
from pretrain.smf.finetune import finetune
from pretrain.smf.methods import build_method


@dataclass(frozen=True)
class RunSpec:
    method: str
    lr: float
    top_t: int = 0  # sparse only
    lora_rank: int = 0  # lora only
    epochs: int = 0  # 0: the sweep's default
    max_grad_norm: float = 0.0  # sparse only: clip the selected rows' gradient norm (0 = off)

    @property
    def label(self) -> str:
        extra = {
            "sparse": f" t={self.top_t}" + (f" clip={self.max_grad_norm:g}" if self.max_grad_norm else ""),
            "lora": f" r={self.lora_rank}",
        }.get(self.method, "")
        return f"{self.method} lr={self.lr:g}{extra}" + (f" {self.epochs}ep" if self.epochs else "")


@dataclass
class SweepSettings:
    epochs: int = 10
    batch_size: int = 6  # the fact world's new_facts.jsonl holds 6 documents per entity, in order
    eval_every: int = 2
    shuffle: bool = False
    seed: int = 0


def default_grid() -> list[RunSpec]:
    """Sized for a CPU run of the tiny fact world (configs/smf_tiny.yaml).

    Sparse: t in {300, 1000, 3000} at lr 100 and lr in {30, 300} at t=1000, with the
    update's gradient norm clipped to 0.05 (the first epoch's gradients are ~5x the later
    ones; unclipped, that first jump does most of the forgetting), plus the unclipped
    t=300 run to show it; 40 epochs, since only the batch's rows learn. Full finetuning: lr in {1e-4, 3e-4, 1e-3}. LoRA:
    rank 4 at lr 1e-3, rank 32 at 1e-3 and 3e-3. Baselines run the sweep's default epochs.
    """
    runs = [RunSpec("sparse", 100.0, top_t=t, epochs=40, max_grad_norm=0.05) for t in (300, 1000, 3000)]
    runs += [RunSpec("sparse", lr, top_t=1000, epochs=40, max_grad_norm=0.05) for lr in (30.0, 300.0)]
    runs.append(RunSpec("sparse", 100.0, top_t=300, epochs=40))
    runs += [RunSpec("full", lr) for lr in (1e-4, 3e-4, 1e-3)]
    runs += [RunSpec("lora", lr, lora_rank=r) for r, lr in ((4, 1e-3), (32, 1e-3), (32, 3e-3))]
    return runs


@dataclass
class SweepInputs:
    """What every run of a sweep reads, loaded and checked once before the first run."""

    export_dir: Path
    finetune_files: list[Path]
    data: FinetuneSet
    evaluate: LearningForgettingEval
    table: SlotTable | None  # None when no run is sparse


def check_data_config_for_export(export_dir: str | Path, data_cfg) -> None:
    """Refuse (ExportError, DataError), before a dataset is built or read, an export that cannot be
    used or a data config whose dataset cannot be the one the export was trained on: the sweep reads
    that dataset's new facts and validation split with the export's tokenizer. A prepared data.dir
    is compared by the tokenizer hash of its manifest; the embedded fact world by its probes, which
    the export carries (probes.jsonl): another world trains another tokenizer."""
    from pretrain.data import DataError, load_probes
    from pretrain.data.shards import read_manifest
    from pretrain.data.synthetic import build_fact_world
    from pretrain.export.loading import export_tokenizer

    export_dir = Path(export_dir)
    tokenizer = export_tokenizer(export_dir)  # a missing export or tokenizer is named first
    fix = "pass --dataset-dir with the dataset the export was trained on, or the config and overrides of its run"
    if data_cfg.dir:
        have = read_manifest(data_cfg.dir).get("tokenizer_sha256", "")
        if have != tokenizer.sha256:
            raise DataError(
                f"data.dir={data_cfg.dir} was prepared with tokenizer sha256 {have[:12] or '<none>'}, but "
                f"{export_dir} was trained with {tokenizer.sha256[:12]}: {fix}"
            )
        return
    if not (export_dir / "probes.jsonl").is_file():
        # an export of a run on prepared text (data.dir): the config's world would be built for nothing
        raise DataError(
            f"{export_dir} has no probes.jsonl: the report measures learning and forgetting with the embedded "
            "fact world's probes, which an export carries when its run trained on that corpus (data.dir left "
            "empty, as in configs/smf_tiny.yaml); give such an export, or leave --export out to pretrain one. "
            "To finetune an export of your own text, use memlayers-smf-finetune"
        )
    syn = data_cfg.synthetic
    world = build_fact_world(
        syn.num_entities, syn.docs_per_entity, syn.qa_docs_per_entity, syn.new_fact_fraction, syn.seed
    )
    if world.probes != load_probes(export_dir):
        raise DataError(
            f"the config's embedded fact world (data.synthetic: num_entities={syn.num_entities}, seed={syn.seed}, "
            f"new_fact_fraction={syn.new_fact_fraction}, ...) is not the one {export_dir} was trained on (its "
            f"probes.jsonl differs), so its dataset would have another tokenizer: {fix}"
        )


def check_dataset_for_pretraining(dataset_dir: str | Path, data_cfg) -> Path:
    """Refuse (DataError), before pretraining, a dataset folder (the sweep's new facts and validation
    split) whose tokenizer is not that of the config's dataset, which pretraining reads (prepared
    here, as pretraining would): the export would be refused against it only after pretraining.
    Returns the config's dataset folder."""
    from pretrain.data import DataError, prepare_embedded_dataset
    from pretrain.data.shards import read_manifest

    ours = prepare_embedded_dataset(data_cfg, data_cfg.seq_len)
    want = read_manifest(ours).get("tokenizer_sha256", "")
    have = read_manifest(dataset_dir).get("tokenizer_sha256", "")
    if have != want:
        raise DataError(
            f"--dataset-dir {dataset_dir} was prepared with tokenizer sha256 {have[:12] or '<none>'}, but the "
            f"config's dataset {ours}, which pretraining reads, with {want[:12]}: the pretrained model could not "
            "be evaluated on it; leave --dataset-dir out (the config's dataset is used), or give --export with "
            "the model trained on it"
        )
    return ours


def load_sweep_inputs(
    export_dir: str | Path,
    finetune_files: list[str | Path],
    dataset_dir: str | Path | None = None,
    with_table: bool = True,
) -> SweepInputs:
    """The export's tokenizer, slot table (with_table: checked against model, tokenizer and run),
    the finetuning set and the evaluation. Raises ExportError, DataError, TableMismatchError,
    FileNotFoundError or ValueError (no trained-fact probes) naming what is missing, before any
    finetuning."""
    export_dir = Path(export_dir)
    if with_table:  # the table checked against model and tokenizer
        # the sweep has no --table: its sparse runs rank against the export's own table
        base, _, table, _ = load_export_for_tfidf(export_dir, other_fix="leave the sparse runs out of --runs")
    else:
        base, table = load(export_dir), None
    tokenizer = Tokenizer(export_dir / "tokenizer.model")
    data = FinetuneSet(finetune_files, tokenizer, base.cfg.max_seq_len)
    masking = trained_with_document_masking(export_dir)
    evaluate = LearningForgettingEval(
        export_dir, tokenizer, base.cfg.max_seq_len, dataset_dir, document_masking=masking
    )
    if evaluate.old is None:  # forgetting is what a sweep compares: refused before any run
        raise ValueError(
            f"{export_dir}/probes.jsonl has no trained-fact probe (is_new_fact false) that fits the model's "
            "context: a sweep measures forgetting on them; use the probes of the corpus the export was trained on"
        )
    return SweepInputs(export_dir, [Path(p) for p in finetune_files], data, evaluate, table)


def run_sweep(
    inputs: SweepInputs,
    runs: list[RunSpec],
    settings: SweepSettings,
    out_json: str | Path,
    show_progress: bool = True,
) -> dict:
    """Finetune a fresh copy of the export for every run; return (and keep writing to `out_json`) the report."""
    export_dir, data, evaluate, table = inputs.export_dir, inputs.data, inputs.evaluate, inputs.table
    if table is None and any(spec.method == "sparse" for spec in runs):
        raise ValueError("sparse runs need the slot table: load_sweep_inputs(..., with_table=True)")
    report = {
        "export": str(export_dir),
        "finetune_files": [str(p) for p in inputs.finetune_files],
        "finetune_rows": len(data),
        "finetune_tokens": data.num_tokens,
        "settings": asdict(settings),
        "before": {**evaluate(load(export_dir)), **evaluate.guessing()},
        "runs": [],
    }
    bar = progress_bar(runs, desc="smf sweep", unit="run", disable=not show_progress)
    for spec in bar:
        bar.set_postfix_str(spec.label)
        torch.manual_seed(settings.seed)
        model = load(export_dir)
        method = build_method(
            spec.method,
            model,
            lr=spec.lr,
            table=table,
            top_t=spec.top_t or 500,
            lora_rank=spec.lora_rank or 8,
            max_grad_norm=spec.max_grad_norm,
        )
        start = time.perf_counter()
        history = finetune(
            method,
            data,
            spec.epochs or settings.epochs,
            settings.batch_size,
            settings.shuffle,
            settings.seed,
            evaluate,
            log=None,
            eval_every=settings.eval_every,
        )
        record = {**asdict(spec), "label": spec.label, "seconds": time.perf_counter() - start, "history": history}
        if spec.method == "sparse":
            record["rows_updated"] = method.rows_updated
        report["runs"].append(record)
        atomic_write(out_json, json.dumps(report, indent=1) + "\n")
        last = history[-1]
        bar.write(
            f"{spec.label}: new {last['new_fact_recall']:.3f} old {last.get('old_fact_recall', float('nan')):.3f}"
            f" val {last.get('val_loss', float('nan')):.3f} ({record['seconds']:.0f} s)"
        )
    return report
