"""What the documentation (README.md and every docs/*.md) names, read from its text: fenced blocks,
inline code spans, the commands they show (console scripts, tools, modules, make targets) with the
options given to each, dotted config keys, repository paths and the links between the files.
tests/test_readme.py checks each against the code."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

FENCE = re.compile(r"^```(\w*)\s*$")
SPAN = re.compile(r"`([^`]+)`")
ENV_ASSIGNMENT = re.compile(r"^[A-Z_][A-Z0-9_]*=\S*$")
OPTION = re.compile(r"^--(\[no-\])?[a-z][a-z0-9_-]*")
PYTHON = re.compile(r"^(\S*/)?python3?$")
SCRIPT = re.compile(r"^(?:\./)?((?:tools/)?[a-z_0-9]+\.py)$")
CONSOLE_SCRIPT = re.compile(r"^memlayers-[a-z-]+$")
PACKAGES = ("pretrain", "kernels", "tools")


@dataclass
class Where:
    path: str  # the document, relative to the repository root: README.md, docs/slurm.md
    line: int  # 1-based line in it
    text: str  # the fenced line or the inline span

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.text.strip()[:120]}"


@dataclass
class Document:
    """One documentation file and what it is cut into: fenced blocks, the prose around them, its spans."""

    path: str
    text: str
    blocks: list[tuple[str, list[tuple[int, str]]]]
    prose: list[tuple[int, str]]
    spans: list[Where]

    def numbered_lines(self) -> list[tuple[int, str]]:
        return list(enumerate(self.text.splitlines(), 1))

    def paragraphs(self) -> str:
        """The text with the line breaks inside each paragraph made spaces (a phrase may run over one)."""
        return re.sub(r"(?<!\n)\n(?!\n)", " ", self.text)

    def line_of(self, offset: int) -> int:
        return self.text.count("\n", 0, offset) + 1


@dataclass
class Command:
    """One invocation a document shows: `kind` is "script" (memlayers-*), "file" (python tools/X.py,
    or tools/X.py named with options), "module" (python -m M, torchrun -m M) or "make"."""

    kind: str
    name: str
    where: Where
    options: list[str] = field(default_factory=list)
    values: dict[str, str] = field(default_factory=dict)  # option -> the word after it (or after its =)

    def add_option(self, token: str, following: str | None) -> None:
        names = option_names(token)
        self.options.extend(names)
        value = token.split("=", 1)[1] if "=" in token else following
        if len(names) == 1 and value is not None and not value.lstrip("[(").startswith("-"):
            self.values[names[0]] = value.strip("[]()\"',")


def split_fences(text: str, path: str) -> tuple[list[tuple[str, list[tuple[int, str]]]], list[tuple[int, str]]]:
    """(fenced blocks as (language, [(line number, line)]), the lines outside them)."""
    blocks, prose, current = [], [], None
    for number, line in enumerate(text.splitlines(), 1):
        match = FENCE.match(line)
        if match and current is None:
            current = (match.group(1), [])
        elif line.startswith("```") and current is not None:
            blocks.append(current)
            current = None
        elif current is not None:
            current[1].append((number, line))
        else:
            prose.append((number, line))
    assert current is None, f"{path} ends inside a fenced block"
    return blocks, prose


def inline_spans(prose: list[tuple[int, str]], path: str) -> list[Where]:
    """Code spans of the text outside fences; a span may run over a line break (within a paragraph)."""
    spans = []
    paragraph: list[tuple[int, str]] = []
    for number, line in [*prose, (0, "")]:
        if line.strip():
            paragraph.append((number, line))
            continue
        if paragraph:
            joined = "\n".join(text for _, text in paragraph)
            for match in SPAN.finditer(joined):
                first = paragraph[0][0] + joined.count("\n", 0, match.start())
                spans.append(Where(path, first, match.group(1).replace("\n", " ")))
        paragraph = []
    return spans


def split_comment(line: str) -> tuple[str, str]:
    """A shell line's command and its `# comment` (a # that starts a word, outside quotes)."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i], line[i + 1 :]
    return line, ""


def option_names(token: str) -> list[str]:
    """`--x`, `[--x`, `--x=1`, `--x,` -> ["--x"]; `--[no-]x` -> ["--x", "--no-x"]."""
    match = OPTION.match(token.lstrip("[("))
    if not match:
        return []
    name = match.group(0)
    if match.group(1):
        bare = "--" + name[len("--[no-]") :]
        return [bare, "--no-" + bare[2:]]
    return [name]


def command_at(tokens: list[str], i: int, where: Where, named_with_options_only: bool) -> tuple[Command, int] | None:
    """The command that starts at tokens[i], and the index after its name; None if none starts there."""
    token = tokens[i]
    rest = tokens[i + 1 :]
    if CONSOLE_SCRIPT.match(token):
        return Command("script", token, where), i + 1
    if PYTHON.match(token) and rest:
        if rest[0] == "-m" and len(rest) > 1:
            return Command("module", rest[1], where), i + 3
        if SCRIPT.match(rest[0]):
            return Command("file", SCRIPT.match(rest[0]).group(1), where), i + 2
    if token == "torchrun":
        for j in range(i + 1, len(tokens) - 1):
            if tokens[j] == "-m":
                return Command("module", tokens[j + 1], where), j + 2
    if token == "make" and rest and re.fullmatch(r"[a-z][a-z-]*", rest[0]):
        return Command("make", rest[0], where), i + 2
    if SCRIPT.match(token) and (not named_with_options_only or any(t.startswith("--") for t in rest)):
        return Command("file", SCRIPT.match(token).group(1), where), i + 1
    return None


def commands_in(
    text: str, where: Where, last: Command | None, named_with_options_only: bool, prose: bool = False
) -> list[Command]:
    """The commands a piece of shell text starts; options before the first belong to `last` (in `prose`,
    a comment, without the word after each: `--top-p and --seed are refused`)."""
    tokens = text.split()
    found: list[Command] = []
    current = last
    i = 0
    while i < len(tokens):
        started = command_at(tokens, i, where, named_with_options_only)
        if started:
            current, i = started
            found.append(current)
            continue
        if current is not None:
            following = tokens[i + 1] if i + 1 < len(tokens) and not (prose and current is last) else None
            current.add_option(tokens[i], following)
        i += 1
    return found


def fenced_commands(blocks, path: str) -> list[Command]:
    """Every command of the shell blocks, with its options: a line's `\\`-continuations join it, and the
    options in a comment belong to the command it names (`# or: python tools/export.py ... --force`), or
    else to the block's last command (`#   (--temperature 0 ... --top-p and --seed are refused ...)`)."""
    commands = []
    for language, lines in blocks:
        if language not in ("bash", "sh"):
            continue
        last = None
        joined: list[tuple[int, str]] = []
        for number, line in lines:
            if joined and joined[-1][1].rstrip().endswith("\\"):
                joined[-1] = (joined[-1][0], joined[-1][1].rstrip()[:-1] + " " + line)
            else:
                joined.append((number, line))
        for number, line in joined:
            where = Where(path, number, line)
            code, comment = split_comment(line)
            code_tokens = code.split()
            while code_tokens and ENV_ASSIGNMENT.match(code_tokens[0]):
                code_tokens.pop(0)
            if code_tokens:
                started = command_at(code_tokens, 0, where, named_with_options_only=False)
                last = started[0] if started else Command("external", code_tokens[0], where)
                commands.append(last)
                commands.extend(commands_in(" ".join(code_tokens[started[1] if started else 1 :]), where, last, False))
            for command in commands_in(comment, where, last, named_with_options_only=False, prose=True):
                commands.append(command)
                last = command
    return commands


def span_commands(spans: list[Where]) -> list[Command]:
    """Commands shown in inline spans (`python tools/bench_train.py --ac none,full ...`,
    `memlayers-submit --resume`, `prepare_data.py --vocab-size`), with the options after each."""
    commands = []
    for span in spans:
        commands.extend(commands_in(span.text, span, None, named_with_options_only=True))
    return commands


def readme() -> str:
    return (REPO / "README.md").read_text(encoding="utf-8")


def document_paths() -> list[str]:
    """README.md, then every docs/*.md, relative to the repository root."""
    return ["README.md", *(str(path.relative_to(REPO)) for path in sorted((REPO / "docs").glob("*.md")))]


def read_document(path: str) -> Document:
    text = (REPO / path).read_text(encoding="utf-8")
    blocks, prose = split_fences(text, path)
    return Document(path, text, blocks, prose, inline_spans(prose, path))


def documents() -> list[Document]:
    return [read_document(path) for path in document_paths()]


def commands(document: Document) -> list[Command]:
    """Every command a document shows, fenced or in an inline span, with its options."""
    return fenced_commands(document.blocks, document.path) + span_commands(document.spans)
