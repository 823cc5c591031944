"""README.md and every docs/*.md against the code, each read from its text (tests/readme_names.py), never
from a list of what it says: every command they show exists (console scripts in pyproject's [project.scripts], tools/*.py,
`python -m` modules, make targets); every option shown with a command is in that command's parser
(its entry module's `build_parser()`, built without running the tool), with one of its choices where
it has some; every --option named anywhere is one of this project's commands' or of another program
the documents show; every dotted config key is in the schema (pretrain/config/schema.py), with an
allowed choice where it sets a Literal; every default they give is the code's; every
repository path, test name, Python name, "`name` in `file`" and project `Class.attribute` it names
is there; every relative link leads to a file (and heading) that is there, and the README links every
docs/*.md. A renamed option, key, file or function fails here, naming the file and line, until the
documents follow. The floors (`> 40 commands`, ...) count over all the files together.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import re
import typing
from functools import cache

import tomllib

from pretrain.config.schema import RunConfig
from tests.readme_names import (
    PACKAGES,
    REPO,
    Command,
    Document,
    commands,
    documents,
    option_names,
    readme,
    split_fences,
)

TEXT = readme()
DOCUMENTS = documents()
SPANS = [span for document in DOCUMENTS for span in document.spans]
COMMANDS = [command for document in DOCUMENTS for command in commands(document)]
SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]

# Options of other programs the documents show beside ours (only these may name an option no parser here has).
OTHER_PROGRAMS_OPTIONS = {
    "torchrun": {"--nproc-per-node", "--nnodes", "--node-rank", "--master-addr", "--master-port"},
    "sbatch / srun / squeue": {
        "--array",
        "--signal",
        "--requeue",
        "--open-mode",
        "--gpus-per-task",
        "--gpu-bind",
        "--kill-on-bad-exit",
        "--me",
    },
    "lm_eval": {"--model", "--model_args", "--tasks", "--include_path", "--batch_size", "--device"},
    "pip": {"--no-deps", "--target"},
    "pytest": {"--durations"},
    "ruff format": {"--check"},
    "huggingface-cli download": {"--local-dir"},
    "tensorboard": {"--logdir"},
}
CONFIG_SECTIONS = tuple(field.name for field in dataclasses.fields(RunConfig))
FILE_SUFFIXES = {"py", "safetensors", "png", "json", "jsonl", "yaml", "md", "txt", "pt", "model", "lock", "sh", "gz"}


def test_the_first_screen_opens_with_the_two_commands():
    assert TEXT.startswith("# memlayers\n\n```bash\nmake demo\nmake test\n```\n")
    fenced = [f"README.md:{lines[0][0]}" for _, lines in DOCUMENTS[0].blocks if lines]
    assert len(fenced) == 1, f"the README shows the two commands alone; the others belong in docs/*.md: {fenced}"


LINK = re.compile(r"\[[^\]]+\]\(([^)\s]+)\)")


def heading_anchors(text: str) -> set[str]:
    """The anchors GitHub gives a Markdown file's headings: lower case, punctuation dropped, spaces -> '-'."""
    _, prose = split_fences(text, "")
    anchors = set()
    for _, line in prose:
        heading = re.match(r"^#{1,6} (.+)$", line)
        if heading:
            anchors.add(re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-"))
    return anchors


def test_every_relative_link_leads_to_a_file_and_heading_that_are_there():
    """`[Faults](faults.md#resuming)`, `[docs/slurm.md](docs/slurm.md)`: the file, relative to the document
    that links it, and the heading its #anchor names."""
    broken = []
    for document in DOCUMENTS:
        for number, line in document.prose:
            for target in LINK.findall(line):
                if re.match(r"^[a-z]+:", target):  # https:, mailto:
                    continue
                path, _, anchor = target.partition("#")
                file = (REPO / document.path).parent / path if path else REPO / document.path
                if not file.exists():
                    broken.append(f"{document.path}:{number}: {target} (no {path})")
                elif (
                    anchor and file.suffix == ".md" and anchor not in heading_anchors(file.read_text(encoding="utf-8"))
                ):
                    broken.append(
                        f"{document.path}:{number}: {target} (no heading #{anchor} in {path or document.path})"
                    )
    assert not broken, "\n".join(broken)


def test_the_readme_links_every_docs_file():
    linked = {target.partition("#")[0] for _, line in DOCUMENTS[0].prose for target in LINK.findall(line)}
    unlinked = [document.path for document in DOCUMENTS[1:] if document.path not in linked]
    assert len(DOCUMENTS) > 10, "docs/*.md are no longer read"
    assert not unlinked, f"README.md's 'Where to go next' does not link: {', '.join(unlinked)}"


def entry_point(command: Command) -> tuple[str, str] | None:
    """(module, function) that a command runs; None for another program's, or where it is not there
    (test_every_command_shown_exists names it)."""
    if command.kind == "script" and command.name in SCRIPTS:
        module, function = SCRIPTS[command.name].split(":")
        return module.replace("memlayers_tools", "tools", 1), function  # setup.py installs tools/ so
    if command.kind == "file":
        path = command.name if "/" in command.name else f"tools/{command.name}"
        return (path.removesuffix(".py").replace("/", "."), "main") if (REPO / path).is_file() else None
    if command.kind == "module" and command.name.split(".")[0] in PACKAGES:
        return (command.name, "main") if importlib.util.find_spec(command.name) else None
    return None


def test_every_console_script_named_is_installed():
    named = {}
    for document in DOCUMENTS:
        for number, line in document.numbered_lines():
            for name in re.findall(r"(?<![\w/-])memlayers-[a-z][a-z-]*[a-z]", line):
                named.setdefault(name, f"{document.path}:{number}")
    assert named, "the documents name no console script: the pattern no longer reads it"
    unknown = [f"{where}: {name}" for name, where in named.items() if name not in SCRIPTS]
    assert not unknown, "not in pyproject's [project.scripts]:\n" + "\n".join(unknown)
    for name in named:
        module, function = entry_point(Command("script", name, None))
        assert callable(getattr(importlib.import_module(module), function, None)), f"{name} = {SCRIPTS[name]}"


def test_every_command_shown_exists():
    targets = re.findall(r"^([a-z][a-z-]*):", (REPO / "Makefile").read_text(), re.MULTILINE)
    missing = []
    for command in COMMANDS:
        if command.kind == "file":
            path = command.name if "/" in command.name else f"tools/{command.name}"
            if not (REPO / path).is_file():
                missing.append(f"{command.where}: no {path}")
        elif command.kind == "module" and command.name.split(".")[0] in PACKAGES:
            path = REPO / command.name.replace(".", "/")
            if not (path.with_suffix(".py").is_file() or (path / "__main__.py").is_file()):
                missing.append(f"{command.where}: no module {command.name}")
        elif command.kind == "make" and command.name not in targets:
            missing.append(f"{command.where}: no make target {command.name}")
    assert not missing, "\n".join(missing)


@cache
def parser_actions(module: str) -> dict[str, argparse.Action]:
    """Option string -> action of a command's parser: its entry module's build_parser(), not run."""
    build = getattr(importlib.import_module(module), "build_parser", None)
    assert build is not None, f"{module} has no build_parser(): add one returning its argparse parser"
    return dict(build()._option_string_actions)


def parser_options(module: str) -> set[str]:
    return set(parser_actions(module))


def test_every_option_shown_is_the_commands():
    shown = [c for c in COMMANDS if c.options and entry_point(c)]
    assert len(shown) > 40, "the documents' commands are no longer read"
    unknown = []
    for command in shown:
        options = sorted(set(command.options) - parser_options(entry_point(command)[0]))
        if options:
            unknown.append(f"{command.where}: {command.name} has no {', '.join(options)}")
    assert not unknown, "\n".join(unknown)


def test_every_option_value_shown_is_a_choice_it_takes():
    """`--method sparse`, `--dtype bf16`, `--part licenses`: an option with choices is shown with one."""
    wrong = []
    for command in [c for c in COMMANDS if c.values and entry_point(c)]:
        actions = parser_actions(entry_point(command)[0])
        for option, value in command.values.items():
            choices = getattr(actions.get(option), "choices", None)
            if choices and not re.search(r"[A-Z<.]{2,}|<", value) and value not in map(str, choices):
                wrong.append(f"{command.where}: {option} {value} (choices: {', '.join(map(str, choices))})")
    assert not wrong, "\n".join(wrong)


def command_modules() -> list[str]:
    """The entry modules of every console script and every tools/*.py."""
    modules = {entry_point(Command("script", name, None))[0] for name in SCRIPTS}
    modules |= {f"tools.{path.stem}" for path in (REPO / "tools").glob("*.py") if "def main" in path.read_text()}
    return sorted(modules)


def test_every_option_named_anywhere_is_some_commands():
    """Options named in prose (`--signal-seconds`, "`--workdir`") belong to no command the test can see:
    each must be an option of one of this project's commands, or of another program the documents show."""
    ours = set().union(*(parser_options(module) for module in command_modules()))
    others = set().union(*OTHER_PROGRAMS_OPTIONS.values())
    unknown = {}
    for document in DOCUMENTS:
        for number, line in document.numbered_lines():
            for match in re.finditer(r"(?<![\w-])--(\[no-\])?[a-z][a-z0-9_-]*", line):
                for option in option_names(match.group(0)):
                    if option not in ours and option not in others:
                        unknown.setdefault(option, f"{document.path}:{number}")
    assert unknown == {}, "options no command has:\n" + "\n".join(f"{w}: {o}" for o, w in unknown.items())


def config_keys() -> list[tuple[str, str, str | None]]:
    """("file:line", dotted key, the value it is set to or None) for every config key the documents
    name, in prose, overrides and shell blocks; `memory.x` is `model.memory.x`. File names
    (`model.safetensors`, `slots.png`) and Python calls are not keys. Python blocks are left out."""
    pattern = re.compile(
        rf"(?<![\w./$-])((?:{'|'.join(CONFIG_SECTIONS)}|memory)(?:\.[a-z_][a-z0-9_]*)+)(\(|=[^\s,;`\"')]*)?"
    )
    keys = []
    for document in DOCUMENTS:
        python_lines = {number for language, lines in document.blocks if language == "python" for number, _ in lines}
        for number, line in document.numbered_lines():
            if number in python_lines:
                continue
            for match in pattern.finditer(line):
                key, after = match.group(1), match.group(2) or ""
                if after == "(" or key.rsplit(".", 1)[1] in FILE_SUFFIXES:
                    continue
                if key.startswith("memory."):
                    key = "model." + key
                keys.append((f"{document.path}:{number}", key, after[1:] if after.startswith("=") else None))
        keys.extend(abbreviated_keys(document))
    return keys


def abbreviated_keys(document: Document) -> list[tuple[str, str, None]]:
    """Keys of a list that names the section once: (`train.log_every`, `eval_every`, `checkpoint_every`)."""
    keys = []
    lead = rf"`((?:{'|'.join(CONFIG_SECTIONS)})(?:\.\w+)*)\.\w+`((?:,\s*(?:and\s+)?`[a-z_]+`)+)"
    for match in re.finditer(lead, document.text):
        where = f"{document.path}:{document.line_of(match.start())}"
        keys.extend((where, f"{match.group(1)}.{bare}", None) for bare in re.findall(r"`([a-z_]+)`", match.group(2)))
    return keys


def schema_type(key: str):
    """The annotated type of a dotted key of RunConfig; KeyError naming the first part that is not there."""
    node: typing.Any = RunConfig
    for i, part in enumerate(key.split(".")):
        if not (isinstance(node, type) and dataclasses.is_dataclass(node)):
            raise KeyError(f"{'.'.join(key.split('.')[:i])} has no fields")
        hints = typing.get_type_hints(node)
        if part not in hints:
            raise KeyError(f"{node.__name__} has no field {part!r}")
        node = hints[part]
    return node


def test_every_config_key_named_is_in_the_schema():
    keys = config_keys()
    assert len({key for _, key, _ in keys}) > 40, "the documents' config keys are no longer read"
    missing = []
    for where, key, _ in keys:
        try:
            schema_type(key)
        except KeyError as err:
            missing.append(f"{where}: {key} ({err})")
    assert not missing, "\n".join(missing)


def test_every_choice_set_is_one_the_key_allows():
    """`optim.value_optimizer=sparse_adamw`, `train.activation_checkpointing=full`: a string choice
    given a value must be one of its Literal's."""
    wrong = []
    for where, key, value in config_keys():
        if value is None or not re.fullmatch(r"[\w.-]+", value):
            continue
        try:
            kind = schema_type(key)
        except KeyError:  # test_every_config_key_named_is_in_the_schema names it
            continue
        if typing.get_origin(kind) is typing.Literal and value not in typing.get_args(kind):
            wrong.append(f"{where}: {key}={value} (choices {typing.get_args(kind)})")
    assert not wrong, "\n".join(wrong)


REPO_PATH = re.compile(
    r"(?<![\w./-])((?:\.ci|tools|pretrain|slurm|configs|benchmarks|kernels|tests|requirements)/[\w./*<>{}:-]*)"
)


def test_every_repository_path_named_exists():
    """tools/..., configs/*.yaml, benchmarks/..., tests/x.py::test_name (the test defined there),
    pretrain/model/lookups.LookupRecorder (the name defined in that module); a path is checked up to
    its first placeholder (`benchmarks/<device>/...`), a glob must match something."""
    missing = []
    for document, number, line in [(d, n, text) for d in DOCUMENTS for n, text in d.numbered_lines()]:
        for match in REPO_PATH.finditer(line):
            named = match.group(1).rstrip(".,:")
            path, _, test = named.partition("::")
            path = re.split(r"[<{]", path)[0].rstrip(":")
            path = re.sub(r":\d+$", "", path)  # file:line of a stack in an output block
            if "*" in path:
                found = bool(list(REPO.glob(path)))
            elif (REPO / path).exists():
                found = not test or re.search(rf"^\s*def {re.escape(test)}\(", (REPO / path).read_text(), re.MULTILINE)
            else:  # module.Name
                module, _, name = path.rpartition(".")
                source = REPO / f"{module}.py"
                found = (
                    bool(name)
                    and source.is_file()
                    and re.search(
                        rf"^(class|def) {re.escape(name)}\b|^{re.escape(name)} *[:=]", source.read_text(), re.MULTILINE
                    )
                )
            if not found:
                missing.append(f"{document.path}:{number}: {named}")
    assert not missing, "\n".join(missing)


def test_every_python_name_named_exists():
    """`pretrain.export.load`, `kernels.pkm_topk`, `pretrain.model.kv_cache.KVCache`: importable, then
    each attribute after the module there."""
    names = {}
    for span in SPANS:
        for name in re.findall(r"(?<![\w./-])(?:pretrain|kernels)(?:\.[A-Za-z_]\w*)+", span.text):
            names.setdefault(name, f"{span.path}:{span.line}")
    assert names, "the documents' Python names are no longer read"
    missing = []
    for name, where in names.items():
        parts = name.split(".")
        for split in range(len(parts), 0, -1):
            try:
                target = importlib.import_module(".".join(parts[:split]))
                break
            except ModuleNotFoundError:
                continue
        for attribute in parts[split:]:
            target = getattr(target, attribute, None)
        if target is None:
            missing.append(f"{where}: {name}")
    assert not missing, "\n".join(missing)


def defines(source: str, name: str) -> bool:
    """Whether Python source defines `name`: a def or class, a module constant, a field or attribute."""
    name = re.escape(name)
    return bool(re.search(rf"^\s*(async\s+)?(def|class) {name}\b|^\s*{name}\s*(:[^=\n]*)?=|^\s+{name}\s*:|self\.{name}\s*=",
                          source, re.MULTILINE))  # fmt: skip


def project_sources() -> dict[str, str]:
    return {
        str(path.relative_to(REPO)): path.read_text(encoding="utf-8")
        for package in PACKAGES
        for path in sorted((REPO / package).rglob("*.py"))
    }


def test_every_name_placed_in_a_file_is_defined_there():
    """ "`TABLE_FILENAME` in `pretrain/slots/table.py`", "`barrier` in `pretrain/distributed.py`"."""
    placed = [
        (document.path, name, path)
        for document in DOCUMENTS
        for name, path in re.findall(
            r"`([A-Za-z_][\w.]*)`(?: \([^)]*\))? in `((?:pretrain|kernels|tools)/[\w/]+\.py)`", document.paragraphs()
        )
    ]
    assert placed, "the documents' `name` in `file` no longer read"
    missing = [f"{document}: {name} in {path}" for document, name, path in placed
               if not defines((REPO / path).read_text(encoding="utf-8"), name.split(".")[-1])]  # fmt: skip
    assert not missing, "\n".join(missing)


def test_every_attribute_of_a_project_class_named_exists():
    """`Trainer.train_step`, `Optimizers.step(lr_multiplier, skip)`, `TrainResult.peak_memory_bytes`:
    where the class is this project's, the attribute is defined in its file."""
    sources = project_sources()
    missing = []
    for span in SPANS:
        match = re.fullmatch(r"([A-Z]\w*[a-z]\w*)((?:\.\w+)+)(\(.*\))?", span.text)
        if not match:
            continue
        holders = [source for source in sources.values() if re.search(rf"^class {match.group(1)}\b", source, re.M)]
        for attribute in match.group(2).split(".")[1:]:
            if holders and not any(defines(source, attribute) for source in holders):
                missing.append(str(span))
    assert not missing, "\n".join(missing)


def schema_default(key: str):
    node, value = RunConfig, None
    for part in key.split("."):
        field = {f.name: f for f in dataclasses.fields(node)}[part]
        value = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        node = typing.get_type_hints(node)[part]
    return value


def test_every_default_named_is_the_default():
    """ "`--max-sentences` lines (default 200,000", "`train.hang_timeout_s` (default 600 s": the
    option's (in some command that has it) or the config key's default."""
    named = [
        (document.path, *found)
        for document in DOCUMENTS
        for found in re.findall(
            r"`((?:--|[a-z]+\.)[\w.-]+)`(?: [a-z]+)? ?[(,] ?(?:[^()`;]*; )?(?:[a-z]+, )?default:? (?:`([^`]+)`|(\d[\d,.]*\d|\d))",
            document.paragraphs(),
        )
    ]
    assert len(named) >= 8, "the documents' defaults are no longer read"
    wrong = []
    for document, name, text, number in named:
        if name.startswith("--"):
            defaults = [parser_actions(m)[name].default for m in command_modules() if name in parser_actions(m)]
        else:
            defaults = [schema_default(name)] if name.split(".")[0] in CONFIG_SECTIONS else []
        said = text or number.replace(",", "")
        if not any(str(d) == said or (number and isinstance(d, (int, float)) and d == float(said)) for d in defaults):
            wrong.append(f"{document}: {name}: the documents say default {said}, the code has {defaults}")
    assert not wrong, "\n".join(wrong)
