"""lm-evaluation-harness on an export, offline: the shipped fact-probe tasks give the same
exact-match accuracy as pretrain.evaluate.fact_recall and the same multiple-choice accuracy as
scoring the choices with the training model (independent implementations agreeing)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from pretrain.data import Probe, Tokenizer, load_probes
from pretrain.evaluate import encode_probes, fact_recall
from pretrain.export import ExportError, load
from pretrain.export.generation import fits
from pretrain.export.lm_eval_tasks import (
    GROUP,
    MC_TASK,
    check_task_dir,
    write_fact_tasks,
)
from tools.memlayers_eval import main as memlayers_eval


def teach_half(export: Path, out: Path, probes: list[Probe], tokenizer: Tokenizer) -> Path:
    """A copy of `export` whose model was fitted to the answers of the even probes (about half of
    the probes are then answered right): exact-match agreement is only telling between 0 and 1."""
    from safetensors.torch import save_file

    from pretrain.model import language_model_loss

    shutil.copytree(export, out)
    model = load(export)
    batch = encode_probes(probes[::2], tokenizer, model.cfg.max_seq_len)
    targets = batch.targets.masked_fill(~batch.answer_mask, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(0)
    model.train()
    for _ in range(60):
        optimizer.zero_grad()
        language_model_loss(model(batch.tokens), targets).backward()
        optimizer.step()
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def lm_eval_command() -> list[str]:
    script = Path(sys.executable).parent / "lm_eval"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "lm_eval"]


def run_lm_eval(export: Path, task_dir: Path, out: Path, tmp: Path) -> dict:
    # without the launch variables the in-process training fixtures leave (lm_eval would join their group)
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update(
        HF_DATASETS_OFFLINE="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HOME=str(tmp / "hf-home"),
        TOKENIZERS_PARALLELISM="false",
    )
    cmd = lm_eval_command() + [
        "--model",
        "hf",
        "--model_args",
        f"pretrained={export},trust_remote_code=True,dtype=float32",
        "--tasks",
        f"{GROUP},{MC_TASK}",
        "--include_path",
        str(task_dir),
        "--device",
        "cpu",
        "--batch_size",
        "4",
        "--output_path",
        str(out),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp, check=False)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    found = sorted(out.rglob("results*.json"))
    assert found, proc.stdout[-2000:]
    return json.loads(found[-1].read_text())["results"]


@pytest.mark.slow
def test_lm_eval_fact_tasks_agree_with_fact_recall(inference_export, tmp_path):
    tokenizer = Tokenizer(inference_export / "tokenizer.model")
    # probes that fit lm_eval's context + max_gen_toks (one token less than fact_recall needs)
    probes = [p for p in load_probes(inference_export) if fits(p, tokenizer, 31)][:16]
    export = teach_half(inference_export, tmp_path / "export", probes, tokenizer)
    model = load(export)
    probes_dir = tmp_path / "probes"
    probes_dir.mkdir()
    (probes_dir / "probes.jsonl").write_text("".join(json.dumps(asdict(p)) + "\n" for p in probes))
    task_dir = tmp_path / "tasks"
    written = write_fact_tasks(export, task_dir, probes_dir=probes_dir)
    assert written["skipped"] == 0
    check_task_dir(task_dir)
    results = run_lm_eval(export, task_dir, tmp_path / "out", tmp_path)

    kept = [
        json.loads(line) for f in sorted(task_dir.glob(f"{GROUP}_len*.jsonl")) for line in f.read_text().splitlines()
    ]
    assert len(kept) == written["probes"] > 0
    kept_probes = [Probe(r["question"], r["answer"], r["attribute"], 0.0, False) for r in kept]
    batch = encode_probes(kept_probes, tokenizer, model.cfg.max_seq_len)
    assert batch.tokens.shape[0] == len(kept)  # fact_recall scores exactly the task's probes
    want = fact_recall(model, batch, torch.device("cpu"))["fact_recall"]
    assert 0 < want < 1  # a comparison that can tell right from wrong answers
    assert results[GROUP]["exact_match,none"] == pytest.approx(want, abs=1e-9)

    # multiple choice: the choice with the highest log-likelihood under the training model
    rows = [json.loads(line) for line in (task_dir / f"{MC_TASK}.jsonl").read_text().splitlines()]
    hits = 0
    for row in rows:
        context = [tokenizer.eos_id] + tokenizer.encode(row["question"])
        scores = []
        for choice in row["choices"]:
            full = [tokenizer.eos_id] + tokenizer.encode(f"{row['question']} {choice}")
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([full[:-1]]))[0].double(), -1)
            cont = torch.tensor(full[len(context) :])
            scores.append(logp[len(context) - 1 :].gather(-1, cont[:, None]).sum().item())
        hits += int(max(range(len(scores)), key=scores.__getitem__) == row["label"])
    assert results[MC_TASK]["acc,none"] == pytest.approx(hits / len(rows), abs=1e-9)


def test_task_writer_and_checker_reject_bad_input(inference_export, tmp_path, capsys):
    bad = tmp_path / "probes"
    bad.mkdir()
    (bad / "probes.jsonl").write_text('{"question": "Q: x? A:"}\n')
    with pytest.raises(Exception, match=r"probes.jsonl:1: not a probe record"):
        write_fact_tasks(inference_export, tmp_path / "t0", probes_dir=bad)
    task_dir = tmp_path / "tasks"
    write_fact_tasks(inference_export, task_dir, limit=10)
    check_task_dir(task_dir)
    data = task_dir / f"{MC_TASK}.jsonl"
    data.write_text(data.read_text() + '{"question": "Q: y? A:"}\n')
    lines = len(data.read_text().splitlines())
    with pytest.raises(ExportError, match=rf"{MC_TASK}.jsonl:{lines}: record lacks \['answer'\].*memlayers-eval"):
        check_task_dir(task_dir)
    (task_dir / f"{MC_TASK}.yaml").write_text("task: [unclosed\n")
    with pytest.raises(ExportError, match=rf"{MC_TASK}.yaml is not valid YAML"):
        check_task_dir(task_dir)
    # the wrapper refuses the folder before starting lm_eval
    assert memlayers_eval([str(inference_export), "--task-dir", str(task_dir)]) == 2
    assert f"{MC_TASK}.yaml is not valid YAML" in capsys.readouterr().err
    # a misspelt folder (it said '... holds no task .yaml files', as of a folder that exists)
    assert memlayers_eval([str(inference_export), "--task-dir", str(tmp_path / "taks")]) == 2
    assert f"error: no such task folder: {tmp_path / 'taks'}: write one with" in capsys.readouterr().err
    no_tok = tmp_path / "no-tokenizer"
    no_tok.mkdir()
    (no_tok / "config.json").write_text((inference_export / "config.json").read_text())
    with pytest.raises(ExportError, match="has no tokenizer.model.*tools/export.py"):
        write_fact_tasks(no_tok, tmp_path / "t1")


@pytest.mark.parametrize("answer", ["", " "])
def test_a_probe_without_an_answer_is_refused_before_any_task_is_written(inference_export, tmp_path, answer):
    """A probe whose answer is no tokens was written as a generation subtask of max_gen_toks 0 (its
    empty output counted right) and as a multiple-choice option: the empty continuation that
    lm-eval's HF model asserts on (a bare AssertionError) mid-evaluation."""
    from dataclasses import replace

    probes = load_probes(inference_export)[:6]
    probes[3] = replace(probes[3], answer=answer)  # line 4 of the file
    folder = tmp_path / "probes"
    folder.mkdir()
    (folder / "probes.jsonl").write_text("".join(json.dumps(asdict(p)) + "\n" for p in probes))
    with pytest.raises(ExportError) as refused:
        write_fact_tasks(inference_export, tmp_path / "tasks", probes_dir=folder)
    assert str(refused.value) == (
        f"{folder}/probes.jsonl:4: the answer to {probes[3].question!r} is {answer!r}, no tokens: lm-eval "
        "cannot score an empty continuation; give the probe its answer or delete the line"
    )
    assert not (tmp_path / "tasks").exists()


class Killed(BaseException):
    """The process dying mid-write (not an Exception: nothing may catch it on the way)."""


@pytest.mark.parametrize("target", [f"{MC_TASK}.jsonl", f"{MC_TASK}.yaml"])
def test_interrupted_task_write_leaves_the_previous_files(inference_export, tmp_path, monkeypatch, target):
    task_dir = tmp_path / "tasks"
    write_fact_tasks(inference_export, task_dir, limit=6)
    before = {p.name: p.read_bytes() for p in task_dir.iterdir()}
    real_text, real_bytes = Path.write_text, Path.write_bytes

    def dies_half_way(real):
        def write(self, data, *args, **kwargs):
            if target in self.name:  # the final name or a temporary beside it
                real(self, data[: len(data) // 2], *args, **kwargs)
                raise Killed(f"killed writing {self.name}")
            return real(self, data, *args, **kwargs)

        return write

    monkeypatch.setattr(Path, "write_text", dies_half_way(real_text))
    monkeypatch.setattr(Path, "write_bytes", dies_half_way(real_bytes))
    with pytest.raises(Killed):
        write_fact_tasks(inference_export, task_dir, limit=12)  # other rows than the first write
    monkeypatch.undo()
    after = {p.name: p.read_bytes() for p in task_dir.iterdir()}
    assert after[target] == before[target]  # the previous file, whole
    assert set(before) <= set(after) and not [name for name in after if ".tmp" in name]  # no temporary left
    check_task_dir(task_dir)


def test_probe_counts_below_one_are_refused(inference_export, tmp_path, monkeypatch, capsys):
    import tempfile

    for limit in (0, -3):
        with pytest.raises(ExportError, match=rf"limit={limit} must be an integer >= 1"):
            write_fact_tasks(inference_export, tmp_path / "t", limit=limit)
        assert not (tmp_path / "t").exists()
    for choices in (1, 0):  # one option is always right; none crashed in random.sample
        with pytest.raises(ExportError, match=rf"choices={choices} must be an integer >= 2"):
            write_fact_tasks(inference_export, tmp_path / "t", choices=choices)
        assert not (tmp_path / "t").exists()
    for option in ("--probes", "--limit"):
        with pytest.raises(SystemExit) as exit_info:
            memlayers_eval([str(inference_export), option, "0"])
        assert exit_info.value.code == 2
        assert "0 must be an integer >= 1" in capsys.readouterr().err
    # a failure while writing the scratch task folder removes it (it was left behind before)
    scratch = []
    real_mkdtemp = tempfile.mkdtemp
    monkeypatch.setattr(tempfile, "mkdtemp", lambda *a, **k: scratch.append(real_mkdtemp(dir=tmp_path)) or scratch[-1])
    bad = tmp_path / "probes"
    bad.mkdir()
    (bad / "probes.jsonl").write_text('{"question": "Q: x? A:"}\n')
    assert memlayers_eval([str(inference_export), "--probes-dir", str(bad)]) == 2
    assert "not a probe record" in capsys.readouterr().err
    assert len(scratch) == 1 and not Path(scratch[0]).exists()


def test_check_task_dir_names_a_killed_writers_temporary(inference_export, tmp_path):
    from pretrain.files import temp_path_beside

    task_dir = tmp_path / "tasks"
    write_fact_tasks(inference_export, task_dir, limit=6)
    stale = temp_path_beside(task_dir / f"{MC_TASK}.yaml")
    stale.write_text('{"task": "memlay')
    with pytest.raises(ExportError, match=rf"{stale.name} is the temporary of an interrupted write: delete it"):
        check_task_dir(task_dir)


def test_a_file_as_task_folder_is_refused_with_a_message(data_cache, tmp_path, capsys):
    # --write-tasks naming a file crashed with a FileExistsError traceback from mkdir
    dataset = next(p.parent for p in Path(data_cache).rglob("manifest.json"))
    export = tmp_path / "export"  # what write_fact_tasks reads of an export
    export.mkdir()
    for name in ("tokenizer.model", "probes.jsonl"):
        shutil.copyfile(dataset / name, export / name)
    (export / "config.json").write_text(json.dumps({"model": {"vocab_size": 384, "max_seq_len": 32}}))
    target = tmp_path / "tasks.txt"
    target.write_text("mine")
    with pytest.raises(ExportError, match=r"tasks.txt is a file.*folder"):
        write_fact_tasks(export, target)
    assert memlayers_eval([str(export), "--write-tasks", str(target)]) == 2
    assert "tasks.txt is a file" in capsys.readouterr().err
    assert target.read_text() == "mine"
    write_fact_tasks(export, tmp_path / "tasks")  # the same export writes a folder
    check_task_dir(tmp_path / "tasks")


def test_multiple_choice_options_come_from_the_whole_probe_file(inference_export, tmp_path):
    """With --probes 2 the other options were drawn from the 2 kept probes only: both share their
    attribute's answer, so each question had a single option, always right (acc 1.0)."""
    probes = tmp_path / "probes"
    probes.mkdir()
    rows = [("Q: a? A:", "red", "color"), ("Q: b? A:", "red", "color")]
    rows += [(f"Q: c{i}? A:", colour, "color") for i, colour in enumerate(["blue", "green", "gold", "grey"])]
    rows += [("Q: d? A:", "same", "only"), ("Q: e? A:", "same", "only")]
    (probes / "probes.jsonl").write_text(
        "".join(
            json.dumps({"question": q, "answer": a, "attribute": attr, "chance": 0.2, "is_new_fact": False}) + "\n"
            for q, a, attr in rows
        )
    )
    info = write_fact_tasks(inference_export, tmp_path / "t2", probes_dir=probes, limit=2, choices=4)
    mc = [json.loads(line) for line in (tmp_path / "t2" / f"{MC_TASK}.jsonl").read_text().splitlines()]
    assert info["probes"] == 2 and info["mc_skipped"] == 0 and len(mc) == 2
    for row in mc:  # brute force: 3 distinct others in the file besides "red", plus the answer
        assert len(row["choices"]) == 4 and len(set(row["choices"])) == 4
        assert row["choices"][row["label"]] == "red" and set(row["choices"]) <= {"red", "blue", "green", "gold", "grey"}
    # an attribute with one value in the whole file has no question to ask: left out and counted
    info = write_fact_tasks(inference_export, tmp_path / "t3", probes_dir=probes, choices=4)
    mc = [json.loads(line) for line in (tmp_path / "t3" / f"{MC_TASK}.jsonl").read_text().splitlines()]
    assert info["probes"] == 8 and info["mc_skipped"] == 2 and len(mc) == 6
    assert all(row["attribute"] == "color" for row in mc)


def test_lm_eval_requests_past_max_seq_len_equal_float64_brute_force(inference_export, hf_model):
    """lm-eval's own HF adapter on the exported model, in process: loglikelihood,
    loglikelihood_rolling and generate_until with contexts shorter and longer than max_seq_len in
    mixed-length batches, against the training model in float64 scoring token by token. lm-eval
    reads the context length from config.max_position_embeddings (else 2048: every long request
    would fail in forward); a long context loses its start, the continuation stays scored whole."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(inference_export, trust_remote_code=True)
    lm = HFLM(pretrained=hf_model, tokenizer=tok, batch_size=3, device="cpu")
    limit = hf_model.config.max_seq_len
    assert lm.max_length == limit
    reference = load(inference_export).double()
    words = "the cat sat on a mat and then ran into the house where nobody lived any more".split()

    def text(n, seed):
        return " ".join(words[(seed * 7 + 3 * i) % len(words)] for i in range(n))

    def encode(s):
        return tok(s, add_special_tokens=False)["input_ids"]

    def logprobs(seq):  # (len(seq) - 1, vocab): log p(seq[t + 1] | seq[: t + 1])
        with torch.no_grad():
            return torch.log_softmax(reference(torch.tensor([seq[:-1]]))[0], -1)

    pairs = [(text(n, n), " " + text(m, n + 1)) for n, m in ((2, 1), (30, 3), (6, 4), (45, 2), (12, 9))]
    got = lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)])
    assert any(len(encode(c + x)) > limit + 1 for c, x in pairs)  # some contexts are cut
    for (context, continuation), (ll, _) in zip(pairs, got):
        whole, ctx = encode(context + continuation), encode(context)
        cont = whole[len(ctx) :]
        seq = whole[-(limit + 1) :]  # the context's start cut; every continuation token scored
        want = logprobs(seq)[-len(cont) :].gather(-1, torch.tensor(cont)[:, None]).sum().item()
        assert ll == pytest.approx(want, abs=1e-4), (len(ctx), len(cont))

    docs = [text(n, n) for n in (4, 40, 90)]
    got = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (d,), i) for i, d in enumerate(docs)])
    assert len(encode(docs[0])) < limit < len(encode(docs[2])) // 2
    for doc, ll in zip(docs, got):
        ids = encode(doc)
        full = [tok.eos_token_id] + ids  # every document starts after the separator
        want = 0.0
        for start in range(0, len(ids), limit):  # disjoint windows of `limit` predicted tokens
            end = min(start + limit, len(ids))
            seq = full[max(0, end - limit) : end + 1]  # up to `limit` tokens of context each
            want += logprobs(seq)[-(end - start) :].gather(-1, torch.tensor(ids[start:end])[:, None]).sum().item()
        assert ll == pytest.approx(want, abs=1e-4), len(ids)

    prompts = [text(n, n) for n in (3, 40, 10)]
    request = {"until": ["zzz"], "max_gen_toks": 4, "do_sample": False}
    got = lm.generate_until([Instance("generate_until", {}, (p, request), i) for i, p in enumerate(prompts)])
    for prompt, out in zip(prompts, got):
        seq = encode(prompt)[-(limit - 4) :]  # room left for the new tokens
        new = []
        for _ in range(4):
            new.append(int(logprobs(seq + new + [0])[-1].argmax()))
        if tok.eos_token_id in new:
            new = new[: new.index(tok.eos_token_id)]
        assert out == tok.decode(new), prompt


def test_fact_tasks_ask_the_trained_facts_as_the_runs_fact_recall(inference_export, tmp_path, capsys):
    """The tasks asked every probe of the file, new facts (never trained on) among them, while the
    run's fact recall asks only trained facts: lm-eval's exact_match was diluted by them."""
    from dataclasses import replace

    tokenizer = Tokenizer(inference_export / "tokenizer.model")
    fitting = [p for p in load_probes(inference_export) if fits(p, tokenizer, 31)]  # none left out as too long
    probes = [replace(p, is_new_fact=i % 3 == 1) for i, p in enumerate(fitting[:12])]
    folder = tmp_path / "probes"
    folder.mkdir()
    (folder / "probes.jsonl").write_text("".join(json.dumps(asdict(p)) + "\n" for p in probes))

    def asked(task_dir):
        rows = [json.loads(line) for path in task_dir.glob(f"{GROUP}_len*.jsonl") for line in path.open()]
        mc = [json.loads(line) for line in (task_dir / f"{MC_TASK}.jsonl").open()]
        assert {r["question"] for r in mc} <= {r["question"] for r in rows}
        return {r["question"] for r in rows}

    trained = [p.question for p in probes if not p.is_new_fact]
    info = write_fact_tasks(inference_export, tmp_path / "t", probes_dir=folder, limit=5)
    assert asked(tmp_path / "t") == set(trained[:5]) and info["probes"] == 5 and info["other_facts"] == 4
    info = write_fact_tasks(inference_export, tmp_path / "n", probes_dir=folder, new_facts=True)
    assert asked(tmp_path / "n") == {p.question for p in probes if p.is_new_fact} and info["other_facts"] == 8

    assert (
        memlayers_eval([str(inference_export), "--probes-dir", str(folder), "--write-tasks", str(tmp_path / "w")]) == 0
    )
    assert "(8 trained-fact probes, 0 longer than the model's context left out; 4 new" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        memlayers_eval([str(inference_export), "--task-dir", str(tmp_path / "t"), "--new-facts"])
    assert "--new-facts and --task-dir" in capsys.readouterr().err


@pytest.mark.slow
def test_memlayers_eval_runs_a_task_of_ones_own_from_a_task_dir(inference_export, tmp_path, monkeypatch):
    """A run on one's own text has no fact probes; the offline way to score its export with lm-eval is a
    task of one's own (a loglikelihood_rolling task over a local JSONL). `memlayers-eval --task-dir`
    refused such a folder, checking every task's records for the fact probes' question/answer
    (`record lacks ['answer', 'question']: re-write the folder with memlayers-eval EXPORT --write-tasks`).
    Now only the fact tasks are checked, and lm_eval's bits per byte equals the training model's own
    log-likelihood of the text after one separator (an independent implementation: pretrain.export.load
    and the training tokenizer)."""
    import math

    text = "The list of the river and the town was long."
    tasks = tmp_path / "own-tasks"
    tasks.mkdir()
    (tasks / "own_text.jsonl").write_text(json.dumps({"text": text}) + "\n")
    (tasks / "own_text.yaml").write_text(
        "task: own_text\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tasks / 'own_text.jsonl'}\n"
        "test_split: test\n"
        "output_type: loglikelihood_rolling\n"
        'doc_to_text: ""\n'
        'doc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: bits_per_byte\n"
    )
    check_task_dir(tasks)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)  # the in-process training fixtures' (lm_eval would join their group)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    argv = [str(inference_export), "--task-dir", str(tasks), "--tasks", "own_text", "--device", "cpu"]
    assert memlayers_eval([*argv, "--output", str(out)]) == 0
    got = json.loads(sorted(out.rglob("results*.json"))[-1].read_text())["results"]["own_text"]["bits_per_byte,none"]

    tokenizer = Tokenizer(inference_export / "tokenizer.model")
    ids = torch.tensor([[tokenizer.eos_id, *tokenizer.encode(text)]])
    model = load(inference_export).eval()
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids[:, :-1]).double(), dim=-1)
    total = logprobs.gather(-1, ids[:, 1:, None]).sum().item()
    assert got == pytest.approx(-total / math.log(2) / len(text.encode()), rel=1e-4)
