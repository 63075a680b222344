"""load_model -> VQA2: scoring and answering with tiny models on CPU, from both directory formats."""

import math
import shutil

import numpy as np
import pytest
import torch

from tests.fixtures.models import tiny_sample
from vqa2cli.errors import InputError, ModelNotFoundError, SetupError
from vqa2cli.pipeline import ScoreResult, load_model, resolve_device


@pytest.fixture(scope="module")
def ours(tiny_model_dir):
    return load_model(str(tiny_model_dir), device="cpu")


@pytest.fixture(scope="module")
def official(tiny_official_checkpoint):
    return load_model(str(tiny_official_checkpoint), device="cpu")


def test_official_checkpoint_scores(official):
    result = official.score(tiny_sample(official.config))
    assert isinstance(result, ScoreResult)
    assert 0.0 <= result.score <= 1.0
    assert list(result.probs) == ["high", "good", "fair", "poor", "low"]
    assert sum(result.probs.values()) == pytest.approx(1.0, abs=1e-9)
    assert result.level == max(result.probs, key=result.probs.get)
    assert official.name.endswith("tiny-llava_qwen") and official.precision.quant == "none"


@pytest.mark.parametrize("level_logits, score, level", [
    ((0.0, math.log(2.0), 0.0, 0.0, 0.0), 3.25 / 6, "good"),  # probabilities (1, 2, 1, 1, 1) / 6
    ((0.0, 0.0, 0.0, 0.0, math.log(3.0)), 2.5 / 7, "low"),  # (1, 1, 1, 1, 3) / 7
])
def test_score_from_known_logits(tiny_model_dir, level_logits, score, level):
    """An output layer that ignores its input (zero weights) and gives the level words known logits:
    the score is the hand-computed weighted level probability (weights 1, .75, .5, .25, 0)."""
    model = load_model(str(tiny_model_dir), device="cpu")
    head = torch.nn.Linear(model.config.text.hidden_size, model.config.text.vocab_size)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(9.0)  # every other word is far likelier: only the level words' logits count
        head.bias[model.level_ids] = torch.tensor(level_logits)
    model.model.language_model.lm_head = head
    result = model.score(tiny_sample(model.config))
    assert result.score == pytest.approx(score, abs=1e-7) and result.level == level  # float32 logits
    assert sum(result.probs.values()) == pytest.approx(1.0, abs=1e-12)


def test_repeat_runs_and_reloads_are_bitwise_identical(ours, tiny_model_dir):
    sample = tiny_sample(ours.config)
    first = ours.score(sample)
    assert all(ours.score(sample) == first for _ in range(3))
    assert load_model(str(tiny_model_dir), device="cpu").score(sample) == first


def test_both_formats_give_the_same_scores(ours, official):
    """The fixtures hold the same seeded weights: the official name mapping loses nothing, and results
    do not depend on how tensors are laid out in the files."""
    for seed in (0, 1):
        assert ours.score(tiny_sample(ours.config, seed)) == official.score(tiny_sample(official.config, seed))


def test_batch_matches_single(ours):
    samples = [tiny_sample(ours.config, seed) for seed in (0, 1, 2)]
    batch = ours.score_batch(samples)
    for sample, result in zip(samples, batch):
        single = ours.score(sample)
        assert result.score == pytest.approx(single.score, abs=1e-6)
        assert result.level == single.level


def test_prompt_kinds(ours):
    sample = tiny_sample(ours.config)
    assert ours.score(sample, prompt="streaming") != ours.score(sample, prompt="ugc")
    assert ours.score(sample, prompt="ugc") == ours.score(sample)
    with pytest.raises(SetupError, match="unknown scoring prompt"):
        ours.score(sample, prompt="nonsense")


def test_too_many_motion_frames_is_an_input_error(ours):
    limit = ours.config.motion.max_frames
    with pytest.raises(InputError, match=f"more than model .*'s {limit}; decode it with model.load_video"):
        ours.score(tiny_sample(ours.config, num_motion=limit + 4))


def test_a_sample_decoded_at_other_sizes_is_refused_in_one_line(ours, clip_factory):
    """`load_video(path)` (384 px defaults) given to a 128 px model: a one-line InputError saying how to decode
    it, not a raw tensor-size error from deep in the model."""
    from vqa2cli.video import load_video

    clip = clip_factory(seconds=2, fps=8)
    with pytest.raises(InputError) as caught:
        ours.score(load_video(clip))
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{clip}: decoded at 384 px keyframes and 384 px motion")
    assert f"takes {ours.config.keyframe_size} and {ours.config.motion_size}" in message
    assert ours.score(ours.load_video(clip)) == ours.score(clip)


def test_a_sample_decoded_as_fragments_is_refused_by_a_whole_frame_model(ours, clip_factory):
    from vqa2cli.video import load_video

    clip = clip_factory(seconds=2, fps=8)
    sizes = ours.config.keyframe_size, ours.config.motion_size
    with pytest.raises(InputError, match=f"^{clip}: decoded with 4x4 keyframe fragments, but model .* takes "
                                         "whole-frame keyframes; decode it with model.load_video"):
        ours.score(load_video(clip, *sizes, keyframe_fragments=4))


def test_ask_streams_the_answer(ours):
    sample = tiny_sample(ours.config)
    pieces = []
    answer = ours.ask(sample, "Is the video blurry?", max_new_tokens=12, on_text=pieces.append)
    assert pieces and "".join(pieces).strip() == answer
    assert ours.ask(sample, "Is the video blurry?", max_new_tokens=12) == answer  # greedy: repeatable


def test_round_trip_through_save(ours, tmp_path):
    from vqa2cli.checkpoint import save_model_dir

    saved = save_model_dir(ours.model, ours.tokenizer, tmp_path / "copy")
    again = load_model(str(saved), device="cpu")
    sample = tiny_sample(ours.config, seed=3)
    assert again.score(sample) == ours.score(sample)


def test_not_a_model_directory(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ModelNotFoundError, match="not a model directory"):
        load_model(str(tmp_path), device="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_cuda_without_gpu_is_a_setup_error():
    with pytest.raises(SetupError, match="no CUDA GPU"):
        resolve_device("cuda")
    assert resolve_device("auto") == torch.device("cpu")


def test_registry_entry_sets_the_prompt_of_an_official_checkpoint(tiny_official_checkpoint, tmp_path, monkeypatch):
    """A checkpoint found in the HF cache under the streaming scorer's repo id scores with its prompt."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    commit = "0" * 40
    repo = tmp_path / "hf" / "hub" / "models--q-future--VQA-Streaming-Scorer-llava_qwen"
    shutil.copytree(tiny_official_checkpoint, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    model = load_model("vqa2-streaming-scorer", device="cpu")
    assert model.name == "vqa2-streaming-scorer" and model.config.prompt == "streaming"
    sample = tiny_sample(model.config)
    assert model.score(sample) == model.score(sample, prompt="streaming")


def test_scores_a_video_file(ours, clip_factory):
    """A path is decoded with the model's frame sizes, its motion stream capped to the position table."""
    clip = clip_factory(seconds=4, fps=25)  # 100 frames; the tiny model's table holds 64
    limit = ours.config.motion.max_frames
    result = ours.score(clip, max_motion_frames=2000)  # capped to the table, not an error
    sample = ours.load_video(clip)
    assert sample.keyframes.shape[-1] == ours.config.keyframe_size and sample.motion.shape[-1] == ours.config.motion_size
    assert sample.motion.shape[0] == limit
    assert ours.score(sample) == result
    assert ours.score(clip, max_motion_frames=32) != result


def test_per_second_layout_places_motion_by_second(tmp_path, monkeypatch):
    from tests.fixtures.checkpoints import write_tiny_model_dir
    from tests.fixtures.clips import make_clip

    model = load_model(str(write_tiny_model_dir(tmp_path / "per-second", token_layout="per_second")), device="cpu")
    # 2.5 s at 10 fps: keyframes 0, 10, 20 and 24 motion frames, i.e. 10 + 10 + 4 by second (an even
    # split would be 8 + 8 + 8).
    sample = model.load_video(make_clip(tmp_path / "clip.mp4", frames=25, fps=10, size=(32, 32)))
    assert sample.keyframe_indices == [0, 10, 20] and len(sample.motion_indices) == 24

    seen = []
    build = model.model.build_inputs

    def spy(input_ids, videos, labels=None, motion_splits=None):
        seen.append(motion_splits)
        return build(input_ids, videos, labels, motion_splits)

    monkeypatch.setattr(model.model, "build_inputs", spy)
    model.score(sample)
    assert seen == [[[10, 10, 4]]]


def test_shifted_fragment_views_are_scored_as_the_mean_of_each_view(tmp_path):
    from dataclasses import replace

    from tests.fixtures.checkpoints import write_tiny_model_dir
    from tests.fixtures.clips import make_clip

    model = load_model(str(write_tiny_model_dir(tmp_path / "shifted", keyframe_fragments=4, fragment_shifts=3)),
                       device="cpu")
    noise = np.random.default_rng(0).integers(0, 256, (80, 96, 3), dtype=np.uint8)
    clip = make_clip(tmp_path / "clip.mkv", frames=20, fps=10, size=(96, 80), codec="ffv1",
                     pattern=lambda i, w, h: np.roll(noise, i, axis=1))
    sample = model.load_video(clip)
    assert sample.keyframe_views.shape[:2] == (9, 2)
    views = [model.score(replace(sample, keyframes=view, keyframe_views=None)) for view in sample.keyframe_views]
    assert len({view.score for view in views}) == 9  # the views see different pixels
    result = model.score(clip)
    assert result.score == pytest.approx(np.mean([view.score for view in views]), abs=1e-6)
    for level, p in result.probs.items():
        assert p == pytest.approx(np.mean([view.probs[level] for view in views]), abs=1e-6)
    # the centre view alone is what a one-view decode scores
    assert views[0] == model.score(replace(sample, keyframe_views=None))
    batch = model.score_batch([sample, replace(sample, keyframe_views=None)])
    assert batch[0].score == pytest.approx(result.score, abs=1e-5) and batch[1].score == pytest.approx(views[0].score, abs=1e-5)
    # questions are answered from the centres: decoded without the other views, the same answer
    centres = model.load_video(clip, views=False)
    assert centres.keyframe_views is None and torch.equal(centres.keyframes, sample.keyframes)
    assert model.ask(clip, "How is it?", max_new_tokens=4) == model.ask(sample, "How is it?", max_new_tokens=4)
