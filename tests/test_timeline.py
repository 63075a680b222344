"""`--timeline`: windows sampled like clips of their own from one decoding pass, streamed to the model; their
scores in every output format; the shipped vqa2-tiny sees damage in the later windows of a clip."""

import csv
import io
import json
import sys

import numpy as np
import pytest
import torch

from tests.fixtures.clips import make_clip
from vqa2cli.timeline import Window, WindowSampler, sparkline, worst, worst_text
from vqa2cli.video import Sampling, load_video

FRAMES = [np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(100)]


@pytest.fixture(scope="module")
def lossless(tmp_path_factory):
    """A 4 s, 25 fps clip of noise frames (ffv1: decoded exactly), and makers of its stretches as clips."""
    root = tmp_path_factory.mktemp("lossless")

    def cut(first, stop):
        path = root / f"cut-{first}-{stop}.nut"
        if not path.exists():
            make_clip(path, frames=stop - first, fps=25, pattern=lambda i, w, h: FRAMES[first + i])
        return path

    return cut(0, 100), cut


def _windows(path, sampling, seconds):
    windows = []
    sampler = WindowSampler(str(path), sampling, seconds, windows.append)
    whole = sampling.load(path, tap=sampler)
    sampler.close()
    return whole, windows


@pytest.mark.parametrize("seconds", [2.0, 2.5])
@pytest.mark.parametrize("sampling", [
    Sampling(56, 32, 2000, 40),  # sizes differ: keyframes and motion frames resized apart
    Sampling(32, 32, 2000, 40),  # same size: a keyframe is also its motion frame, the exact resize
    Sampling(32, 32, 16, 1),  # caps: the whole clip and each window subsample differently
    Sampling(48, 48, 8, 3),
    Sampling(32, 32, 2000, 40, keyframe_fragments=4),  # same size, but keyframes are crops of the 64x48 frames
    Sampling(32, 16, 2000, 40, keyframe_fragments=4, fragment_shifts=3),  # and cut at 9 places each
], ids=["sizes-differ", "same-size", "caps", "small-caps", "fragments", "shifted-fragments"])
def test_a_window_is_what_decoding_that_stretch_alone_gives(lossless, sampling, seconds):
    """Bitwise: each window's keyframes, motion frames and their indices equal load_video of the same frames
    written as a clip of their own; the whole clip's sample is untouched by the tap."""
    clip, cut = lossless
    whole, windows = _windows(clip, sampling, seconds)
    size = round(seconds * 25)
    bounds = [(first, min(first + size, 100)) for first in range(0, 100, size)]
    assert [(w.number, w.start, w.end) for w in windows] == [(i, a / 25, b / 25) for i, (a, b) in enumerate(bounds)]
    for window, (first, stop) in zip(windows, bounds):
        alone = sampling.load(cut(first, stop))
        assert torch.equal(window.sample.keyframes, alone.keyframes)
        views = window.sample.keyframe_views
        assert (views is not None) == (sampling.fragment_shifts > 1) == (alone.keyframe_views is not None)
        assert views is None or torch.equal(views, alone.keyframe_views)
        assert torch.equal(window.sample.motion, alone.motion)
        assert window.sample.keyframe_indices == alone.keyframe_indices
        assert window.sample.motion_indices == alone.motion_indices
        assert window.sample.num_frames == stop - first and (window.sample.width, window.sample.height) == (64, 48)
        assert window.sample.keyframe_fragments == sampling.keyframe_fragments
    plain = sampling.load(clip)
    assert torch.equal(whole.keyframes, plain.keyframes) and torch.equal(whole.motion, plain.motion)


def test_windows_leave_during_decoding(lossless):
    """Each window goes to the model as soon as the next one's first frame arrives, before decoding ends: the
    memory holds one window's frames, however long the video."""
    clip, _ = lossless
    seen, handed = [], []

    class Watched(WindowSampler):
        def frame(self, index, *args):
            seen.append(index)
            super().frame(index, *args)

    sampler = Watched(str(clip), Sampling(32, 32, 2000, 40), 1.0, lambda w: handed.append((w.number, seen[-1])))
    load_video(clip, 32, 32, tap=sampler)
    assert handed == [(0, 25), (1, 50), (2, 75)]  # window 3 is still being filled when decoding ends
    sampler.close()
    assert handed[-1] == (3, 99) and sampler.current is None


def test_sparkline_and_worst_window():
    segments = [{"start": 2.0 * i, "end": 2.0 * i + 2, "score": s, "level": "fair"} for i, s in
                enumerate([0.0, 0.13, 0.5, 0.999, 1.0, 0.3])]
    assert sparkline(segments) == "▁▂▅██▃"  # eighths of the 0..1 scale: int(8 * score), 1.0 in the top one
    assert worst(segments)["start"] == 0.0 and worst_text(segments[3:]) == "10.0-12.0 s: 0.300"
    # more windows than the width: each block is its group's worst window
    assert sparkline(segments, width=3) == "▁▅▃"


# ---- with models ------------------------------------------------------------------------------------


def test_score_videos_with_timeline(tiny_model_dir, lossless, tmp_path):
    from vqa2cli.batch import score_videos
    from vqa2cli.pipeline import load_model

    model = load_model(tiny_model_dir, device="cpu")
    clip, cut = lossless
    short = make_clip(tmp_path / "short.mp4", frames=30, fps=25)  # 1.2 s: one window shorter than asked
    missing = tmp_path / "missing.mp4"
    records = list(score_videos(model, [clip, missing, short], timeline=1.5, batch_size=2))
    assert [r.error is None for r in records] == [True, False, True]
    assert records[1].segments is None and records[1].error == f"{missing}: no such file"
    segments = records[0].segments
    assert [(s["start"], s["end"]) for s in segments] == [(0.0, 1.52), (1.52, 3.04), (3.04, 4.0)]
    assert [(s["start"], s["end"]) for s in records[2].segments] == [(0.0, 1.2)]
    for record in (records[0], records[2]):
        for s in record.segments:
            assert 0 <= s["score"] <= 1 and s["level"] in {"high", "good", "fair", "poor", "low"}
    # the whole-clip score is the one without --timeline, from the same single decoding pass
    assert records[0].score == pytest.approx(model.score(str(clip)).score, abs=1e-6)
    # a window scores as its stretch does, cut out and scored alone (1.5 s at 25 fps: 38 frames)
    assert segments[0]["score"] == pytest.approx(model.score(str(cut(0, 38))).score, abs=1e-5)
    assert segments[2]["score"] == pytest.approx(model.score(str(cut(76, 100))).score, abs=1e-5)


def test_cli_timeline_in_every_format(vqa2, tiny_model_dir, lossless):
    clip, _ = lossless
    code, out, err = vqa2("score", clip, "-m", tiny_model_dir, "--timeline", "--json")
    assert code == 0, err
    [record] = json.loads(out)
    assert [(s["start"], s["end"]) for s in record["segments"]] == [(0.0, 2.0), (2.0, 4.0)]
    code, out, _ = vqa2("score", clip, "-m", tiny_model_dir, "--timeline", "2", "--jsonl")
    assert json.loads(out)["segments"] == record["segments"]
    code, out, _ = vqa2("score", clip, "-m", tiny_model_dir, "--timeline", "--csv")
    [row] = list(csv.DictReader(io.StringIO(out)))
    assert list(row)[-2:] == ["error", "segments"]  # the usual columns keep their places
    assert json.loads(row["segments"]) == record["segments"]


@pytest.mark.parametrize("suffix", ["jsonl", "csv"])
def test_timeline_output_file_resumes(vqa2, tiny_model_dir, lossless, tmp_path, suffix):
    """--output FILE with --timeline: the records keep their segments in the file, --resume skips the videos it
    holds, and a CSV file's header (its segments column) is only this kind of run's."""
    clip, cut = lossless
    short = cut(0, 30)  # 1.2 s: one window
    records_file = tmp_path / f"scores.{suffix}"
    code, out, err = vqa2("score", clip, "-m", tiny_model_dir, "--timeline", "--output", records_file)
    assert code == 0 and out == "", err
    code, _, err = vqa2("score", clip, short, "-m", tiny_model_dir, "--timeline", "--output", records_file, "--resume")
    assert code == 0 and "1 video(s) already scored are skipped" in err, err
    text = records_file.read_text()
    if suffix == "jsonl":
        records = [json.loads(line) for line in text.splitlines()]
    else:
        records = [{**row, "segments": json.loads(row["segments"])} for row in csv.DictReader(io.StringIO(text))]
    assert [r["path"] for r in records] == [str(clip), str(short)]
    assert [[(s["start"], s["end"]) for s in r["segments"]] for r in records] == [[(0.0, 2.0), (2.0, 4.0)], [(0.0, 1.2)]]
    if suffix == "csv":  # the same file continued without --timeline would mix two kinds of rows
        code, _, err = vqa2("score", short, "-m", tiny_model_dir, "--output", records_file, "--resume")
        assert code == 2 and err.startswith(f"error: {records_file}: its columns are not this run's") and "\n" == err[-1]


def test_table_shows_a_sparkline_and_the_worst_window():
    from vqa2cli.cli import _score_columns
    from vqa2cli.output import TableWriter

    stream = io.StringIO()
    segments = [{"start": 0.0, "end": 2.0, "score": 0.9, "level": "high"},
                {"start": 2.0, "end": 4.0, "score": 0.2, "level": "poor"}]
    with TableWriter(stream, _score_columns(["high", "good", "fair", "poor", "low"], timeline=True)) as table:
        table.write({"path": "a.mp4", "score": 0.5, "level": "fair", "segments": segments})
    text = stream.getvalue()
    assert "█▂ 2.0-4.0 s: 0.200" in text


def test_plot_png_and_svg(vqa2, tiny_model_dir, lossless, tmp_path):
    pytest.importorskip("matplotlib")  # the plot extra; CI installs it with the test extra
    clip, _ = lossless
    png, svg = tmp_path / "t.png", tmp_path / "t.svg"
    code, out, err = vqa2("score", clip, clip, "-m", tiny_model_dir, "--plot", png, "--jsonl")
    assert code == 0, err
    assert all(json.loads(line)["segments"] for line in out.splitlines())  # --plot implies --timeline
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"plot of 2 timeline(s) written to {png}" in err
    code, _, err = vqa2("score", clip, "-m", tiny_model_dir, "--timeline", "1", "--plot", svg, "--quiet")
    assert code == 0 and err == "" and b"<svg" in svg.read_bytes()[:500]
    assert not list(tmp_path.glob("*.part"))


def test_plot_problems_stop_before_scoring(vqa2, tiny_model_dir, lossless, tmp_path, monkeypatch):
    clip, _ = lossless
    code, out, err = vqa2("score", clip, "-m", tiny_model_dir, "--plot", tmp_path / "t.jpg")
    assert code == 2 and out == "" and err == f"error: {tmp_path / 't.jpg'}: --plot writes .png, .svg, .pdf files, not .jpg\n"
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if the extra were not installed
    code, out, err = vqa2("score", clip, "-m", tiny_model_dir, "--plot", tmp_path / "t.png")
    assert code == 2 and out == ""
    assert err == "error: --plot needs matplotlib, which is not installed: pip install 'vqa2[plot]'\n"


@pytest.fixture(scope="module")
def damaged_second_half(tmp_path_factory):
    """8 s of procedural texture at 128 px, 12 fps, clean and with strong flicker (which vqa2-tiny sees on
    such clips) over the second half, made with vqa2 synth's generators, lossless: the first halves are the
    same frames."""
    from vqa2cli.synth import AppliedDistortion, ContentSettings, DistortionRenderer, ProceduralClip, encode_clip

    root = tmp_path_factory.mktemp("damage")
    size, fps, frames = 128, 12.0, 96
    source = ProceduralClip("texture", np.random.default_rng(1), size, size, frames, ContentSettings())
    clean = [source.frame(i) for i in range(frames)]
    flicker = DistortionRenderer(AppliedDistortion("flicker", 3.5, "second half"), np.random.default_rng(2), size,
                                 size, fps, frames)
    encode_clip(root / "clean.mp4", iter(clean), size, size, fps)
    encode_clip(root / "flicker.mp4", (flicker(frame.copy(), i) for i, frame in enumerate(clean)), size, size, fps)
    return root / "clean.mp4", root / "flicker.mp4"


def test_vqa2_tiny_sees_the_damage_in_the_later_windows(vqa2, damaged_second_half, monkeypatch):
    """Measured: clean windows 0.62 0.66 0.68 0.71, flickering ones 0.62 0.66 0.44 0.47."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, out, err = vqa2("score", *damaged_second_half, "-m", "vqa2-tiny", "--timeline", "--json")
    assert code == 0, err
    clean, damaged = ([s["score"] for s in record["segments"]] for record in json.loads(out))
    assert len(clean) == len(damaged) == 4
    assert damaged[:2] == pytest.approx(clean[:2], abs=1e-6)  # same frames, same windows
    assert max(damaged[2:]) < min(damaged[:2]) - 0.08 and max(damaged[2:]) < min(clean[2:]) - 0.08
    assert worst(json.loads(out)[1]["segments"])["start"] >= 4.0


def test_still_image_has_no_timeline(tmp_path):
    from PIL import Image

    from tests.fixtures.checkpoints import write_tiny_model_dir
    from vqa2cli.pipeline import load_model
    from vqa2cli.timeline import score_timeline

    Image.new("RGB", (40, 30), (10, 200, 30)).save(tmp_path / "p.png")
    model = load_model(write_tiny_model_dir(tmp_path / "m", images=True), device="cpu")
    sample, result, segments = score_timeline(model, tmp_path / "p.png")
    assert segments is None and 0 <= result.score <= 1 and sample.num_frames == 1


def test_segment_times_are_the_window_s():
    from vqa2cli.timeline import segment

    class Result:
        score, level = 0.25, " poor"

    window = Window(number=3, start=6.0, end=7.5, sample=None)
    assert segment(window, Result()) == {"start": 6.0, "end": 7.5, "score": 0.25, "level": "poor"}
