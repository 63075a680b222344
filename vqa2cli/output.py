"""Writers for records (plain dicts): a rich table, a JSON array, JSON Lines, CSV.

Every writer has `write(record)` and `close()` and is a context manager. The streaming formats write
and flush each record as it arrives, so a consumer sees results as they finish and an interrupted
run keeps everything written so far; `JsonArrayWriter.close()` ends the array, so a `finally:` (or
`with`) keeps `--json` output valid after Ctrl-C. Records go to the stream given (stdout); nothing
else is ever written there.

Commands describe their records once with `Column`s (used by the table and CSV; JSON formats dump the
whole record) and pick a writer with `make_writer`:

    columns = [Column("path", "Path"), Column("score", "Score", fmt_float(3), "right")]
    with make_writer(fmt or default_format(sys.stdout), sys.stdout, columns) as writer:
        for record in records:
            writer.write(record)
"""

import contextlib
import csv
import json
import math
import os
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from vqa2cli.errors import STOP_SIGNALS, SetupError

FORMATS = ("table", "json", "jsonl", "csv")


@dataclass(frozen=True)
class Column:
    """One column of the table/CSV views of a record.

    `key` may be dotted ("probs.high") to reach into a nested dict; it is also the CSV header.
    """

    key: str
    header: str
    fmt: Callable[[Any], str] = str  # table cell text for a value that is not None
    justify: str = "left"
    in_table: bool = True  # False: CSV only, to keep the terminal table narrow
    in_csv: bool = True  # False: table only (a view of another column's data, e.g. a sparkline)
    wide_only: bool = False  # in the table only on a terminal at least WIDE_TABLE columns wide
    no_wrap: bool = False  # keep table cells whole (names to copy and paste); numbers never wrap
    missing: str = ""  # table cell text for None
    when_set: bool = False  # in the table only when some row has a value (e.g. warnings)


def lookup(record: dict, key: str):
    """The value at a dotted key, or None where any part is missing (an error record has no probs)."""
    value = record
    for part in key.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


# What must not reach a terminal raw: control characters (a line break splits a "one-line" message, an
# escape sequence recolours or rewrites the screen), bidirectional overrides (text that reads differently
# from what it is) and the undecodable bytes of a file name (os.fsdecode's surrogates, unprintable).
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def printable(text) -> str:
    """`text` made safe to show on a terminal, on one line: each unprintable character is written as its
    Python escape (\\n, \\x1b, \\u202e, \\udcff). For people only; data (JSON, CSV) keeps the true text."""
    return _UNPRINTABLE.sub(lambda match: repr(match.group())[1:-1], str(text))


def _json_safe(value):
    # NaN/inf are not JSON; a parser downstream must never choke on our output.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return value


def to_json(record: dict, indent=None) -> str:
    text = json.dumps(_json_safe(record), ensure_ascii=False, indent=indent)
    # a file name that is not UTF-8 (os.fsdecode's surrogates) as \udcXX escapes: valid UTF-8 JSON, and
    # json.loads + os.fsencode give the name back
    return _SURROGATE.sub(lambda match: f"\\u{ord(match.group()):04x}", text)


@contextlib.contextmanager
def uninterrupted():
    """Hold the stop signals (Ctrl-C, SIGTERM, SIGHUP) back until the block ends, then deliver them.

    Writers wrap each record and their closing text in it, so a signal never leaves half a record, or
    a record the writer does not know it wrote (and `]` closing an array it never opened).
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # handlers can only be set from the main thread
        return
    caught = []
    previous = {}
    for signum in STOP_SIGNALS:
        handler = signal.getsignal(signum)
        if handler is not None and handler != signal.SIG_IGN:  # None: not ours to replace; ignored stays so
            previous[signum] = signal.signal(signum, lambda number, frame: caught.append((number, frame)))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if caught:
            signum, frame = caught[0]
            if callable(previous[signum]):
                previous[signum](signum, frame)  # Python's SIGINT handler raises KeyboardInterrupt here
            else:  # SIG_DFL: what the signal would have done (end the process)
                signal.raise_signal(signum)


class _Writer:
    def __init__(self, stream):
        self.stream = stream
        self.count = 0
        self._closed = False

    def write(self, record: dict):
        with uninterrupted():
            self._write(record)
            self.count += 1

    def close(self):
        """Finish the output (idempotent: a `finally` after a normal close adds nothing)."""
        if self._closed:
            return
        with uninterrupted():
            self._closed = True
            self._close()

    def _close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()
        return False


class JsonLinesWriter(_Writer):
    """One JSON object per line, flushed as each record arrives."""

    def _write(self, record):
        self.stream.write(to_json(record) + "\n")
        self.stream.flush()


class JsonArrayWriter(_Writer):
    """A single JSON array, streamed: `[`, then records one per line, `]` on close.

    The array is valid after `close()` however many records were written (zero gives `[]`).
    """

    def _write(self, record):
        self.stream.write(("[\n" if self.count == 0 else ",\n") + to_json(record))
        self.stream.flush()

    def _close(self):
        self.stream.write("[]\n" if self.count == 0 else "\n]\n")
        self.stream.flush()


def _csv_cell(value):
    # spelled as in the JSON output, so both formats read the same
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)) and not any(isinstance(item, (dict, list, tuple)) for item in value):
        return "; ".join(str(item) for item in value)  # e.g. warnings, which are sentences with spaces
    if isinstance(value, (dict, list, tuple)):  # nested data (timeline segments): one JSON cell
        return to_json(value)
    return value


class CsvWriter(_Writer):
    """CSV with a header row of column keys (`header=False`: none, for appending to a file that has it);
    None is an empty cell, a list of plain values "; "-separated, a dict or a list holding dicts one JSON
    text; flushed per record."""

    def __init__(self, stream, columns, header=True):
        super().__init__(stream)
        self.columns = [column for column in columns if column.in_csv]
        self._csv = csv.writer(stream, lineterminator="\n")
        if header:
            with uninterrupted():
                self._csv.writerow([column.key for column in self.columns])
                stream.flush()

    def _write(self, record):
        self._csv.writerow([_csv_cell(lookup(record, column.key)) for column in self.columns])
        self.stream.flush()


WIDE_TABLE = 110


class TableWriter(_Writer):
    """A rich table, printed on close (also after Ctrl-C) to a terminal.

    Rows whose record has an `error` show it in an Error column (added only when some row failed),
    without the record's path when the message starts with it. Right-justified (numeric) columns
    never wrap; `wide_only` columns are left out on terminals narrower than WIDE_TABLE.
    """

    def __init__(self, stream, columns, title=None):
        super().__init__(stream)
        self.columns = list(columns)
        self.title = title
        self.rows = []

    def _write(self, record):
        self.rows.append(record)

    def _close(self):
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text

        console = Console(file=self.stream, highlight=False)
        wide = console.width >= WIDE_TABLE
        columns = [column for column in self.columns if column.in_table and (wide or not column.wide_only)
                   and (not column.when_set or any(lookup(record, column.key) for record in self.rows))]
        title = None if self.title is None else Text(printable(self.title))
        table = Table(title=title, title_justify="left")
        for column in columns:
            whole = column.no_wrap or column.justify == "right"
            table.add_column(column.header, justify=column.justify, no_wrap=whole, overflow="ellipsis" if whole else "fold")
        with_errors = any(record.get("error") for record in self.rows)
        if with_errors:
            table.add_column("Error", style="red")
        for record in self.rows:
            cells = []
            for column in columns:
                value = lookup(record, column.key)
                cells.append(column.missing if value is None else column.fmt(value))
            if with_errors:
                error = record.get("error") or ""
                path = str(record.get("path"))
                cells.append(error[len(path) + 2:] if error.startswith(path + ": ") else error)
            table.add_row(*(Text(printable(cell)) for cell in cells))  # Text: a name is never markup
        console.print(table)
        self.stream.flush()


def default_format(stream) -> str:
    """A table for people, JSON Lines when stdout is a pipe or file: parseable and streamed."""
    isatty = getattr(stream, "isatty", None)
    return "table" if isatty is not None and isatty() else "jsonl"


def make_writer(fmt: str, stream, columns, title=None):
    """A writer for `fmt` (one of FORMATS) on `stream`."""
    if fmt == "json":
        return JsonArrayWriter(stream)
    if fmt == "jsonl":
        return JsonLinesWriter(stream)
    if fmt == "csv":
        return CsvWriter(stream, columns)
    if fmt == "table":
        return TableWriter(stream, columns, title=title)
    raise ValueError(f"unknown output format {fmt!r} (choose from {', '.join(FORMATS)})")


# --- record files (--output FILE): appended as records are made, resumable ---------------------------

RECORD_FILE_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}
SYNC_SECONDS = 2.0


def record_file_format(path) -> str:
    """The format of a record file, from its extension; ValueError (one line) for other extensions."""
    fmt = RECORD_FILE_FORMATS.get(os.path.splitext(os.fspath(path))[1].lower())
    if fmt is None:
        raise ValueError(f"{path}: records are appended one line each: name a .jsonl or .csv file")
    return fmt


@dataclass
class RecordFile:
    """What an existing record file held when it was opened for appending."""

    path: str
    records: int = 0  # complete records
    done: set = field(default_factory=set)  # paths that have a record without error
    models: set = field(default_factory=set)  # the `model` of those records
    torn_bytes: int = 0  # an incomplete last record (a crash mid-write), cut off before appending


def open_record_file(path, columns, resume: bool = False):
    """Open a record file for appending: (writer, RecordFile of what it held).

    Each record is written and flushed as one line (a JSON object, or a CSV row under the header the
    file starts with), so a record is in the file as soon as `write` returns and survives the process
    being killed; the file is also fsynced every SYNC_SECONDS and on close. An existing non-empty file
    is refused unless `resume`; then it is read first: a last line without its newline, or that does
    not parse (a crash mid-write), is cut off; any other unreadable line, or a CSV header other than
    `columns`, is a SetupError (it is not our file, or not this kind of record).
    """
    path = os.fspath(path)
    fmt = record_file_format(path)
    existing = RecordFile(path)
    end = 0
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        size = 0
    except OSError as error:
        raise SetupError(f"{path}: cannot read ({error.strerror})") from None
    if size and not resume:
        raise SetupError(f"{path} already holds records: add --resume to continue it, or name a new file")
    if size:
        records, end = _read_records(path, fmt, [column.key for column in columns if column.in_csv])
        existing.records = len(records)
        finished = [record for record in records if not record.get("error")]
        existing.done = {record["path"] for record in finished}
        existing.models = {record.get("model") for record in finished}
        existing.torn_bytes = size - end
        if existing.torn_bytes:
            os.truncate(path, end)
    try:
        handle = open(path, "a", encoding="utf-8", errors="surrogateescape", newline="")
    except OSError as error:
        raise SetupError(f"{path}: cannot write ({error.strerror})") from None
    synced = _SyncedFile(handle)
    writer = JsonLinesWriter(synced) if fmt == "jsonl" else CsvWriter(synced, columns, header=end == 0)
    return _FileWriter(writer, synced), existing


class _SyncedFile:
    """A text file whose flush() also fsyncs, at most every SYNC_SECONDS (flushed records already survive
    the process being killed; fsync makes them survive a power cut, at a cost too high to pay per
    record on slow disks), and whose close() always does."""

    def __init__(self, handle):
        self._handle = handle
        self._synced = time.monotonic()

    def write(self, text):
        return self._handle.write(text)

    def flush(self):
        self._handle.flush()
        if time.monotonic() - self._synced >= SYNC_SECONDS:
            os.fsync(self._handle.fileno())
            self._synced = time.monotonic()

    def close(self):
        if not self._handle.closed:
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()


class _FileWriter:
    """A record writer together with the file it writes: closing one closes both."""

    def __init__(self, writer, file):
        self._writer = writer
        self._file = file

    @property
    def count(self):
        return self._writer.count

    def write(self, record: dict):
        self._writer.write(record)

    def close(self):
        self._writer.close()
        with uninterrupted():
            self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()
        return False


class _Lines:
    """The lines of a binary file as text, tracking where the last one ended and whether it was whole."""

    def __init__(self, handle):
        self._handle = handle
        self.end = 0
        self.whole = True
        self.number = 0

    def __iter__(self):
        for line in self._handle:
            self.end += len(line)
            self.whole = line.endswith(b"\n")
            self.number += 1
            yield line.decode("utf-8", "surrogateescape")


def _read_records(path: str, fmt: str, header: list) -> tuple:
    """(complete records as dicts, offset where the last one ends) of a record file."""
    records, end, bad = [], 0, None
    with open(path, "rb") as handle:
        lines = _Lines(handle)
        if fmt == "csv":
            reader = csv.reader(lines)
            rows = iter(lambda: _csv_row(reader, lines), None)
            first = next(rows, None)
            if first is not None and lines.whole:
                if first != header:
                    raise SetupError(f"{path}: its columns are not this run's ({','.join(first)[:200]}); "
                                     f"name a new file")
                end = lines.end
            parsed = ((dict(zip(header, row)) if len(row) == len(header) else None) for row in rows)
        else:
            parsed = (_json_record(text) for text in lines)
        for record in parsed:
            if bad is not None:  # only the last line may be incomplete
                raise SetupError(bad)
            if record is None or not lines.whole or not isinstance(record.get("path"), str):
                bad = f"{path} line {lines.number}: not a record of this kind; name a new file"
                continue
            records.append(record)
            end = lines.end
    return records, end


def _csv_row(reader, lines):
    try:
        return next(reader)
    except StopIteration:
        return None
    except csv.Error:  # an unterminated quote at the end: a row cut short
        return []


def _json_record(text):
    try:
        record = json.loads(text)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def fmt_float(digits=3):
    """A cell formatter for floats with a fixed number of decimals."""
    return lambda value: f"{value:.{digits}f}"


def human_size(size_bytes: int) -> str:
    size = float(size_bytes)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


class Reporter:
    """Everything a command tells the user on stderr: one-line notes, a spinner, a progress bar.

    Notes are shown `printable`: a file name with a line break or an escape sequence stays one harmless line.

    The spinner and the progress bar (count, rate, ETA) show only when `live` (stderr is a terminal
    and not --quiet); notes always print, one line each, above the bar when it is showing. Use as a
    context manager so the bar is gone before a table is printed on stdout. While the bar shows,
    rich sends whatever is written to `sys.stdout` above it, on stderr (stray library prints stay
    out of the data): writers must be given the real stdout before `start()`.
    """

    def __init__(self, live: bool, unit: str = "videos"):
        self.live = live
        self.unit = unit
        self._progress = None
        self._task = None

    @classmethod
    def for_stderr(cls, quiet: bool, unit: str = "videos"):
        return cls(live=not quiet and sys.stderr.isatty(), unit=unit)

    def note(self, message: str):
        message = printable(message)
        if self._progress is not None:
            # soft_wrap: a long path must stay on one line, not be folded at the terminal width
            self._progress.console.print(message, markup=False, highlight=False, soft_wrap=True)
        else:
            sys.stderr.write(message + "\n")
            sys.stderr.flush()

    def status(self, message: str):
        """A spinner while something slow without steps runs (loading a model); a no-op when not live."""
        if not self.live:
            return contextlib.nullcontext()
        from rich.console import Console
        from rich.text import Text

        return Console(stderr=True).status(Text(printable(message)))

    def start(self, description: str, total=None):
        """Show the progress bar; `total` None (paths still streaming in on stdin) means no ETA."""
        if not self.live:
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        self._task = self._progress.add_task(description, total=total, rate="")
        self._progress.start()

    def advance(self):
        if self._progress is None:
            return
        self._progress.update(self._task, advance=1)
        # rich's speed is an average over the last 30 s; slow models read better as seconds per item
        speed = self._progress.tasks[0].speed
        if speed:
            rate = f"{speed:.2f} {self.unit}/s" if speed >= 1 else f"{1 / speed:.1f} s/{self.unit.rstrip('s')}"
            self._progress.update(self._task, rate=rate)

    def stop(self):
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.stop()
        return False
