"""tools/generate.py: prints decode(prompt + continuation) and refuses bad input before loading."""

from __future__ import annotations

import shutil
from pathlib import Path

from pretrain.data import Tokenizer
from tests.export.export_helpers import OracleModel


def test_generate_prints_prompt_and_continuation_decoded_together(inference_export, monkeypatch, capsys):
    import pretrain.export
    from tools.generate import main

    tok = Tokenizer(inference_export / "tokenizer.model")
    prompt, text = "The list", "The list type is used"
    full = [tok.eos_id] + tok.encode(text)
    continuation = full[1 + len(tok.encode(prompt)) :]
    assert tok._sp.id_to_piece(continuation[0]).startswith("\u2581")  # the continuation starts a new word
    assert prompt + tok.decode(continuation) != text  # the old print would glue the words together
    monkeypatch.setattr(pretrain.export, "load", lambda *a, **k: OracleModel([full], tok.vocab_size))
    assert main([str(inference_export), "--prompt", prompt, "--max-new-tokens", str(len(continuation))]) == 0
    assert capsys.readouterr().out.strip() == text


def test_generate_errors_name_the_problem_and_fix(inference_export, tmp_path, capsys):
    from tools.generate import main

    no_tokenizer = tmp_path / "export"
    shutil.copytree(inference_export, no_tokenizer)
    (no_tokenizer / "tokenizer.model").unlink()
    assert main([str(no_tokenizer), "--prompt", "The"]) == 2
    err = capsys.readouterr().err
    assert f"{no_tokenizer} has no tokenizer.model" in err and "tools/export.py" in err

    assert main([str(inference_export), "--prompt", "The city of Aldmere " * 8, "--max-new-tokens", "4"]) == 2
    err = capsys.readouterr().err  # 89 tokens: no --max-new-tokens fits them
    assert "longer than the model's max_seq_len of 32: shorten the prompt to at most 29 tokens (keep its end)" in err
    assert main([str(inference_export), "--prompt", "The city", "--max-new-tokens", "40"]) == 2
    err = capsys.readouterr().err
    assert "max_seq_len is 32: shorten the prompt or lower --max-new-tokens to at most" in err


def test_generate_refuses_bad_numbers_before_loading(inference_export, monkeypatch, capsys):
    import pytest

    import pretrain.export
    from tools.generate import main

    def no_load(*args, **kwargs):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(pretrain.export, "load", no_load)
    for flags, message in [  # refused when the arguments are parsed (pretrain.cli types)
        (["--temperature", "nan"], "argument --temperature: nan must be a finite number >= 0 (0 = greedy)"),
        (["--temperature", "inf"], "argument --temperature: inf must be a finite number >= 0 (0 = greedy)"),
        (["--temperature", "1", "--top-p", "nan"], "argument --top-p: nan must be a probability mass in (0, 1]"),
        (["--max-new-tokens", "-2"], "argument --max-new-tokens: -2 must be an integer >= 0"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main([str(inference_export), "--prompt", "The", *flags])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err, flags
    # a nucleus mass above 1 passed the parse: check_sampling refused it only after the export's
    # tokenizer was read, as 'top_p=1.5' (not the option), and a missing export was named first
    for export, flags in [
        (inference_export, ["--temperature", "1", "--top-p", "1.5"]),
        ("no-such-export", ["--temperature", "1", "--top-p", "1.5"]),
        (inference_export, ["--top-p", "2"]),  # was 'applies to sampling': as if 2 were a valid mass
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main([str(export), "--prompt", "The", *flags])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and "must be a probability mass in (0, 1] (1 = no nucleus cut)" in err
        assert f"argument --top-p: {flags[-1]} " in err, flags
    for count in ("0", "-3"):  # -3 answered all but the last 3 probes before
        with pytest.raises(SystemExit) as exit_info:
            main([str(inference_export), "--probes", count])
        assert exit_info.value.code == 2
        assert f"{count} must be an integer >= 1" in capsys.readouterr().err


def test_generate_refuses_a_prompt_beside_probes(tmp_path, capsys):
    """--prompt with --probes was ignored without a word (the probes' questions are the prompts)."""
    import pytest

    from tools.generate import main

    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path), "--probes", "5", "--prompt", "The capital of"])
    assert exit_.value.code == 2
    assert "--prompt and --probes" in capsys.readouterr().err


def test_generate_without_prompt_or_probes_is_refused_and_an_empty_prompt_samples_unconditionally(
    inference_export, monkeypatch, capsys
):
    """Neither --prompt nor --probes generated from the document separator alone without a word (a
    forgotten --prompt passed for an answer); it is refused before the weights load, naming both
    options and --prompt "", which generates from the separator alone, as transformers' generate()
    without input_ids does."""
    import pytest

    import pretrain.export
    import pretrain.export.generation
    from tools.generate import main

    def no_load(*args, **kwargs):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(pretrain.export, "load", no_load)
    for flags in ([], ["--max-new-tokens", "3"], ["--temperature", "0.5"]):
        with pytest.raises(SystemExit) as exit_info:
            main([str(inference_export), *flags])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2, flags
        assert "give --prompt TEXT to continue, or --probes N" in err and '--prompt ""' in err, err
    with pytest.raises(SystemExit):  # an explicit prompt beside --probes is refused, even an empty one
        main([str(inference_export), "--probes", "3", "--prompt", ""])
    assert "--prompt and --probes" in capsys.readouterr().err

    tok = Tokenizer(inference_export / "tokenizer.model")
    prompts = []
    monkeypatch.setattr(pretrain.export, "load", lambda *a, **k: OracleModel([[tok.eos_id]], tok.vocab_size))
    monkeypatch.setattr(
        pretrain.export.generation, "generate", lambda model, prompt, *a, **k: prompts.append(prompt) or []
    )
    assert main([str(inference_export), "--prompt", "", "--max-new-tokens", "3"]) == 0
    assert prompts == [[tok.eos_id]]  # the separator alone


def _probes_with_new_facts(export, folder):
    """A probes.jsonl of the export's probes with every third one marked a new fact (held out of
    pretraining), as the embedded corpus interleaves them; returns (trained, new) questions in order."""
    import json
    from dataclasses import asdict, replace

    from pretrain.data import load_probes
    from pretrain.export.generation import fits

    tok = Tokenizer(export / "tokenizer.model")
    fitting = [p for p in load_probes(export) if fits(p, tok, 32)]  # the export's max_seq_len
    probes = [replace(p, is_new_fact=i % 3 == 1) for i, p in enumerate(fitting[:12])]
    folder.mkdir()
    (folder / "probes.jsonl").write_text("".join(json.dumps(asdict(p)) + "\n" for p in probes))
    return [p.question for p in probes if not p.is_new_fact], [p.question for p in probes if p.is_new_fact]


def test_generate_probes_asks_the_trained_facts_as_the_runs_fact_recall(inference_export, tmp_path, capsys):
    """--probes N asked the first N probes of the file, new facts (never trained on) among them,
    while the run's fact recall asks only trained facts: the printed accuracy was diluted."""
    from tools.generate import main

    trained, new = _probes_with_new_facts(inference_export, tmp_path / "probes")
    assert main([str(inference_export), "--probes", "5", "--probes-dir", str(tmp_path / "probes")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line[4:].split(" -> ")[0] for line in lines[:-1]] == trained[:5]
    assert " on 5 trained-fact probes " in lines[-1]
    argv = [str(inference_export), "--probes", "9", "--probes-dir", str(tmp_path / "probes"), "--new-facts"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line[4:].split(" -> ")[0] for line in lines[:-1]] == new  # all 4 of them
    assert " on 4 new-fact probes " in lines[-1]


def test_generate_probes_without_probes_of_the_kind_asked_is_refused(inference_export, tmp_path, monkeypatch, capsys):
    import json
    from dataclasses import asdict, replace

    import pytest

    import pretrain.export
    from pretrain.data import load_probes
    from tools.generate import main

    monkeypatch.setattr(pretrain.export, "load", lambda *a, **k: pytest.fail("the weights were loaded"))
    folder = tmp_path / "probes"
    folder.mkdir()
    probes = [replace(p, is_new_fact=False) for p in load_probes(inference_export)[:3]]
    (folder / "probes.jsonl").write_text("".join(json.dumps(asdict(p)) + "\n" for p in probes))
    assert main([str(inference_export), "--probes", "2", "--probes-dir", str(folder), "--new-facts"]) == 2
    assert "probes.jsonl holds no new-fact probe: ask the others without --new-facts" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(inference_export), "--prompt", "The", "--new-facts"])
    assert "--new-facts selects which fact probes --probes asks" in capsys.readouterr().err


def test_an_export_without_probes_names_why_and_what_to_pass(inference_export, tmp_path, monkeypatch, capsys):
    """An export of a run on one's own text has no probes.jsonl; --probes and memlayers-eval said to
    "prepare it with pretrain.data.prepare_embedded_dataset or leave data.dir empty", a training fix."""
    import pytest

    import pretrain.export
    from tools.generate import main
    from tools.memlayers_eval import main as memlayers_eval

    export = tmp_path / "export"
    shutil.copytree(inference_export, export)
    (export / "probes.jsonl").unlink()
    monkeypatch.setattr(pretrain.export, "load", lambda *a, **k: pytest.fail("the weights were loaded"))
    why = f"{export} has no probes.jsonl: its run trained on a dataset without fact probes"
    assert main([str(export), "--probes", "3"]) == 2
    err = capsys.readouterr().err
    assert why in err and "pass --probes-dir with a folder holding a probes.jsonl" in err
    assert memlayers_eval([str(export)]) == 2
    err = capsys.readouterr().err
    assert why in err and "or evaluate other --tasks" in err
    # a --probes-dir without probes.jsonl (a prepared dataset of one's own text): it said, as to the trainer,
    # "prepare it with pretrain.data.prepare_embedded_dataset or leave data.dir empty"
    for folder in (tmp_path / "none", tmp_path):
        assert main([str(export), "--probes", "3", "--probes-dir", str(folder)]) == 2
        err = capsys.readouterr().err
        assert f"{folder}/probes.jsonl does not exist: --probes-dir names a folder holding the fact probes" in err
        assert "data.dir" not in err


def test_a_file_passed_as_probes_dir_is_named_a_file(inference_export, tmp_path, monkeypatch, capsys):
    """--probes-dir with a file (the probes.jsonl itself) was read as a folder: "<file>/probes.jsonl
    does not exist", which names neither the mistake nor its fix."""
    import pytest

    import pretrain.export
    from tools.generate import main
    from tools.memlayers_eval import main as memlayers_eval

    monkeypatch.setattr(pretrain.export, "load", lambda *a, **k: pytest.fail("the weights were loaded"))
    probes_file = inference_export / "probes.jsonl"
    assert probes_file.is_file()
    assert main([str(inference_export), "--probes", "3", "--probes-dir", str(probes_file)]) == 2
    err = capsys.readouterr().err
    assert (
        f"--probes-dir {probes_file} is a file, not a folder: pass its folder, --probes-dir {inference_export}" in err
    )
    other = tmp_path / "facts.txt"
    other.write_text("")
    assert memlayers_eval([str(inference_export), "--probes-dir", str(other)]) == 2
    err = capsys.readouterr().err
    assert f"--probes-dir {other} is a file, not a folder: pass the folder holding a probes.jsonl" in err


def test_a_run_directory_or_a_missing_folder_is_named_as_such(tmp_path, capsys):
    """A run directory passed where an export belongs was told it "has no tokenizer.model ... re-export
    with tools/export.py", and so was a folder that does not exist; the tools now say which it is."""
    from tools.generate import main
    from tools.memlayers_eval import main as memlayers_eval
    from tools.perplexity import main as perplexity

    run = tmp_path / "runs" / "english"
    (run / "checkpoints" / "step_00000100").mkdir(parents=True)
    (run / "checkpoints" / "step_00000100" / "config.yaml").write_text("model: {}\n")
    for folder in (run, run / "checkpoints" / "step_00000100"):
        for tool in (
            lambda d: main([d, "--prompt", "The"]),
            lambda d: perplexity([d, "--data", str(tmp_path)]),
            lambda d: memlayers_eval([d]),
        ):
            assert tool(str(folder)) == 2
            err = capsys.readouterr().err
            assert f"{folder} is a training run or checkpoint, not an export: export it first, memlayers-export" in err
    for tool in (lambda d: main([d, "--prompt", "The"]), lambda d: memlayers_eval([d])):
        assert tool(str(tmp_path / "nowhere")) == 2
        assert f"no such export directory: {tmp_path / 'nowhere'}" in capsys.readouterr().err


def test_generate_refuses_top_p_when_greedy(data_cache, tmp_path, monkeypatch, capsys):
    """--top-p with --temperature 0 (the default, greedy) was ignored without a word: the greedy
    continuation came out as if it were not given. It is refused as the other no-op combinations
    are (sampling options beside --probes); with a temperature > 0 it is taken."""
    from pathlib import Path

    import pytest

    import pretrain.export
    from tools.generate import main

    export = tmp_path / "export"  # the tokenizer is all the tool reads before the weights
    export.mkdir()
    dataset = next(p.parent for p in Path(data_cache).rglob("manifest.json"))
    shutil.copy(dataset / "tokenizer.model", export / "tokenizer.model")
    tok = Tokenizer(export / "tokenizer.model")
    full = [tok.eos_id] + tok.encode("The list type is used")
    monkeypatch.setattr(pretrain.export, "load", lambda *a, **k: OracleModel([full], tok.vocab_size))
    for flags in (["--top-p", "0.5"], ["--temperature", "0", "--top-p", "0.9"]):
        with pytest.raises(SystemExit) as exit_info:
            main([str(export), "--prompt", "The list", "--max-new-tokens", "3", *flags])
        assert exit_info.value.code == 2
        assert "--top-p applies to sampling (--temperature > 0); at --temperature 0" in capsys.readouterr().err
    assert main([str(export), "--prompt", "The list", "--max-new-tokens", "3", "--top-p", "1.0"]) == 0
    assert (
        main([str(export), "--prompt", "The list", "--max-new-tokens", "3", "--temperature", "0.5", "--top-p", "0.5"])
        == 0
    )


def test_generate_refuses_options_that_would_change_nothing(inference_export, tmp_path, monkeypatch, capsys):
    """--seed at --temperature 0 (greedy draws nothing), --seed, --max-new-tokens and --no-cache
    beside --probes (answered greedily, each to its answer's length, cached) and --probes-dir
    without --probes were ignored without a word: the output came out as if they were not given.
    They are refused before anything is read, as --top-p at temperature 0 is; a seed with a
    temperature > 0 is taken."""
    import pytest

    import pretrain.export
    from tools.generate import main

    missing = str(tmp_path / "missing")  # the refusals come from the arguments alone
    for flags, message in [
        (
            ["--prompt", "The", "--seed", "3"],
            "--seed 3: the seed draws the samples of --temperature > 0; at --temperature 0",
        ),
        (["--prompt", "The", "--temperature", "0", "--seed", "0"], "--seed 0: the seed draws the samples"),
        (["--probes", "3", "--seed", "3"], "--seed: sampling options apply to --prompt generation, not --probes"),
        # it read '--max-new-tokens: --prompt generation options; --probes generates ...: drop them'
        (
            ["--probes", "3", "--max-new-tokens", "4"],
            "--max-new-tokens applies to --prompt generation only: --probes generates each probe's answer to "
            "the answer's length, with the cache; drop it",
        ),
        (
            ["--probes", "3", "--max-new-tokens", "4", "--no-cache"],
            "--max-new-tokens and --no-cache apply to --prompt generation only: --probes generates",
        ),
        (
            ["--prompt", "The", "--probes-dir", "x"],
            "--probes-dir names where --probes reads probes.jsonl: give --probes",
        ),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main([missing, *flags])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err

    tok = Tokenizer(inference_export / "tokenizer.model")
    full = [tok.eos_id] + tok.encode("The list type is used")
    monkeypatch.setattr(pretrain.export, "load", lambda *a, **k: OracleModel([full], tok.vocab_size))
    argv = [str(inference_export), "--prompt", "The list", "--max-new-tokens", "3", "--temperature", "0.5"]
    assert main([*argv, "--seed", "3"]) == 0


def perplexity_before_torch(tmp_path: Path, repo_root: Path, splits: dict, *args: str):
    """tools/perplexity.py run in a fresh interpreter on a stub export (nothing reads its files before the
    split is checked) and a dataset of these manifest splits: (its exit status, whether torch was imported,
    its stderr, the data folder)."""
    import json
    import subprocess
    import sys

    from pretrain.data.shards import FORMAT
    from pretrain.export.folders import EXPORT_FILES

    export = tmp_path / "export"
    export.mkdir()
    for name in (*EXPORT_FILES, "tokenizer.model"):
        (export / name).write_bytes(b"")
    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.json").write_text(json.dumps({"format": FORMAT, "splits": splits}))
    script = (
        "import sys\n"
        "from tools.perplexity import main\n"
        f"print(main({[str(export), '--data', str(data), *args]!r}))\n"
        "print('torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=repo_root, capture_output=True, text=True, check=True)
    status, torch_imported = done.stdout.split()
    return int(status), torch_imported == "True", done.stderr, data


def test_perplexity_refuses_a_split_the_dataset_lacks_before_importing_torch(tmp_path, repo_root):
    """`--split vall` was refused only by the data loader, after torch was imported (2.4 s measured),
    in the loader's words (`split 'vall' is not in .../manifest.json`); the tool now refuses it from
    the manifest, naming the splits to pass. The reference is sys.modules in a fresh interpreter."""
    status, torch_imported, err, data = perplexity_before_torch(
        tmp_path, repo_root, {"train": {}, "val": {}}, "--split", "vall"
    )
    assert (status, torch_imported) == (2, False), err
    assert f"error: {data} has no split 'vall': pass --split train or --split val" in err


def test_perplexity_refuses_an_empty_split_before_importing_torch_naming_the_split_to_pass(tmp_path, repo_root):
    """A held-out file prepared to be scored (one text file: `--val-fraction 0`, since a validation split
    of one document would be refused) has an empty 'val', perplexity's default split: the loader refused
    it after torch was imported (9.4 s on 2 loaded cores), advising to prepare again with
    `--val-fraction > 0`, which prepare_data refuses for that file. The tool now refuses it from the
    manifest, naming `--split train`. The reference is sys.modules in a fresh interpreter."""
    splits = {"train": {"sequences": 409, "shards": [{}]}, "val": {"sequences": 0, "shards": []}}
    status, torch_imported, err, data = perplexity_before_torch(tmp_path, repo_root, splits)
    assert (status, torch_imported) == (2, False), err
    assert f"error: the 'val' split of {data} holds no sequences" in err
    assert err.rstrip().endswith("pass --split train")
