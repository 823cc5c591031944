"""Real English text that ships with every machine, as a reproducible corpus for recipes and tests.

Two parts, both present wherever Python and Debian are:
- `python-docs`: CPython's own documentation topics (`pydoc_data.topics`, the text behind
  `help("if")`; ~465K characters of prose and examples in Python 3.11), one document per topic;
- `licenses`: the license texts in /usr/share/common-licenses (~240K characters), one document
  per distinct file (symlinked aliases such as GPL -> GPL-3 are read once).
The content is fixed by the Python version and the Debian release, so the same machine image
always yields the same corpus, with no download and no hand-made file.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from pretrain.data.errors import DataError
from pretrain.files import atomic_write

LICENSES_DIR = Path("/usr/share/common-licenses")
PARTS = ("python-docs", "licenses")


def python_docs() -> Iterator[dict]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield {"text": topics[name], "source": f"pydoc_data.topics/{name}"}


def licenses(directory: Path = LICENSES_DIR) -> Iterator[dict]:
    if not directory.is_dir():
        raise DataError(f"{directory} does not exist on this machine: use --part python-docs")
    seen = set()
    for path in sorted(directory.iterdir()):
        real = path.resolve()
        if real in seen or not real.is_file():
            continue
        seen.add(real)
        yield {"text": real.read_text(encoding="utf-8", errors="replace"), "source": str(path)}


def bundled_documents(parts: list[str]) -> list[dict]:
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise DataError(f"unknown part(s) {unknown}: choose from {', '.join(PARTS)}")
    readers = {"python-docs": python_docs, "licenses": licenses}
    # a part named twice (--part licenses licenses) once: its documents would be in the corpus twice
    return [doc for part in dict.fromkeys(parts) for doc in readers[part]()]


def write_bundled_corpus(out: str | Path, parts: list[str]) -> dict:
    """Write the chosen parts as JSONL ({"text", "source"} per line); return counts."""
    docs = bundled_documents(parts)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs))
    return {"documents": len(docs), "characters": sum(len(d["text"]) for d in docs)}
