"""The shipped `vqa2-tiny` model (weights/vqa2-tiny, built by tools/build_vqa2_tiny.py): it loads offline,
is listed by `vqa2 models`, scores clips the test makes, its scores fall as real-style damage of photographs it
never saw rises (an x264 CRF ladder and a Gaussian blur ladder), they fall with seven of vqa2 synth's eight
distortions on procedural clips it never saw, and it answers the yes/no and open questions better than a
constant answer would.

The damage tests are real checks of the trained weights: random weights give near-uniform level probabilities
(gaps ~0.001), the first vqa2-tiny, trained on procedural content, ranked the CRF ladder backwards, v2
lowered its score by only 0.01-0.03 over the whole blur ladder, and v3 by only 0.03 for procedural noise.
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
# Held-out photographs (scikit-image's, never in training) panned for 2 s, clean and at each level of the
# real-footage set's ladders (tools/real_footage.py). Measured Spearman(level, score) per photo: compression
# -1.0, -1.0, -0.9 (clean to CRF 49: 0.80 -> 0.62, 0.81 -> 0.50, 0.69 -> 0.56); blur -1.0, -1.0, -0.9
# (0.80 -> 0.42, 0.81 -> 0.43, 0.69 -> 0.43).
LADDER_PHOTOS = ("astronaut", "chelsea", "coffee")
LADDER_FAMILIES = ("compression", "blur")
MAX_LADDER_SRCC = -0.6
# Content the model was not trained on: procedural clips at 128 px, its own seed, each clean and with each of
# the first vqa2-tiny's eight distortions.
CONTENT = ("texture", "gradient", "zoom", "shapes")
DISTORTED = ("blur", "noise", "blocking", "overexposure", "underexposure", "stutter", "flicker", "shake")
# Over-exposure is not here: it raises this model's score on two of the four clips (docs/vqa2-tiny.md).
DAMAGE = ("blur", "noise", "blocking", "underexposure", "stutter", "flicker", "shake")
# Score gaps clean - damaged (clean clips score 0.45-0.93), measured per clip: blur 0.08-0.58 (mean 0.29),
# under-exposure 0.08-0.50 (mean 0.29), the other five 0.20-0.74 (means 0.36-0.49).
MIN_GAP, MEAN_GAP = 0.05, 0.12
# Asked what is wrong, it names blur, noise, blocking, under-exposure and flicker on every procedural clip
# (measured 20 of 20; stutter, shake and over-exposure 1 of 4 each). It calls two of the four clean procedural
# clips damaged, so "no visible distortion" is checked on the clean photographs: measured 2 of 3 (chelsea:
# "slight compression artifacts").
EXPLAINED = ("blur", "noise", "blocking", "underexposure", "flicker")
MIN_EXPLAINED, MIN_CLEAN_EXPLAINED = 18, 2
# "Is there <distortion> in this video?" about the same clips (80 questions, see the test): measured 66 right
# (the clip's own distortion 28 of 32, another one 25 of 32, clean clips 13 of 16); always "No." gets 48,
# always "Yes." 32.
YES_NO_CLEAN_QUESTIONS = ("blur", "noise", "stutter", "flicker")
MIN_YES_NO_RIGHT = 62


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
    DISTORTED at severity 3.5 over its whole length, made with vqa2 synth's own generators (lossless H.264)."""
    from vqa2cli.synth import AppliedDistortion, ContentSettings, DistortionRenderer, ProceduralClip, encode_clip

    folder = tmp_path_factory.mktemp("tiny-damage")
    size, fps, frames = 128, 12.0, 48
    settings = ContentSettings(speed=(1.5, 2.5), detail=(1.6, 1.9), objects=(4, 7))
    clips = {}
    for k, kind in enumerate(CONTENT):
        source = ProceduralClip(kind, np.random.default_rng(7000 + k), size, size, frames, settings)
        clean = [source.frame(i) for i in range(frames)]
        versions = {"clean": clean}
        for name in DISTORTED:
            renderer = DistortionRenderer(AppliedDistortion(name, 3.5, "whole"), np.random.default_rng(8000 + k),
                                          size, size, fps, frames)
            versions[name] = [renderer(frame.copy(), i) for i, frame in enumerate(clean)]
        for version, images in versions.items():
            path = folder / f"{kind}-{version}.mp4"
            encode_clip(path, iter(images), size, size, fps)
            clips[(kind, version)] = path
    return clips


@pytest.fixture(scope="module")
def ladder_clips(tmp_path_factory):
    """{(photo, family): [clean clip, level 1, ..., level 4]} made the way tools/real_footage.py makes its set."""
    from tools import real_footage

    folder = tmp_path_factory.mktemp("tiny-ladders")
    ladders = {}
    for k, photo in enumerate(LADDER_PHOTOS):
        frames = real_footage.camera_frames(real_footage.skimage_photo(photo), seed=k, n_frames=48)
        clean = folder / f"{photo}-clean.mp4"
        real_footage.write_clip(clean, frames, real_footage.CLEAN_CRF)
        for family in LADDER_FAMILIES:
            ladders[(photo, family)] = [clean]
            for level in real_footage.FAMILIES[family]:
                path = folder / f"{photo}-{family}-{level}.mp4"
                if family == "compression":
                    real_footage.write_clip(path, frames, level)
                else:
                    real_footage.write_clip(path, real_footage.damaged(family, level, frames, seed=k),
                                            real_footage.CLEAN_CRF)
                ladders[(photo, family)].append(path)
    return ladders


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


@pytest.mark.parametrize("family", LADDER_FAMILIES)
def test_scores_fall_as_real_style_damage_rises(tiny, ladder_clips, family):
    from scipy.stats import spearmanr

    correlations = {}
    for photo in LADDER_PHOTOS:
        scores = [tiny.score(str(path)).score for path in ladder_clips[(photo, family)]]
        assert scores[-1] < scores[0], (photo, scores)  # the strongest damage scores below the clean clip
        correlations[photo] = spearmanr(range(len(scores)), scores)[0]
    assert np.mean(list(correlations.values())) < MAX_LADDER_SRCC, correlations


def test_scores_fall_with_damage(tiny, damage_clips):
    scores = {key: tiny.score(str(path)).score for key, path in damage_clips.items()}
    for name in DAMAGE:
        gaps = [scores[(kind, "clean")] - scores[(kind, name)] for kind in CONTENT]
        assert np.mean(gaps) > MEAN_GAP, (name, scores)
        assert min(gaps) > MIN_GAP, (name, scores)


def test_explains_what_is_wrong(tiny, damage_clips, ladder_clips):
    """Stage 3's open question, asked of unseen clips: the answer names the distortion, or none for the clean
    photographs."""
    from vqa2cli.synth import DISTORTIONS, NO_DISTORTION, PROBLEMS_QUESTION

    def answer(kind, version):
        return tiny.ask(str(damage_clips[(kind, version)]), PROBLEMS_QUESTION, max_new_tokens=40)

    damaged = {(kind, name): answer(kind, name) for kind in CONTENT for name in EXPLAINED}
    named = [key for key, text in damaged.items() if DISTORTIONS[key[1]].phrase in text]
    assert len(named) >= MIN_EXPLAINED, damaged
    clean = {photo: tiny.ask(str(ladder_clips[(photo, "blur")][0]), PROBLEMS_QUESTION, max_new_tokens=40)
             for photo in LADDER_PHOTOS}
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
        for i, name in enumerate(DISTORTED):
            results.append(right(kind, name, name, "Yes."))
            results.append(right(kind, name, DISTORTED[(i + 3) % len(DISTORTED)], "No."))
        results += [right(kind, "clean", asked, "No.") for asked in YES_NO_CLEAN_QUESTIONS]
    assert sum(results) >= MIN_YES_NO_RIGHT, f"{sum(results)} of {len(results)} right"
