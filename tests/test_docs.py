"""What README.md and docs/ show is what vqa2 does: every `vqa2` command they give parses with today's options,
and the README's quick start, run as written, prints the scores, levels and answer the README shows."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import click
import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_OPERATORS = {"|", "||", "&&", ";", ">", ">>", "<", "&"}


def code_blocks(text: str) -> list[list[str]]:
    return [block.splitlines() for block in re.findall(r"^```[^\n]*\n(.*?)^```", text, re.S | re.M)]


def documented_commands() -> list[tuple[str, str]]:
    """(where, command line) for every vqa2 command in a code block. In blocks with `$ ` prompts only the
    prompted lines are commands (the rest is output, which may start with "vqa2 score (model)")."""
    found = []
    for document in DOCUMENTS:
        for block in code_blocks(document.read_text()):
            prompted = any(line.startswith("$ ") for line in block)
            for line in block:
                command = line[2:] if prompted and line.startswith("$ ") else None if prompted else line
                if command and command.startswith("vqa2 "):
                    found.append((f"{document.relative_to(ROOT)}: {line.strip()}", command))
    return found


def arguments(command: str) -> list[str]:
    """The command's own arguments: no comment, nothing from the first shell operator or redirection on, and
    no "..." (the documents' "and so on")."""
    words = []
    for word in shlex.split(command, comments=True)[1:]:
        if word in SHELL_OPERATORS or re.match(r"^\d?>", word):
            break
        if word != "...":
            words.append(word)
    return words


COMMANDS = documented_commands()


def test_the_documents_give_commands_of_every_kind():
    from vqa2cli.cli import cli

    shown = {arguments(command)[0] for _, command in COMMANDS}
    assert set(cli.commands) <= shown, set(cli.commands) - shown


@pytest.mark.parametrize("where,command", COMMANDS, ids=[where for where, _ in COMMANDS])
def test_documented_command_parses(where, command):
    """A subcommand that no longer exists, an unknown option or an option missing its value, or more
    arguments than the command takes fail here. Values are not converted: the files the examples name do
    not exist here."""
    from vqa2cli.cli import cli

    name, *rest = arguments(command)
    assert name in cli.commands, f"{where}: no command {name!r}"
    with cli.make_context("vqa2", [name], resilient_parsing=True) as parent:
        context = click.Context(cli.commands[name], info_name=name, parent=parent)
        try:
            _, extra, _ = cli.commands[name].make_parser(context).parse_args(args=rest)
        except click.UsageError as error:
            pytest.fail(f"{where}: {error.format_message()}")
    assert not extra, f"{where}: unexpected arguments {extra}"


def quick_start() -> tuple[list[str], list[str]]:
    """The README's quick-start block: its commands and its output lines."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Quick start"):]
    block = code_blocks(section)[0]
    return [line[2:] for line in block if line.startswith("$ ")], [line for line in block if not line.startswith("$ ")]


def test_readme_quick_start_prints_what_the_readme_shows(tmp_path, monkeypatch):
    """Run the quick start's commands as a new user would, then hold the README to their output: every
    clip's score (to the 3 decimals shown) and level, and the answer to the question."""
    commands, shown = quick_start()
    assert [arguments(c)[0] for c in commands] == ["synth", "score", "ask"], commands
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def vqa2(*args):
        done = subprocess.run([sys.executable, "-m", "vqa2cli", *args], cwd=tmp_path, capture_output=True,
                              text=True)
        assert done.returncode == 0, done.stderr
        return done.stdout

    vqa2(*arguments(commands[0]))
    records = json.loads(vqa2(*arguments(commands[1]), "--json"))
    rows = {cells[0]: cells[1:3] for cells in (
        [cell.strip() for cell in line.strip("│").split("│")] for line in shown if line.startswith("│"))}
    assert sorted(rows) == sorted(record["path"] for record in records)
    for record in records:
        score, level = rows[record["path"]]
        assert record["score"] == pytest.approx(float(score), abs=0.0015) and record["level"] == level, record
    answer = vqa2(*arguments(commands[2])).strip()
    assert answer == shown[-1].strip()
