"""`vqa2 eval`: run a model over a labelled set and compute the standard metrics.

Two kinds of label file, told apart by the CSV header:
- scores: `path,mos` -> every video scored once; SRCC, PLCC, KRCC, RMSE (see `vqa2cli.metrics` for the
  protocol: PLCC and RMSE after the 4-parameter logistic fit, RMSE on the MOS scale);
- questions: `path,question,answer` -> every question asked; accuracy, overall and per answer kind
  (yes/no, option letter, open).
`video` is accepted for `path`, so `vqa2 synth`'s stage2.csv/stage3.csv can be evaluated as they are.
The file is read by `vqa2cli.data.read_csv` (the one CSV reader): paths are relative to the CSV's folder
and may not leave it; invalid rows refuse the file before anything runs. A video that is missing or fails to
decode or score is a failed prediction (counted, reported, left out of the metrics), never the end of the run.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from vqa2cli.errors import DataError

SCORE_COLUMNS = ("path", "mos")
QUESTION_COLUMNS = ("path", "question", "answer")


@dataclass
class LabelRow:
    path: str  # as written in the CSV (what prediction records show)
    video: Path  # resolved, inside the CSV's folder
    mos: Optional[float] = None
    question: Optional[str] = None
    answer: Optional[str] = None


@dataclass
class LabelSet:
    file: Path
    kind: str  # "scores" | "questions"
    rows: list = field(default_factory=list)


def read_labels(path) -> LabelSet:
    """Read and check a label CSV (`vqa2cli.data.read_csv`); DataError (one line, naming the file and the
    first invalid row's line) when it is unusable."""
    from vqa2cli.data import Problem, read_csv

    file = Path(path)
    if not file.is_file():
        raise DataError(f"{file}: no such file")

    def kind_of(columns: list[str]) -> str:
        named = {"path" if c == "video" else c for c in columns}
        if named.issuperset(QUESTION_COLUMNS):
            return "questions"
        if named.issuperset(SCORE_COLUMNS):
            return "scores"
        raise DataError(f"{file}: header '{','.join(columns)}' is neither path,mos (scores) nor path,question,answer")

    kind, rows = read_csv(file, kind_of, video_columns=("path", "video"), name=str(file))
    entries = [row if isinstance(row, Problem) else _label_row(row, kind) for row in rows]
    problems = [entry for entry in entries if isinstance(entry, Problem)]
    if problems:  # metrics over a silently thinned set would mislead: refuse, naming the first
        more = f" (and {len(problems) - 1} more invalid rows)" if len(problems) > 1 else ""
        raise DataError(f"{problems[0]}{more}")
    if not entries:
        raise DataError(f"{file}: no rows after the header")
    return LabelSet(file, kind, entries)


def _label_row(row, kind: str):
    """A checked `LabelRow` of a CSV row, or the row's `Problem`."""
    from vqa2cli.data import Problem

    if kind == "scores":
        text = row.fields["mos"]
        try:
            mos = float(text)
        except ValueError:
            return Problem(row.where, f"mos '{text}' is not a number")
        if not math.isfinite(mos):
            return Problem(row.where, f"mos '{text}' is not a finite number")
        return LabelRow(row.path, row.video, mos=mos)
    question, answer = row.fields["question"], row.fields["answer"]
    if not question or not answer:
        return Problem(row.where, f"empty {'question' if not question else 'answer'}")
    return LabelRow(row.path, row.video, question=question, answer=answer)


def evaluate_scores(model, labels: LabelSet, max_motion_frames=2000, on_record: Callable = None, batch_size=1,
                    workers=0, strict=False):
    """Score every video; returns (prediction records, summary). `on_record(record)` sees each as it ends."""
    from vqa2cli import metrics
    from vqa2cli.batch import score_videos

    records = []
    scores = score_videos(model, (str(row.video) for row in labels.rows), max_motion_frames=max_motion_frames,
                          batch_size=batch_size, workers=workers, strict=strict)
    try:
        for row, scored in zip(labels.rows, scores):
            error = scored.error.replace(str(row.video), row.path) if scored.error else None
            record = {"path": row.path, "mos": row.mos, "score": scored.score, "level": scored.level,
                      "seconds": scored.seconds, "warnings": scored.warnings, "error": error}
            records.append(record)
            if on_record:
                on_record(record)
    finally:
        scores.close()
    ok = [r for r in records if r["error"] is None]
    summary = _summary(model, labels, records, ok)
    if len(ok) < 2:
        summary["note"] = f"{len(ok)} video(s) scored: correlations need at least 2"
        summary.update(srcc=None, plcc=None, krcc=None, rmse=None, fit=None)
        return records, summary
    result = metrics.score_metrics([r["score"] for r in ok], [r["mos"] for r in ok])
    summary.update({k: result[k] for k in ("srcc", "plcc", "krcc", "rmse", "fit", "note")})
    summary["fit_params"] = result["fit_params"]
    return records, summary


def evaluate_questions(model, labels: LabelSet, max_motion_frames=2000, max_new_tokens=64,
                       on_record: Callable = None, workers=0, strict=False):
    """Ask every question, decoding each video once; returns (prediction records, summary)."""
    from vqa2cli import metrics
    from vqa2cli.batch import Prefetcher, damage_error, warnings_of

    by_video = {}
    for row in labels.rows:
        by_video.setdefault(row.video, []).append(row)

    records = []
    with Prefetcher((str(video) for video in by_video), model.sampling(max_motion_frames, views=False).load,
                    workers=workers) as prefetcher:
        for (video, rows), (_, sample, error, decode_seconds) in zip(by_video.items(), prefetcher):
            warnings = warnings_of(sample)
            if strict and warnings and error is None:
                error, sample = damage_error(video, warnings), None
            for row in rows:
                record = _answer(model, row, sample, warnings, error.replace(str(video), row.path) if error else None,
                                 max_new_tokens)
                if row is rows[0]:
                    record["seconds"] = round(record["seconds"] + decode_seconds, 3)
                records.append(record)
                if on_record:
                    on_record(record)
            del sample
    ok = [r for r in records if r["error"] is None]
    summary = _summary(model, labels, records, ok)
    summary.update(accuracy=None, yes_no_accuracy=None, option_accuracy=None, open_accuracy=None)
    if ok:
        result = metrics.accuracy([r["predicted"] for r in ok], [r["answer"] for r in ok])
        summary["accuracy"] = result["accuracy"]
        for kind, key in (("yes/no", "yes_no_accuracy"), ("option", "option_accuracy"), ("open", "open_accuracy")):
            if kind in result["by_kind"]:
                summary[key] = result["by_kind"][kind]["accuracy"]
        summary["by_kind"] = result["by_kind"]
    return records, summary


def _answer(model, row, sample, warnings, error, max_new_tokens) -> dict:
    """The prediction record of one question about a decoded video (or about one that failed: `error`)."""
    from vqa2cli import metrics
    from vqa2cli.batch import error_message
    from vqa2cli.errors import SetupError

    start = time.perf_counter()
    record = {"path": row.path, "question": row.question, "answer": row.answer, "predicted": None,
              "correct": None, "kind": metrics.answer_kind(row.answer), "seconds": 0.0, "warnings": warnings,
              "error": error}
    if sample is not None:
        try:
            record["predicted"] = model.ask(sample, row.question, max_new_tokens=max_new_tokens)
            record["correct"] = metrics.answer_matches(record["predicted"], row.answer)
        except SetupError:
            raise
        except Exception as failure:  # this question fails; the set goes on
            record["error"] = error_message(row.path, failure)
    record["seconds"] = round(time.perf_counter() - start, 3)
    return record


def _summary(model, labels, records, ok):
    return {
        "labels": str(labels.file),
        "kind": labels.kind,
        "model": getattr(model, "name", None),
        "items": len(records),
        "evaluated": len(ok),
        "failed": len(records) - len(ok),
    }


def evaluate(model, labels: LabelSet, max_motion_frames=2000, max_new_tokens=64, on_record: Callable = None,
             batch_size=1, workers=0, strict=False):
    """Run the evaluation the label file asks for: (prediction records, summary). `workers`: decode
    worker processes (0: a thread); `strict`: damaged videos are failed items (see `vqa2cli.batch`)."""
    if labels.kind == "scores":
        return evaluate_scores(model, labels, max_motion_frames, on_record, batch_size, workers, strict)
    return evaluate_questions(model, labels, max_motion_frames, max_new_tokens, on_record, workers, strict)


def prediction_columns(kind):
    """Columns of the per-item predictions file (CSV) for a label kind."""
    from vqa2cli.output import Column

    if kind == "scores":
        keys = ("path", "mos", "score", "level", "seconds", "warnings", "error")
    else:
        keys = ("path", "question", "answer", "predicted", "correct", "kind", "seconds", "warnings", "error")
    return [Column(key, key) for key in keys]


def summary_columns(kind):
    """Columns of the metrics summary (table/CSV on stdout)."""
    from vqa2cli.output import Column, fmt_float

    count = [Column("items", "Videos" if kind == "scores" else "Questions", justify="right"),
             Column("failed", "Failed", justify="right")]
    if kind == "scores":
        return [*count, *(Column(k, k.upper(), fmt_float(4), "right") for k in ("srcc", "plcc", "krcc")),
                Column("rmse", "RMSE", fmt_float(3), "right"), Column("fit", "Fit"),
                Column("model", "Model", in_table=False), Column("labels", "Labels", in_table=False),
                Column("note", "Note")]
    return [*count, Column("accuracy", "Accuracy", fmt_float(4), "right"),
            Column("yes_no_accuracy", "Yes/no", fmt_float(4), "right"),
            Column("option_accuracy", "Option", fmt_float(4), "right"),
            Column("open_accuracy", "Open", fmt_float(4), "right"),
            Column("model", "Model", in_table=False), Column("labels", "Labels", in_table=False)]
