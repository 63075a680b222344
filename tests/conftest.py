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
def stop_signals_armed():
    """SIGINT, SIGTERM and SIGHUP act as in a foreground Python process, whatever this one inherited (a
    script's background job starts with SIGINT ignored, `nohup` ignores SIGHUP, and vqa2 leaves an ignored
    signal ignored): for tests that raise them themselves."""
    defaults = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL, signal.SIGHUP: signal.SIG_DFL}
    previous = {signum: signal.signal(signum, handler) for signum, handler in defaults.items()}
    yield
    for signum, handler in previous.items():
        signal.signal(signum, handler)
