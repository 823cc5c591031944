"""The corpus files a user named (--input and the like): `resolve_files` lists folders (sorted,
recursive, hidden entries left out) and expands glob patterns, keeps each file once however many
names reach it, and skips with a warning, or refuses naming the fix, what no corpus reader should
read: symbolic links that lead nowhere or out of the folder, archives, Arrow files, datasets
prepared inside the folder, binary files, a folder mixing record and plain-text files."""

from __future__ import annotations

import glob
import json
import lzma
import os
import warnings
import zlib
from pathlib import Path

from pretrain.data.errors import DataError
from pretrain.data.file_formats import COMPRESSED, format_of, open_binary
from pretrain.data.text_encoding import UTF16_BOMS

# Files no reader here takes, which were read as one document of binary garbage when named (a .tar.gz
# decompressed, then read whole, headers included): refused before any work, naming the fix.
_ARCHIVES = (".zip", ".tar", ".tgz", ".tar.gz", ".tar.zst", ".tar.bz2", ".tar.xz", ".7z", ".rar")


def _files_in(root: Path, broken: list[Path] | None = None, linked_folders: list[Path] | None = None) -> list[Path]:
    """The files under `root` (symbolic links to files included), sorted as Paths sort, hidden files and
    folders left out (`huggingface-cli download --local-dir` keeps its metadata under .cache/huggingface/
    beside the data); symbolic links to folders are not entered, as find, grep -r and Path.rglob do not
    (a link may lead back up: a loop), and appended to `linked_folders` (sorted), when given. As
    sorted(Path.rglob) with a filter, which this replaced: one scandir per folder, where rglob and a stat
    per file took ~60 us a file. Symbolic links that lead nowhere are appended to `broken` (sorted), when
    given."""
    found: list[tuple[str, ...]] = []
    dangling: list[tuple[str, ...]] = []
    folder_links: list[tuple[str, ...]] = []
    stack: list[tuple[str, ...]] = [()]
    while stack:
        parts = stack.pop()
        folder = os.path.join(root, *parts)
        try:
            entries = list(os.scandir(folder))
        except OSError as err:  # rglob skipped such a folder without a word: its documents went missing
            raise DataError(
                f"cannot list {folder} ({err.strerror}): make it readable, or name the files to read"
            ) from None
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir(follow_symlinks=False):
                stack.append((*parts, entry.name))
            elif entry.is_file():  # follows a symbolic link: a broken one, or one to a folder, is no file
                found.append((*parts, entry.name))
            elif entry.is_symlink():
                if entry.is_dir():
                    folder_links.append((*parts, entry.name))
                elif not os.path.exists(entry.path):
                    dangling.append((*parts, entry.name))
    if broken is not None:
        broken += [root.joinpath(*parts) for parts in sorted(dangling)]
    if linked_folders is not None:
        linked_folders += [root.joinpath(*parts) for parts in sorted(folder_links)]
    return [root.joinpath(*parts) for parts in sorted(found)]  # Paths compare by their parts


def resolve_files(paths: list[str | Path], option: str = "--input", fmt: str = "auto") -> list[Path]:
    """Expand directories (sorted, recursive; hidden files and folders skipped) and glob patterns
    (sorted); check that every path exists. `option`: the command-line flag the paths came from,
    named in the errors; `fmt`: the --format they are read with (auto: each file's by its suffix)."""
    if not paths:
        raise DataError(f"no input paths given: pass {option} <file or directory> ...")
    files: list[Path] = []
    # each file (device, inode: a symbolic or hard link is the file it links to) -> (the argument that
    # named it first, the path it was reached by)
    named_by: dict[tuple[int, int], tuple[str, Path]] = {}
    stats: dict[Path, os.stat_result] = {}  # each file's, found once: a stat per file
    for arg, p in zip(paths, map(Path, paths)):
        before = len(files)
        if not p.exists() and glob.has_magic(str(p)):
            matched, broken = [], []
            for m in sorted(map(Path, glob.glob(str(p), recursive=True))):
                if m.is_file():
                    matched.append(m)
                elif m.is_symlink() and not m.exists():
                    broken.append(m)
            _warn_of_broken_links(broken, arg, option)
            if not matched:
                raise DataError(f"input pattern {p} matches no file: check {option}")
            matched = _without_links(matched, arg, option, stats)
            matched = _without_archives(_without_binary(matched, arg, option), arg, option, stats)
            files.extend(matched)
        elif p.is_dir():
            _refuse_prepared(p, option)
            broken: list[Path] = []
            linked_folders: list[Path] = []
            found = _files_in(p, broken, linked_folders)
            _warn_of_broken_links(broken, arg, option, p)
            _warn_of_linked_folders(linked_folders, arg, option, p)
            found = _without_links(found, arg, option, stats, relative_to=p)
            found = _without_prepared(found, arg, option, p)
            found = _without_binary(found, arg, option, relative_to=p)
            found = _without_archives(found, arg, option, stats, relative_to=p)
            for f in found:
                _refuse_unreadable(f, option)
            if fmt == "auto":  # a --format reads every file alike: no file is read otherwise than meant
                _warn_of_mixed_formats(found, arg, option, p)
            if not found:
                raise DataError(f"input directory {p} holds no files: point {option} at your corpus")
            files.extend(found)
        elif p.is_file():
            _refuse_binary(p, option)
            files.append(p)
        else:
            raise DataError(f"input path {p} does not exist: check {option}")
        for f in files[before:]:
            _refuse_unreadable(f, option)
            key = _file_key(stats[f] if f in stats else f.stat())
            if key in named_by:
                first_arg, first = named_by[key]
                raise DataError(_read_twice(f, first, first_arg, str(arg), option))
            named_by[key] = (str(arg), f)
    return files


def _file_key(stat: os.stat_result) -> tuple[int, int]:
    """A file's identity: a symbolic or hard link is the file it links to."""
    return stat.st_dev, stat.st_ino


def _without_links(
    found: list[Path], arg, option: str, stats: dict[Path, os.stat_result], relative_to: Path | None = None
) -> list[Path]:
    """`found` (the files a folder or glob pattern `arg` reached) with each file once: of the names of
    one file (symbolic or hard links, as /usr/share/doc/base-files/FAQ -> README), the first that is
    not a symbolic link is kept, the others skipped with a warning naming them. Each file's key
    stat goes into `stats`, for the caller's later checks."""
    names: dict[tuple[int, int], list[Path]] = {}
    for f in found:
        stats[f] = f.stat()
        names.setdefault(_file_key(stats[f]), []).append(f)
    if all(len(group) == 1 for group in names.values()):
        return found

    def shown(f: Path) -> str:
        return str(f.relative_to(relative_to)) if relative_to else str(f)

    kept, skipped = set(), []
    for group in names.values():
        keep = min(group, key=Path.is_symlink) if len(group) > 1 else group[0]  # the first not a symbolic link
        kept.add(keep)
        skipped += [f"{shown(f)} (= {shown(keep)})" for f in group if f is not keep]
    warnings.warn(
        f"{option} {arg}: skipped {len(skipped)} file(s) that are links to a file it reaches by another name, "
        f"so that it is read once: {', '.join(skipped[:4])}{' ...' if len(skipped) > 4 else ''}",
        stacklevel=2,  # one place (resolve_files): shown once however many passes resolve the inputs
    )
    return [f for f in found if f in kept]


def _read_twice(path: Path, first: Path, first_arg: str, arg: str, option: str) -> str:
    """The error for one file reached by two arguments, by one name or two (a link)."""
    harm = "its documents would be read twice, some into the training and some into the validation split"
    if os.path.abspath(path) == os.path.abspath(first):
        return (
            f"{path} is named twice in {option} ({first_arg!r} and {arg!r}): {harm}; name each file once "
            "(to weight a corpus, prepare it on its own and give it a weight in data.sources)"
        )
    links = [str(p) for p in (first, path) if p.is_symlink()]
    how = (
        f"{' and '.join(links)} {'is a symbolic link' if len(links) == 1 else 'are symbolic links'}"
        if links
        else "hard links"
    )
    return (
        f"{first} and {path} are one file ({how}), reached by {option} {first_arg!r} and {arg!r}: {harm}; "
        "name each file once"
    )


def _warn_of_mixed_formats(found: list[Path], arg, option: str, root: Path) -> None:
    """A folder of record files (JSONL, Parquet) that also holds plain-text files: as a Hugging Face
    dataset downloaded with --local-dir keeps its card, README.md, beside data/*.parquet. Each text file
    is read as one more document (the card's YAML and prose among the training text): said once. A folder
    of text files with a few record files among them (/usr/share/doc: 4,128 and 66, nodejs/api/*.json.gz)
    is rather documents, of which those few are read as records: said so, with --format text."""
    kinds = {f: format_of(f, "auto") for f in found}
    text = [f for f, kind in kinds.items() if kind == "text"]
    records = [f for f, kind in kinds.items() if kind != "text"]
    if records and len(records) < len(text):
        names = ", ".join(str(f.relative_to(root)) for f in records[:4]) + (" ..." if len(records) > 4 else "")
        warnings.warn(
            f"{option} {arg}: besides its {len(text)} plain-text files it holds {len(records)} JSONL/Parquet "
            f"file(s) ({names}), read as records (a document per line or row, from the field --text-field); if "
            "they are documents like the others, pass --format text to read every file whole",
            stacklevel=2,  # one place (resolve_files): shown once however many passes resolve the inputs
        )
    elif text and records:
        names = ", ".join(str(f.relative_to(root)) for f in text[:4]) + (" ..." if len(text) > 4 else "")
        record = next(f for f in found if kinds[f] != "text")
        suffix = "".join(record.suffixes[-2:]) if record.suffix in COMPRESSED else record.suffix
        pattern = f"'{root}/**/*{suffix}'"
        warnings.warn(
            f"{option} {arg}: besides its JSONL/Parquet files it holds {len(text)} plain-text file(s) ({names}), "
            f"each read as one document; if they are not corpus text, name the data files alone (e.g. {pattern})",
            stacklevel=2,  # one place (resolve_files): shown once however many passes resolve the inputs
        )


def _warn_of_broken_links(broken: list[Path], arg, option: str, root: Path | None = None) -> None:
    """Symbolic links in a folder (or matching a glob pattern) that lead nowhere (a target moved, an
    unmounted drive): they were skipped without a word, their documents missing from the dataset. Said
    once, naming them."""
    if broken:
        names = ", ".join(f"{f.relative_to(root) if root else f} -> {os.readlink(f)}" for f in broken[:4])
        warnings.warn(
            f"{option} {arg}: skipped {len(broken)} symbolic link(s) that lead to no file ({names}"
            f"{' ...' if len(broken) > 4 else ''}): restore their targets to read them, or remove the links",
            stacklevel=2,  # one place (resolve_files): shown once however many passes resolve the inputs
        )


def _warn_of_linked_folders(links: list[Path], arg, option: str, root: Path) -> None:
    """Symbolic links to folders in a folder are not entered (_files_in). Those leading to a folder
    inside it lose nothing (/usr/share/doc holds 44, such as g++ -> cpp: its files are read there);
    those leading out of it were skipped without a word, their files missing from the corpus
    (/usr/share/doc/git/contrib/hooks -> ../../../git-core/contrib/hooks). Said once, naming them."""
    real_root = os.path.realpath(root)
    outside = [f for f in links if os.path.commonpath([real_root, os.path.realpath(f)]) != real_root]
    if outside:
        names = ", ".join(f"{f.relative_to(root)} -> {os.readlink(f)}" for f in outside[:4])
        warnings.warn(
            f"{option} {arg}: did not enter {len(outside)} symbolic link(s) to folders outside it ({names}"
            f"{' ...' if len(outside) > 4 else ''}), as find and grep -r do not: to read their files, name the "
            f"folders they lead to in {option} too",
            stacklevel=2,  # one place (resolve_files): shown once however many passes resolve the inputs
        )


def _without_archives(
    found: list[Path], arg, option: str, stats: dict[Path, os.stat_result], relative_to: Path | None = None
) -> list[Path]:
    """`found` (the files a folder or glob pattern `arg` reached) less its archives (.zip, .tar.gz, ...),
    which no reader here opens, with a warning naming them and how to include them: /usr/share/doc holds
    two test reports as .tar.gz beside 115 MB of text, and refused the whole folder for them. Where the
    archives hold at least as many bytes as the other files (a corpus shipped as archive shards beside
    its README), the corpus is in them: refused, naming them and the fix, as a named archive is."""
    packed = [f for f in found if f.name.lower().endswith(_ARCHIVES)]
    if not packed:
        return found
    rest = [f for f in found if not f.name.lower().endswith(_ARCHIVES)]
    shown = [str(f.relative_to(relative_to)) if relative_to else str(f) for f in packed[:4]]
    names = ", ".join(shown) + (" ..." if len(packed) > 4 else "")
    packed_bytes = sum(stats[f].st_size for f in packed)
    rest_bytes = sum(stats[f].st_size for f in rest)
    fix = "extract them (e.g. tar -xf or unzip) and pass the extracted files or folder"
    if packed_bytes >= rest_bytes:
        raise DataError(
            f"{option} {arg}: {len(packed)} archive(s) ({names}) hold most of its data ({packed_bytes:,} of "
            f"{packed_bytes + rest_bytes:,} bytes), and the corpus readers cannot open an archive: {fix}"
        )
    warnings.warn(
        f"{option} {arg}: skipped {len(packed)} archive(s) ({names}; {packed_bytes:,} bytes), which the corpus "
        f"readers cannot open; to read their text, {fix} too",
        stacklevel=2,  # one place (resolve_files): shown once however many passes resolve the inputs
    )
    return rest


def _refuse_unreadable(path: Path, option: str) -> None:
    """An archive or an Arrow file among the inputs: DataError naming it and what to pass instead."""
    name = path.name.lower()
    if name.endswith(_ARCHIVES):
        raise DataError(
            f"{option}: {path} is an archive, which the corpus readers cannot open: extract it (e.g. tar -xf or "
            "unzip) and pass the extracted files or folder"
        )
    if name.endswith(".arrow"):
        raise DataError(
            f"{option}: {path} is an Arrow file (as datasets' save_to_disk writes), which the corpus readers cannot "
            "open: write the dataset as Parquet or JSONL, e.g. datasets.load_from_disk(folder).to_parquet("
            "'corpus.parquet'), and pass that"
        )


def _without_prepared(found: list[Path], arg, option: str, root: Path) -> list[Path]:
    """`found` (a folder's files) less those of datasets prepared inside it (a manifest.json with
    splits and a tokenizer hash, or an OUTPUT.slices/ folder), with a warning naming them: a dataset
    prepared from a glob of the corpus folder's files may sit there, and its manifest read as JSONL
    failed the next run over the folder."""
    prepared = {f.parent for f in found if f.name == "manifest.json" and _is_manifest(f)}
    below = len(str(root))
    prepared |= {
        root / d
        for f in found
        if ".slices" in str(f)[below:]  # a few files at most: relative_to costs ~20 us a file
        for d in f.relative_to(root).parents
        if d.name.endswith(".slices")
    }
    if not prepared:
        return found
    names = ", ".join(sorted(str(d.relative_to(root)) for d in prepared))
    warnings.warn(
        f"{option} {arg}: skipped the prepared data inside it ({names}): shards, not text; move it out of the "
        "corpus folder to silence this",
        stacklevel=2,
    )
    return [f for f in found if not any(d in f.parents for d in prepared)]


def _refuse_prepared(folder: Path, option: str) -> None:
    """A prepared dataset named as the corpus (--input data/english): its shards are no text, and it
    was skipped as prepared data inside the folder, leaving 'holds no files'. Refused naming what it is,
    how to train on it, and the corpus its manifest records."""
    manifest_path = folder / "manifest.json"
    if not (manifest_path.is_file() and _is_manifest(manifest_path)):
        return
    inputs = json.loads(manifest_path.read_bytes()).get("creation", {}).get("inputs") or []
    source = f"; it was prepared from {' '.join(map(str, inputs))}" if inputs else ""
    raise DataError(
        f"{option} {folder} is a prepared dataset (shards and a manifest.json), not corpus text{source}: "
        f"pass the corpus itself to {option}, or train on the dataset as it is with data.dir={folder}"
    )


def _is_manifest(path: Path) -> bool:
    try:
        manifest = json.loads(path.read_bytes())
    except (ValueError, OSError):
        return False
    return isinstance(manifest, dict) and "splits" in manifest and "tokenizer_sha256" in manifest


def _without_binary(found: list[Path], arg, option: str, relative_to: Path | None = None) -> list[Path]:
    """`found` (the files a folder or a glob pattern `arg` reached) less those that are not text,
    with a warning naming them: `corpus/` and `'corpus/*'` both reach the recipe's corpus/tokenizer.model."""
    binary = [f for f in found if binary_text_file(f)]
    if binary:
        shown = [str(f.relative_to(relative_to)) if relative_to else str(f) for f in binary[:4]]
        names = ", ".join(shown) + (" ..." if len(binary) > 4 else "")
        warnings.warn(
            f"{option} {arg}: skipped {len(binary)} file(s) that are not text ({names}; a tokenizer.model beside "
            "the corpus, say)",
            stacklevel=2,  # one place (resolve_files), so it shows once however many passes resolve the inputs
        )
    return [f for f in found if f not in binary]


def _refuse_binary(path: Path, option: str) -> None:
    """A file named itself that is not text (binary_text_file): `smf_finetune --data model.safetensors`
    trained on the bytes of the weights. Refused, naming it."""
    if binary_text_file(path):
        raise DataError(
            f"{option} {path} is not text (a NUL byte in its first 8 KiB{', decompressed' if path.suffix.lower() in COMPRESSED else ''}, "
            "as in a model, tokenizer, image or PDF file), and would be read as one document of binary: name the "
            "text, JSONL or Parquet files to read"
        )


def binary_text_file(path: Path) -> bool:
    """A file read as text (by its suffix) whose first 8 KiB, decompressed, hold a NUL byte, as grep
    and git tell binary files: no corpus text has one, a sentencepiece model, an image or a PDF has
    (/usr/share/doc holds 7 compressed ones, such as valgrind/valgrind_manual.pdf.gz, 1.4 MB of PDF that
    was read as a document)."""
    name = path.name.lower()
    if format_of(path, "auto") != "text" or name.endswith(_ARCHIVES + (".arrow",)):
        return False  # archives and Arrow files are refused with their fix (_refuse_unreadable), not skipped
    try:
        with open_binary(path) as fh:
            head = fh.read(8192)
    except (OSError, EOFError, zlib.error, lzma.LZMAError, DataError):
        return False  # a damaged compressed file is refused, naming it, when it is read
    return b"\0" in head and not head.startswith(UTF16_BOMS)  # UTF-16 text is refused when read, not skipped
