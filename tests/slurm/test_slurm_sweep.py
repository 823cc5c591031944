"""memlayers-submit --sweep (pretrain/sweep.py): one job per combination, each run directory
holding its own resolved config; every run validated before the first is queued; a refusal
midway says what is already queued. sbatch is a stand-in script that counts its calls."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pretrain.launch import REPO_ROOT
from pretrain.sweep import SweepError, parse_sweep
from tools.submit import main

TINY = str(REPO_ROOT / "configs" / "tiny.yaml")


def fake_sbatch(tmp_path: Path, monkeypatch, refuse_call: int = 0) -> Path:
    """An sbatch that prints job ids 101, 102, ... and records the scripts it was given;
    with `refuse_call` = n it fails on its n-th call as sbatch does."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    calls = tmp_path / "calls"
    (bindir / "sbatch").write_text(
        "#!/bin/sh\n"
        f'echo "$2" >> {calls}\n'
        f'n=$(wc -l < {calls})\n'
        f'if [ "$n" -eq {refuse_call} ]; then echo "sbatch: error: QOSMaxSubmitJobPerUserLimit" >&2; exit 1; fi\n'
        'echo $((100 + n))\n'
    )  # fmt: skip
    (bindir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:/usr/bin:/bin")
    return calls


def test_the_product_of_the_values_in_order():
    runs = parse_sweep(["optim.lr=1e-3,3e-3", "train.seed=0,1,2"])
    assert [r.name for r in runs] == [
        "lr=1e-3_seed=0", "lr=1e-3_seed=1", "lr=1e-3_seed=2", "lr=3e-3_seed=0", "lr=3e-3_seed=1", "lr=3e-3_seed=2",
    ]  # fmt: skip
    assert runs[4].overrides == ("optim.lr=3e-3", "train.seed=1")
    # keys ending in the same name are spelled out whole
    assert [r.name for r in parse_sweep(["optim.beta1=0.9", "model.memory.k=16,32"])] == [
        "beta1=0.9_k=16",
        "beta1=0.9_k=32",
    ]
    assert parse_sweep(["optim.lr=1", "foo.lr=2"])[0].name == "optim.lr=1_foo.lr=2"


@pytest.mark.parametrize(
    "specs,message",
    [
        (["lr=1e-3"], "write it as a dotted config key"),
        (["optim.lr"], "write it as a dotted config key"),
        (["train.run_dir=a,b"], "names each run's directory"),
        (["optim.lr=1", "optim.lr=2"], "given twice"),
        (["optim.lr=1e-3,../x"], "not a plain number or name"),
        (["model.memory.layers=[1,2]"], "lists and quoted strings cannot be swept"),
        (["optim.lr=1,1"], "repeats a value"),
        # the same setting written two ways queued two identical jobs (the check compared text)
        (["optim.lr=1e-3,0.001"], "repeats a value: 1e-3 and 0.001 are the same setting"),
        (["train.seed=7,07"], "repeats a value: 7 and 07 are the same setting"),
        (["optim.lr=1,1.0"], "repeats a value: 1 and 1.0"),
    ],
)
def test_bad_specifications_are_named(specs, message):
    with pytest.raises(SweepError, match=message):
        parse_sweep(specs)


def test_each_combination_is_a_run_with_its_own_config_and_job(tmp_path, monkeypatch, capsys):
    calls = fake_sbatch(tmp_path, monkeypatch)
    base = tmp_path / "runs" / "sweep"
    argv = ["--config", TINY, "--cpu", "train.micro_batch=2", f"train.run_dir={base}"]
    assert main([*argv, "--sweep", "optim.lr=1e-3,3e-3", "--sweep", "train.seed=0,1"]) == 0
    out = capsys.readouterr().out
    record = json.loads((base / "sweep.json").read_text())["runs"]
    assert [(r["name"], r["job_id"]) for r in record] == [
        ("lr=1e-3_seed=0", "101"), ("lr=1e-3_seed=1", "102"), ("lr=3e-3_seed=0", "103"), ("lr=3e-3_seed=1", "104"),
    ]  # fmt: skip
    assert calls.read_text().split() == [str(base / r["name"] / "train.sbatch") for r in record]
    for r in record:
        cfg = yaml.safe_load((base / r["name"] / "config.yaml").read_text())
        lr, seed = r["overrides"][0].split("=")[1], r["overrides"][1].split("=")[1]
        assert (cfg["optim"]["lr"], cfg["train"]["seed"]) == (float(lr), int(seed))
        assert cfg["train"]["run_dir"] == str(base / r["name"]) and cfg["train"]["micro_batch"] == 2
        assert f"submitted job {r['job_id']}: {base / r['name']}" in out


def test_a_run_that_would_fail_stops_the_sweep_before_anything_is_queued(tmp_path, monkeypatch, capsys):
    calls = fake_sbatch(tmp_path, monkeypatch)
    base = tmp_path / "sweep"
    argv = ["--config", TINY, "--cpu", f"train.run_dir={base}", "--sweep", "train.micro_batch=2,5"]
    assert main(argv) == 2  # 5 does not divide the global batch of 16
    err = capsys.readouterr().err
    assert "sweep run micro_batch=5:" in err and "nothing was submitted" in err
    assert not calls.exists() and not base.exists()


def test_a_refusal_midway_says_which_jobs_are_queued(tmp_path, monkeypatch, capsys):
    fake_sbatch(tmp_path, monkeypatch, refuse_call=3)
    base = tmp_path / "sweep"
    argv = ["--config", TINY, "--cpu", "train.micro_batch=2", f"train.run_dir={base}", "--sweep", "train.seed=0,1,2,3"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "sweep run seed=2: sbatch refused the job (exit 1): sbatch: error: QOSMaxSubmitJobPerUserLimit" in err
    assert "Already queued: 2 of 4 runs (jobs 101, 102" in err and "the rest were not submitted" in err
    assert [r["job_id"] for r in json.loads((base / "sweep.json").read_text())["runs"]] == ["101", "102"]
    assert sorted(p.name for p in base.iterdir()) == ["seed=0", "seed=1", "sweep.json"]  # seed=2 rolled back


def test_a_refusal_of_the_first_job_leaves_nothing_behind(tmp_path, monkeypatch, capsys):
    """sbatch refusing the sweep's first job (an unknown partition, a queue limit) left a new
    train.run_dir holding a sweep.json of no runs, and the error said the queued jobs ('none') were
    'listed in' it. Nothing is written now, and the error says that nothing was submitted."""
    fake_sbatch(tmp_path, monkeypatch, refuse_call=1)
    base = tmp_path / "sweep"
    argv = ["--config", TINY, "--cpu", "train.micro_batch=2", f"train.run_dir={base}", "--sweep", "train.seed=0,1"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "sweep run seed=0: sbatch refused the job (exit 1): sbatch: error: QOSMaxSubmitJobPerUserLimit" in err
    assert "nothing was submitted" in err and "listed in" not in err, err
    assert not base.exists()


def test_dry_run_prints_every_script_and_writes_nothing(tmp_path, capsys):
    base = tmp_path / "sweep"
    argv = ["--config", TINY, "--cpu", "train.micro_batch=2", f"train.run_dir={base}", "--dry-run"]
    assert main([*argv, "--sweep", "optim.lr=1e-3,3e-3"]) == 0
    out = capsys.readouterr().out
    assert out.count("#!/bin/bash") == 2
    assert f"# sweep run 2/2: {base / 'lr=3e-3'} (optim.lr=3e-3)" in out
    assert not base.exists()


def test_runs_of_a_sweep_under_a_path_with_yaml_characters_get_their_own_directories(tmp_path, monkeypatch, capsys):
    """A working directory named 'w #1' (YAML would read ' #1' as a comment): each run still
    has its own run directory, named in its config, its script and the sweep record."""
    calls = fake_sbatch(tmp_path, monkeypatch)
    workdir = tmp_path / "w #1"
    workdir.mkdir()
    argv = ["--config", TINY, "--cpu", "train.micro_batch=2", "train.run_dir=runs/s", "--workdir", str(workdir)]
    assert main([*argv, "--sweep", "train.seed=0,1"]) == 0
    base = workdir / "runs" / "s"
    record = json.loads((base / "sweep.json").read_text())["runs"]
    assert [r["run_dir"] for r in record] == [str(base / "seed=0"), str(base / "seed=1")]
    assert calls.read_text().splitlines() == [str(base / n / "train.sbatch") for n in ("seed=0", "seed=1")]
    for name, seed in (("seed=0", 0), ("seed=1", 1)):
        cfg = yaml.safe_load((base / name / "config.yaml").read_text())
        assert (cfg["train"]["run_dir"], cfg["train"]["seed"]) == (str(base / name), seed)
    assert capsys.readouterr().out.count("submitted job") == 2


def test_a_second_sweep_or_a_resume_under_the_same_run_dir_keeps_every_run_in_the_record(tmp_path, monkeypatch, capsys):
    calls = fake_sbatch(tmp_path, monkeypatch)
    base = tmp_path / "sweep"
    argv = ["--config", TINY, "--cpu", "train.micro_batch=2", f"train.run_dir={base}"]
    assert main([*argv, "--sweep", "optim.lr=1e-3,2e-3"]) == 0
    assert main([*argv, "--sweep", "train.seed=0,1"]) == 0
    assert main([*argv, "--sweep", "optim.lr=1e-3,2e-3", "--resume"]) == 0  # requeued: their entries get new ids
    capsys.readouterr()
    record = json.loads((base / "sweep.json").read_text())["runs"]
    assert [(r["name"], r["run_dir"], r["job_id"]) for r in record] == [
        ("lr=1e-3", str(base / "lr=1e-3"), "105"),
        ("lr=2e-3", str(base / "lr=2e-3"), "106"),
        ("seed=0", str(base / "seed=0"), "103"),
        ("seed=1", str(base / "seed=1"), "104"),
    ]
    assert len(calls.read_text().split()) == 6
    (base / "sweep.json").write_text('{"runs": {"seed=0": 1}}')  # not a record: refused before anything is queued
    assert main([*argv, "--sweep", "train.seed=2,3"]) == 2
    err = capsys.readouterr().err
    assert f"{base / 'sweep.json'} is not a sweep record" in err and "move it aside" in err, err
    assert len(calls.read_text().split()) == 6 and not (base / "seed=2").exists()
