"""Every ``vstar ...`` command the READMEs and docs/ show parses against the real CLI.

Users and automated checks copy these lines, so an option that was renamed or
removed, a choice that no longer exists, or a word that is not a number where
the option takes one must fail here rather than in someone's shell. Checked per
command: the subcommand exists, every ``--option`` is one of its options, a
literal value of an option with choices is one of them, and a literal value of
a numeric option reads as that number. Placeholders (``DIR``, ``$D``,
``<run>``, ``...``) pass as values; shell variables that hold options
(``R="--data $D ..."``) are expanded where the README defines them.
"""

from __future__ import annotations

import functools
import re
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer.main

from vstar import app

REPO = Path(__file__).resolve().parents[1]
READMES = (REPO / "README.md", REPO / "docker" / "README.md", *sorted((REPO / "docs").glob("*.md")))
ALT = "\u00a6"  # stands for the escaped `\|` of a Markdown table cell: alternatives such as tiny|small


def lines_of_shell(text: str) -> Iterator[tuple[int, str]]:
    """(line number, logical line) of every fenced bash block: continuations joined, comments dropped."""
    in_block, shell, held, start = False, False, "", 0
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            in_block, shell = not in_block, line[3:].strip() in ("bash", "sh")
            continue
        if not (in_block and shell):
            continue
        code = "" if line.lstrip().startswith("#") else re.sub(r"\s+#\s.*$", "", line)
        start = start if held else number
        held = f"{held} {code.rstrip(chr(92)).strip()}".strip()
        if not code.rstrip().endswith("\\"):
            yield start, held
            held = ""


def inline_commands(text: str) -> Iterator[tuple[int, str]]:
    """(line number, command) of every inline code span that starts with ``vstar ``."""
    for number, line in enumerate(text.splitlines(), 1):
        for span in re.findall(r"`(vstar [^`]*)`", line.replace("\\|", ALT)):
            yield number, span


def simple_commands(line: str) -> list[str]:
    """The simple commands of a shell line (split at ; && || | & and a loop's do/then)."""
    line = re.sub(r"\$\([^)]*\)", "X", line)  # a command substitution is one word
    parts = re.split(r"\s*(?:;|&&|\|\||\||&(?=\s|$))\s*", line)
    return [re.sub(r"^(?:do|then|else)\s+", "", p.strip()) for p in parts if p.strip()]


def vstar_args(words: list[str]) -> list[str] | None:
    """The arguments after ``vstar`` when the command runs it (``vstar``, ``.venv/bin/vstar``, ``-m vstar``
    under torchrun / accelerate, after ``VAR=value`` assignments), else None."""
    for i, word in enumerate(words):
        if word in ("vstar", ".venv/bin/vstar") and (i == 0 or words[i - 1] == "-m" or "=" in words[i - 1]):
            return words[i + 1 :]
        if i == 0 and not re.fullmatch(r"[A-Z_]+=\S*|torchrun|accelerate", word):
            return None
    return None


def choices_of(param: Any) -> tuple[str, ...] | None:
    annotation = param.type_descriptor.annotation
    while typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    return typing.get_args(annotation) if typing.get_origin(annotation) is typing.Literal else None


def number_type(param: Any) -> type | None:
    annotation = param.type_descriptor.annotation
    args = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    return args[0] if args[0] in (int, float) else None


def is_placeholder(value: str) -> bool:
    return bool(re.search(r"[$<>A-Z]|\.\.\.", value))


@functools.cache
def root_command() -> Any:
    return typer.main.get_command(app)


def problems_of(args: list[str]) -> list[str]:
    """What does not parse in ``vstar ARGS``, one sentence each."""
    command: Any = root_command()
    path: list[str] = []
    while hasattr(command, "commands") and args and args[0] in command.commands:
        path.append(args[0])
        command, args = command.commands[args[0]], args[1:]
    name = " ".join(["vstar", *path])
    if hasattr(command, "commands") and args and ALT in args[0]:  # e.g. bench decode|train|serve
        return [p for alt in args[0].split(ALT) for p in problems_of([*path, alt, *args[1:]])]
    if hasattr(command, "commands"):
        word = args[0] if args else ""
        return [] if is_placeholder(word) or not word else [f"{name}: no subcommand {word!r}"]
    params = {opt: p for p in command.params for opt in p.opts + p.secondary_opts}
    found, i = [], 0
    while i < len(args):
        word = args[i].strip("[]")
        i += 1
        if not word.startswith("--"):
            continue
        flag, _, given = word.partition("=")
        param = params.get(flag.split(ALT)[0])
        if param is None:
            found.append(f"{name}: no option {flag}")
            continue
        if param.is_flag:
            continue
        if not given and i < len(args):
            given, i = args[i].strip("[]"), i + 1
        if not given or is_placeholder(given):
            continue
        choices, kind = choices_of(param), number_type(param)
        for value in given.split(ALT):
            if choices is not None and value not in choices:
                found.append(f"{name} {flag}: {value!r} is not one of {', '.join(choices)}")
            elif kind is not None and not re.fullmatch(r"[-+]?[0-9.e+-]+", value):
                found.append(f"{name} {flag}: {value!r} is not a number")
            elif kind is int and not re.fullmatch(r"[-+]?[0-9]+", value):
                found.append(f"{name} {flag}: {value!r} is not an integer")
    return found


def readme_commands(readme: Path) -> Iterator[tuple[int, list[str]]]:
    """(line number, arguments after ``vstar``) of every command the README shows running vstar."""
    text = readme.read_text()
    variables: dict[str, str] = {}
    for number, line in lines_of_shell(text):
        for command in simple_commands(line):
            assignment = re.fullmatch(r'([A-Z]+)="([^"]*)"', command)
            if assignment:
                variables[assignment[1]] = assignment[2]
                continue
            args = vstar_args(command.split())
            if args is not None:
                words = [w for a in args for w in (variables[a[1:]].split() if a[1:] in variables else [a])]
                yield number, words
    for number, span in inline_commands(text):
        for command in simple_commands(span):
            args = vstar_args(command.split())
            if args is not None:
                yield number, args


@pytest.mark.parametrize("readme", READMES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_readme_command_parses(readme: Path) -> None:
    commands = list(readme_commands(readme))
    assert len(commands) >= (100 if readme.name == "README.md" and readme.parent == REPO else 1)
    problems = [f"{readme.name}:{number}: {p}" for number, args in commands for p in problems_of(args)]
    assert not problems, "\n".join(problems)


def test_the_checker_finds_mistakes() -> None:
    """A renamed option, a choice that is gone, a word for a number and an unknown subcommand are caught."""
    assert problems_of("sft --data DIR --out X --presets tiny".split()) == ["vstar sft: no option --presets"]
    assert problems_of("eval --decoder greedy".split()) == ["vstar eval --decoder: 'greedy' is not one of beam, ved"]
    assert problems_of("rl --beta high".split()) == ["vstar rl --beta: 'high' is not a number"]
    assert problems_of("rl --epochs 1.5".split()) == ["vstar rl --epochs: '1.5' is not an integer"]
    assert problems_of("bench decoder --json x".split()) == ["vstar bench: no subcommand 'decoder'"]
    assert problems_of(f"sft --preset tiny{ALT}small --epochs $E [--resume{ALT}--force]".split()) == []
