"""The shipped `vqa2-tiny` model (weights/vqa2-tiny, built by tools/build_vqa2_tiny.py): it loads offline,
is listed by `vqa2 models`, scores clips the test makes, its scores fall with damage it never saw, asked
what is wrong it names five of the eight distortions, and it says whether a named distortion is there.

The damage test is a real check of the trained weights: clean clips must beat the same clips with a strong
distortion by a clear margin, which random weights (near-uniform level probabilities, gaps ~0.001) cannot do.
Asserted for all eight distortions, clip by clip except blur, which the shipped model misses on one of the four
clips (README, vqa2-tiny) and which is asserted on average.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from vqa2cli.config import LEVEL_WORDS
from vqa2cli.registry import get_entry, resolve

NAME = "vqa2-tiny"
# Content the model was not trained on: its own seed, and texture detail / speeds outside the build's ranges.
CONTENT = ("texture", "gradient", "zoom", "shapes")
DAMAGE = ("blur", "noise", "blocking", "overexposure", "underexposure", "stutter", "flicker", "shake")
AVERAGE_ONLY = {"blur"}  # missed on the texture clip
# Score gaps clean - damaged on the 0..1 score (clean clips score 0.68-0.87); measured per clip: stutter
# 0.17-0.33 (mean 0.24), the other six 0.18-0.76 (means 0.34-0.56); blur 0.003, 0.13, 0.15, 0.31 (mean 0.15).
MIN_GAP, MEAN_GAP = 0.05, 0.12
# Asked what is wrong, it names these five on every clip (measured: 20 of 20); stutter 3 of 4, shake 2 of 4
# and blur 1 of 4 (it says compression blocking, or no distortion). Clean clips: "no visible distortion" on 2 of
# 4 (the other two: strong blur, strong compression blocking).
EXPLAINED = ("noise", "blocking", "overexposure", "underexposure", "flicker")
MIN_EXPLAINED, MIN_CLEAN_EXPLAINED = 18, 2
# "Is there <distortion> in this video?" about the same clips (80 questions, see the test): measured 72 right
# (the clip's own distortion 31 of 32, another one 30 of 32, clean clips 11 of 16: it finds blur in all four);
# the model before the yes/no pass got 46 (it said Yes to 26 of the 32 absent distortions).
YES_NO_CLEAN_QUESTIONS = ("blur", "noise", "stutter", "flicker")
MIN_YES_NO_RIGHT = 68


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny():
    from vqa2cli.pipeline import load_model

    return load_model(NAME, device="cpu")


@pytest.fixture(scope="module")
def damage_clips(tmp_path_factory):
    """For each content kind: a clean 4 s, 12 fps, 128 px clip and the same clip with each distortion of
    DAMAGE at severity 3.5 over its whole length, made with vqa2 synth's own generators (lossless H.264)."""
    from vqa2cli.synth import AppliedDistortion, ContentSettings, DistortionRenderer, ProceduralClip, encode_clip

    folder = tmp_path_factory.mktemp("tiny-damage")
    size, fps, frames = 128, 12.0, 48
    settings = ContentSettings(speed=(1.5, 2.5), detail=(1.6, 1.9), objects=(4, 7))
    clips = {}
    for k, kind in enumerate(CONTENT):
        source = ProceduralClip(kind, np.random.default_rng(7000 + k), size, size, frames, settings)
        clean = [source.frame(i) for i in range(frames)]
        versions = {"clean": clean}
        for name in DAMAGE:
            renderer = DistortionRenderer(AppliedDistortion(name, 3.5, "whole"), np.random.default_rng(8000 + k),
                                          size, size, fps, frames)
            versions[name] = [renderer(frame.copy(), i) for i, frame in enumerate(clean)]
        for version, images in versions.items():
            path = folder / f"{kind}-{version}.mp4"
            encode_clip(path, iter(images), size, size, fps)
            clips[(kind, version)] = path
    return clips


def test_registered_and_listed_offline():
    entry = get_entry(NAME)
    assert entry is not None and entry.path and entry.repo_id is None
    assert NAME not in (entry.default_for or ())  # the published checkpoints stay the defaults
    out = subprocess.run([sys.executable, "-m", "vqa2cli", "models", "--json"], capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=True).stdout
    listed = {m["name"]: m for m in json.loads(out)}
    assert listed[NAME]["present"] is True and listed[NAME]["size_bytes"] > 0


def test_shipped_files_and_size():
    path = resolve(NAME).path
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md"):
        assert (path / name).is_file(), name
    assert (path / "model.safetensors").stat().st_size <= 30 * 2**20
    assert json.loads((path / "config.json").read_text())["format"] == "vqa2"


def test_loads_with_single_token_level_words(tiny):
    for word in LEVEL_WORDS:
        assert len(tiny.tokenizer(word, add_special_tokens=False)["input_ids"]) == 1


def test_cli_scores_a_clip_offline(damage_clips):
    clip = damage_clips[("texture", "clean")]
    done = subprocess.run([sys.executable, "-m", "vqa2cli", "score", str(clip), "--model", NAME, "--json"],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    (record,) = json.loads(done.stdout)
    assert 0.0 <= record["score"] <= 1.0 and record["level"] in {w.strip() for w in LEVEL_WORDS}


def test_scores_fall_with_damage(tiny, damage_clips):
    scores = {key: tiny.score(str(path)).score for key, path in damage_clips.items()}
    for name in DAMAGE:
        gaps = [scores[(kind, "clean")] - scores[(kind, name)] for kind in CONTENT]
        assert np.mean(gaps) > MEAN_GAP, (name, scores)
        if name not in AVERAGE_ONLY:
            assert min(gaps) > MIN_GAP, (name, scores)


def test_explains_what_is_wrong(tiny, damage_clips):
    """Stage 3's open question, asked of the unseen clips: the answer names the distortion, or none."""
    from vqa2cli.synth import DISTORTIONS, NO_DISTORTION, PROBLEMS_QUESTION

    def answer(kind, version):
        return tiny.ask(str(damage_clips[(kind, version)]), PROBLEMS_QUESTION, max_new_tokens=40)

    damaged = {(kind, name): answer(kind, name) for kind in CONTENT for name in EXPLAINED}
    named = [key for key, text in damaged.items() if DISTORTIONS[key[1]].phrase in text]
    assert len(named) >= MIN_EXPLAINED, damaged
    clean = {kind: answer(kind, "clean") for kind in CONTENT}
    assert sum(NO_DISTORTION in text for text in clean.values()) >= MIN_CLEAN_EXPLAINED, clean


def test_answers_whether_a_distortion_is_present(tiny, damage_clips):
    """"Is there <distortion> in this video?" about the unseen clips: Yes for the clip's distortion, No for
    another one, No for clean clips, judged as `vqa2 eval` judges yes/no. Random weights, or a model that
    always says Yes, get about half."""
    from vqa2cli.metrics import answer_matches
    from vqa2cli.synth import DISTORTIONS

    def right(kind, version, asked, truth):
        question = f"Is there {DISTORTIONS[asked].phrase} in this video?"
        return answer_matches(tiny.ask(str(damage_clips[(kind, version)]), question, max_new_tokens=4), truth)

    results = []
    for kind in CONTENT:
        for i, name in enumerate(DAMAGE):
            results.append(right(kind, name, name, "Yes."))
            results.append(right(kind, name, DAMAGE[(i + 3) % len(DAMAGE)], "No."))
        results += [right(kind, "clean", asked, "No.") for asked in YES_NO_CLEAN_QUESTIONS]
    assert sum(results) >= MIN_YES_NO_RIGHT, f"{sum(results)} of {len(results)} right"
