"""The `vqa2` command end to end: in-process through `main()` (exit codes included), and in
subprocesses where only a real process will do (import cost, SIGINT, pipes)."""

import io
import json
import subprocess
import sys

import pytest

from vqa2cli.cli import main
from vqa2cli.registry import registry


@pytest.fixture
def vqa2(capsys, monkeypatch):
    """Run `vqa2 ARGS` in-process: (exit code, stdout, stderr)."""

    def run(*args, stdin=None):
        monkeypatch.setattr(sys, "argv", ["vqa2", *map(str, args)])
        if stdin is not None:
            monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        with pytest.raises(SystemExit) as exit_info:
            main()
        out, err = capsys.readouterr()
        return exit_info.value.code, out, err

    return run


def test_help_and_version_do_not_import_torch():
    # every command's --help too: commands added later must keep heavy imports inside their bodies
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from vqa2cli.cli import cli\n"
        "runner = CliRunner()\n"
        "for args in [['--help'], ['--version'], *[[name, '--help'] for name in cli.commands]]:\n"
        "    result = runner.invoke(cli, args)\n"
        "    assert result.exit_code == 0, (args, result.output)\n"
        "heavy = [m for m in ('torch', 'transformers', 'bitsandbytes', 'peft', 'av') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_version(vqa2):
    code, out, _ = vqa2("--version")
    assert code == 0 and out.startswith("vqa2, version ")


def test_help_lists_commands_with_examples(vqa2):
    code, out, _ = vqa2("--help")
    assert code == 0
    for command in ("score", "ask", "models"):
        assert command in out
    code, out, _ = vqa2("score", "--help")
    assert code == 0 and "Examples:" in out and "--recursive" in out and "--jsonl" in out


def test_conflicting_formats_is_a_usage_error(vqa2, tmp_path):
    code, out, err = vqa2("score", tmp_path, "--json", "--csv")
    assert code == 2 and out == ""
    assert "choose one output format, not --json and --csv" in err


def test_bad_option_value_is_a_usage_error(vqa2, tmp_path):
    code, out, err = vqa2("score", tmp_path, "--device", "tpu")
    assert code == 2 and out == "" and "Traceback" not in err


def test_ask_needs_a_question(vqa2, tmp_path):
    code, out, err = vqa2("ask", tmp_path / "clip.mp4")
    assert code == 2 and "give a QUESTION" in err


def test_models_json(vqa2):
    code, out, err = vqa2("models", "--json")
    assert code == 0
    models = json.loads(out)
    assert [m["name"] for m in models] == [entry.name for entry in registry()]
    for model in models:
        assert set(model) == {"name", "purpose", "repo_id", "prompt", "default_for", "present", "size_bytes", "path"}
        assert isinstance(model["present"], bool) and isinstance(model["size_bytes"], int)


def test_models_csv_and_default_jsonl_when_piped(vqa2):
    code, out, _ = vqa2("models", "--csv")
    lines = out.splitlines()
    assert code == 0 and lines[0] == "name,purpose,repo_id,default_for,present,size_bytes,path"
    assert len(lines) == len(registry()) + 1
    code, out, _ = vqa2("models")
    assert code == 0 and [json.loads(line)["name"] for line in out.splitlines()] == [e.name for e in registry()]

