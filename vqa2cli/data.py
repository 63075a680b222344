"""Fine-tuning datasets: reading the supported formats, validating every record, keeping paths inside the data folder.

Formats (DATA is the file, or a folder holding exactly one ``*.json``/``*.jsonl``/``*.csv``):

* LLaVA-style JSON (an array) or JSONL (one object a line), as in the VQA² release:
  ``{"id", "image": "<video path>", "conversations": [{"from": "human"|"gpt", "value": ...}], "gt_score"?}``
  (``"video"`` is accepted for ``"image"``, ``role``/``content`` with ``user``/``assistant`` for ``from``/``value``).
  The first human turn either holds its ``<image>`` slots as the release's data does (two: keyframes, then
  motion; one: keyframes only, like the streaming scorer's prompt), or none, and then it is a bare question
  wrapped at training time in the same prompt ``vqa2 ask`` uses.
* CSV with a header; per stage: 1 ``video,distortion[,kind]``, 2 ``video,mos`` (needs ``mos_range``),
  3 ``video,question,answer``. Extra columns are ignored.

Video paths are relative to the data folder and may not leave it, through ``..`` or through a symlink.

Validation is cheap on purpose: each distinct video file is opened and its first frame decoded (a few ms a
file; two frames for picture formats, so a still image is refused as `load_video` would), not decoded in
full; a file that breaks later in the stream is reported when training reaches it.
Every problem is reported with its place: ``CSV line``, ``JSONL line``, or JSON array index (and line).
"""

from __future__ import annotations

import csv
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

from vqa2cli.config import parse_json
from vqa2cli.errors import DataError
from vqa2cli.prompts import IMAGE_TOKEN as IMAGE_SLOT
from vqa2cli.prompts import UGC_USER as SCORE_QUESTION  # stage-2 records ask exactly what `vqa2 score` asks
from vqa2cli.scoring import answer_text, mos_to_level

DATA_SUFFIXES = (".json", ".jsonl", ".csv")
# What `vqa2 synth` writes beside the stage files that is not training data: its settings, the clips'
# sources and distortions, and the `vqa2 eval` labels.
NOT_TRAINING_DATA = frozenset({"synth.json", "manifest.csv", "labels.csv"})
# JSON and JSON Lines files are read whole, and their records take about ten times the file's size in
# memory: a bigger file is refused rather than exhausting the machine.
MAX_JSON_BYTES = 1 << 30
BIG_FILE_BYTES = 20 << 20  # files from this size on get a progress line
KINDS = ("spatial", "motion")
CSV_COLUMNS = {1: ("video", "distortion"), 2: ("video", "mos"), 3: ("video", "question", "answer")}
ROLE_ALIASES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}
T = TypeVar("T")


@dataclass
class Record:
    """One training conversation about one video."""

    where: str  # "train.csv line 7", "data.json [3] (line 12)": where the user finds it
    video: Path  # resolved path, inside the data folder
    turns: list[tuple[str, str]]  # ("human", text), ("gpt", text), ... alternating, human first, gpt last
    kind: str | None = None  # stage 1: "spatial" or "motion" distortion; None when not known

    @property
    def wrapped(self) -> bool:
        """True when the first human turn is a bare question that gets the `ask` prompt around it."""
        return IMAGE_SLOT not in self.turns[0][1]


@dataclass
class Problem:
    where: str
    message: str

    def __str__(self):
        return f"{self.where}: {self.message}"


@dataclass
class Dataset:
    path: Path  # the data file
    root: Path  # the data folder; video paths are relative to it
    records: list[Record]  # valid records, file order
    problems: list[Problem]  # invalid records, file order
    total: int  # records in the file, valid or not


def find_data_file(path: str | os.PathLike, stage: int | None = None) -> Path:
    """DATA may be the file itself or a folder holding it: the stage's own file (``stage2.json``, as `vqa2
    synth` names them; JSON before JSONL before CSV, since a JSON file needs no --mos-range), or the one data
    file there; files that are not training data (`NOT_TRAINING_DATA`) are never taken."""
    path = Path(path)
    if path.is_file():
        if path.suffix.lower() not in DATA_SUFFIXES:
            raise DataError(f"{path}: unknown data format (expected {', '.join(DATA_SUFFIXES)})")
        return path
    if path.is_dir():
        found = {p.name: p for p in sorted(path.iterdir())
                 if p.is_file() and p.suffix.lower() in DATA_SUFFIXES and p.name not in NOT_TRAINING_DATA}
        own = [found[name] for name in (f"stage{stage}{suffix}" for suffix in DATA_SUFFIXES) if name in found]
        if own:
            return own[0]
        if len(found) == 1:
            return next(iter(found.values()))
        if not found:
            raise DataError(f"{path}: no .json, .jsonl or .csv data file in this folder")
        raise DataError(f"{path}: several data files ({', '.join(found)}); name the one to use")
    raise DataError(f"{path}: no such file or folder")


def resolve_video_path(root: Path, value: str) -> Path:
    """The file `value` names, relative to `root`; ValueError when it is absolute or leaves `root`."""
    if not value:
        raise ValueError("empty video path")
    if os.path.isabs(value) or value.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", value):
        raise ValueError(f"video path '{value}' is absolute; paths must be relative to the data folder")
    normal = os.path.normpath(value)
    if normal == ".." or normal.startswith(".." + os.sep):
        raise ValueError(f"video path '{value}' leaves the data folder")
    resolved = (root / normal).resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise ValueError(f"video path '{value}' leads outside the data folder (through a symbolic link)")
    return resolved


def probe_video(path: Path) -> str | None:
    """None if the file opens as a video and its first frame decodes, else the reason it does not
    (`load_video`'s reasons; a still image is refused as it refuses it)."""
    from vqa2cli.video import VideoError, check_video

    try:
        check_video(path)
    except VideoError as error:
        return error.reason
    return None


def distortion_question(kind: str) -> str:
    return f"What is the main {kind} distortion in this video?"


def distortion_answer(distortion: str) -> str:
    return f"It is {distortion.strip().rstrip('.')}."


def load_dataset(
    path: str | os.PathLike,
    stage: int,
    mos_range: tuple[float, float] | None = None,
    check_videos: bool = True,
    say=None,
) -> Dataset:
    """Read and validate every record; raises DataError only when the file as a whole is unusable.
    `say(line)` hears which file of a folder was taken, and progress on big files."""
    if stage not in (1, 2, 3):
        raise DataError(f"unknown stage {stage} (1, 2 or 3)")
    say = say or (lambda line: None)
    file = find_data_file(path, stage)
    if file != Path(path):
        say(f"using {file.name} from {path}")
    root = file.parent.resolve()
    suffix = file.suffix.lower()
    if suffix == ".csv":
        entries = _read_csv(file, stage, mos_range)
    else:
        entries = _read_json_entries(file, root, stage, say, check_videos)
    if check_videos:
        _check_videos(entries, root)
    records = [entry for _, entry in entries if isinstance(entry, Record)]
    problems = [entry for _, entry in entries if isinstance(entry, Problem)]
    return Dataset(path=file, root=root, records=records, problems=problems, total=len(entries))


def format_problems(dataset: Dataset, limit: int = 20) -> list[str]:
    """Report lines: a summary, then up to `limit` problems in file order."""
    lines = [f"{dataset.path.name}: {len(dataset.problems)} of {dataset.total} records are invalid:"]
    lines += [f"  {problem}" for problem in dataset.problems[:limit]]
    if len(dataset.problems) > limit:
        lines.append(f"  ... and {len(dataset.problems) - limit} more")
    return lines


# --- CSV: the one reader, for fine-tuning data and `vqa2 eval` label files ------------------------

@dataclass
class CsvRow:
    where: str  # "labels.csv line 3": the line the row starts on
    fields: dict[str, str]  # lower-cased column name -> stripped cell
    path: str  # the video path as written
    video: Path  # that path resolved inside the file's folder


def read_csv(file: Path, check_header: Callable[[list[str]], T], video_columns=("video",),
             name: str | None = None) -> tuple[T, list[CsvRow | Problem]]:
    """`check_header(columns)`'s result and the rows of a CSV file with a header, in file order: a `CsvRow`
    each, or a `Problem` saying where and why.

    One error policy for every CSV vqa2 reads: a problem with the file as a whole (not UTF-8, malformed, no
    header, a header that `check_header(columns)` refuses by raising) is a `DataError` naming the file; a
    problem with one row (its number of fields, its video path) is that row's `Problem`, so a caller reports
    them all at once and decides whether the rest is usable. Column names are stripped and lower-cased; the
    first of `video_columns` in the header names each row's video, relative to the file's folder, which it
    may not leave (`resolve_video_path`). Blank lines are skipped; places read ``<name> line <n>`` (name:
    the file's name unless given) and a quoted field may span lines, so n is where the row starts.
    """
    root = file.parent.resolve()
    name = file.name if name is None else name
    try:
        # utf-8-sig: spreadsheets often write a byte-order mark before the header
        with open(file, newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is None:
                raise DataError(f"{file}: empty file (a header line is needed)")
            columns = [column.strip().lower() for column in header]
            checked = check_header(columns)
            video_column = next((c for c in video_columns if c in columns), None)
            if video_column is None:
                raise DataError(f"{file}: the header names no video column ({' or '.join(video_columns)})")
            rows: list[CsvRow | Problem] = []
            line = reader.line_num + 1
            for cells in reader:
                where, line = f"{name} line {line}", reader.line_num + 1
                if any(cell.strip() for cell in cells):
                    rows.append(_csv_row(where, cells, columns, video_column, root))
    except UnicodeDecodeError as error:
        raise DataError(f"{file}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    except csv.Error as error:
        raise DataError(f"{file}: malformed CSV ({error})") from None
    return checked, rows


def _csv_row(where: str, cells: list[str], columns: list[str], video_column: str, root: Path) -> CsvRow | Problem:
    if len(cells) != len(columns):
        return Problem(where, f"{len(cells)} fields, the header has {len(columns)}")
    fields = {column: cell.strip() for column, cell in zip(columns, cells)}
    try:
        video = resolve_video_path(root, fields[video_column])
    except ValueError as error:
        return Problem(where, str(error))
    return CsvRow(where, fields, fields[video_column], video)


def _read_csv(file: Path, stage: int, mos_range) -> list[tuple[str, Record | Problem]]:
    if stage == 2 and mos_range is None:
        raise DataError(f"{file}: a stage-2 CSV needs --mos-range LO HI (the scale of its mos column, e.g. 1 5)")

    def check_header(columns: list[str]) -> None:
        missing = [column for column in CSV_COLUMNS[stage] if column not in columns]
        if missing:
            expected = ",".join(CSV_COLUMNS[stage]) + (",kind" if stage == 1 else "")
            raise DataError(f"{file}: header lacks {', '.join(missing)}; stage {stage} expects {expected}")

    return [(row.where, row if isinstance(row, Problem) else _csv_record(row, stage, mos_range))
            for row in read_csv(file, check_header)[1]]


def _csv_record(row: CsvRow, stage: int, mos_range) -> Record | Problem:
    where, fields, video = row.where, row.fields, row.video
    if stage == 1:
        distortion = fields["distortion"]
        kind = (fields.get("kind") or "spatial").lower()
        if not distortion:
            return Problem(where, "empty distortion")
        if kind not in KINDS:
            return Problem(where, f"kind '{fields['kind']}' is neither spatial nor motion")
        turns = [("human", distortion_question(kind)), ("gpt", distortion_answer(distortion))]
        return Record(where, video, turns, kind)
    if stage == 2:
        lo, hi = mos_range
        try:
            mos = float(fields["mos"])
        except ValueError:
            return Problem(where, f"mos '{fields['mos']}' is not a number")
        if not lo <= mos <= hi:  # also rejects nan
            return Problem(where, f"mos {fields['mos']} is outside --mos-range {lo:g} {hi:g}")
        return Record(where, video, [("human", SCORE_QUESTION), ("gpt", answer_text(mos_to_level(mos, (lo, hi))))])
    question, answer = fields["question"], fields["answer"]
    if not question or not answer:
        return Problem(where, "empty question" if not question else "empty answer")
    if IMAGE_SLOT in question:
        return Problem(where, f"the question may not contain {IMAGE_SLOT}")
    return Record(where, video, [("human", question), ("gpt", answer)])


# --- JSON / JSONL -------------------------------------------------------------------------------

def _read_json_entries(file: Path, root: Path, stage: int, say, check_videos: bool):
    size = file.stat().st_size
    if size > MAX_JSON_BYTES:
        raise DataError(f"{file}: {size / 2**30:.1f} GiB; JSON data files are read whole and may be at most "
                        f"{MAX_JSON_BYTES / 2**30:.0f} GiB: split it into several runs")
    progress = say if size >= BIG_FILE_BYTES else lambda line: None
    progress(f"reading {file.name} ({size / 2**20:.0f} MiB)")
    items = _read_jsonl(file) if file.suffix.lower() == ".jsonl" else _read_json_array(file)
    progress(f"read {len(items)} records; checking them" + (" and their videos" if check_videos else ""))
    return [(where, item if isinstance(item, Problem) else _json_record(where, item, root, stage))
            for where, item in items]


def _read_text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise DataError(f"{file}: not UTF-8 text ({error.reason} at byte {error.start})") from None


def _read_jsonl(file: Path) -> list[tuple[str, object]]:
    items = []
    for number, line in enumerate(_read_text(file).splitlines(), 1):
        if not line.strip():
            continue
        where = f"{file.name} line {number}"
        try:
            items.append((where, parse_json(line)))
        except ValueError as error:
            reason = f"{error.msg} at column {error.colno}" if isinstance(error, json.JSONDecodeError) else error
            items.append((where, Problem(where, f"not valid JSON ({reason})")))
    return items


def _read_json_array(file: Path) -> list[tuple[str, object]]:
    """Decode a top-level array element by element, so each record knows its index and line. Lines are
    counted on from the previous element, so the whole file is read once (linear in its size)."""
    text = _read_text(file)
    decoder = json.JSONDecoder()
    space = re.compile(r"\s*")
    counted, line = 0, 1  # `line` is the line number at offset `counted`

    def line_at(offset: int) -> int:
        nonlocal counted, line
        line += text.count("\n", counted, offset)
        counted = offset
        return line

    position = space.match(text).end()
    if not text.startswith("[", position):
        raise DataError(f"{file}: expected a JSON array of records")
    position = space.match(text, position + 1).end()
    items = []
    if text.startswith("]", position):
        return items
    while True:
        place = f"[{len(items)}] (line {line_at(position)})"
        try:
            item, end = decoder.raw_decode(text, position)
        except json.JSONDecodeError as error:
            raise DataError(f"{file}: not valid JSON ({error.msg} at line {error.lineno} column {error.colno})") \
                from None
        except RecursionError:
            raise DataError(f"{file}: record {place} is nested too deeply to be read") from None
        items.append((f"{file.name} {place}", item))
        position = space.match(text, end).end()
        if text.startswith(",", position):
            position = space.match(text, position + 1).end()
        elif text.startswith("]", position):
            if text[space.match(text, position + 1).end():]:
                raise DataError(f"{file}: unexpected text after the JSON array")
            return items
        else:
            raise DataError(f"{file}: not valid JSON (expected ',' or ']' at line {line_at(position)})")


def _json_record(where: str, item, root: Path, stage: int) -> Record | Problem:
    if not isinstance(item, dict):
        return Problem(where, "a record must be a JSON object")
    value = item.get("video", item.get("image"))
    if value is None:
        return Problem(where, "no 'image' (or 'video') field naming the video")
    if not isinstance(value, str):
        return Problem(where, "'image' must be one video path (lists of images are not supported)")
    try:
        video = resolve_video_path(root, value.strip())
    except ValueError as error:
        return Problem(where, str(error))
    conversations = item.get("conversations")
    if not isinstance(conversations, list) or len(conversations) < 2:
        return Problem(where, "'conversations' must be a list of at least two turns")
    turns = []
    for number, turn in enumerate(conversations):
        if not isinstance(turn, dict):
            return Problem(where, f"turn {number} is not an object")
        role = ROLE_ALIASES.get(str(turn.get("from", turn.get("role", ""))).lower())
        text = turn.get("value", turn.get("content"))
        expected = "human" if number % 2 == 0 else "gpt"
        if role != expected:
            return Problem(where, f"turn {number} must be from {expected} (turns alternate, human first)")
        if not isinstance(text, str) or not text.strip():
            return Problem(where, f"turn {number} has no text")
        if number > 0 and IMAGE_SLOT in text:
            return Problem(where, f"only the first turn may hold {IMAGE_SLOT} slots (turn {number} does)")
        turns.append((role, text))
    if turns[-1][0] != "gpt":
        return Problem(where, "the last turn must be from gpt (an answer to learn)")
    slots = turns[0][1].count(IMAGE_SLOT)
    if slots > 2:
        return Problem(where, f"the first turn holds {slots} {IMAGE_SLOT} slots; at most 2 (keyframes, motion)")
    kind = None
    if stage == 1:
        match = re.search(r"\b(spatial|motion)\s+distortion", turns[0][1], re.IGNORECASE)
        kind = match.group(1).lower() if match else None
    return Record(where, video, turns, kind)


# --- videos -------------------------------------------------------------------------------------

def _check_videos(entries: list[tuple[str, Record | Problem]], root: Path) -> None:
    """Replace records whose video is missing or undecodable by problems; each distinct file is probed once."""
    videos = sorted({entry.video for _, entry in entries if isinstance(entry, Record)})

    def check(video: Path) -> str | None:
        if not video.exists():
            return "file not found"
        if not video.is_file():
            return "not a file"
        return probe_video(video)

    # decoding a first frame is mostly I/O and FFmpeg, which runs without the GIL
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) + 2)) as pool:
        verdicts = dict(zip(videos, pool.map(check, videos)))
    for index, (where, entry) in enumerate(entries):
        if isinstance(entry, Record) and verdicts[entry.video]:
            shown = entry.video.relative_to(root)
            entries[index] = (where, Problem(where, f"video '{shown}': {verdicts[entry.video]}"))
