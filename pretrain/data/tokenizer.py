"""SentencePiece tokenizer: training on a corpus sample and a small loading wrapper.

Fixed special ids: 0 = <pad>, 1 = <unk>, 2 = <s> (BOS), 3 = </s> (EOS). Byte fallback is
on, so every input encodes without <unk>. `Tokenizer.sha256` is the hash of the model
file, recorded in shard manifests to catch a mismatched tokenizer.

Text is kept as written (`keep_whitespace`, the default): no normalization, newlines (id 4, one
piece each), tabs and runs of spaces are encoded, so decode(encode(text)) == text. sentencepiece's
default instead collapses every run of whitespace, newlines included, into one space; the
embedded fact world (single-line prose) keeps that tokenizer, so its cached datasets stay valid.

`encode` reads "</s>" in the text as its characters (training data is encoded so). A prompt is
read as the export's Hugging Face tokenizer (pretrain/hf/tokenization_memlayers.py) reads it:
`encode_with_special_tokens` turns the text of a special token ("</s>", "<unk>", "<pad>") into its
id and encodes the text between them piece by piece; `decode_with_special_tokens` writes special
ids as their text, as that tokenizer's decode does.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import sentencepiece as spm

from pretrain.data.errors import DataError
from pretrain.data.worker_exits import ended_by
from pretrain.files import atomic_write
from pretrain.slurm import stop_signals_blocked

MIN_VOCAB_SIZE = 260  # what a tokenizer with byte fallback holds at least: 256 byte pieces + 4 specials

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
MAX_SENTENCE_BYTES = 4096
# A document longer than this (characters) is encoded in pieces (Tokenizer.cut_document): sentencepiece
# took ~40 bytes per character to encode one whole, its working memory and the list of ids it returns
# (measured: a 60 MiB document, 2.6 GB above the 0.6 GB held before, 3.1 GB resident).
PIECE_CHARS = 1 << 20
# A document that cannot be cut (Tokenizer.cuts_at_newlines) is encoded whole; above this many characters a
# warning says so, with the memory it takes: sentencepiece 0.2.3's unigram encoding of a 63.1M-character
# document (Python sources and /usr/share/doc text, ASCII) took 1.71 GB above what was held before, ~27 bytes a
# byte of UTF-8; per character it grows with the bytes a character takes (16M characters of that text with its
# letters mapped to Cyrillic and CJK, 27.3 MB of UTF-8: 20 bytes a byte with a tokenizer trained on it, 30 with
# the English one, which writes them as bytes; 34 and 52 bytes a character).
WHOLE_DOCUMENT_WARNING_CHARS = 16 << 20
ENCODE_BYTES_PER_UTF8_BYTE = 27
NEWLINE = "\n"  # a piece of its own when whitespace is kept (training samples lines, which hold none)


class Tokenizer:
    """Load a sentencepiece model file; encode/decode without adding BOS/EOS."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if path.is_dir():
            inside = path / "tokenizer.model"
            hint = f"pass {inside}" if inside.is_file() else "name the .model file itself"
            raise DataError(f"tokenizer model {path} is a folder: {hint}")
        if not path.is_file():
            raise DataError(f"tokenizer model {path} does not exist: train one with tools/train_tokenizer.py")
        self.path = path
        blob = path.read_bytes()
        self.sha256 = hashlib.sha256(blob).hexdigest()
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(blob)
        except RuntimeError as err:
            raise DataError(f"{path} is not a sentencepiece model ({err})") from None
        self.bos_id = self._sp.bos_id()
        self.eos_id = self._sp.eos_id()
        self.pad_id = self._sp.pad_id()
        self.vocab_size = self._sp.get_piece_size()
        if self.eos_id < 0:
            raise DataError(f"tokenizer {path} has no EOS piece: train it with tools/train_tokenizer.py")

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(texts)

    @functools.cached_property
    def cuts_at_newlines(self) -> bool:
        """Whether a document cut before a newline encodes, piece by piece, to the ids of the whole: a BPE
        tokenizer whose normalizer keeps "\n" as it is and in which no piece but "\n" holds one (as
        train_tokenizer makes them, whitespace kept: "\n" is a user-defined piece, and the sample's lines
        hold none). No BPE merge then joins across a line end, and merges are ordered by score, then
        position, so each line is segmented as it would be alone. A unigram tokenizer is not cut: its best
        path passes each line end too, but sentencepiece keeps the path score as a float32 running sum
        (rebased past 1e5), and two segmentations of a line that score the same, such as 16 + 3 spaces and
        3 + 16, are told apart by its rounding, which depends on the text before (a 60 MiB document of
        Python sources cut at 1 MiB: 3 pairs of tokens swapped in its first 3 MB)."""
        from sentencepiece import sentencepiece_model_pb2

        model = sentencepiece_model_pb2.ModelProto.FromString(self._sp.serialized_model_proto())
        if model.trainer_spec.model_type != sentencepiece_model_pb2.TrainerSpec.BPE:
            return False
        # every character kept as written, spaces beside a newline too: sentencepiece's default
        # remove_extra_whitespaces drops those at a piece's end and merges those across a newline into one
        # (a BPE tokenizer with the identity rule and "\n" user-defined, but that default: 131 of 200 cut
        # documents encoded differently); a normalization rule may map text across a newline ("\r\n")
        kept = (
            self._sp.normalize(" a  \n  b ") == "\u2581\u2581a\u2581\u2581\n\u2581\u2581b\u2581"
        )  # "\u2581" added first
        if not kept or model.normalizer_spec.precompiled_charsmap:
            return False
        holding = [p for p in model.pieces if NEWLINE in p.piece]
        return [p.piece for p in holding] == [NEWLINE] and holding[0].type == holding[0].USER_DEFINED

    def cut_document(self, text: str) -> list[str]:
        """`text` in pieces of at least PIECE_CHARS characters, each after the first starting at a
        newline (a line longer than that stays whole), which `encode_pieces` encodes to the ids of the
        whole text with a bounded memory; [text] when it is short, or when this tokenizer's tokens may
        span a newline (`cuts_at_newlines`)."""
        if len(text) <= PIECE_CHARS:
            return [text]
        if not self.cuts_at_newlines:
            if len(text) > WHOLE_DOCUMENT_WARNING_CHARS:
                self._warn_of_whole_encoding(len(text), len(text.encode("utf-8", "surrogatepass")))
            return [text]
        pieces, start = [], 0
        while (cut := text.find(NEWLINE, start + PIECE_CHARS)) >= 0:
            pieces.append(text[start:cut])
            start = cut
        pieces.append(text[start:])
        return pieces

    def _warn_of_whole_encoding(self, chars: int, utf8_bytes: int) -> None:
        """No cut of a unigram tokenizer's document is provably the same ids as the whole: sentencepiece's path
        score is a float32 sum set back to 0 wherever it passes 1e5 (a place that depends on all the text
        before), and ties between equal-scoring segmentations follow its rounding (a 6 MB document of Python
        sources cut at newlines every 1M characters: 45 of 1.96M tokens differed). So such a document is
        encoded whole, and a long one is named with the memory that takes."""
        from sentencepiece import sentencepiece_model_pb2 as pb

        model = pb.ModelProto.FromString(self._sp.serialized_model_proto())
        why = (
            "is a unigram model, whose segmentation of a line may depend on the text before it"
            if model.trainer_spec.model_type == pb.TrainerSpec.UNIGRAM
            else "normalizes text (whitespace or characters) in a way that may join text across a line end"
        )
        warnings.warn(
            f"a document of {chars:,} characters is encoded whole, as {self.path} {why}: sentencepiece then "
            f"holds about {utf8_bytes * ENCODE_BYTES_PER_UTF8_BYTE / 2**20:,.0f} MiB (~{ENCODE_BYTES_PER_UTF8_BYTE} bytes "
            f"a byte of its {utf8_bytes:,} bytes of UTF-8) in each tokenizing process (--workers). A BPE tokenizer as tools/train_tokenizer.py makes "
            f"by default (--model-type bpe) encodes it in pieces of {PIECE_CHARS:,} characters (its ids of the whole "
            "document, in bounded memory); or split such documents",
            stacklevel=3,
        )

    def encode_pieces(self, pieces: list[str], continued: list[bool]) -> list[np.ndarray]:
        """The ids (int32) of each piece; a `continued` one (a piece after the first of `cut_document`,
        starting with its newline) without the tokens sentencepiece puts before the newline for the
        "\u2581" it adds at the start of the text it encodes (add_dummy_prefix): within the whole
        document there is none."""
        encoded = self._sp.encode_as_numpy(pieces)
        newline = self._sp.piece_to_id(NEWLINE)
        return [ids[np.argmax(ids == newline) :] if cont else ids for ids, cont in zip(encoded, continued)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))

    @property
    def special_tokens(self) -> dict[str, int]:
        """Text -> id of the special tokens of the export's Hugging Face tokenizer: EOS (the
        document separator, also its start token), UNK, and PAD (EOS where the model has none);
        sentencepiece's BOS piece "<s>", never seen in training, is not one of them."""
        piece = self._sp.id_to_piece
        ids = [self.eos_id, self._sp.unk_id(), self.pad_id if self.pad_id >= 0 else self.eos_id]
        return {piece(i): i for i in ids if i >= 0}

    def encode_with_special_tokens(self, text: str) -> list[int]:
        """`encode`, except that the text of a special token ("</s>") becomes its id and the text
        between two is encoded on its own, as the export's Hugging Face tokenizer encodes a prompt."""
        specials = self.special_tokens
        pattern = "|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True))
        ids: list[int] = []
        for i, part in enumerate(re.split(f"({pattern})", text)):
            if i % 2:
                ids.append(specials[part])
            elif part:
                ids.extend(self._sp.encode(part))
        return ids

    def decode_with_special_tokens(self, ids: Iterable[int]) -> str:
        """`decode`, except that special ids are written as their text ("</s>") and the ids between
        two are decoded on their own, as the export's Hugging Face tokenizer decodes."""
        specials = set(self.special_tokens.values())
        parts, run = [], []
        for i in map(int, ids):
            if i in specials:
                parts += [self._sp.decode(run), self._sp.id_to_piece(i)]
                run = []
            else:
                run.append(i)
        return "".join([*parts, self._sp.decode(run)])

    def __getstate__(self):  # picklable into worker processes: reload from the file
        return {"path": str(self.path)}

    def __setstate__(self, state):
        self.__init__(state["path"])


@dataclasses.dataclass
class SampleSize:
    """How much text a tokenizer's sample holds and was drawn from: non-blank lines and their UTF-8
    bytes (as read, before a line is cut to MAX_SENTENCE_BYTES), and the documents read."""

    lines: int = 0
    bytes: int = 0
    lines_read: int = 0
    bytes_read: int = 0
    documents_read: int = 0


def sample_line(size: SampleSize, files: list[Path], inputs: list[str]) -> str:
    """The line train_tokenizer and prepare_data print once the sample is drawn: what the tokenizer is
    trained on, and drawn from (a 50 GB corpus gives it --max-sentences lines)."""
    from pretrain.data.corpus import input_bytes
    from pretrain.refused_writes import mib
    from pretrain.words import counted

    share = "all" if size.lines == size.lines_read else "a seeded uniform sample"
    return (
        f"tokenizer sample: {size.lines:,} of {size.lines_read:,} non-blank lines ({share}; {mib(size.bytes)} of "
        f"{mib(size.bytes_read)} of text), from {size.documents_read:,} document{'s' * (size.documents_read != 1)} in "
        f"{counted(len(files), 'file')} ({mib(input_bytes(files))} as stored) of --input {' '.join(map(str, inputs))}"
    )


def _lines(documents: Iterable[str], keep_whitespace: bool = True, size: SampleSize | None = None) -> Iterator[str]:
    """Non-blank lines, cut to MAX_SENTENCE_BYTES; their indentation kept with `keep_whitespace`. `size`
    counts the documents, lines and bytes read."""
    size = size if size is not None else SampleSize()
    for doc in documents:
        size.documents_read += 1
        for line in doc.splitlines():
            line = line.rstrip() if keep_whitespace else line.strip()
            if line.strip():
                encoded = line.encode("utf-8")
                size.lines_read += 1
                size.bytes_read += len(encoded)
                yield encoded[:MAX_SENTENCE_BYTES].decode("utf-8", errors="ignore")


def sample_sentences(
    documents: Iterable[str],
    max_sentences: int,
    seed: int = 0,
    keep_whitespace: bool = True,
    size: SampleSize | None = None,
) -> list[str]:
    """At most `max_sentences` non-blank lines, a uniform sample over the whole stream; `size` (if
    given) is filled in with the sample's size and what it was drawn from.

    Reservoir sampling (seeded, so reproducible): memory stays bounded by `max_sentences`
    lines however large the corpus; a corpus with fewer lines is kept whole and in order.
    """
    size = size if size is not None else SampleSize()
    rng = random.Random(seed)
    reservoir: list[str] = []
    for seen, line in enumerate(_lines(documents, keep_whitespace, size)):
        if seen < max_sentences:
            reservoir.append(line)
        else:
            slot = rng.randrange(seen + 1)
            if slot < max_sentences:
                reservoir[slot] = line
    size.lines, size.bytes = len(reservoir), sum(len(line.encode("utf-8")) for line in reservoir)
    return reservoir


def _covered_characters(counts: collections.Counter, coverage: float) -> int:
    """How many of the characters counted sentencepiece gives a piece at `coverage`: the commonest,
    until they make up `coverage` of all occurrences (trainer_interface.cc, as it counts them)."""
    total, covered, taken = sum(counts.values()), 0, 0
    for count in sorted(counts.values(), reverse=True):
        if covered / total >= coverage:
            break
        covered += count
        taken += 1
    return taken


_WORKER = Path(__file__).with_name("sentencepiece_worker.py")
_CTRL_C_AND_STOPS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


SEND_BATCH = 4096  # sentences written to the trainer at a time


def _send_sentences(trainer: subprocess.Popen, sentences: list[str]) -> None:
    """Each sentence and a line break (no sentence holds one) on the trainer's stdin, a batch at a time, so
    that no second copy of the sample is made here (joined and encoded whole, it was made twice). A trainer
    that ended early closed its end: its exit status, not the broken pipe, says why."""
    try:
        with trainer.stdin:
            for start in range(0, len(sentences), SEND_BATCH):
                batch = sentences[start : start + SEND_BATCH]
                trainer.stdin.write(("\n".join(batch) + "\n").encode("utf-8"))
    except BrokenPipeError:
        pass


def _trained_model(sentences: list[str], options: dict) -> bytes:
    """The model file sentencepiece trains on `sentences` with `options`, in a child process
    (sentencepiece_worker.py) that this one kills on its way out: a stop signal or Ctrl-C acts at once,
    not when the native trainer returns (measured: Ctrl-C 4.9 s late on a 50 MB corpus, where a unigram
    model trains for 9.5 min)."""
    with tempfile.TemporaryDirectory(prefix="sentencepiece-") as tmp:
        model = Path(tmp) / "tokenizer.model"
        command = [sys.executable, str(_WORKER), json.dumps(options), str(model), str(os.getpid())]
        with stop_signals_blocked(_CTRL_C_AND_STOPS):  # it ignores them, then unblocks: none ends it as it starts
            trainer = subprocess.Popen(command, stdin=subprocess.PIPE)
        try:
            _send_sentences(trainer, sentences)
            trainer.wait()
        finally:
            if trainer.poll() is None:
                trainer.kill()
            trainer.wait()
        if trainer.returncode == 0:
            return model.read_bytes()
    code = trainer.returncode
    if code == -signal.SIGKILL:
        why = ", most often the kernel's out-of-memory killer (dmesg): a smaller sample (--max-sentences) needs less memory"
    else:
        why = " (its own error is printed above)" if code > 0 else ""
    raise DataError(f"the sentencepiece trainer (pid {trainer.pid}) {ended_by(code)}{why}")


def train_tokenizer(
    documents: Iterable[str],
    out_path: str | Path,
    vocab_size: int,
    model_type: str = "bpe",
    max_sentences: int = 200_000,
    num_threads: int = 1,
    keep_whitespace: bool = True,
    character_coverage: float | None = None,
    on_sample: Callable[[SampleSize], None] | None = None,
) -> Tokenizer:
    """Train on a seeded uniform sample of at most `max_sentences` lines of `documents`
    (all of them when fewer); write the model to `out_path`.

    `keep_whitespace`: encode text as written (see the module docstring); False is
    sentencepiece's default normalization, which the embedded fact world was built with.
    `character_coverage`: the share of the sample's characters (by occurrence) that get a piece of
    their own, sentencepiece's option; the rarest of the rest are written as bytes. Default 1.0 for
    bpe (every character), 0.9995 for unigram.
    `on_sample`: called with the sample's size once it is drawn, before the training (minutes on a
    large sample).
    Deterministic for the same input (single-threaded by default, seeded sample).
    """
    if model_type not in ("bpe", "unigram"):
        raise DataError(f"model_type={model_type!r} must be 'bpe' or 'unigram'")
    if vocab_size < MIN_VOCAB_SIZE:
        raise DataError(
            f"vocab_size={vocab_size} is too small: byte fallback needs >= {MIN_VOCAB_SIZE} (256 bytes + 4 specials)"
        )
    if max_sentences <= 0:
        raise DataError(f"max_sentences={max_sentences} must be positive (e.g. 200000)")
    if not 1 <= num_threads <= 1024:  # sentencepiece would refuse it only after the sample is read
        raise DataError(f"num_threads={num_threads} must be in 1..1024 (--threads)")
    if character_coverage is None:
        character_coverage = 1.0 if model_type == "bpe" else 0.9995
    if not 0 < character_coverage <= 1:  # checked before the sample is read, as the above
        raise DataError(
            f"character_coverage={character_coverage} must be in (0, 1] (--character-coverage; e.g. 0.9995)"
        )
    size = SampleSize()
    sentences = sample_sentences(documents, max_sentences, keep_whitespace=keep_whitespace, size=size)
    if not sentences:
        raise DataError("the tokenizer corpus is empty: no non-blank line to train on")
    if on_sample is not None:
        on_sample(size)
    symbols = [NEWLINE] if keep_whitespace else []
    if model_type == "bpe":  # every covered character becomes a piece, beside 256 bytes + 4 specials
        reserved = 260 + len(symbols)
        counts = collections.Counter()
        for sentence in sentences:
            counts.update(sentence)
        for symbol in symbols:
            counts.pop(symbol, None)
        counts[" "] += len(sentences)  # the "▁" sentencepiece puts before each line (add_dummy_prefix)
        covered = _covered_characters(counts, character_coverage)
        if vocab_size < covered + reserved:
            distinct = (
                f"{covered:,} distinct characters"
                if covered == len(counts)
                else f"{len(counts):,} distinct characters, {covered:,} of which cover {character_coverage} of the text"
            )
            fewer = (
                f"--character-coverage 0.9995 needs --vocab-size >= {_covered_characters(counts, 0.9995) + reserved}"
                if character_coverage > 0.9995
                else f"a --character-coverage below {character_coverage} needs fewer"
            )
            raise DataError(
                f"vocab_size={vocab_size} is too small for this corpus: it has {distinct}, so pass --vocab-size >= "
                f"{covered + reserved}, or give pieces only to the commonest characters and write the rarest as "
                f"bytes: {fewer}"
            )
    whitespace = (
        {
            "normalization_rule_name": "identity",
            "remove_extra_whitespaces": False,
            "allow_whitespace_only_pieces": True,
            "user_defined_symbols": symbols,
        }
        if keep_whitespace
        else {}
    )
    options = dict(
        vocab_size=vocab_size,
        model_type=model_type,
        byte_fallback=True,
        character_coverage=character_coverage,
        hard_vocab_limit=False,
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        num_threads=num_threads,
        minloglevel=2,
        **whitespace,
    )
    model = _trained_model(sentences, options)
    tokenizer = Tokenizer(atomic_write(out_path, model))
    if tokenizer.vocab_size < vocab_size:  # hard_vocab_limit=False: the size asked is an upper bound
        warnings.warn(
            f"{out_path} has {tokenizer.vocab_size} pieces, fewer than the {vocab_size} asked: {model_type} found no "
            f"more in its sample of {len(sentences):,} lines, and the model's vocabulary follows the tokenizer; for "
            + (
                f"more, raise --max-sentences (the sample was capped at {max_sentences:,} lines)"
                if len(sentences) == max_sentences
                else "more, train on more text"
            ),
            stacklevel=2,
        )
    return tokenizer
