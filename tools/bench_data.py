"""Data-pipeline throughput, side by side in one run.

Reports (1) tokenization throughput of prepare_data (sentencepiece encode, and the whole
tokenize+pack+write path; and files/s on a folder of --files one-document files), (2) ShardLoader tokens/s on one core from prepared shards, one
reader and 4 readers (the row split of 2 ranks x 2 workers: pieces of shards) taking batches in
turn, (3) the weighted-mixture loader (two sources, 3:1) against that single dataset, same batch
and core, (4) tokens/s a tiny-model CPU training step consumes (forward + backward + AdamW of
configs/tiny.yaml's model at micro_batch x seq_len), and the loader/training ratio.

  python tools/bench_data.py [--entities 2000] [--seconds 3] [--json bench_data.json]
  python tools/bench_data.py --data data/english [data/code]    # the loader rounds on your datasets
  python tools/bench_data.py --config my_run.yaml --config-data # on its data.dir or data.sources

The loader rounds read the embedded corpus unless --data or --config-data names prepared datasets
(tools/prepare_data.py's folders): then the first one is the single dataset, at its own seq_len, and
the mixture round reads all of them with their weights (--data's equal; none with one dataset).
Tokenization and preparation are timed on the embedded corpus either way.

`--json` also writes the raw measurements (seconds of each timed part, tokens of each loader round,
each training step's time) beside the rates computed from them, with the device, date, commit and
torch version.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from kernels.benchmark import write_results  # noqa: E402
from pretrain.cli import output_file, positive_int, positive_number  # noqa: E402
from pretrain.config import ConfigError, DataConfig, RunConfig, SyntheticConfig, load_config  # noqa: E402
from pretrain.data import ShardLoader, Tokenizer, build_fact_world, prepare_embedded_dataset  # noqa: E402
from pretrain.data.errors import DataError  # noqa: E402
from pretrain.data.prepare import write_dataset  # noqa: E402
from pretrain.data.sources import Source, resolve_sources  # noqa: E402
from pretrain.words import counted  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def loader_round(
    path: Path,
    batch: int,
    seq_len: int,
    seconds: float,
    shuffle_buffer: int,
    mixture: list[Source] | None = None,
    readers: int = 1,
) -> dict:
    """Tokens a ShardLoader of `path` (`readers` of them, ranks of that world, taking batches in
    turn; or a MixtureLoader of the `mixture` sources instead)
    yields in about `seconds`, and the seconds it took: {"tokens", "seconds"}."""
    if mixture is None:
        loaders = [
            ShardLoader(path, "train", batch, seq_len, r, readers, seed=0, shuffle_buffer=shuffle_buffer, loop=True)
            for r in range(readers)
        ]
    else:
        from pretrain.data.mixture import MixtureLoader

        loaders = [MixtureLoader(mixture, batch, seed=0, shuffle_buffer=shuffle_buffer)]
    its = [iter(loader) for loader in loaders]
    for it in its:
        for _ in range(5):
            next(it)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(50):
            for it in its:
                n += next(it).tokens.numel()
    return {"tokens": n, "seconds": time.perf_counter() - start}


def folder_round(root: Path, documents: list[str], files: int, tokenizer: Tokenizer, seq_len: int) -> dict:
    """prepare_corpus on a folder of `files` one-document text files (a corpus shipped one document per
    file, in 100 subfolders), the documents cycled: {"files", "tokens", "seconds", "resolve_seconds"}
    (resolve: listing the folder and checking its files, what each pass over the inputs does before a
    document is read). One worker, so the tokenizing is the same work in every round."""
    from pretrain.data.input_files import resolve_files
    from pretrain.data.prepare import prepare_corpus

    corpus = root / "files"
    for i in range(files):
        folder = corpus / f"{i % 100:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:07d}.txt").write_text(documents[i % len(documents)])
    start = time.perf_counter()
    resolve_files([corpus])
    resolve_s = time.perf_counter() - start
    start = time.perf_counter()
    with warnings.catch_warnings():  # val_fraction=0 (any --files has a split): "no validation split"
        warnings.simplefilter("ignore")
        manifest = prepare_corpus(
            [corpus], root / "prepared", seq_len, tokenizer_path=tokenizer.path, val_fraction=0, show_progress=False
        )
    seconds = time.perf_counter() - start
    tokens = sum(split["tokens"] for split in manifest["splits"].values())
    return {"files": files, "tokens": tokens, "seconds": seconds, "resolve_seconds": resolve_s}


def datasets(data_dirs: list[str] | None, config_data: bool, cfg: RunConfig, config_path: str) -> list[Source]:
    """The prepared datasets the loader rounds read, checked as the trainer checks them: --data's folders
    (equal weights), or --config's data.dir / data.sources (--config-data); [] for the embedded corpus."""
    if config_data:
        found = resolve_sources(cfg.data)
        if not found:
            raise DataError(
                f"--config-data: {config_path} names no prepared dataset (its data.dir and data.sources are "
                "empty: it trains on the embedded corpus, which the rounds read without the option)"
            )
        return found
    if not data_dirs:
        return []
    if len(data_dirs) == 1:
        return resolve_sources(SimpleNamespace(dir=data_dirs[0], sources=[]))
    return resolve_sources(SimpleNamespace(dir="", sources=[{"dir": d, "weight": 1.0, "name": ""} for d in data_dirs]))


def rate(measured: dict) -> float:
    """Tokens per second of a loader round."""
    return measured["tokens"] / measured["seconds"]


def training_step_times(cfg: RunConfig, batch: int, seq_len: int, steps: int) -> list[float]:
    """Seconds of each of `steps` CPU training steps (after two untimed ones) of the config's model."""
    from pretrain.model.objective import language_model_loss
    from pretrain.model.transformer import Transformer

    torch.manual_seed(0)
    model = Transformer(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, cfg.model.vocab_size, (batch, seq_len + 1))

    def step():
        loss = language_model_loss(model(tokens[:, :-1]), tokens[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "configs/tiny.yaml"), help="the model whose training step is timed")
    data = ap.add_mutually_exclusive_group()
    data.add_argument(
        "--data",
        nargs="+",
        metavar="DIR",
        help="prepared dataset folder(s) the loader rounds read (tools/prepare_data.py)",
    )
    data.add_argument(
        "--config-data", action="store_true", help="the loader rounds read --config's data.dir or data.sources"
    )
    ap.add_argument("--entities", type=positive_int, default=2000, help="fact-world size of the benchmark corpus")
    ap.add_argument(
        "--micro-batch", type=positive_int, default=16, help="rows per loader batch and per training micro-batch"
    )
    ap.add_argument(
        "--seq-len", type=positive_int, default=128, help="of the embedded corpus (a prepared dataset's is its own)"
    )
    ap.add_argument(
        "--seconds", type=positive_number("e.g. 3", what="number of seconds"), default=3.0, help="loader measuring time"
    )
    ap.add_argument(
        "--files", type=positive_int, default=5000, help="one-document files of the folder prepare_data reads"
    )
    ap.add_argument("--train-steps", type=positive_int, default=3, help="training steps timed beside the loader")
    ap.add_argument("--json", type=output_file("bench_data.json"), default=None, help="also write the raw times here")
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        train_cfg = load_config(args.config)  # its model's steps are timed last, after the data rounds
        sources = datasets(args.data, args.config_data, train_cfg, args.config)
    except (ConfigError, DataError) as err:
        ap.error(str(err))
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cfg = DataConfig(cache_dir=str(tmp / "cache"), synthetic=SyntheticConfig(num_entities=args.entities))
        path = prepare_embedded_dataset(cfg, args.seq_len, show_progress=False)
        tok = Tokenizer(path / "tokenizer.model")
        docs = build_fact_world(args.entities, seed=cfg.synthetic.seed).train_documents
        start = time.perf_counter()
        ids = tok.encode_batch(docs)
        encode_s = time.perf_counter() - start
        n_tokens = sum(len(x) + 1 for x in ids)
        start = time.perf_counter()
        write_dataset(
            tok.encode_batch(docs),
            tmp / "again",
            tok,
            args.seq_len,
            val_fraction=0.05,
            sequences_per_shard=1024,
            show_progress=False,
        )
        prepare_s = time.perf_counter() - start
        folder = folder_round(tmp, docs, args.files, tok, args.seq_len)
        if sources:
            path, seq_len = sources[0].dir, int(sources[0].manifest["seq_len"])
            mixture = sources if len(sources) > 1 else None
        else:
            seq_len, halves = args.seq_len, [(path, 3.0, "a"), (tmp / "again", 1.0, "b")]
            mixture = resolve_sources(
                SimpleNamespace(dir="", sources=[{"dir": str(d), "weight": w, "name": n} for d, w, n in halves])
            )

        torch.set_num_threads(1)
        plain = loader_round(path, args.micro_batch, seq_len, args.seconds, 0)
        shuffled = loader_round(path, args.micro_batch, seq_len, args.seconds, 1024)
        split = loader_round(path, args.micro_batch, seq_len, args.seconds, 0, readers=4)
        # Alternating short rounds, medians: a load change on a shared machine hits both sides alike.
        single_rounds, mixed_rounds = [], []
        for _ in range(4 if mixture else 0):
            single_rounds.append(loader_round(path, args.micro_batch, seq_len, args.seconds / 2, 0))
            mixed_rounds.append(loader_round(path, args.micro_batch, seq_len, args.seconds / 2, 0, mixture=mixture))
    torch.set_num_threads(threads)
    raw = {
        "corpus_tokens": n_tokens,
        "documents": len(docs),
        "encode_s": encode_s,
        "prepare_s": prepare_s,
        "folder_prepare": folder,
        "loader_plain": plain,
        "loader_shuffled": shuffled,
        "loader_row_split_4_readers": split,
        "single_rounds": single_rounds,
        "mixture_rounds": mixed_rounds,
        "loader_datasets": [str(s.dir) for s in sources] or ["embedded"],
        "train_step_s": training_step_times(train_cfg, args.micro_batch, seq_len, args.train_steps),
        "train_tokens_per_step": args.micro_batch * seq_len,
    }
    summary = summarize(raw)
    print(f"corpus: {len(docs)} documents, {n_tokens} tokens (fact world, {args.entities} entities)")
    if sources:
        shown = ", ".join(f"{s.dir} ({s.train_sequences:,} training sequences, weight {s.weight:g})" for s in sources)
        print(f"loader datasets (seq_len {seq_len}): {shown}")
    print(f"tokenization (sentencepiece encode, 1 process):    {summary['encode_tokens_per_s'] / 1e6:8.2f} M tokens/s")
    print(
        f"prepare_data (encode + pack + write shards):        {summary['prepare_tokens_per_s'] / 1e6:8.2f} M tokens/s"
    )
    print(
        f"prepare_data on a folder of {args.files} one-document files: {summary['folder_files_per_s']:8.0f} files/s "
        f"({folder['seconds']:.2f} s; listing and checking the folder once: {folder['resolve_seconds']:.2f} s)"
    )
    batch = f"{args.micro_batch}x{seq_len}"
    print(
        f"loader, 1 core, batch {batch}, no shuffle:      {summary['loader_plain_tokens_per_s'] / 1e6:8.2f} M tokens/s"
    )
    print(
        f"loader, 1 core, batch {batch}, shuffle 1024:    {summary['loader_shuffled_tokens_per_s'] / 1e6:8.2f} M tokens/s"
    )
    print(
        f"loader, 1 core, 4 readers' row split in turn, no shuffle: "
        f"{summary['loader_row_split_4_readers_tokens_per_s'] / 1e6:8.2f} M tokens/s"
    )
    single, mixed = summary["single_median_tokens_per_s"], summary["mixture_median_tokens_per_s"]
    if mixture:
        weights = ":".join(f"{s.weight:g}" for s in mixture)
        print(
            f"single dataset vs mixture ({counted(len(mixture), 'source')}, {weights}), alternating rounds, no "
            f"shuffle: {single / 1e6:.2f} vs {mixed / 1e6:.2f} M tokens/s ({mixed / single:.2f}x)"
        )
    else:
        print("single dataset vs mixture: not measured (one dataset given)")
    print(
        f"training step ({Path(args.config).name}, fwd+bwd+AdamW, {counted(threads, 'thread')}): {summary['train_tokens_per_s'] / 1e6:8.4f} M tokens/s"
    )
    ratio, loader = summary["loader_over_training"], summary["loader_tokens_per_s"]
    print(f"loader / training: {ratio:.0f}x (need >= 20x); loader >= 5M tokens/s: {loader >= 5e6}")
    if args.json:
        write_results(args.json, "cpu", vars(args), threads=threads, raw=raw, summary=summary)
        print(f"results written to {args.json}")
    return 0 if summary["passed"] else 1


def summarize(raw: dict) -> dict:
    """The rates the report prints, from the raw measurements; `passed`: loader >= 20x training and
    >= 5M tokens/s (the loader's criterion is the slower of its plain and shuffled rounds)."""
    steps = raw["train_step_s"]
    train = len(steps) * raw["train_tokens_per_step"] / sum(steps)
    plain, shuffled = rate(raw["loader_plain"]), rate(raw["loader_shuffled"])
    loader = min(plain, shuffled)
    return {
        "encode_tokens_per_s": raw["corpus_tokens"] / raw["encode_s"],
        "prepare_tokens_per_s": raw["corpus_tokens"] / raw["prepare_s"],
        "folder_files_per_s": raw["folder_prepare"]["files"] / raw["folder_prepare"]["seconds"],
        "loader_plain_tokens_per_s": plain,
        "loader_shuffled_tokens_per_s": shuffled,
        "loader_row_split_4_readers_tokens_per_s": rate(raw["loader_row_split_4_readers"]),
        "single_median_tokens_per_s": statistics.median(map(rate, raw["single_rounds"]))
        if raw["single_rounds"]
        else None,
        "mixture_median_tokens_per_s": statistics.median(map(rate, raw["mixture_rounds"]))
        if raw["mixture_rounds"]
        else None,
        "train_tokens_per_s": train,
        "loader_tokens_per_s": loader,
        "loader_over_training": loader / train,
        "passed": loader / train >= 20 and loader >= 5e6,
    }


if __name__ == "__main__":
    sys.exit(main())
