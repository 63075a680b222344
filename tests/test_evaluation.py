"""vqa2 eval: label files, the protocol on a model whose answers are known, failures, the command."""

import csv
import json
import math
import shutil
from types import SimpleNamespace

import pytest

from vqa2cli import evaluation, metrics, synth
from vqa2cli.config import tiny_config
from vqa2cli.errors import DataError


@pytest.fixture(scope="module")
def synth_set(tmp_path_factory):
    """A tiny synthetic set: 6 clips of 64x64, 2 s at 8 fps, with labels.csv and stage3.csv."""
    out = tmp_path_factory.mktemp("eval") / "set"
    synth.generate_dataset(out, synth.SynthSettings(count=6, seed=11, width=64, height=64, fps=8.0, seconds=2.0))
    return out


class KnownModel:
    """Model-like: scores are a known, monotone, non-linear function of each video's MOS; answers
    are right except for the questions in `wrong`."""

    name = "known"

    def __init__(self, mos_by_file, answers=None, wrong=()):
        self.config = tiny_config()
        self.mos_by_file = mos_by_file
        self.answers = answers or {}
        self.wrong = set(wrong)

    def sampling(self, max_motion_frames=None, max_keyframes=None, views=True):
        return self.config.sampling(max_motion_frames, max_keyframes, views)

    def score(self, sample, prompt=None):
        mos = self.mos_by_file[sample.path]
        # the inverse of the logistic 100 / (1 + exp(-(x - 0.5) / 0.1)): a fit recovers MOS exactly
        score = 0.5 - 0.1 * math.log(100 / mos - 1)
        return SimpleNamespace(score=score, level="fair", probs={"fair": 1.0})

    def ask(self, sample, question, max_new_tokens=512, on_text=None):
        if question in self.wrong:
            return "Maybe."
        return self.answers[(sample.path, question)]


def write_csv(path, header, rows):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_score_protocol_on_a_known_model(synth_set):
    labels = evaluation.read_labels(synth_set / "labels.csv")
    assert labels.kind == "scores" and len(labels.rows) == 6
    model = KnownModel({str(row.video): row.mos for row in labels.rows})
    seen = []
    records, summary = evaluation.evaluate(model, labels, on_record=seen.append)
    assert seen == records and len(records) == 6
    assert summary["failed"] == 0 and summary["evaluated"] == 6
    assert summary["srcc"] == pytest.approx(1.0) and summary["krcc"] == pytest.approx(1.0)
    assert summary["fit"] == "logistic4" and summary["plcc"] > 0.999 and summary["rmse"] < 1.0
    assert [r["path"] for r in records] == [row.path for row in labels.rows]  # as written in the CSV


def test_bad_videos_are_failed_rows_not_crashes(synth_set, tmp_path):
    folder = tmp_path / "set"
    shutil.copytree(synth_set, folder)
    (folder / "videos" / "broken.mp4").write_bytes(b"\x00" * 100)
    rows = list(csv.reader(open(folder / "labels.csv")))[1:]
    rows += [["videos/missing.mp4", "50"], ["videos/broken.mp4", "40"]]
    labels = evaluation.read_labels(write_csv(folder / "with-bad.csv", ["path", "mos"], rows))
    model = KnownModel({str(row.video): row.mos for row in labels.rows})
    records, summary = evaluation.evaluate(model, labels)
    assert summary["failed"] == 2 and summary["evaluated"] == 6
    failed = [r for r in records if r["error"]]
    assert [r["path"] for r in failed] == ["videos/missing.mp4", "videos/broken.mp4"]
    assert all(r["path"] in r["error"] and str(folder) not in r["error"] for r in failed)  # paths as in the CSV
    assert summary["srcc"] == pytest.approx(1.0)  # the metrics use the videos that were scored


def test_question_protocol_on_a_known_model(synth_set):
    labels = evaluation.read_labels(synth_set / "stage3.csv")  # video,question,answer: `video` means path
    assert labels.kind == "questions"
    answers = {(str(row.video), row.question): row.answer for row in labels.rows}
    wrong = {labels.rows[0].question}  # a yes/no question (they come first): answered "Maybe." everywhere
    assert labels.rows[0].question.startswith("Is there")
    model = KnownModel({}, answers, wrong=wrong)
    records, summary = evaluation.evaluate(model, labels)
    expected = sum(row.question not in wrong for row in labels.rows) / len(labels.rows)
    assert summary["accuracy"] == pytest.approx(expected) and expected < 1
    assert summary["open_accuracy"] == 1.0 and 0 < summary["yes_no_accuracy"] < 1
    assert all(r["correct"] == metrics.answer_matches(r["predicted"], r["answer"]) for r in records)


@pytest.mark.parametrize(
    "text, message",
    [
        ("path,score\na.mp4,1\n", "neither path,mos"),
        ("path,mos\n../a.mp4,1\n", "line 2: video path '../a.mp4' leaves"),
        ("path,mos\n/etc/a.mp4,1\n", "absolute"),
        ("path,mos\na.mp4,1\nb.mp4,good\n", "line 3: mos 'good' is not a number"),
        ("path,mos\na.mp4,nan\n", "not a finite number"),
        ("path,mos\n", "no rows"),
        ("", "empty file"),
        ("path,question,answer\na.mp4,,Yes\n", "line 2: empty question"),
        ("path,mos\na.mp4,1,2\n", "line 2: 3 fields"),
        ("path,mos\na.mp4,x\n../b.mp4,1\nc.mp4,\n", r"line 2: mos 'x' is not a number \(and 2 more invalid rows\)$"),
    ],
)
def test_unusable_label_files_are_one_line_errors(tmp_path, text, message):
    (tmp_path / "labels.csv").write_text(text)
    with pytest.raises(DataError, match=message) as error:
        evaluation.read_labels(tmp_path / "labels.csv")
    assert "\n" not in str(error.value) and "labels.csv" in str(error.value)


# ---------------------------------------------------------------- the command, with the tiny model


def test_command_scores_a_set_with_the_tiny_model(synth_set, tmp_path, tiny_model_dir, vqa2):
    predictions = tmp_path / "preds.csv"
    code, out, err = vqa2("eval", synth_set / "labels.csv", "--model", tiny_model_dir,
                         "--device", "cpu", "--json", "--predictions", predictions, "--batch-size", 2)
    assert code == 0, err
    (summary,) = json.loads(out)
    assert summary["kind"] == "scores" and summary["items"] == 6 and summary["failed"] == 0
    for key in ("srcc", "plcc", "krcc"):
        assert summary[key] is None or -1 <= summary[key] <= 1  # random weights: any correlation, but defined
    assert summary["rmse"] >= 0 and summary["predictions"] == str(predictions)
    rows = list(csv.DictReader(open(predictions)))
    assert [row["path"] for row in rows] == [row["path"] for row in csv.DictReader(open(synth_set / "labels.csv"))]
    assert all(0 <= float(row["score"]) <= 1 and not row["error"] for row in rows)
    # the same scores give the same metrics through the library
    scores = [float(row["score"]) for row in rows]
    mos = [float(row["mos"]) for row in rows]
    assert summary["srcc"] == pytest.approx(metrics.srcc(scores, mos), nan_ok=True)


def test_command_reports_failures_and_questions(synth_set, tmp_path, tiny_model_dir, vqa2):
    folder = tmp_path / "set"
    shutil.copytree(synth_set, folder)
    first = list(csv.reader(open(folder / "stage3.csv")))[1:3]
    questions = write_csv(folder / "q.csv", ["path", "question", "answer"], [*first, ["videos/none.mp4", "Is it?", "No."]])
    code, out, err = vqa2("eval", questions, "--model", tiny_model_dir, "--device", "cpu",
                         "--max-new-tokens", 4, "--jsonl", "-q")
    assert code == 1  # one video is missing
    summary = json.loads(out)
    assert summary["kind"] == "questions" and summary["items"] == 3 and summary["failed"] == 1
    assert 0 <= summary["accuracy"] <= 1
    assert "videos/none.mp4" in err and err.count("\n") == 1
    saved = list(csv.DictReader(open(folder / "q.predictions.csv")))  # default: beside the labels
    assert len(saved) == 3 and saved[2]["error"] and saved[0]["predicted"] is not None


def test_command_usage_errors_exit_2(tmp_path, vqa2):
    (tmp_path / "bad.csv").write_text("file,rating\nx.mp4,3\n")
    code, _, err = vqa2("eval", tmp_path / "bad.csv")
    assert code == 2 and "neither path,mos" in err and err.count("\n") == 1
    code, _, err = vqa2("eval", tmp_path / "missing.csv")
    assert code == 2 and "no such file" in err


def test_damaged_videos_carry_warnings_and_fail_under_strict(synth_set, tmp_path):
    from tests.fixtures.clips import make_damaged_clip

    folder = tmp_path / "set"
    shutil.copytree(synth_set, folder)
    make_damaged_clip(folder / "videos" / "cut.mp4")
    rows = list(csv.reader(open(folder / "labels.csv")))[1:] + [["videos/cut.mp4", "50"]]
    labels = evaluation.read_labels(write_csv(folder / "with-cut.csv", ["path", "mos"], rows))
    model = KnownModel({str(row.video): row.mos for row in labels.rows})
    records, summary = evaluation.evaluate(model, labels, workers=2)
    *clean, cut = records
    assert summary["failed"] == 0 and summary["evaluated"] == 7 and cut["error"] is None
    assert len(cut["warnings"]) == 1 and "file truncated or damaged" in cut["warnings"][0]
    assert all(r["warnings"] == [] for r in clean)
    records, summary = evaluation.evaluate(model, labels, strict=True)
    assert summary["failed"] == 1 and summary["srcc"] == pytest.approx(1.0)  # left out of the metrics
    assert records[-1]["error"].startswith("videos/cut.mp4: refused as damaged (strict): ")

    questions = [["videos/cut.mp4", "Is it cut?", "Yes."], ["videos/cut.mp4", "How long?", "Short."]]
    labels = evaluation.read_labels(write_csv(folder / "q.csv", ["path", "question", "answer"], questions))
    video = str(labels.rows[0].video)
    model = KnownModel({}, {(video, q): a for _, q, a in questions})
    records, summary = evaluation.evaluate(model, labels, workers=1)
    assert summary["accuracy"] == 1.0 and all(r["warnings"] == cut["warnings"] for r in records)
    records, summary = evaluation.evaluate(model, labels, strict=True)
    assert summary["failed"] == 2 and all("refused as damaged" in r["error"] for r in records)


def test_command_predictions_carry_warnings(synth_set, tmp_path, tiny_model_dir, vqa2):
    from tests.fixtures.clips import make_damaged_clip

    folder = tmp_path / "set"
    shutil.copytree(synth_set, folder)
    make_damaged_clip(folder / "videos" / "cut.mp4")
    rows = list(csv.reader(open(folder / "labels.csv")))[1:3] + [["videos/cut.mp4", "50"]]
    labels = write_csv(folder / "with-cut.csv", ["path", "mos"], rows)
    code, out, err = vqa2("eval", labels, "--model", tiny_model_dir, "--jsonl", "--workers", 2,
                         "--predictions", tmp_path / "p.jsonl")
    assert code == 0, err
    predictions = [json.loads(line) for line in open(tmp_path / "p.jsonl")]
    assert [p["warnings"] != [] for p in predictions] == [False, False, True]
    assert f"warning: videos/cut.mp4: {predictions[2]['warnings'][0]}" in err.splitlines()
    code, out, err = vqa2("eval", labels, "--model", tiny_model_dir, "--jsonl", "--strict", "--workers", 0)
    assert code == 1 and json.loads(out)["failed"] == 1
    saved = list(csv.DictReader(open(folder / "with-cut.predictions.csv")))
    assert saved[2]["error"].startswith("videos/cut.mp4: refused as damaged (strict): ")
    assert saved[2]["warnings"] == predictions[2]["warnings"][0]
