"""`vqa2 score --explain`: the score and the assistant's answer about what is wrong, from one decoded video."""

import csv
import io
import json

import numpy as np
import pytest

from vqa2cli.explain import Explainer, assistant_for


class Named:
    def __init__(self, name):
        self.name = name


def test_which_model_explains(tmp_path):
    loaded = []

    def load(name):
        loaded.append(name)
        return Named(name or "ask-default")

    tiny, ugc = Named("vqa2-tiny"), Named("vqa2-ugc-scorer")
    assert assistant_for(tiny, None, load) is tiny  # it answers questions too (registry tasks)
    assert assistant_for(ugc, None, load).name == "ask-default" and loaded == [None]  # a scorer only
    assert assistant_for(ugc, "vqa2-ugc-scorer", load) is ugc  # named explicitly: the same model, not loaded twice
    assert assistant_for(ugc, "some/assistant", load).name == "some/assistant"
    (tmp_path / "m").mkdir()
    mine = Named(str(tmp_path / "m"))
    assert assistant_for(mine, str(tmp_path / "." / "m"), load) is mine
    assert assistant_for(mine, None, load).name == "ask-default"  # a directory the registry does not know


@pytest.fixture(scope="module")
def short_clips(tmp_path_factory):
    """4 s, 12 fps, 128 px procedural texture (the length vqa2-tiny's answers were trained on), clean and with
    strong flicker throughout (a distortion vqa2-tiny names reliably), made with vqa2 synth's generators."""
    from vqa2cli.synth import AppliedDistortion, ContentSettings, DistortionRenderer, ProceduralClip, encode_clip

    root = tmp_path_factory.mktemp("explain")
    source = ProceduralClip("texture", np.random.default_rng(1), 128, 128, 48, ContentSettings())
    clean = [source.frame(i) for i in range(48)]
    flicker = DistortionRenderer(AppliedDistortion("flicker", 3.5, "whole"), np.random.default_rng(2), 128, 128,
                                 12.0, 48)
    encode_clip(root / "clean.mp4", iter(clean), 128, 128, 12.0)
    encode_clip(root / "flicker.mp4", (flicker(frame.copy(), i) for i, frame in enumerate(clean)), 128, 128, 12.0)
    return root / "clean.mp4", root / "flicker.mp4"


@pytest.fixture
def decodes(monkeypatch):
    """The paths load_video decodes, in order."""
    import vqa2cli.video

    calls, real = [], vqa2cli.video.load_video

    def counting(path, *args, **kwargs):
        calls.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(vqa2cli.video, "load_video", counting)
    return calls


def test_vqa2_tiny_scores_and_explains_from_one_decoding(vqa2, short_clips, decodes, monkeypatch):
    """Measured: 0.69, "The video has no visible distortion. Overall, the quality is high." and 0.35, "The
    video has strong flicker throughout the video. Overall, the quality is fair.\""""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # decoded in this process (--workers 0), where `decodes` counts them
    code, out, err = vqa2("score", *short_clips, "-m", "vqa2-tiny", "--explain", "--jsonl", "--workers", "0")
    assert code == 0, err
    clean, flicker = (json.loads(line) for line in out.splitlines())
    assert "flicker" not in clean["explanation"] and "flicker" in flicker["explanation"]
    assert clean["score"] > flicker["score"] + 0.2
    assert decodes == [str(path) for path in short_clips]  # one decoding pass per video for both models' work


def test_another_assistant_at_other_sizes_decodes_again(vqa2, short_clips, tiny_model_dir, decodes, monkeypatch):
    """The test model takes 56/32 px frames, vqa2-tiny 128/64: the assistant decodes the file at its sizes."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, out, err = vqa2("score", short_clips[1], "-m", tiny_model_dir, "--explain-model", "vqa2-tiny", "--csv")
    assert code == 0, err
    [row] = list(csv.DictReader(io.StringIO(out)))
    assert list(row)[-2:] == ["error", "explanation"] and "flicker" in row["explanation"]
    assert decodes == [str(short_clips[1])] * 2


def test_a_failed_explanation_keeps_the_score(tiny_model_dir, short_clips):
    from vqa2cli.batch import score_videos
    from vqa2cli.errors import InputError
    from vqa2cli.pipeline import load_model

    model = load_model(tiny_model_dir, device="cpu")

    def broken(record, sample):
        raise InputError(f"{record.path}: the assistant could not answer")

    [record] = score_videos(model, [str(short_clips[0])], after=broken)
    assert record.score is not None and record.explanation is None
    assert record.error == f"{short_clips[0]}: the assistant could not answer"
    explainer = Explainer(model, model, max_new_tokens=3)
    [record] = score_videos(model, [str(short_clips[0])], after=explainer, timeline=2.0)
    assert record.error is None and record.explanation and len(record.segments) == 2
