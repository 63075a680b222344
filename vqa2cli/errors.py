"""Errors vqa2 reports to users.

Every message is one line that names the thing at fault (a file, a model) and the reason, so the CLI
can print it as is, without a traceback. The class decides the exit code: input errors (a bad video,
a bad dataset record) fail one item of a batch (exit 1); setup errors (no weights, bad options, a
broken checkpoint) stop the command (exit 2); a stop signal ends it with 128 + the signal number (`Stopped`).
"""

import signal


class Vqa2Error(Exception):
    """Base class: `str(error)` is a one-line message for the user."""


class InputError(Vqa2Error):
    """One input (a video, a dataset record) cannot be used; the rest of a batch goes on."""


class SetupError(Vqa2Error):
    """The command cannot run at all: missing weights, a broken checkpoint, an unusable device."""


class ModelNotFoundError(SetupError):
    """The named model is neither known nor on disk, or its weights cannot be fetched offline."""


class CheckpointError(SetupError):
    """A checkpoint does not match the architecture (missing/unexpected keys, wrong shapes)."""


class DataError(SetupError):
    """A fine-tuning dataset is unusable as a whole (bad file, invalid records without --skip-invalid)."""


# The signals that end a run: `vqa2cli.cli.main` makes each of them stop a command the way Ctrl-C does.
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


class Stopped(KeyboardInterrupt):
    """A stop signal (SIGINT, SIGTERM or SIGHUP) reached the `vqa2` command.

    A KeyboardInterrupt, so whatever handles Ctrl-C (keeping finished results, closing a JSON array) handles
    `kill`, `timeout`, `docker stop` and a closed terminal the same way; the exit code is 128 + `signum`.
    """

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
