"""Which prepared datasets a run trains on, checked before any heavy work.

`resolve_sources(data_cfg)` turns `data.sources` (a list of {dir, weight, name}) or a single
`data.dir` (a mixture of one) into `Source`s and refuses bad input with the source named
and the fix: a missing directory or manifest, a weight <= 0, a source without training
sequences, sources made with different seq_len or different tokenizers (both files named).
Only manifests are read, so this is cheap enough for config loading.

`dataset_values(sources)` are the values a dataset already records (vocabulary size,
sequence length) that the config follows unless the user sets them explicitly.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from pathlib import Path

from pretrain.data.errors import DataError
from pretrain.data.shards import read_manifest

VOCAB_MULTIPLE = 64  # model.vocab_size follows the tokenizer, padded up to this multiple (faster matmuls)


@dataclass(frozen=True, eq=False)  # compared and hashed by identity
class Source:
    name: str
    dir: Path
    weight: float
    manifest: dict

    @property
    def train_sequences(self) -> int:
        return int(self.manifest["splits"]["train"]["sequences"])

    @property
    def has_validation(self) -> bool:
        val = self.manifest["splits"].get("val", {})
        return bool(val.get("shards")) and int(val.get("sequences", 0)) > 0

    @property
    def has_probes(self) -> bool:
        return (self.dir / "probes.jsonl").is_file()


def padded_vocab_size(tokenizer_vocab: int, multiple: int = VOCAB_MULTIPLE) -> int:
    return multiple * math.ceil(tokenizer_vocab / multiple)


def _label(index: int, name: str, many: bool, directory: Path) -> str:
    return f"data.sources[{index}] ({name})" if many else f"data.dir={directory}"


def resolve_sources(data_cfg, seq_len: int | None = None) -> list[Source]:
    """The configured datasets as checked `Source`s; [] when the embedded corpus is used."""
    specs = list(data_cfg.sources or [])
    if specs and data_cfg.dir:
        raise DataError(
            f"data.dir={data_cfg.dir} and data.sources are both set: use data.sources alone "
            "(a single dataset is a mixture of one)"
        )
    if not specs:
        if not data_cfg.dir:
            return []
        specs = [{"dir": data_cfg.dir, "weight": 1.0, "name": ""}]
    many = bool(data_cfg.sources)
    sources: list[Source] = []
    for i, spec in enumerate(specs):
        get = spec.get if isinstance(spec, dict) else lambda k, s=spec: getattr(s, k)
        directory = Path(str(get("dir") or ""))
        name = str(get("name") or directory.name or f"source{i}")
        label = _label(i, name, many, directory)
        if not str(get("dir") or ""):
            raise DataError(f"{label}: no dir given: set data.sources[{i}].dir to a prepared dataset")
        weight = float(get("weight"))
        if not math.isfinite(weight) or weight <= 0:
            raise DataError(
                f"{label}: weight={weight} must be a positive number "
                f"(set data.sources[{i}].weight, e.g. 1.0, or remove the source)"
            )
        if not _has_manifest(directory, label):
            raise DataError(f"{label}: {_not_prepared(directory)}")
        manifest = read_manifest(directory)
        source = Source(name, directory, weight, manifest)
        if source.train_sequences <= 0:
            raise DataError(
                f"{label}: {directory} has no training sequences: re-run tools/prepare_data.py "
                "on a non-empty corpus (or a smaller --val-fraction), or remove the source"
            )
        sources.append(source)
    if not math.isfinite(sum(s.weight for s in sources)):  # each row's source is drawn with weight / sum
        raise DataError(
            f"data.sources: the weights {[s.weight for s in sources]} sum to more than a float holds, so every "
            "share would be 0 (the mixture drew only from the last source): only their ratios count, so scale "
            "them down (e.g. 1.0 for each)"
        )
    _check_consistent(sources, many, seq_len)
    return sources


def _has_manifest(directory: Path, label: str) -> bool:
    """Whether `directory` holds a manifest.json; a path the system cannot look up at all (a name too long,
    a folder it may not enter) is refused naming the key, where `is_file` raised a bare OSError."""
    try:
        return (directory / "manifest.json").is_file()
    except OSError as err:
        raise DataError(
            f"{label}: {str(directory)[:200]}{'...' if len(str(directory)) > 200 else ''} cannot be looked up "
            f"({err.strerror}): name the folder of a prepared dataset (tools/prepare_data.py writes one)"
        ) from None


def _not_prepared(directory: Path, options: str = "") -> str:
    """Why `directory` (no manifest.json) is not a dataset, and the command that makes one: a folder
    of corpus files is the usual mistake (the trainer reads prepared shards, not text), and
    preparing into it would be refused, so the fix names a folder beside it."""
    if not directory.exists():
        near = _nearest_dataset(directory)
        return (
            f"{directory} holds no manifest.json (the directory does not exist): "
            + (f"did you mean {near}? Or " if near else "")
            + f"prepare it with tools/prepare_data.py --input <corpus> --output {directory}{options}"
        )
    if not directory.is_dir():  # data.dir=corpus/english.jsonl: the corpus file itself
        target = directory.parent / (directory.name.split(".")[0] + "-prepared")
        return (
            f"{directory} is a file, not a prepared dataset folder (the trainer reads the shards "
            f"tools/prepare_data.py writes); prepare it with tools/prepare_data.py --input {directory} "
            f"--output {target}{options} and name {target} here"
        )
    if (directory.parent / "manifest.json").is_file():
        return f"{directory} is a folder inside the prepared dataset {directory.parent}: name {directory.parent} itself"
    from pretrain.data.input_files import binary_text_file

    files = sorted(f for f in directory.iterdir() if f.is_file() and not f.name.startswith("."))[:1000]
    text = [f.name for f in files if not binary_text_file(f)]
    if text:
        shown = ", ".join(text[:3]) + (", ..." if len(text) > 3 else "")
        target = directory.with_name(directory.name + "-prepared")
        return (
            f"{directory} holds no manifest.json but {len(text)} file(s) of text ({shown}): a corpus, which the "
            f"trainer cannot read as it is; prepare it with tools/prepare_data.py --input {directory} "
            f"--output {target}{options} and name {target} here"
        )
    return (
        f"{directory} holds no manifest.json: prepare it with tools/prepare_data.py --input <corpus> "
        f"--output {directory}{options}"
    )


def _nearest_dataset(directory: Path) -> Path | None:
    """The prepared dataset beside a folder that does not exist whose name is closest to it
    (data/englsh -> data/english), or None."""
    parent = directory.parent
    try:
        entries = list(parent.iterdir()) if parent.is_dir() else []
    except OSError:  # a folder that may be entered but not listed (mode 711): no suggestion
        return None
    names = sorted(d.name for d in entries if _is_prepared(d))
    close = difflib.get_close_matches(directory.name, names, n=1, cutoff=0.6)
    return parent / close[0] if close else None


def _is_prepared(folder: Path) -> bool:
    try:
        return (folder / "manifest.json").is_file()
    except OSError:  # another user's private folder beside it (EACCES): not the one meant
        return False


def _check_consistent(sources: list[Source], many: bool, seq_len: int | None) -> None:
    names = [s.name for s in sources]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DataError(f"data.sources: the name(s) {repeated} are used twice: give each source its own name")
    first = sources[0]
    read_as: dict[Path, tuple[int, Source]] = {}  # each folder -> the source that reads it
    for i, src in enumerate(sources):
        label = _label(i, src.name, many, src.dir)
        if src.dir.resolve() in read_as:
            j, other = read_as[src.dir.resolve()]
            raise DataError(
                f"{label}: {src.dir} is also data.sources[{j}] ({other.name}): one folder read as two sources "
                f"has its rows drawn by both, and its validation split reported under both names; list it once "
                f"(weight {other.weight + src.weight:g} for both shares), or point {src.name!r} at its own folder"
            )
        read_as[src.dir.resolve()] = (i, src)
        _check_same_format(src, first, label, seq_len)


def _check_same_format(src: Source, first: Source, label: str, seq_len: int | None) -> None:
    """`src` has the run's seq_len and the tokenizer of `first`, else DataError naming the fix."""
    if seq_len is not None and src.manifest["seq_len"] != seq_len:
        raise DataError(
            f"{label}: {src.dir} was prepared with seq_len={src.manifest['seq_len']} but "
            f"data.seq_len={seq_len}: set data.seq_len={src.manifest['seq_len']} (or drop the "
            "override to follow the dataset), or re-run tools/prepare_data.py --seq-len "
            f"{seq_len}"
        )
    if src.manifest["seq_len"] != first.manifest["seq_len"]:
        raise DataError(
            f"{label}: {src.dir} was prepared with seq_len={src.manifest['seq_len']} but "
            f"{first.dir} with seq_len={first.manifest['seq_len']}: re-run tools/prepare_data.py "
            f"--seq-len {first.manifest['seq_len']} for {src.dir}"
        )
    if src.manifest.get("tokenizer_sha256") != first.manifest.get("tokenizer_sha256"):
        raise DataError(
            f"{label}: {src.dir / 'tokenizer.model'} (sha256 {str(src.manifest.get('tokenizer_sha256'))[:12]})"
            f" differs from {first.dir / 'tokenizer.model'} (sha256 "
            f"{str(first.manifest.get('tokenizer_sha256'))[:12]}): every source must use one tokenizer; "
            f"re-run tools/prepare_data.py --tokenizer {first.dir / 'tokenizer.model'} for {src.dir}"
        )


def dataset_values(sources: list[Source]) -> dict[str, int]:
    """Config values the datasets already record: {"model.vocab_size", "data.vocab_size", "data.seq_len"}."""
    manifest = sources[0].manifest
    return {
        "model.vocab_size": padded_vocab_size(int(manifest["vocab_size"])),
        "data.vocab_size": int(manifest["vocab_size"]),
        "data.seq_len": int(manifest["seq_len"]),
    }


def source_specs(data) -> dict[str, tuple[str, float]]:
    """{name: (dir, weight)} of a data section (a dict or DataConfig): its data.sources, or
    data.dir as a mixture of one, named as `resolve_sources` names them; {} for the embedded corpus."""
    get = data.get if isinstance(data, dict) else lambda key: getattr(data, key)
    specs = list(get("sources") or [])
    if not specs:
        specs = [{"dir": get("dir"), "weight": 1.0, "name": ""}] if get("dir") else []
    out = {}
    for i, spec in enumerate(specs):
        field = spec.get if isinstance(spec, dict) else lambda key, s=spec: getattr(s, key)
        directory = str(field("dir") or "")
        out[str(field("name") or Path(directory).name or f"source{i}")] = (directory, float(field("weight")))
    return out


def mixture_change(old, new) -> str | None:
    """How the training data of a resumed run differs from the run's so far, as one line
    ('added code (weight 1); removed web; pydocs 3 -> 1'), or None when it does not (or when
    either trains on the embedded corpus). `old` and `new` are data sections (dicts or
    DataConfigs). Sources are known by name: a kept source continues from its position, an
    added one starts at its beginning, a removed one is left where it was
    (pretrain/data/mixture.py). Raises DataError for a source renamed over the same dir,
    which would read again what the run has already read."""
    before, after = source_specs(old), source_specs(new)
    if not before or not after:
        return None
    if before == after:
        return "sources reordered" if list(before) != list(after) else None
    added = [n for n in after if n not in before]
    removed = [n for n in before if n not in after]
    read_before = {Path(before[n][0]).resolve(): n for n in removed}
    for name in added:
        old_name = read_before.get(Path(after[name][0]).resolve())
        if old_name is not None:
            raise DataError(
                f"data.sources: {name!r} reads {after[name][0]}, which this run read as {old_name!r} so far: "
                f"keep the name {old_name!r} to continue where it left off (a new name would start it again)"
            )
    parts = [f"added {n} (weight {after[n][1]:g}, from its start)" for n in added]
    parts += [f"removed {n}" for n in removed]
    parts += [f"{n} {before[n][1]:g} -> {after[n][1]:g}" for n in after if n in before and before[n][1] != after[n][1]]
    parts += [
        f"{n} moved {before[n][0]} -> {after[n][0]}" for n in after if n in before and before[n][0] != after[n][0]
    ]
    return "; ".join(parts) or "sources reordered"


def resolve_eval_sources(data_cfg, train_sources: list[Source]) -> list[Source]:
    """`data.eval_sources` as checked `Source`s: prepared, named once, not trained on, and with
    the seq_len and tokenizer of the training data (`train_sources[0]`; not compared while the
    embedded corpus is still unbuilt: the trainer checks again once it is)."""
    specs = list(getattr(data_cfg, "eval_sources", None) or [])
    trained = {s.name: s for s in train_sources}
    out: list[Source] = []
    for i, spec in enumerate(specs):
        get = spec.get if isinstance(spec, dict) else lambda k, s=spec: getattr(s, k)
        directory = Path(str(get("dir") or ""))
        name = str(get("name") or directory.name or f"eval{i}")
        label = f"data.eval_sources[{i}] ({name})"
        if not str(get("dir") or ""):
            raise DataError(f"{label}: no dir given: set data.eval_sources[{i}].dir to a prepared dataset")
        if not _has_manifest(directory, label):
            raise DataError(f"{label}: {_not_prepared(directory, ' --tokenizer <the training data tokenizer.model>')}")
        if name in trained or name in {s.name for s in out}:
            raise DataError(f"{label}: the name {name!r} is already used: set data.eval_sources[{i}].name")
        twice = [s for s in out if s.dir.resolve() == directory.resolve()]
        if twice:
            raise DataError(f"{label}: {directory} is also listed as {twice[0].name!r}: list each corpus once")
        if any(directory.resolve() == s.dir.resolve() for s in train_sources):
            raise DataError(
                f"{label}: {directory} is trained on (data.dir / data.sources): its validation split is "
                "reported as val_loss already; list only corpora the run does not train on"
            )
        source = Source(name, directory, 1.0, read_manifest(directory))
        if train_sources:
            _check_same_format(source, train_sources[0], label, None)
        out.append(source)
    return out
