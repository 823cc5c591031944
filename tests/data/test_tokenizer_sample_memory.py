"""The tokenizer's sample crosses to sentencepiece's trainer process without extra copies of it.

train_tokenizer holds its sample (at most --max-sentences lines) as a list; the trainer runs in a child
process (pretrain/data/sentencepiece_worker.py) that reads the sample from a pipe. The sample used to be
joined and encoded whole on the way (two more copies in the tool's process), and read whole, decoded and
split in the child (three more, beside sentencepiece's own store).
"""

import io
import subprocess
import sys
import textwrap

from pretrain.data import sentencepiece_worker

MEASURE = textwrap.dedent(
    """
    import random, sys
    from pretrain.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, _trained_model

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(5000)]
    sentences = [" ".join(rng.choice(words) for _ in range(180)) for _ in range(20000)]
    options = dict(vocab_size=300, model_type="bpe", byte_fallback=True, character_coverage=1.0,
                   hard_vocab_limit=False, pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
                   input_sentence_size=0, shuffle_input_sentence=False, num_threads=1, minloglevel=2)
    def kib(key):
        status = open("/proc/self/status").read().split(key + ":")[1]
        return int(status.split()[0])

    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # the peak (VmHWM) starts again from what is resident now: imports left out
    before = kib("VmRSS")
    _trained_model(sentences, options)
    print(sum(len(s) + 1 for s in sentences), (kib("VmHWM") - before) * 1024)
    """
)


def test_the_tool_sends_the_sample_without_copying_it_whole():
    """Measured on this 22 MiB sample: the tool's peak rose by 45 MiB (2x the sample: joined, then encoded)
    while the trainer read it; now by 9 MiB (a batch of 4096 sentences, joined and encoded). Linux: the
    peak is reset before the call (/proc/self/clear_refs), so what imports and the sample took is left out."""
    done = subprocess.run([sys.executable, "-c", MEASURE], capture_output=True, text=True, check=True)
    sample_bytes, growth = map(int, done.stdout.split())
    assert sample_bytes > 15 * 2**20
    assert growth < sample_bytes / 2, (
        f"the tool's peak rose by {growth / 2**20:.1f} MiB sending {sample_bytes / 2**20:.1f} MiB"
    )


def test_the_worker_hands_sentences_over_as_it_reads_them():
    """Each line, without its line break (a carriage return or tab inside kept), is yielded before the
    next is read: the worker never holds the sample itself."""

    class Stream(io.BytesIO):
        lines_read = 0

        def __iter__(self):
            for line in io.BytesIO(self.getvalue()):
                Stream.lines_read += 1
                yield line

    text = ["a line", "tab\there\r", "  indented", "élan", "last without a break"]
    stream = Stream(("\n".join(text)).encode("utf-8"))
    got = []
    for sentence in sentencepiece_worker._sentences(stream):
        assert Stream.lines_read == len(got) + 1
        got.append(sentence)
    assert got == text
