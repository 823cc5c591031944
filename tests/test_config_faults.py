"""Config values that used to fail only after start-up (ZeroDivisionError) or with an
omegaconf traceback are refused when the config loads, naming the key and the fix."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pretrain.config import ConfigError, load_config
from pretrain.config.schema import RunConfig, SourceConfig

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("key", ["train.log_every", "train.eval_every", "train.checkpoint_every", "slots.log_every"])
@pytest.mark.parametrize("value", [0, -3])
def test_cadence_below_one_is_refused(key, value):
    with pytest.raises(ConfigError, match=rf"{key}={value} must be >= 1"):
        load_config(None, [f"{key}={value}"])


def test_keeping_no_checkpoint_is_refused():
    with pytest.raises(ConfigError, match="train.keep_checkpoints=0 would delete every checkpoint"):
        load_config(None, ["train.keep_checkpoints=0"])
    assert load_config(None, ["train.keep_checkpoints=1"]).train.keep_checkpoints == 1


def test_yaml_list_is_refused(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("- model\n- train\n")
    with pytest.raises(ConfigError, match=rf"{path.name} holds a YAML list, not a mapping"):
        load_config(path)


@pytest.mark.parametrize(
    "text, message",
    [
        ("5\n", r"could not be read as a YAML mapping \(Invalid loaded object type: int\): write it as `section:`"),
        ("model: {dim: [1\n", r"is not valid YAML \(did not find expected ',' or '\]' at line 2, column 1\)"),
        ("model:\n  dim: 64\n  dim: 32\n", r"is not valid YAML \(found duplicate key dim at line 3, column 3\)"),
        ("train:\n  run_dir: !tag x\n", r"is not valid YAML \(.*tag '!tag'"),
        ("train:\n  run_dir: *x\n", r"is not valid YAML \(found undefined alias at line 2"),
        ("model: 5\n", r"model is a section, not a value \(5\): set its keys, e.g. model\.vocab_size="),
        ("model:\n  memory: [1]\n", r"model\.memory is a section, not a value \(\[1\]\)"),
        ("train:\n  run_dir: ${nope}/x\n", r"train\.run_dir: Interpolation key 'nope' not found: an interpolation"),
        ("model:\n  memory:\n    layers: 1\n", r"model\.memory\.layers is a list, not 1: write it in brackets"),
    ],
)
def test_a_bad_yaml_file_is_a_config_error_naming_the_file(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"^config file {path}:? .*{message}"):
        load_config(path)


def test_a_yaml_interpolation_that_resolves_still_works(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("train:\n  seed: 5\ndata:\n  synthetic:\n    seed: ${train.seed}\n")
    assert load_config(path).data.synthetic.seed == 5


def test_a_typo_inside_a_list_item_suggests_the_items_own_field(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("data:\n  sources:\n    - {dir: x, wieght: 2}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == (
        f"config file {path}: unknown config key 'data.sources[0].wieght'; did you mean 'data.sources[0].weight'?"
    )
    with pytest.raises(
        ConfigError, match=r"'data\.eval_sources\[1\]\.nme'; did you mean 'data\.eval_sources\[1\]\.name'"
    ):
        load_config(None, ["data.eval_sources=[{dir: a}, {dir: b, nme: c}]"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.memory.layers=[0,1", r"the value is not valid YAML \(did not find expected ',' or '\]'\): close every"),
        ("optim.lr=[1", r"the value is not valid YAML"),
        # docs/own-corpus.md's quoted mixture override typed without quotes: the shell splits it at each space
        ("data.sources=[{dir:", r"the value stops at ':', where the shell split the override at a space: quote"),
        (
            "model.memory.layers=[0,",
            r"stops at ',', .* quote the whole override, e.g. \"model\.memory\.layers=\[0, 1\]\"",
        ),
        ("train=5", r"train is a section, not a value \(5\): set its keys, e.g. train\.run_dir="),
        ("model.memory=true", r"model\.memory is a section, not a value \(True\)"),
        ("model.memory.layers=1", r"model\.memory\.layers is a list, not 1: write it in brackets"),
        ("model.memory.layers={a: 1}", r"model\.memory\.layers is a list, not \{'a': 1\}"),
        ("data.sources[0].dir=x", r"an override cannot set one item of the list data\.sources: set the whole list"),
        ("data.sources.0.dir=x", r"an override cannot set one item of the list data\.sources: set the whole list"),
        ("=5", None),
    ],
)
def test_a_bad_override_is_a_config_error_naming_the_override(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    if message is None:
        assert str(err.value) == "override '=5' must look like key.sub=value"
    else:
        assert str(err.value).startswith(f"override {override!r}: ")
        assert re.search(message, str(err.value)), str(err.value)


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.val_fraction=0", "data.val_fraction=0.0 and data.min_shards=8 must be positive for the embedded corpus"),
        ("data.min_shards=0", "data.val_fraction=0.05 and data.min_shards=0 must be positive for the embedded corpus"),
        ("data.val_fraction=1", "data.val_fraction=1.0 must be below 1 for the embedded corpus"),
        ("data.val_fraction=1.5", "data.val_fraction=1.5 must be below 1 for the embedded corpus"),
        ("data.sequences_per_shard=0", "data.sequences_per_shard=0 must be positive for the embedded corpus"),
        ("data.shuffle_buffer=-1", "data.shuffle_buffer=-1 must be >= 0"),
        ("train.stop_after=-3", "train.stop_after=-3 (0: run to train.max_steps) and train.probe_limit=200"),
        ("train.probe_limit=-1", "train.stop_after=0 (0: run to train.max_steps) and train.probe_limit=-1"),
        ("train.seed=-1", "train.seed=-1 must be >= 0 (e.g. train.seed=1)"),
    ],
)
def test_values_the_job_would_refuse_late_are_refused_when_the_config_loads(override, message):
    """The embedded corpus's settings were refused only when the job built the corpus (after the
    queue); a negative shuffle buffer only by the loader; a negative train.seed by numpy's
    SeedSequence, a traceback after the data and model were built (compare_dense --seeds -1 too)."""
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert str(err.value).startswith(message), str(err.value)


def test_embedded_corpus_settings_are_not_read_with_a_prepared_dataset():
    from pretrain.config import RunConfig, validate

    cfg = RunConfig()
    cfg.data.val_fraction, cfg.data.min_shards, cfg.data.sequences_per_shard = 0.0, 0, 0
    cfg.data.dir = "prepared"
    validate(cfg)  # data.dir's own manifest says how it was split
    with pytest.raises(ConfigError, match="must be positive for the embedded corpus"):
        cfg.data.dir = ""
        validate(cfg)


def test_a_shell_variable_in_a_config_file_names_the_form_that_reads_the_environment(tmp_path, monkeypatch):
    """A config file's `run_dir: $ROOT/run` (no shell reads a YAML file) was told to put 'the override
    in double quotes'; the file's fix is OmegaConf's ${oc.env:ROOT}, named with the variable."""
    monkeypatch.setenv("MEMLAYERS_TEST_ROOT", str(tmp_path / "root"))
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  run_dir: $MEMLAYERS_TEST_ROOT/run\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "train.run_dir='$MEMLAYERS_TEST_ROOT/run' holds a shell variable" in str(err.value)
    assert "in a config file, write ${oc.env:MEMLAYERS_TEST_ROOT}" in str(err.value)
    path.write_text("train:\n  run_dir: ${oc.env:MEMLAYERS_TEST_ROOT}/run\n")  # the form it names
    assert load_config(path).train.run_dir == f"{tmp_path}/root/run"


# Measured before each refusal below (`python -m pretrain.train --config configs/tiny.yaml <override>`):
# an OverflowError traceback at start-up (timeouts of inf); a ValueError/OverflowError/RuntimeError
# traceback after the model's build had begun and the run directory was made (integers beyond 64 bits);
# the run trained on where the value made no sense (hang detection or clipping silently off, every norm's
# output 0, checkpoints and the corpus written into the working directory); a DataError only after torch
# and the process group (the embedded corpus's world settings; data.vocab_size below 260, named as
# prepare_data's "vocab_size"); a non-finite loss at step 1 after a checkpoint was written (init_std=inf).
LATE_OR_NEVER = [
    ("train.hang_timeout_s=inf", "train.hang_timeout_s=inf must be a number of seconds >= 0, 0 turning hang"),
    ("train.hang_timeout_s=nan", "train.hang_timeout_s=nan must be a number of seconds >= 0"),
    (
        "train.startup_timeout_s=inf",
        "train.startup_timeout_s=inf must be a number of seconds > 0 (train.hang_timeout_s=0",
    ),
    ("train.startup_timeout_s=nan", "train.startup_timeout_s=nan must be a number of seconds > 0"),
    ("optim.grad_clip=nan", "optim.grad_clip=nan must be a number: the bound on the gradient norm (e.g. 1.0; 0 or"),
    ("model.norm_eps=inf", "model.norm_eps=inf must be >= 0 and finite (the default: model.norm_eps=1e-05)"),
    ("model.init_std=inf", "model.init_std=inf must be >= 0 and finite (the default: model.init_std=0.02)"),
    ("data.val_fraction=nan", "data.val_fraction=nan and data.min_shards=8 must be positive for the embedded corpus"),
    ("data.synthetic.num_entities=1", "data.synthetic.num_entities=1 must be >= 2 (e.g. 300 for the demo)"),
    ("data.synthetic.new_fact_fraction=1", "data.synthetic.new_fact_fraction=1.0 must be in [0, 1)"),
    ("data.synthetic.docs_per_entity=-1", "data.synthetic.docs_per_entity=-1 and qa_docs_per_entity=2 must be >= 0"),
    ("data.vocab_size=64", "data.vocab_size=64 is too small for the embedded corpus's tokenizer: its byte fallback"),
    ("train.run_dir=", "train.run_dir is empty: name the run's directory (e.g. train.run_dir=runs/tiny)"),
    ("data.cache_dir=", "data.cache_dir is empty: name the folder the embedded corpus is built in"),
    ("train.seed=18446744073709551616", "train.seed=18446744073709551616 is beyond the 64-bit integers torch"),
    ("model.max_seq_len=10**20", "model.max_seq_len=100000000000000000000 is beyond the 64-bit integers"),
    ("model.n_layers=10**20", "model.n_layers=100000000000000000000 is beyond the 64-bit integers"),
    ("model.memory.n_keys=10**20", "model.memory.n_keys=100000000000000000000 is beyond the 64-bit integers"),
    ("data.synthetic.num_entities=10**20", "data.synthetic.num_entities=100000000000000000000 is beyond the 64-bit"),
    ("model.memory.layers=[-10**20]", "model.memory.layers=[-100000000000000000000] is beyond the 64-bit"),
    ("slots.granularity=chunk:10**20", "slots.granularity='chunk:100000000000000000000' must be document, sequence"),
]


@pytest.mark.parametrize("override, message", LATE_OR_NEVER)
def test_a_value_refused_late_or_never_is_refused_when_the_config_loads(override, message):
    override = override.replace("10**20", str(10**20))
    with pytest.raises(ConfigError) as err:
        load_config("configs/tiny.yaml", [override])
    assert str(err.value).startswith(message), str(err.value)


def test_the_limits_themselves_are_still_accepted():
    """What the refusals above keep: 0 or less turns clipping off (a run started with -1 resumes with it), 0 hang
    detection; the largest 64-bit seed
    seeds every generator the run draws from (torch's, numpy's modulo 2**32, the value tables')."""
    cfg = load_config(
        "configs/tiny.yaml",
        [
            "optim.grad_clip=-1",
            "train.hang_timeout_s=0",
            f"train.seed={2**63 - 1}",
            "model.norm_eps=0",
            "train.run_dir=.",
        ],
    )
    assert (cfg.optim.grad_clip, cfg.train.hang_timeout_s, cfg.train.seed) == (-1.0, 0.0, 2**63 - 1)
    from pretrain.rng import rng_state, seed_everything, set_rng_state

    state = rng_state()
    try:
        seed_everything(cfg.train.seed)  # the call the 2**64 seed failed in, after the build had begun
    finally:
        set_rng_state(state)


def test_the_64_bit_refusal_suggests_the_keys_default():
    with pytest.raises(ConfigError, match=r"\(the default: train\.max_steps=300\)$"):
        load_config(None, [f"train.max_steps={2**63}"])
    with pytest.raises(ConfigError, match=r"set a realistic value$"):  # a list has no example to give
        load_config(
            None, [f"train.activation_checkpointing_layers=[{2**63}]", "train.activation_checkpointing=selective"]
        )


@pytest.mark.parametrize("key", ["data.dir", "data.sources", "data.eval_sources"])
def test_a_path_the_system_cannot_look_up_is_refused_naming_the_key(key):
    """A folder name over the system's limit (255 bytes here) raised a bare OSError from is_file() in
    resolve_sources (which tools and the loaders call too; load_config refuses the name first, below)."""
    from types import SimpleNamespace

    from pretrain.data.errors import DataError
    from pretrain.data.sources import resolve_eval_sources, resolve_sources

    name = "x" * 300
    data = SimpleNamespace(dir="", sources=[], eval_sources=[])
    if key == "data.dir":
        data.dir = name
    else:
        setattr(data, key.split(".")[1], [{"dir": name, "weight": 1.0, "name": ""}])
    with pytest.raises(DataError) as err:
        resolve_eval_sources(data, resolve_sources(data))
    where = key if key == "data.dir" else f"{key}[0]"
    assert str(err.value).startswith(where), str(err.value)
    assert "cannot be looked up (File name too long): name the folder of a prepared dataset" in str(err.value)


@pytest.mark.parametrize(
    "key",
    ["train.run_dir", "data.cache_dir", "train.init_from", "data.dir", "data.sources", "data.eval_sources"],
)
def test_a_path_name_no_file_system_holds_is_refused_when_the_config_loads(key, tmp_path):
    """train.run_dir, data.cache_dir and train.init_from with a name over 255 bytes ended the job with an
    OSError traceback ("File name too long") after torch; the datasets' dirs were refused as above."""
    path = f"{tmp_path}/{'x' * 256}/run"
    override = f"{key}=[{{dir: {path}}}]" if key.endswith("sources") else f"{key}={path}"
    with pytest.raises(ConfigError) as err:
        load_config("configs/tiny.yaml", [override])
    where = f"{key}[0].dir" if key.endswith("sources") else key
    assert str(err.value).startswith(f"{where}='{tmp_path}"[:40]), str(err.value)
    assert str(err.value).endswith(
        "has 256 bytes, above the 255 a file system allows for one name: name a shorter path"
    ), str(err.value)
    assert load_config("configs/tiny.yaml", [f"train.run_dir={tmp_path}/{'x' * 255}"])  # at the limit


@pytest.mark.parametrize(
    "override, meant",
    [
        ("train.lr=1e-3", "optim.lr"),  # was: did you mean 'train'?
        ("model.n_keys=64", "model.memory.n_keys"),  # was: 'model.n_heads'
        ("train.vocab_size=64", "data.vocab_size"),
        ("data.seed=3", "data.synthetic.seed"),  # a key of that name in the same section before train.seed
        ("optim.max_steps=3", "train.max_steps"),
        ("model.dimm=64", "model.dim"),  # a misspelling: the nearest spelling, as before
    ],
)
def test_a_key_in_the_wrong_section_suggests_where_it_lives(override, meant):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert str(err.value).endswith(f"; did you mean '{meant}'?"), str(err.value)


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.memory.parallel_size=2", "error: model.memory.parallel_size=2 must divide the world size 1: set"),
        ("data.synthetic.num_entities=1", "error: data.synthetic.num_entities=1 must be >= 2"),
        ("train.hang_timeout_s=inf", "error: train.hang_timeout_s=inf must be a number of seconds"),
    ],
)
def test_a_process_alone_refuses_these_before_torch_is_imported(override, message):
    """Refused before, but only after torch (2-6 s on the loaded machine) and, for the first, the process
    group: a process alone runs in a world of 1, known before torch. The reference is the exit status and
    sys.modules of a fresh interpreter after the refusal (as tests/test_packaging.py checks model.dim)."""
    argv = ["pretrain.train", "--config", "configs/tiny.yaml", override]
    code = (
        "import os, runpy, sys\n"
        "os._exit = sys.exit\n"
        f"sys.argv = {argv!r}\n"
        "try:\n"
        "    runpy.run_module('pretrain.train', run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    print('exit', e.code)\n"
        "print(sorted(m for m in ('torch', 'deepspeed') if m in sys.modules))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "WORLD_SIZE"}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, env=env
    )
    assert message in done.stderr, done.stdout + done.stderr
    assert done.stdout.splitlines()[-2:] == ["exit 2", "[]"], done.stdout + done.stderr


@pytest.mark.parametrize(
    "override, message",
    [
        # OmegaConf named these by the field alone: "invalid value for config key 'weight'"
        ("data.sources=[{dir: a, weight: abc}]", "'data.sources[0].weight': Value 'abc' of type 'str' could not"),
        ("data.sources=[{dir: a}, {dir: b, weight: [1]}]", "'data.sources[1].weight': Value '[1]' of type"),
        ("data.eval_sources=[{dir: a, name: [1]}]", "'data.eval_sources[0].name': Cannot convert 'ListConfig'"),
    ],
)
def test_a_bad_value_in_a_list_item_names_the_item(override, message, tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert str(err.value).startswith(f"override {override!r}: invalid value for config key {message}"), str(err.value)
    path = tmp_path / "run.yaml"  # the same list in a config file
    key, _, value = override.partition("=")
    path.write_text(f"data:\n  {key.split('.')[1]}: {value}\n")
    with pytest.raises(ConfigError, match=re.escape(f"config file {path}: invalid value for config key {message}")):
        load_config(path)


@pytest.mark.parametrize(
    "override, ending",
    [
        ("train.max_steps=abc", "could not be converted to Integer (the default: train.max_steps=300)"),
        (
            "data.sources=[{dir: a, weight: abc}]",
            "could not be converted to Float (the default: data.sources[0].weight=1.0)",
        ),
        ("model.tie_embeddings=1.5", "is not a valid bool (type float) (the default: model.tie_embeddings=false)"),
        ("model.memory.k=null", "for field of type 'int' (the default: model.memory.k=32)"),
        (
            "model.memory.layers=[a]",
            "'model.memory.layers[0]': Value 'a' of type 'str' could not be converted to Integer",
        ),
        ("train.peak_flops=abc", "'train.peak_flops': Value 'abc' of type 'str' could not be converted to Float"),
    ],
)
def test_a_value_of_the_wrong_type_is_shown_its_keys_default(override, ending):
    """A list of values and a default of null have none to show."""
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert str(err.value).endswith(ending), str(err.value)


@pytest.mark.parametrize(
    "override, message",
    [  # "model.memory.n_keys, heads and k must be positive" / "train.max_steps, train.micro_batch and ...":
        # which one, and at what value, the reader had to find out
        ("model.memory.heads=0", "model.memory.heads=0 must be positive (the default: model.memory.heads=4)"),
        ("model.memory.k=-1", "model.memory.k=-1 must be positive (the default: model.memory.k=32)"),
        ("train.micro_batch=0", "train.micro_batch=0 must be positive (the default: train.micro_batch=16)"),
        ("train.max_steps=-5", "train.max_steps=-5 must be positive (the default: train.max_steps=300)"),
    ],
)
def test_a_count_that_must_be_positive_names_its_key_and_value(override, message):
    with pytest.raises(ConfigError) as err:
        load_config("configs/tiny.yaml", [override])
    assert str(err.value) == message


@pytest.mark.parametrize(
    "override",
    [
        "train.max_steps=abc",  # OmegaConf's type check
        "train.max_steps=99999999999999999999",  # beyond 64 bits
        "train.max_steps=0",  # a count
        "train.hang_timeout_s=inf",  # the timings
        "train.startup_timeout_s=nan",
        "train.rendezvous_timeout_s=0",
        "train.lost_peer_grace_s=-1",
        "model.norm_eps=inf",  # the model's own checks
        "model.rope_theta=0",
        "model.memory.k=0",
        "data.sources=[{dir: a, weight: abc}]",  # an item of a list of sections
    ],
)
def test_every_refusal_names_the_keys_default_in_one_form(override):
    """Refusals named a key's default four ways: ': e.g. K=V', ' (e.g. K=V)', ' (e.g. V)', ' (the
    default: K=V)', and as numbers typed into the message ('default 600'), which a changed default
    would leave wrong. The reference: the schema's default, read back from the message as YAML."""
    with pytest.raises(ConfigError) as err:
        load_config("configs/tiny.yaml", [override])  # its memory layers: their checks run
    key = override.partition("=")[0].replace("data.sources", "data.sources[0].weight")
    shown = re.search(rf" \(the default: {re.escape(key)}=([^ )]+)\)$", str(err.value))
    assert shown, str(err.value)
    default = RunConfig()
    for part in key.replace("[0]", "").split("."):
        default = getattr(default, part) if part != "sources" else SourceConfig(dir="x")
    assert OmegaConf.create(f"v: {shown.group(1)}").v == default  # as a config file reads it


@pytest.mark.parametrize("text", ["2", "-1", "'5'", "'x1'"])
def test_a_boolean_key_refuses_a_number_or_text_that_is_not_one(text, tmp_path):
    """OmegaConf read `train.compile: 2`, `-1` and the text '5' as true without a word."""
    path = tmp_path / "run.yaml"
    path.write_text(f"train:\n  compile: {text}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(f"config file {path}: train.compile=") and str(err.value).endswith(
        "is not a boolean: write train.compile=true or train.compile=false"
    ), str(err.value)


@pytest.mark.parametrize("text, value", [("true", True), ("0", False), ("1", True), ("yes", True), ("'off'", False)])
def test_a_boolean_key_still_reads_yamls_booleans_and_0_or_1(text, value, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(f"train:\n  compile: {text}\n")
    assert load_config(path).train.compile is value
    assert load_config(None, [f"train.compile={text.strip(chr(39))}"]).train.compile is value


@pytest.mark.parametrize("environment", ["true", "false"])
def test_a_boolean_key_in_a_config_file_still_takes_an_interpolation(environment, tmp_path, monkeypatch):
    """The boolean check read the unresolved text '${oc.env:...}' as a typo and refused the file."""
    monkeypatch.setenv("MEMLAYERS_TEST_COMPILE", environment)
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  compile: ${oc.env:MEMLAYERS_TEST_COMPILE}\nslots:\n  enabled: ${train.compile}\n")
    cfg = load_config(path)
    assert cfg.train.compile is cfg.slots.enabled is (environment == "true")
    path.write_text("train:\n  compile: ${oc.env:MEMLAYERS_TEST_UNSET_VARIABLE,true}\n")
    assert load_config(path).train.compile is True


@pytest.mark.parametrize("environment", ["2", "-1", "x1"])
def test_a_boolean_key_refuses_an_interpolation_that_reads_a_number_or_text(environment, tmp_path, monkeypatch):
    """`train.compile=2` on the command line was refused, but `${oc.env:VAR}` with VAR=2 (or -1) read as
    true without a word. The resolved value is checked as a typed one is, naming the key and variable."""
    monkeypatch.setenv("MEMLAYERS_TEST_COMPILE", environment)
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  compile: ${oc.env:MEMLAYERS_TEST_COMPILE}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == (
        f"config file {path}: train.compile=${{oc.env:MEMLAYERS_TEST_COMPILE}} reads {environment!r} from the "
        "environment variable MEMLAYERS_TEST_COMPILE, which is not a boolean: set MEMLAYERS_TEST_COMPILE to "
        "true or false (or 1, 0)"
    )
    path.write_text("train:\n  seed: 2\nslots:\n  enabled: ${train.seed}\n")  # another key's value
    with pytest.raises(ConfigError, match=r"slots.enabled=\$\{train.seed\} reads 2 from the interpolation"):
        load_config(path)
    path.write_text("train:\n  compile: ${oc.env:MEMLAYERS_TEST_COMPILE}\n")
    assert load_config(path, ["train.compile=true"]).train.compile is True  # the override replaces it


@pytest.mark.parametrize("key", ["train.run_dir", "data.cache_dir"])
def test_a_run_saved_with_an_empty_path_before_it_was_refused_still_exports(key, tmp_path):
    """A run started before a01ec3f with train.run_dir= or data.cache_dir= (the directory it started in)
    saved "" in its config.yaml; re-validated for export and --resume, that config was refused."""
    from pathlib import Path

    from pretrain.config import config_yaml
    from pretrain.export.source import load_run_config

    cfg = load_config("configs/tiny.yaml")
    section, name = key.split(".")
    setattr(getattr(cfg, section), name, "")  # as the older code saved it
    saved = tmp_path / "config.yaml"
    saved.write_text(config_yaml(cfg))
    loaded = load_run_config(saved)
    assert Path(getattr(getattr(loaded, section), name)) == Path("")  # the same directory it trained in
    assert loaded.model == cfg.model
