"""ShardLoader: conservation over ranks x workers, exact resume, epochs, bad input."""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from itertools import islice

import numpy as np
import pytest
import torch

from data_helpers import SEQ_LEN
from pretrain.data import CorruptShardError, DataError, ShardLoader, read_manifest, train_tokenizer, write_dataset
from pretrain.data.prepare import is_validation
from pretrain.data.work_plan import epoch_order


def full_rows(batch) -> np.ndarray:
    """The stored rows (seq_len + 1 tokens) behind a batch: inputs plus the last target."""
    last = batch.targets[:, -1:].clone()
    last[last == -100] = -1
    return torch.cat([batch.tokens, last], dim=1).numpy()


def collect_epoch(dataset, split, world_size, num_workers, batch_size=4, shuffle_buffer=0):
    """Every (token, doc id) pair of one epoch over all simulated ranks."""
    per_doc: dict[int, Counter] = {}
    rows = 0
    for rank in range(world_size):
        loader = ShardLoader(
            dataset,
            split,
            batch_size=batch_size,
            seq_len=SEQ_LEN,
            rank=rank,
            world_size=world_size,
            num_workers=num_workers,
            seed=5,
            shuffle_buffer=shuffle_buffer,
            loop=False,
        )
        for b in loader:
            rows += len(b.tokens)
            toks = b.tokens.numpy()
            docs = b.doc_ids.numpy()
            for t, d in zip(toks.ravel(), docs.ravel()):
                if d >= 0:
                    per_doc.setdefault(int(d), Counter())[int(t)] += 1
            # the final token of each row is only visible as a target
            last_t, last_d = b.targets[:, -1].numpy(), docs[:, -1]
            eos_last = toks[:, -1] == loader.eos_id
            last_doc = np.where(eos_last, last_d + 1, last_d)
            for t, d in zip(last_t, last_doc):
                if t != -100:
                    per_doc.setdefault(int(d), Counter())[int(t)] += 1
    return per_doc, rows


def direct(documents, tokenizer, split, seed=3, val_fraction=0.2):
    """Per-document token multisets of a split, by direct tokenization; ids: train first, then val."""
    in_val = [is_validation(i, seed, val_fraction) for i in range(len(documents))]
    order = [i for i in range(len(documents)) if not in_val[i]] + [i for i in range(len(documents)) if in_val[i]]
    want_val = split == "val"
    return {
        new_id: Counter(tokenizer.encode(documents[i]) + [tokenizer.eos_id])
        for new_id, i in enumerate(order)
        if in_val[i] == want_val
    }


@pytest.mark.parametrize("split", ["train", "val"])
def test_conservation_two_ranks_two_workers(dataset, documents, tokenizer, split):
    manifest = read_manifest(dataset)
    workers = 2 if split == "train" else 0
    if len(manifest["splits"][split]["shards"]) < 2 * max(1, workers):
        pytest.skip("not enough val shards for this layout")
    per_doc, rows = collect_epoch(dataset, split, world_size=2, num_workers=workers, shuffle_buffer=5)
    assert rows == manifest["splits"][split]["sequences"]
    assert per_doc == direct(documents, tokenizer, split)


def test_conservation_train_plus_val_is_the_whole_corpus(dataset, documents, tokenizer):
    train, _ = collect_epoch(dataset, "train", 1, 0)
    val, _ = collect_epoch(dataset, "val", 1, 0)
    assert not set(train) & set(val)
    assert sorted({**train, **val}) == list(range(len(documents)))
    whole = {**direct(documents, tokenizer, "train"), **direct(documents, tokenizer, "val")}
    assert {**train, **val} == whole


def test_doc_ids_change_exactly_at_eos(dataset):
    loader = ShardLoader(dataset, "train", batch_size=8, seq_len=SEQ_LEN, seed=1, loop=False)
    starts = Counter()
    for b in loader:
        toks, docs = b.tokens.numpy(), b.doc_ids.numpy()
        for row_t, row_d in zip(toks, docs):
            valid = row_d >= 0
            for t in range(SEQ_LEN - 1):
                if valid[t + 1]:
                    assert (row_d[t + 1] != row_d[t]) == (row_t[t] == loader.eos_id)
                    if row_d[t + 1] != row_d[t]:
                        assert row_d[t + 1] == row_d[t] + 1
                        starts[int(row_d[t + 1])] += 1
    # a document starts at most once in the whole split: ids are unique across shards
    assert max(starts.values()) == 1


def run_batches(dataset, n, world_size, rank, workers, state=None, shuffle=0):
    loader = ShardLoader(
        dataset,
        "train",
        batch_size=8,
        seq_len=SEQ_LEN,
        rank=rank,
        world_size=world_size,
        num_workers=workers,
        seed=7,
        shuffle_buffer=shuffle,
        loop=True,
    )
    if state is not None:
        loader.load_state_dict(json.loads(json.dumps(state)))  # the state survives JSON
    got = [(b.tokens.clone(), b.targets.clone(), b.doc_ids.clone()) for b in islice(loader, n)]
    return got, loader.state_dict()


@pytest.mark.parametrize("world_size,workers,shuffle", [(1, 0, 0), (1, 2, 5), (2, 0, 5), (2, 2, 0)])
def test_exact_resume(dataset, world_size, workers, shuffle):
    n = 23  # 2n batches of 8 rows cross epochs (272 rows per epoch over all consumers) and windows
    for rank in range(world_size):
        whole, _ = run_batches(dataset, 2 * n, world_size, rank, workers, shuffle=shuffle)
        first, state = run_batches(dataset, n, world_size, rank, workers, shuffle=shuffle)
        second, _ = run_batches(dataset, n, world_size, rank, workers, state=state, shuffle=shuffle)
        assert len(whole) == 2 * n
        for a, b in zip(whole, first + second):
            for x, y in zip(a, b):
                assert torch.equal(x, y)
        assert len(json.dumps(state)) < 2000


EXIT_WITH_A_LIVE_ITERATOR = """
import sys
from pretrain.data import ShardLoader
loader = ShardLoader(sys.argv[1], "train", batch_size=4, seq_len=int(sys.argv[2]), seed=0, num_workers=2)
batches = iter(loader)
next(batches)  # its workers run on while the process exits (a failed test's frame, an error in a rank)
print("exiting", flush=True)
"""


def test_a_process_exits_with_its_loader_workers_still_running(dataset, repo_root):
    """The workers ignore Slurm's stop signals (f52bb0d), and multiprocessing ends a process's
    workers at exit with SIGTERM and then joins them: the suite's pytest printed its summary and
    never returned (CI of f449089), and so would a rank that an error ends mid-epoch."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(repo_root)}
    try:
        result = subprocess.run(
            [sys.executable, "-c", EXIT_WITH_A_LIVE_ITERATOR, str(dataset), str(SEQ_LEN)],
            env=env,
            capture_output=True,
            text=True,
            timeout=90,
        )
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"the process did not exit within 90 s of its last line: {err.stdout!r}")
    assert result.returncode == 0 and result.stdout == "exiting\n", result.stderr[-2000:]


def test_epochs_reshuffle_shards_and_cover_everything(dataset):
    loader = ShardLoader(dataset, "train", batch_size=4, seq_len=SEQ_LEN, seed=2, loop=False)
    epochs = [np.concatenate([full_rows(b) for b in loader]) for _ in range(3)]
    as_set = [sorted(row.tobytes() for row in e) for e in epochs]
    assert as_set[0] == as_set[1] == as_set[2]
    assert not (np.array_equal(epochs[0], epochs[1]) and np.array_equal(epochs[1], epochs[2]))
    assert loader.stats["epoch"] == 3


def test_fewer_rows_than_ranks_and_workers(dataset):
    """More readers than shards read (pieces of shards); fewer rows than readers is refused."""
    rows = read_manifest(dataset)["splits"]["train"]["sequences"]
    with pytest.raises(DataError, match=rf"has {rows} sequences but 2 ranks x {rows} workers = {2 * rows} readers"):
        ShardLoader(dataset, "train", batch_size=2, rank=0, world_size=2, num_workers=rows)


@pytest.mark.filterwarnings("ignore:--val-fraction=0")
def test_an_empty_split_is_named_with_its_cause(tmp_path, tokenizer, documents):
    """Not "needs at least one each: lower num_workers", which no num_workers fixes."""
    ids = tokenizer.encode_batch(documents)
    write_dataset(
        ids, tmp_path / "ds", tokenizer, SEQ_LEN, val_fraction=0.0, sequences_per_shard=8, show_progress=False
    )
    cause = r"is empty \(no shards\): it was prepared with --val-fraction 0; re-run tools/prepare_data.py"
    with pytest.raises(
        DataError, match=rf"split 'val' of {re.escape(str(tmp_path / 'ds'))} {cause} with --val-fraction > 0"
    ):
        ShardLoader(tmp_path / "ds", "val", batch_size=4, loop=False)
    assert sum(len(b.tokens) for b in ShardLoader(tmp_path / "ds", "train", batch_size=4, loop=False)) > 0


def test_seq_len_and_state_mismatch(dataset):
    with pytest.raises(DataError, match="seq_len=64.*seq_len=32"):
        ShardLoader(dataset, "train", seq_len=64)
    state = ShardLoader(dataset, "train", batch_size=2, seed=1).state_dict()
    with pytest.raises(DataError, match="batch_size=2 vs 4"):
        ShardLoader(dataset, "train", batch_size=4, seed=1).load_state_dict(state)


@pytest.mark.filterwarnings("ignore:--val-fraction=0")
def test_a_dataset_prepared_again_in_its_folder_is_named_at_resume(tmp_path, tokenizer, documents):
    """A run's data folder prepared again (--overwrite: another --seq-len, seed or corpus) and the run
    resumed: refused, as it must be (the saved positions address the old shards' rows), but as
    "the saved loader state was made with other settings (saved, now): shards='038bf996b5f8b006' vs
    '38eb6b311781e4e8'; resume with the same data, batch size, ...", two fingerprints and no folder
    (measured on the recipe's licenses prepared again at --seq-len 64). The error now names the folder,
    the split, what happened and the two ways on."""
    ds = tmp_path / "ds"

    def prepare(docs):
        write_dataset(tokenizer.encode_batch(docs), ds, tokenizer, SEQ_LEN, val_fraction=0.0, sequences_per_shard=8,
                      show_progress=False, overwrite=True)  # fmt: skip

    prepare(documents)
    before = ShardLoader(ds, "train", batch_size=2, seed=1)
    next(iter(before))
    state = before.state_dict()
    prepare(documents[::-1])  # the same documents, packed in another order
    for load in ("load_state_dict", "load_resharded"):
        resumed = ShardLoader(ds, "train", batch_size=2, seed=1)
        with pytest.raises(DataError, match=rf"{ds} is not the dataset this run was reading: the 'train' split's "):
            getattr(resumed, load)(state if load == "load_state_dict" else [state])
    prepare(documents)  # put back: resumes
    ShardLoader(ds, "train", batch_size=2, seed=1).load_state_dict(state)


def copy_dataset(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_tokenizer_hash_mismatch(dataset, tmp_path, documents):
    other = train_tokenizer(documents[:20], tmp_path / "other.model", vocab_size=390)
    with pytest.raises(DataError, match="differs from the one .*manifest.json"):
        ShardLoader(dataset, "train", tokenizer=other)
    broken = copy_dataset(dataset, tmp_path / "ds")
    shutil.copyfile(other.path, broken / "tokenizer.model")
    with pytest.raises(DataError, match="differs"):
        ShardLoader(broken, "train")


def first_shard_in_order(ds, seed):
    loader = ShardLoader(ds, "train", batch_size=2, seed=seed)
    return loader.shards[epoch_order(seed, 0, len(loader.shards))[0]]["path"]


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_shard_error_and_skip(dataset, tmp_path, damage):
    ds = copy_dataset(dataset, tmp_path / "ds")
    manifest = read_manifest(ds)
    name = first_shard_in_order(ds, 0)
    path = ds / name
    blob = bytearray(path.read_bytes())
    if damage == "truncate":
        blob = blob[: len(blob) // 2 + 100]
    else:
        blob[3 * 512 + 600] ^= 0xFF  # inside the second block's token payload
    path.write_bytes(bytes(blob))
    loader = ShardLoader(ds, "train", batch_size=2, seed=0, loop=False)
    with pytest.raises(CorruptShardError, match=rf"{name}.* at byte offset \d+"):
        list(loader)

    skipping = ShardLoader(ds, "train", batch_size=2, seed=0, loop=False, on_corrupt="skip")
    with pytest.warns(UserWarning, match="skipping the rest of a shard"):
        rows = sum(len(b.tokens) for b in skipping)
    total = manifest["splits"]["train"]["sequences"]
    bad = next(s["sequences"] for s in manifest["splits"]["train"]["shards"] if s["path"] == name)
    assert total - bad <= rows < total
    assert skipping.stats["corrupt_shards_skipped"] == 1


def test_missing_dataset_dir(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        ShardLoader(tmp_path / "nope", "train")
    with pytest.raises(DataError, match="manifest.json is missing"):
        ShardLoader(tmp_path, "train")


KILLED_WITH_A_LIVE_ITERATOR = """
import multiprocessing, os, sys, time


def rank(path, seq_len, pids_file):
    from pretrain.data import ShardLoader

    loader = ShardLoader(path, "train", batch_size=4, seq_len=seq_len, seed=0, num_workers=2)
    batches = iter(loader)
    next(batches)
    workers = [child.pid for child in multiprocessing.active_children()]
    with open(pids_file + ".tmp", "w") as f:
        f.write(" ".join(map(str, workers)))
    os.rename(pids_file + ".tmp", pids_file)
    time.sleep(600)


if __name__ == "__main__":
    # as the test harness starts ranks (pretrain.spawn.rank_context), and as Python 3.14 starts any process
    process = multiprocessing.get_context("forkserver").Process(target=rank, args=(sys.argv[1], int(sys.argv[2]), sys.argv[3]))
    process.start()
    while not os.path.exists(sys.argv[3]) and process.is_alive():
        time.sleep(0.1)
    process.kill()  # a rank SIGKILLed (the out-of-memory killer, a harness's kill): no teardown of its loader
    process.join()
"""


def test_a_killed_processs_loader_workers_end_with_it_whatever_its_start_method(dataset, repo_root, tmp_path):
    """A rank started from a fork server (the test harness's ranks; every process under Python 3.14's
    default) made its DataLoader's workers with the fork server method too: their parent was a fork
    server of the rank's own, which they kept alive, so torch's worker watchdog (it ends a worker whose
    parent has gone) never fired, and a killed rank left its workers polling for ever (found after a CI
    run: a worker of tests/train/test_loader_faults.py alive 10 minutes after the suite). The loader's
    workers are forked from the rank itself, and end within seconds of it."""
    import os
    import subprocess
    import sys
    import time

    env = {**os.environ, "PYTHONPATH": str(repo_root)}
    script = tmp_path / "kill_a_rank.py"  # a file: a fork server's child imports its function from it
    script.write_text(KILLED_WITH_A_LIVE_ITERATOR)
    with open(tmp_path / "log", "w") as log:  # not a pipe: a worker left alive would hold it open
        result = subprocess.run(
            [sys.executable, str(script), str(dataset), str(SEQ_LEN), str(tmp_path / "pids")],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=120,
        )
    output = (tmp_path / "log").read_text()
    assert result.returncode == 0, output[-2000:]
    workers = [int(pid) for pid in (tmp_path / "pids").read_text().split()]
    assert len(workers) == 2, output[-2000:]

    def alive(pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    deadline = time.monotonic() + 30  # torch's worker watchdog looks every 5 s
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [pid for pid in workers if alive(pid)]
    for pid in left:
        os.kill(pid, 9)
    assert not left, f"loader workers {left} outlived their killed process by 30 s"
