"""`vqa2 compare A B [B2 ...]`: differences B - A of reference-free scores, verdicts, ranks, per window."""

import csv
import io
import json
from fractions import Fraction

import numpy as np
import pytest

from vqa2cli.compare import best, compare_records, windows_text


def _record(path, score, segments=None, error=None):
    return {"path": path, "score": score, "level": None if score is None else "fair", "segments": segments,
            "model": "m", "error": error}


def _windows(*scores):
    return [{"start": 2.0 * i, "end": 2.0 * i + 2, "score": s, "level": "fair"} for i, s in enumerate(scores)]


def test_differences_verdicts_and_ranks():
    rows = compare_records([_record("a", 0.50), _record("b", 0.75), _record("c", 0.49), _record("d", 0.25),
                            _record("e", 0.75), _record("f", None, error="f: no such file")], margin=0.02)
    assert [row["difference"] for row in rows] == [None, 0.25, pytest.approx(-0.01), -0.25, 0.25, None]
    assert [row["verdict"] for row in rows] == ["reference", "better", "same", "worse", "better", None]
    assert [row["rank"] for row in rows] == [3, 1, 4, 5, 1, None]  # equal scores share a rank
    assert all(row["reference"] == "a" for row in rows) and rows[5]["error"] == "f: no such file"
    assert best(rows)["path"] == "b"  # the first of equals


def test_a_failed_reference_leaves_no_differences():
    rows = compare_records([_record("a", None, error="a: empty file (0 bytes)"), _record("b", 0.6)])
    assert rows[1]["difference"] is None and rows[1]["verdict"] is None and rows[1]["rank"] == 1
    assert best(compare_records([_record("x", None)])) is None


def test_windows_pair_by_position():
    rows = compare_records([_record("a", 0.8, _windows(0.8, 0.9, 0.7)), _record("b", 0.5, _windows(0.8, 0.4))])
    assert [w["difference"] for w in rows[0]["segments"]] == [None, None, None]  # the reference's own windows
    assert [w["difference"] for w in rows[1]["segments"]] == [0.0, pytest.approx(-0.5)]
    longer = compare_records([_record("a", 0.8, _windows(0.8)), _record("b", 0.5, _windows(0.6, 0.4))])
    assert longer[1]["segments"][1]["difference"] is None  # past the end of the reference
    assert windows_text(rows[1]["segments"]) == "1/2 behind, most at 2.0-4.0 s (-0.500)"
    assert windows_text(longer[1]["segments"]) == "1/1 behind, most at 0.0-2.0 s (-0.200)"


def test_help_says_it_is_not_full_reference(vqa2):
    code, out, _ = vqa2("compare", "--help")
    assert code == 0 and "NOT a full-reference metric" in out and "pixels of A and B are never" in out
    code, _, err = vqa2("compare", "only-one.mp4")
    assert code == 2 and "Missing argument 'B...'" in err


@pytest.fixture(scope="module")
def encodes(tmp_path_factory):
    """One 4 s, 12 fps, 128 px procedural source (vqa2 synth's), encoded twice with x264: CRF 18, and CRF 45
    with the deblocking filter off (blocking: vqa2-tiny scores it lower)."""
    import av

    from vqa2cli.synth import ContentSettings, ProceduralClip

    root = tmp_path_factory.mktemp("encodes")
    source = ProceduralClip("texture", np.random.default_rng(1), 128, 128, 48, ContentSettings())
    frames = [np.clip(np.rint(source.frame(i)), 0, 255).astype(np.uint8) for i in range(48)]
    paths = {}
    for name, crf, params in (("crf18", 18, ""), ("crf45", 45, "no-deblock=1")):
        paths[name] = root / f"{name}.mp4"
        with av.open(str(paths[name]), "w") as container:
            stream = container.add_stream("libx264", rate=Fraction(12))
            stream.width = stream.height = 128
            stream.pix_fmt = "yuv420p"
            stream.options = {"crf": str(crf), "preset": "veryfast", **({"x264-params": params} if params else {})}
            for frame in frames:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode(None))
    return paths


def test_vqa2_tiny_picks_the_clean_encode(vqa2, encodes, monkeypatch):
    """Measured: CRF 18 0.69, CRF 45 without deblocking 0.41."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for order in (("crf18", "crf45"), ("crf45", "crf18")):
        code, out, err = vqa2("compare", *(encodes[name] for name in order), "-m", "vqa2-tiny", "--json")
        assert code == 0, err
        rows = {row["path"]: row for row in json.loads(out)}
        clean, damaged = rows[str(encodes["crf18"])], rows[str(encodes["crf45"])]
        assert clean["rank"] == 1 and damaged["rank"] == 2 and clean["score"] - damaged["score"] > 0.08
        assert (damaged if order[0] == "crf18" else clean)["verdict"] == ("worse" if order[0] == "crf18" else "better")
        assert f"best: {encodes['crf18']}" in err


def test_cli_compare_per_window_and_csv(vqa2, encodes, tiny_model_dir):
    code, out, err = vqa2("compare", encodes["crf18"], encodes["crf45"], encodes["crf18"].parent / "missing.mp4",
                          "-m", tiny_model_dir, "--timeline", "--csv")
    assert code == 1 and "error: " in err
    rows = list(csv.DictReader(io.StringIO(out)))
    assert list(rows[0]) == ["path", "score", "level", "difference", "verdict", "rank", "reference", "model",
                             "error", "segments"]
    windows = json.loads(rows[1]["segments"])
    assert [(w["start"], w["end"]) for w in windows] == [(0.0, 2.0), (2.0, 4.0)]
    reference = json.loads(rows[0]["segments"])
    for window, base in zip(windows, reference):
        assert window["difference"] == pytest.approx(window["score"] - base["score"])
    assert rows[2]["error"].endswith("missing.mp4: no such file") and rows[2]["verdict"] == ""
