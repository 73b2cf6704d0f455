"""What the documents users read show, taken apart for the tests that hold it to the code (test_docs.py,
test_readme_examples.py): code blocks, inline code, ``KEYBROKER_*=`` assignments and ``keybroker`` command lines.

A block may be marked on the line before it with ``<!-- toml: fragment -->``: not a whole configuration, so it is
not loaded, but its keys are still checked against the settings."""

from __future__ import annotations

import enum
import itertools
import re
import shlex
import types
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Union, get_args, get_origin

import typer

from keybroker.cli.main import app

REPO = Path(__file__).resolve().parents[2]
FRAGMENT = "<!-- toml: fragment -->"


def documents() -> list[Path]:
    """Every Markdown page of the project's documentation (pages other helpers add to docs/ included)."""
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "deploy" / "README.md"]


def where(path: Path, line: int) -> str:
    shown = path.relative_to(REPO) if path.is_relative_to(REPO) else path.name
    return f"{shown}:{line}"


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the opening fence
    language: str
    text: str
    section: str  # the heading it is under
    marker: str  # the HTML comment on the line before the fence, if any

    @property
    def where(self) -> str:
        return where(self.path, self.line)


def blocks(path: Path) -> list[Block]:
    found: list[Block] = []
    lines = path.read_text().splitlines()
    section, previous = "", ""
    index = 0
    while index < len(lines):
        line = lines[index]
        fence = re.match(r"^(\s*)```(\S*)\s*$", line)
        if fence:
            end = index + 1
            while end < len(lines) and lines[end].strip() != "```":
                end += 1
            indent = len(fence.group(1))
            text = "\n".join(body[indent:] for body in lines[index + 1 : end]) + "\n"
            marker = previous if previous.startswith("<!--") else ""
            found.append(Block(path, index + 1, fence.group(2), text, section, marker))
            index = end + 1
            continue
        if line.startswith("#"):
            section = line.lstrip("#").strip()
        if line.strip():
            previous = line.strip()
        index += 1
    return found


def prose(path: Path) -> Iterator[tuple[int, str, str]]:
    """(line, section, paragraph) for the text outside code blocks, paragraph by paragraph (inline code may span a
    line break)."""
    fenced = False
    section, start = "", 0
    paragraph: list[str] = []
    for number, raw in enumerate([*path.read_text().splitlines(), ""], start=1):
        line = raw
        if line.lstrip().startswith("```"):
            fenced = not fenced
            line = ""
        if fenced or not line.strip():
            if paragraph:
                yield start, section, " ".join(paragraph)
            paragraph = []
            continue
        if line.startswith("#"):
            section = line.lstrip("#").strip()
        if not paragraph:
            start = number
        paragraph.append(line.strip())


def inline_code(path: Path) -> Iterator[tuple[int, str, str]]:
    """(line, section, code) for every inline code span of the prose."""
    for line, section, paragraph in prose(path):
        for span in re.findall(r"(?<!`)`([^`]+)`(?!`)", paragraph):
            yield line, section, span.strip()


ASSIGNMENT = re.compile(
    r"(?<![\w$])(KEYBROKER_[A-Z0-9_]+)=(\"(?:[^\"\\]|\\.)*\"|'[^']*'|\$\((?:[^()]|\([^()]*\))*\)|[^\s'\"`;]+)"
)


def assignments(text: str) -> dict[str, str]:
    """``KEYBROKER_X=value`` shown in ``text`` (exports, prefixes, systemd Environment=, comments), quotes removed and
    a ``, ...`` in a JSON list (\"and so on\") dropped."""
    found = {}
    for name, raw in ASSIGNMENT.findall(text):
        value = raw[1:-1] if raw[:1] in {"'", '"'} else raw
        found[name] = re.sub(r",\s*(\.\.\.|…)\s*]", "]", value)
    return found


# -- command lines ----------------------------------------------------------------------------------------------------

COMMAND = re.compile(r"(?<![^\s;&|(])(?:[\w.~/-]*bin/)?keybroker(?=[ \t]|$)", re.M)
SHELL_LANGUAGES = {"bash", "sh", "shell", "console", "zsh"}
PLACEHOLDER = re.compile(r"^([A-Z][A-Z0-9_:]*|.*(\.\.\.|…).*|<[^<>]+>|\$.*|.*\$SUBST.*)$")


def _balanced_end(text: str, start: int) -> int:
    """The index after the ``)`` closing the ``$(`` at ``start``."""
    depth, index = 0, start
    while index < len(text):
        if text[index] == "(":
            depth += 1
        elif text[index] == ")":
            depth -= 1
            if depth == 0:
                return index + 1
        index += 1
    return len(text)


def _command_text(text: str, start: int, pipes: bool) -> str:
    """The shell words of the command starting at ``start``: up to the end of the line (continuations joined), a
    comment, ``;``, ``&&``, a closing ``)`` or (``pipes``) a ``|``; ``$(...)`` inside it becomes ``$SUBST``."""
    out: list[str] = []
    quote = ""
    index = start
    while index < len(text):
        char = text[index]
        if quote:
            out.append(char)
            if char == quote:
                quote = ""
        elif char in "'\"":
            quote = char
            out.append(char)
        elif text.startswith("\\\n", index):
            index += 1
        elif text.startswith("$(", index):
            out.append("$SUBST")
            index = _balanced_end(text, index + 1)
            continue
        elif char in "\n;&)" or (pipes and char == "|") or (char == "#" and (not out or out[-1] in " \t")):
            break
        else:
            out.append(char)
        index += 1
    return "".join(out)


def _words(command: str) -> list[str]:
    """Shell words without redirections, synopsis brackets (``[--days N]``) and ``...`` ("more options")."""
    words: list[str] = []
    skip_next = False
    for shown in shlex.split(command):
        if skip_next:
            skip_next = False
            continue
        redirection = re.match(r"^\d*(>>?|<)(&\d)?(.*)$", shown)
        if redirection and not re.match(r"^<[^<>]+>$", shown):
            skip_next = not redirection.group(3) and not redirection.group(2)
            continue
        word = shown[1:] if re.match(r"^\[[-A-Za-z<]", shown) else shown
        if word.endswith("]") and "[" not in word:
            word = word[:-1]
        if word and word not in {"...", "…"}:
            words.append(word)
    return words


def _alternatives(words: list[str]) -> list[list[str]]:
    """``create|import|list`` as three command lines (an option value ``table|json|id`` as three too)."""
    choices = [word.split("|") if "|" in word and not word.startswith(("'", '"')) else [word] for word in words]
    return [list(line) for line in itertools.islice(itertools.product(*choices), 64)]


@dataclass(frozen=True)
class CommandLine:
    where: str
    text: str  # as shown
    argv: list[str]  # after "keybroker"
    complete: bool = False  # a command to run (shell block), not a mention that may leave out required parameters


def _synopsis(where_: str, line: str, start: int) -> list[CommandLine]:
    """A synopsis line (``keybroker audit list [--since T] | verify``, the command's words from ``start``): `` | ``
    separates alternatives of the last command word before them."""
    words = _words(_command_text(line, start, pipes=False))
    parts = [part.split() for part in " ".join(words).split(" | ")]
    prefix = _group_prefix(parts[0])
    found = [CommandLine(where_, line.strip(), parts[0])]
    found += [CommandLine(where_, line.strip(), [*prefix, *part]) for part in parts[1:]]
    return [CommandLine(c.where, c.text, argv) for c in found for argv in _alternatives(c.argv)]


def _group_prefix(argv: list[str]) -> list[str]:
    """The leading words of ``argv`` that name command groups (``db`` of ``db status``)."""
    command: Any = typer.main.get_command(app)
    prefix: list[str] = []
    for word in argv:
        if not isinstance(command, typer.core.TyperGroup):
            break
        sub = command.get_command(typer.Context(command), word.split("|")[0])
        if sub is None or not isinstance(sub, typer.core.TyperGroup):
            break
        prefix.append(word)
        command = sub
    return prefix


def _at_command_position(text: str, start: int) -> bool:
    """Whether a shell command starts at ``start``: at the start of a line (not a continued one) or after ``;``,
    ``|``, ``&``, ``(`` or ``$(``, with only ``VAR=value`` assignments before it (not ``--label keybroker``, not a
    comment)."""
    line_start = text.rfind("\n", 0, start) + 1
    before = text[line_start:start]
    pieces = re.split(r"[;|&(]", before)
    continued = text[:line_start].rstrip("\n").endswith("\\")
    if continued and len(pieces) == 1:
        return False
    return re.fullmatch(r"\s*(?:\w+=(?:\"[^\"]*\"|'[^']*'|\S*)\s+)*", pieces[-1]) is not None


def command_lines(path: Path) -> list[CommandLine]:
    """Every ``keybroker ...`` command a document shows: in shell blocks wherever a command may start (and
    ``.../bin/keybroker`` anywhere, as given to systemd-run or sudo), in text blocks on lines that begin with one
    (synopses), and in inline code that begins with one."""
    found: list[CommandLine] = []
    for block in blocks(path):
        if block.language in SHELL_LANGUAGES:
            for match in COMMAND.finditer(block.text):
                if "/" not in match.group() and not _at_command_position(block.text, match.start()):
                    continue
                line = block.line + block.text.count("\n", 0, match.start()) + 1
                text = _command_text(block.text, match.end(), pipes=True)
                for argv in _alternatives(_words(text)):
                    found.append(CommandLine(where(path, line), f"keybroker{text}", argv, complete=True))
        elif block.language in {"", "text"}:
            for offset, raw in enumerate(block.text.splitlines(), start=1):
                text = re.sub(r"^\$ ", "", raw.strip())
                if starts := COMMAND.match(text):
                    found += _synopsis(where(path, block.line + offset), text, starts.end())
    for line, _, code in inline_code(path):
        if starts := COMMAND.match(code):
            found += _synopsis(where(path, line), code, starts.end())
    return found


def _sample(annotation: Any) -> str | None:
    """A valid value for an option of this type, standing in for a placeholder (``--days N``)."""
    if get_origin(annotation) in {Union, types.UnionType}:
        annotation = next(arg for arg in get_args(annotation) if arg is not type(None))
    if get_origin(annotation) is list:
        annotation = get_args(annotation)[0]
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return str(next(iter(annotation)).value)
    samples: dict[Any, str] = {int: "1", float: "1.0", datetime: "2026-01-01T00:00:00+00:00"}
    return samples.get(annotation)


def _option_values(param: Any, args: list[str]) -> list[int]:
    """Where in ``args`` the values of the option ``param`` are."""
    names = [*param.opts, *param.secondary_opts]
    return [index + 1 for index, word in enumerate(args[:-1]) if word in names]


def check_command(argv: list[str], complete: bool = True) -> str | None:
    """None if ``keybroker ARGV`` parses against the real CLI, else why not. Placeholders (``KEY_ID``, ``N``,
    ``...``, ``$VAR``, ``<id>``) stand for values; where an option needs a number, date or choice, a valid one is
    put in their place. Unless ``complete``, required parameters left out are filled in (a synopsis or a mention
    in prose names the command, not all of it); unknown commands and options, extra arguments and wrong values
    still fail. Nothing runs."""
    command: Any = typer.main.get_command(app)
    args = list(argv)
    name = "keybroker"
    # Completion options act while parsing (--install-completion writes ~/.bashrc): only check they exist.
    eager = {"--install-completion", "--show-completion"}
    if args and args[0] in eager:
        known = {opt for param in command.params for opt in param.opts}
        return None if args[0] in known else f"no such option: {args[0]}"
    while isinstance(command, typer.core.TyperGroup):
        if not args:
            return None  # a group named alone (``keybroker sim``)
        try:
            context = command.make_context(name, list(args))
        except typer.Exit:
            return None  # --version, --help
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        rest = [*context._protected_args, *context.args]
        if not rest:
            return None
        name = rest[0]
        sub = command.get_command(typer.Context(command), name)
        if sub is None:
            return f"{name!r} is not a command of {command.name or 'keybroker'}"
        command, args = sub, rest[1:]
    for _ in range(len(args) + len(command.params) + 1):
        try:
            command.make_context(name, list(args))
            return None
        except typer.Exit:
            return None
        except Exception as exc:
            param = getattr(exc, "param", None)
            if type(exc).__name__ == "MissingParameter" and not complete and param is not None:
                stand_in = _sample(param.type_descriptor.annotation) or "VALUE"
                args += [param.opts[0], stand_in] if param.param_type_name == "option" else [stand_in]
                continue
            spots = _option_values(param, args) if param is not None and getattr(param, "opts", None) else []
            sample = _sample(param.type_descriptor.annotation) if spots and param is not None else None
            if not spots or sample is None or not all(PLACEHOLDER.match(args[spot]) for spot in spots):
                return f"{type(exc).__name__}: {exc}"
            for spot in spots:
                args[spot] = sample
    return "too many placeholders"
