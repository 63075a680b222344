"""Still images, the release's way, for models trained on them (`VQA2Config.images`): one unpooled keyframe,
the image prompt, motion = the frame 4 times; other models refuse photos with one line."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from tests.fixtures.checkpoints import write_tiny_model_dir
from tests.fixtures.clips import make_clip
from tests.fixtures.models import make_tiny_model
from vqa2cli import prompts
from vqa2cli.config import VisionConfig
from vqa2cli.config import tiny_config as make_tiny_config
from vqa2cli.images import ImageSample, load_image
from vqa2cli.modeling import KEYFRAME, MOTION, NEWLINE, TEXT
from vqa2cli.video import Sampling, VideoError


@pytest.fixture(scope="module")
def image_model_dir(tmp_path_factory):
    """A tiny model that takes still images (as the enhanced checkpoint does)."""
    return write_tiny_model_dir(tmp_path_factory.mktemp("image-model") / "m", images=True)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """A folder mixing a PNG, a JPEG and a video."""
    root = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)).save(root / "a.png")
    Image.fromarray(rng.integers(0, 256, (64, 40, 3), dtype=np.uint8)).save(root / "b.jpg", quality=90)
    make_clip(root / "c.mp4", seconds=1, size=(64, 48))
    return root


# ---- token layout -----------------------------------------------------------------------------------


def test_image_keyframe_is_not_pooled():
    """Released geometry (384 px, 14 px patches): an image gives all 27 x 27 = 729 projected tokens and the
    newline, where a video keyframe gives 14 x 14 = 196; the rows are the projector's output on the tower's
    last kept hidden state (before post_layernorm), in row-major order."""
    vision = VisionConfig(hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    config = make_tiny_config(vision=vision, pooled_grid=14, keyframe_size=384, motion_size=384, images=True)
    model = make_tiny_model(config)
    keyframe = torch.rand(1, 3, 384, 384) * 2 - 1
    with torch.no_grad():
        image = model.encode_keyframes(keyframe, pool=False)
        video = model.encode_keyframes(keyframe)
        hidden = model.vision_tower(pixel_values=keyframe, output_hidden_states=True).hidden_states[-1]
        expected = model.mm_projector(hidden)[0]
    assert image.shape == (729 + 1, config.text.hidden_size) and video.shape == (196 + 1, config.text.hidden_size)
    assert torch.equal(image[:-1], expected) and torch.equal(image[-1], model.image_newline)


def test_image_prompt_places_the_keyframe_block_only(tiny_tokenizer):
    """The image prompt has one <image>: 7 x 7 = 49 keyframe tokens (56 px, 8 px patches) and the newline go
    there, no motion token; everything else is the prompt's text."""
    model = make_tiny_model(make_tiny_config(images=True))
    ids = torch.tensor(prompts.tokenize_prompt(prompts.image_scoring_prompt(), tiny_tokenizer))
    assert (ids == prompts.IMAGE_TOKEN_INDEX).sum() == 1
    keyframe = torch.rand(1, 3, 56, 56) * 2 - 1
    with torch.no_grad():
        encoded = model.encode_video(keyframe, None, pool=False)
        inputs = model.build_inputs([ids], [encoded])
    types = inputs.token_types[0]
    assert (types == KEYFRAME).sum() == 49 and (types == NEWLINE).sum() == 1 and (types == MOTION).sum() == 0
    assert (types == TEXT).sum() == len(ids) - 1 and inputs.inputs_embeds.shape[1] == len(ids) - 1 + 50


def test_image_prompts_follow_the_release():
    text = prompts.image_scoring_prompt()
    assert text.endswith("<|im_start|>user\n<image><|im_end|>\n<|im_start|>assistant\nThe overall quality of the image is")
    question = prompts.image_question_prompt(" What is wrong? ")
    assert "You will receive one image." in question and question.count("<image>") == 1
    assert question.endswith("<image>\nWhat is wrong?<|im_end|>\n<|im_start|>assistant\n")


def test_images_need_the_official_layout():
    with pytest.raises(ValueError, match="official token layout"):
        make_tiny_config(images=True, token_layout="per_second")


# ---- loading ----------------------------------------------------------------------------------------


def test_load_image_shapes_it_like_a_video(tmp_path):
    """A flat colour survives the bicubic resize exactly, so the values are known by hand."""
    path = tmp_path / "flat.png"
    Image.new("RGB", (90, 40), (255, 0, 102)).save(path)
    sample = load_image(path, keyframe_size=56, motion_size=32)
    assert isinstance(sample, ImageSample)
    assert sample.keyframes.shape == (1, 3, 56, 56) and sample.motion.shape == (4, 3, 32, 32)
    for channel, value in enumerate((1.0, -1.0, 102 / 255 * 2 - 1)):
        assert torch.allclose(sample.keyframes[0, channel], torch.tensor(value), atol=1e-6)
    assert sample.motion.dtype == torch.uint8 and (sample.motion[:, 0] == 255).all() and (sample.motion[:, 2] == 102).all()
    assert (sample.width, sample.height, sample.num_frames, sample.duration) == (90, 40, 1, 0.0)
    assert sample.keyframe_indices == [0] and sample.motion_indices == [0, 0, 0, 0]


def test_load_image_resizes_with_pil_bicubic(tmp_path):
    pixels = np.random.default_rng(1).integers(0, 256, (33, 47, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "p.png")
    sample = load_image(tmp_path / "p.png", keyframe_size=48, motion_size=48)
    resized = np.array(Image.fromarray(pixels).resize((48, 48), Image.BICUBIC))
    assert torch.equal(sample.motion[0], torch.from_numpy(resized).permute(2, 0, 1))
    assert torch.allclose(sample.keyframes[0], torch.from_numpy(resized).permute(2, 0, 1) / 127.5 - 1, atol=1e-6)


def test_sampling_takes_photos_only_for_image_models(media, tmp_path):
    video_only, with_images = Sampling(56, 32, 64, 40), Sampling(56, 32, 64, 40, images=True)
    with pytest.raises(VideoError) as refused:
        video_only.load(media / "a.png")
    assert str(refused.value) == (f"{media / 'a.png'}: a still image (png): this model scores videos only "
                                  "(vqa2-assistant-enhanced scores images too)")
    assert isinstance(with_images.load(media / "b.jpg"), ImageSample)
    assert not isinstance(with_images.load(media / "c.mp4"), ImageSample)  # videos stay videos
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    with pytest.raises(VideoError, match="broken.png: "):
        with_images.load(broken)


# ---- scoring ----------------------------------------------------------------------------------------


def test_image_and_video_in_one_batch(image_model_dir, media):
    from vqa2cli.pipeline import load_model

    model = load_model(image_model_dir, device="cpu")
    image, video = model.load_video(media / "a.png"), model.load_video(media / "c.mp4")
    assert model._score_text(None, image) == prompts.image_scoring_prompt()
    together = model.score_batch([image, video])
    one_by_one = [model.score(image), model.score(video)]
    for a, b in zip(together, one_by_one):
        assert a.score == pytest.approx(b.score, abs=1e-5)
    assert abs(one_by_one[0].score - one_by_one[1].score) > 1e-6  # different inputs, different scores


def test_video_only_model_refuses_an_image_sample(tiny_model_dir, image_model_dir, media):
    from vqa2cli.errors import InputError
    from vqa2cli.pipeline import load_model

    image = load_model(image_model_dir, device="cpu").load_video(media / "a.png")
    with pytest.raises(InputError, match="a still image, and model .* takes videos only"):
        load_model(tiny_model_dir, device="cpu").score(image)


def test_cli_scores_a_folder_mixing_images_and_videos(vqa2, media, image_model_dir, tiny_model_dir):
    # decoded in a worker process: photos come back from it as ImageSamples
    code, out, err = vqa2("score", media, "-m", image_model_dir, "--json", "--workers", "1")
    assert code == 0, err
    records = {r["path"].rsplit("/", 1)[1]: r for r in json.loads(out)}
    assert sorted(records) == ["a.png", "b.jpg", "c.mp4"]
    for name in ("a.png", "b.jpg"):
        assert (records[name]["keyframes"], records[name]["motion_frames"], records[name]["duration_s"]) == (1, 4, 0.0)
        assert 0 <= records[name]["score"] <= 1
    # a video-only model walks past the photos in a folder, and refuses one named explicitly, in one line
    code, out, err = vqa2("score", media, media / "a.png", "-m", tiny_model_dir, "--json")
    records = json.loads(out)
    assert code == 1 and [r["path"].rsplit("/", 1)[1] for r in records] == ["c.mp4", "a.png"]
    assert records[1]["error"] == f"{media / 'a.png'}: a still image (png): this model scores videos only " \
                                  "(vqa2-assistant-enhanced scores images too)"


def test_vqa2_tiny_refuses_photos(vqa2, media, monkeypatch):
    """Decided: vqa2-tiny saw video only (never the unpooled layout or the image prompt), so it refuses."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, out, err = vqa2("score", media / "b.jpg", "-m", "vqa2-tiny", "--jsonl")
    assert code == 1 and err.count("error: ") == 1 and "Traceback" not in err
    assert json.loads(out)["error"] == f"{media / 'b.jpg'}: a still image (image2): this model scores videos only " \
                                       "(vqa2-assistant-enhanced scores images too)"


def test_registry_flag_reaches_official_checkpoints(tiny_official_checkpoint, tmp_path):
    """Official configs carry no images field: the registry's entry sets it, for the enhanced checkpoint only
    (here found by its place in the Hugging Face cache)."""
    import shutil

    from vqa2cli.pipeline import load_model

    cached = tmp_path / "hub" / "models--q-future--VQA-Assistant-llava-qwen-enhanced" / "snapshots" / "abc"
    shutil.copytree(tiny_official_checkpoint, cached)
    enhanced = load_model(cached, device="cpu")
    assert enhanced.config.images and enhanced.config.prompt == "enhanced" and enhanced.sampling().images
    assert not load_model(tiny_official_checkpoint, device="cpu").config.images
