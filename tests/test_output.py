import csv
import io
import json
import os
import signal

import pytest

from vqa2cli.errors import SetupError
from vqa2cli.output import (
    Column,
    CsvWriter,
    JsonArrayWriter,
    JsonLinesWriter,
    Reporter,
    TableWriter,
    default_format,
    fmt_float,
    lookup,
    make_writer,
    printable,
    to_json,
    uninterrupted,
)

RECORDS = [
    {"path": "a.mp4", "score": 0.75, "probs": {"high": 0.5, "low": 0.5}, "error": None},
    {"path": "b, \"quoted\".mp4", "score": None, "probs": None, "error": "b.mp4: not a video"},
]
COLUMNS = [
    Column("path", "Path"),
    Column("score", "Score", fmt_float(2), "right"),
    Column("probs.high", "high", fmt_float(2)),
    Column("probs.low", "low", fmt_float(2)),
]


class Tty(io.StringIO):
    def isatty(self):
        return True


def test_lookup_dotted_and_missing():
    assert lookup(RECORDS[0], "probs.high") == 0.5
    assert lookup(RECORDS[1], "probs.high") is None
    assert lookup(RECORDS[0], "nope") is None


def test_json_array_streams_and_stays_valid_at_every_close():
    stream = io.StringIO()
    writer = JsonArrayWriter(stream)
    writer.write(RECORDS[0])
    # what a consumer sees mid-run parses once the writer closes the array
    assert json.loads(stream.getvalue() + "\n]") == [RECORDS[0]]
    writer.write(RECORDS[1])
    writer.close()
    writer.close()  # idempotent: a finally after a normal close must not add a second ']'
    assert json.loads(stream.getvalue()) == RECORDS


def test_json_array_empty():
    stream = io.StringIO()
    with JsonArrayWriter(stream):
        pass
    assert json.loads(stream.getvalue()) == []


def test_json_array_closed_by_with_on_exception():
    stream = io.StringIO()
    with pytest.raises(KeyboardInterrupt):
        with JsonArrayWriter(stream) as writer:
            writer.write(RECORDS[0])
            raise KeyboardInterrupt
    assert json.loads(stream.getvalue()) == [RECORDS[0]]


def test_json_non_finite_floats_become_null():
    stream = io.StringIO()
    with JsonLinesWriter(stream) as writer:
        writer.write({"score": float("nan"), "probs": {"high": float("inf")}})
    assert json.loads(stream.getvalue()) == {"score": None, "probs": {"high": None}}


def test_jsonl_one_object_per_line():
    stream = io.StringIO()
    with JsonLinesWriter(stream) as writer:
        for record in RECORDS:
            writer.write(record)
    lines = stream.getvalue().splitlines()
    assert [json.loads(line) for line in lines] == RECORDS


def test_csv_header_flattening_quoting_and_empty_cells():
    stream = io.StringIO()
    with CsvWriter(stream, COLUMNS) as writer:
        for record in RECORDS:
            writer.write(record)
    rows = list(csv.DictReader(io.StringIO(stream.getvalue())))
    assert list(rows[0]) == ["path", "score", "probs.high", "probs.low"]
    assert rows[0] == {"path": "a.mp4", "score": "0.75", "probs.high": "0.5", "probs.low": "0.5"}
    assert rows[1] == {"path": 'b, "quoted".mp4', "score": "", "probs.high": "", "probs.low": ""}


def test_table_shows_rows_and_errors_column_only_when_needed():
    stream = io.StringIO()
    with TableWriter(stream, COLUMNS, title="scores") as writer:
        writer.write(RECORDS[0])
    text = stream.getvalue()
    assert "a.mp4" in text and "0.75" in text and "Error" not in text

    stream = io.StringIO()
    with TableWriter(stream, COLUMNS) as writer:
        for record in RECORDS:
            writer.write(record)
    assert "Error" in stream.getvalue() and "not a video" in stream.getvalue()


def test_default_format_and_make_writer():
    assert default_format(Tty()) == "table"
    assert default_format(io.StringIO()) == "jsonl"
    assert isinstance(make_writer("json", io.StringIO(), COLUMNS), JsonArrayWriter)
    assert isinstance(make_writer("csv", io.StringIO(), COLUMNS), CsvWriter)
    with pytest.raises(ValueError):
        make_writer("xml", io.StringIO(), COLUMNS)


def test_table_missing_text_and_hidden_columns():
    stream = io.StringIO()
    columns = [Column("name", "Name"), Column("repo", "Source", missing="shipped"), Column("path", "Path", in_table=False)]
    with TableWriter(stream, columns) as writer:
        writer.write({"name": "tiny", "repo": None, "path": "/secret/place"})
    text = stream.getvalue()
    assert "shipped" in text and "Path" not in text and "/secret/place" not in text


class _InterruptedWhileWriting(io.StringIO):
    """Ctrl-C arrives while the first record is being written."""

    def __init__(self):
        super().__init__()
        self.interrupted = False

    def write(self, text):
        written = super().write(text)
        if not self.interrupted:
            self.interrupted = True
            signal.raise_signal(signal.SIGINT)
        return written


def test_ctrl_c_mid_record_still_leaves_a_valid_array(stop_signals_armed):
    stream = _InterruptedWhileWriting()
    with pytest.raises(KeyboardInterrupt):
        with JsonArrayWriter(stream) as writer:
            writer.write(RECORDS[0])  # the interrupt is delivered once the record is whole
            writer.write(RECORDS[1])
    assert writer.count == 1
    assert json.loads(stream.getvalue()) == [RECORDS[0]]


def test_uninterrupted_delivers_the_interrupt_at_the_end(stop_signals_armed):
    done = []
    with pytest.raises(KeyboardInterrupt):
        with uninterrupted():
            signal.raise_signal(signal.SIGINT)
            done.append("rest of the block")
    assert done == ["rest of the block"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_human_size():
    from vqa2cli.output import human_size

    assert [human_size(n) for n in (999, 3_500_000, 16_400_000_000)] == ["999 B", "3.5 MB", "16.4 GB"]


def test_table_marks_warnings_only_when_some_row_has_them_and_csv_joins_lists():
    columns = [*COLUMNS, Column("warnings", "Warnings", lambda w: "! " + "; ".join(w) if w else "", when_set=True)]
    clean = [{**RECORDS[0], "warnings": []}]
    damaged = [*clean, {**RECORDS[0], "path": "cut.mp4", "warnings": ["decoded 4.6 s of 10 s", "2 corrupt packets"]}]
    for records, shown in ((clean, False), (damaged, True)):
        stream = io.StringIO()
        with TableWriter(stream, columns) as writer:
            for record in records:
                writer.write(record)
        assert ("Warnings" in stream.getvalue()) is shown
    assert "! decoded 4.6 s of 10 s; 2 corrupt packets" in stream.getvalue().replace("\n", " ").replace("│", "")
    stream = io.StringIO()
    with CsvWriter(stream, columns) as writer:
        for record in damaged:
            writer.write(record)
    rows = list(csv.DictReader(io.StringIO(stream.getvalue())))
    assert [row["warnings"] for row in rows] == ["", "decoded 4.6 s of 10 s; 2 corrupt packets"]


# --- record files: --output FILE with --resume ----------------------------------------------------

FILE_COLUMNS = [Column("path", "Path"), Column("score", "Score"), Column("model", "Model"), Column("error", "Error")]


def _record(path, score=0.5, error=None):
    return {"path": path, "score": None if error else score, "model": "m", "error": error}


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_record_file_appends_and_resume_finds_what_is_done(tmp_path, suffix):
    from vqa2cli.output import open_record_file

    path = tmp_path / f"out{suffix}"
    writer, existing = open_record_file(path, FILE_COLUMNS)
    assert existing.records == 0 and existing.done == set()
    with writer:
        writer.write(_record("a.mp4", 0.25))
        writer.write(_record("b,\n\"odd\".mp4", error="b: broken"))
        # each record is in the file as soon as it is written, before close
        assert path.read_text().count("a.mp4") == 1
    with pytest.raises(SetupError, match="already holds records: add --resume"):
        open_record_file(path, FILE_COLUMNS)
    writer, existing = open_record_file(path, FILE_COLUMNS, resume=True)
    with writer:
        writer.write(_record("c.mp4", 0.75))
    assert (existing.records, existing.done, existing.models, existing.torn_bytes) == (2, {"a.mp4"}, {"m"}, 0)
    text = path.read_text()
    if suffix == ".csv":
        rows = list(csv.DictReader(io.StringIO(text)))
        assert text.count("path,score,model,error") == 1  # one header, however many runs appended
        assert [(row["path"], row["score"], row["error"]) for row in rows] == [
            ("a.mp4", "0.25", ""), ("b,\n\"odd\".mp4", "", "b: broken"), ("c.mp4", "0.75", "")]
    else:
        assert [json.loads(line) for line in text.splitlines()] == [
            _record("a.mp4", 0.25), _record("b,\n\"odd\".mp4", error="b: broken"), _record("c.mp4", 0.75)]


@pytest.mark.parametrize("suffix, torn", [(".jsonl", '{"path": "c.mp4", "sco'), (".jsonl", '{"path": "c.mp4"}'),
                                          (".jsonl", "\0\0\0\0"), (".csv", "c.mp4,0.7"), (".csv", '"c\n.mp4,0.')])
def test_resume_cuts_off_a_torn_last_record(tmp_path, suffix, torn):
    from vqa2cli.output import open_record_file

    path = tmp_path / f"out{suffix}"
    with open_record_file(path, FILE_COLUMNS)[0] as writer:
        writer.write(_record("a.mp4"))
        writer.write(_record("b.mp4"))
    whole = path.read_bytes()
    with open(path, "ab") as handle:  # a process killed while writing the third record
        handle.write(torn.encode())
    writer, existing = open_record_file(path, FILE_COLUMNS, resume=True)
    assert existing.torn_bytes == len(torn.encode()) and existing.done == {"a.mp4", "b.mp4"}
    assert path.read_bytes() == whole  # cut off before anything is appended
    with writer:
        writer.write(_record("c.mp4"))
    assert path.read_bytes().startswith(whole) and path.read_bytes().count(b"c.mp4") == 1


def test_resume_refuses_files_that_are_not_ours(tmp_path):
    from vqa2cli.output import open_record_file

    damaged = tmp_path / "middle.jsonl"
    damaged.write_text('{"path": "a.mp4", "error": null}\nnot json\n{"path": "b.mp4", "error": null}\n')
    with pytest.raises(SetupError, match="middle.jsonl line 2: not a record of this kind"):
        open_record_file(damaged, FILE_COLUMNS, resume=True)
    other = tmp_path / "other.csv"
    other.write_text("name,rating\nx.mp4,3\n")
    with pytest.raises(SetupError, match="its columns are not this run's"):
        open_record_file(other, FILE_COLUMNS, resume=True)
    with pytest.raises(ValueError, match="name a .jsonl or .csv file"):
        open_record_file(tmp_path / "out.json", FILE_COLUMNS)
    assert damaged.read_text().count("\n") == 3 and other.read_text() == "name,rating\nx.mp4,3\n"  # untouched


def test_uninterrupted_holds_sigterm_back_too():
    from vqa2cli.errors import Stopped

    def stop(signum, frame):
        raise Stopped(signum)

    done = []
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        with pytest.raises(Stopped) as stopped:
            with uninterrupted():
                signal.raise_signal(signal.SIGTERM)
                done.append("rest of the block")
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert done == ["rest of the block"] and stopped.value.signum == signal.SIGTERM


def test_printable_escapes_what_a_terminal_would_obey_and_nothing_else():
    assert printable("a\nb\x1b[31mc\u202ed\udcff\x7f é 日本 \\ ok") == "a\\nb\\x1b[31mc\\u202ed\\udcff\\x7f é 日本 \\ ok"


def test_table_cells_and_notes_are_printable_and_never_markup(capsys):
    stream = io.StringIO()
    with TableWriter(stream, [Column("path", "Path", no_wrap=True)], title="vqa2 (\x1b[2J)") as writer:
        writer.write({"path": "x\x1b[31m[bold]y\nz.mp4", "error": None})
    text = stream.getvalue()
    assert "\x1b" not in text and "x\\x1b[31m[bold]y\\nz.mp4" in text and "vqa2 (\\x1b[2J)" in text
    Reporter(live=False).note("error: a\nb\x1b[0m.mp4: not a video")
    assert capsys.readouterr().err == "error: a\\nb\\x1b[0m.mp4: not a video\n"


def test_json_keeps_a_file_name_that_is_not_utf8_and_stays_utf8():
    name = os.fsdecode(b"clip\xff\n.mp4")
    text = to_json({"path": name})
    assert text == '{"path": "clip\\udcff\\n.mp4"}'
    assert os.fsencode(json.loads(text.encode("utf-8"))["path"]) == b"clip\xff\n.mp4"
