import io
import signal
import sys

import pytest

# Fixture modules, one per area, so each area's fixtures live beside nothing else.
pytest_plugins = ["tests.fixtures.models", "tests.fixtures.checkpoints", "tests.fixtures.clips",
                  "tests.fixtures.finetune"]


def _cuda_available():
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if any("cuda" in item.keywords for item in items) and not _cuda_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(skip)


@pytest.fixture
def vqa2(capsys, monkeypatch):
    """Run `vqa2 ARGS` in-process: (exit code, stdout, stderr)."""
    from vqa2cli.cli import main

    def run(*args, stdin=None):
        monkeypatch.setattr(sys, "argv", ["vqa2", *map(str, args)])
        if stdin is not None:
            monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        with pytest.raises(SystemExit) as exit_info:
            main()
        out, err = capsys.readouterr()
        return exit_info.value.code, out, err

    return run


@pytest.fixture
def sigint_raises():
    """SIGINT raises KeyboardInterrupt, as in a foreground Python process, whatever this one inherited (a
    script's background job starts with SIGINT ignored): for tests that raise SIGINT themselves."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)
