"""The starting filters `tools/build_vqa2_tiny.py` gives vqa2-tiny before training, which parts its stages
train, and that a build is reproducible for a seed. Without the filters the tiny towers did not learn blur,
noise, blocking or shake from the synthetic data (see the functions' docstrings)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vqa2cli.modeling import VQA2Model
from vqa2cli.finetune import select_trainable
from tools.build_vqa2_tiny import (
    PARTS,
    dct_patch_embedding_,
    identity_vision_layers_,
    rectifying_projector_,
    temporal_difference_stem_,
    tiny_vqa2_config,
)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return VQA2Model(tiny_vqa2_config())


def luma_filters(model) -> int:
    """How many patch-embedding rows are luma filters (the rest are colour-difference pairs): 64 of 96."""
    hidden = model.config.vision.hidden_size
    return hidden - 2 * (hidden // 6)


def patch_responses(model, image):
    conv = model.vision_tower.embeddings.patch_embedding
    dct_patch_embedding_(conv)
    with torch.no_grad():
        return conv(image[None])[0].flatten(1)  # [filters, patches]


def test_patch_embedding_separates_flat_from_fine_detail(model):
    size = model.config.keyframe_size
    flat = torch.full((3, size, size), 0.3)
    # Finest possible detail: a one-pixel checkerboard in grey.
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    checker = ((yy + xx) % 2).float().mul(0.2).expand(3, size, size)

    flat_response = patch_responses(model, flat).abs().mean(1)
    assert flat_response[0] > 1.0  # the DC luma filter sees the level
    assert flat_response[1:].max() < 1e-5  # every other filter is blind to a flat patch
    checker_response = patch_responses(model, checker).abs().mean(1)
    luma = luma_filters(model)
    assert checker_response[luma - 1] > 1.0  # the highest-frequency luma filter responds to it
    assert checker_response[luma:].max() < 1e-5  # grey detail has no colour difference


def test_patch_embedding_rows_are_distinct_and_scaled_up_with_frequency(model):
    conv = model.vision_tower.embeddings.patch_embedding
    dct_patch_embedding_(conv)
    weight = conv.weight.detach().flatten(1)
    norms = weight.norm(dim=1)
    luma = luma_filters(model)
    assert norms[0] == pytest.approx(1.0)
    top = model.config.vision.patch_size - 1  # the highest frequency of the patch, both ways
    assert norms[luma - 1] == pytest.approx(1 + math.hypot(top, top), rel=1e-5)
    assert torch.linalg.matrix_rank(weight) == weight.shape[0]
    assert torch.count_nonzero(conv.bias) == 0


def stem_maps(model, frames):
    """frames [T, 3, S, S] in [-1, 1] -> the four stem channels before BatchNorm, [4, T, S, S]."""
    conv = model.motion_encoder.blocks[0].multipathway_blocks[1].conv
    temporal_difference_stem_(conv)
    with torch.no_grad():
        return conv(frames.transpose(0, 1)[None])[0]


def stem_response(model, frames):
    """The stem channels averaged over space, [4, T]."""
    return stem_maps(model, frames).mean((2, 3))


def textured_frames(shifts, size):
    torch.manual_seed(1)
    base = torch.rand(3, size + 16, size + 16) * 2 - 1
    return torch.stack([base[:, 8 + dy : 8 + dy + size, 8 + dx : 8 + dx + size] for dy, dx in shifts])


def test_stem_is_blind_to_a_still_clip_and_sees_flicker(model):
    size = model.config.motion_size
    still = textured_frames([(0, 0)] * 12, size)
    response = stem_response(model, still)
    assert response[:, 2:-2].abs().max() < 1e-5  # away from the zero-padded ends
    flicker = still + 0.2 * torch.tensor([(-1) ** t for t in range(12)], dtype=torch.float32)[:, None, None, None]
    assert stem_response(model, flicker)[:, 2:-2].abs().min() > 0.1


def test_stem_second_difference_tells_shake_from_a_smooth_pan(model):
    size = model.config.motion_size
    pan = textured_frames([(0, t % 8) for t in range(8)], size)
    shake = textured_frames([(0, s) for s in (0, 4, 1, 5, 0, 4, 1, 5)], size)

    def energy(frames):
        return stem_maps(model, frames)[2:, 2:-2].abs().mean()  # second-difference channels

    assert energy(shake) > 2 * energy(pan)


def test_identity_layers_pass_the_patch_embedding_through():
    torch.manual_seed(0)
    tower = VQA2Model(tiny_vqa2_config()).vision_tower
    identity_vision_layers_(tower)
    pixels = torch.rand(2, 3, 128, 128) * 2 - 1
    with torch.no_grad():
        embedded = tower.embeddings(pixels)
        out = tower.encoder(inputs_embeds=embedded).last_hidden_state
    torch.testing.assert_close(out, embedded)


@pytest.fixture()
def rectifier(model):
    """(the keyframe projector as `rectifying_projector_` starts it, the number of luma channels, the tower's
    width); only this projector changes, so the module's model serves."""
    n = luma_filters(model)
    rectifying_projector_(model.mm_projector, n)
    return model.mm_projector, n, model.config.vision.hidden_size


def test_projector_starts_as_magnitude_and_value_of_each_luma_channel(rectifier):
    projector, n, width = rectifier
    x = torch.zeros(3, width)
    x[0, :n] = torch.linspace(-3, 3, n)  # at gain 4, GELU(4x) + GELU(-4x) is within 1e-3 of 4|x| from |x| = 1
    x[1, n:] = 5.0  # colour channels: not read at the start
    x[2, :n] = -0.5
    with torch.no_grad():
        out = projector(x)
    # GELU(z) - GELU(-z) = z exactly: the second half is the channel itself
    torch.testing.assert_close(out[:, n:2 * n], x[:, :n], atol=1e-6, rtol=0)
    big = x[0, :n].abs() >= 1
    torch.testing.assert_close(out[0, :n][big], x[0, :n].abs()[big], atol=1e-3, rtol=0)
    assert torch.all(out[0, :n] >= 0) and torch.all(out[0, :n] <= x[0, :n].abs() + 1e-6)
    assert out[1].abs().max() == 0


def test_pooled_projection_keeps_fine_detail_that_signed_pooling_cancels(rectifier):
    """Two patches with opposite fine detail average to nothing; their magnitudes do not."""
    projector, n, width = rectifier
    detail = torch.zeros(2, width)
    detail[0, n - 1], detail[1, n - 1] = 2.0, -2.0  # the finest luma filter, opposite signs
    with torch.no_grad():
        pooled = projector(detail).mean(0)
    assert pooled[n + n - 1].abs() < 1e-6  # the signed value cancels
    assert pooled[n - 1] > 1.9  # the magnitude survives


def test_build_trains_everything_but_the_fixed_first_layers():
    torch.manual_seed(0)
    model = VQA2Model(tiny_vqa2_config())
    trainable = set(select_trainable(model, tuple(PARTS.split(","))))
    frozen = {name for name, _ in model.named_parameters()} - trainable
    fixed = {"vision_tower.embeddings.patch_embedding.weight", "vision_tower.embeddings.patch_embedding.bias",
             "motion_encoder.blocks.0.multipathway_blocks.1.conv.weight"}
    assert fixed <= frozen
    # Everything else left frozen is unused by the forward pass: the slow pathway, the fast->slow fusions
    # (the fast pathway runs alone) and SigLIP's post-layernorm and head (the features are taken before them).
    unused = ("vision_tower.post_layernorm.", "vision_tower.head.")
    for name in frozen - fixed:
        slow = ".multipathway_blocks.0." in name or ".multipathway_fusion." in name
        assert (name.startswith("motion_encoder.blocks.") and slow) or name.startswith(unused), name


@pytest.mark.slow
def test_the_build_gives_the_same_model_for_the_same_seed(tmp_path):
    """Synth, initialisation and every stage are seeded (stage 2's random fragment places too): two builds from
    nothing, same seed, same bytes."""
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for k in range(3):  # smooth colour fields with some fine detail, big enough for every training size
        coarse = rng.uniform(0, 255, (6, 10, 3)).astype(np.uint8)
        image = np.asarray(Image.fromarray(coarse).resize((640, 384), Image.BICUBIC), dtype=np.float32)
        image += rng.normal(0, 8, image.shape)
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(photos / f"photo{k}.png")
    repo = Path(__file__).resolve().parents[1]
    built = []
    for name in ("first", "second"):
        out = tmp_path / name
        done = subprocess.run([sys.executable, str(repo / "tools" / "build_vqa2_tiny.py"), "--images", str(photos),
                               "--work", str(out / "work"), "--out", str(out / "model"), "--train-clips", "12",
                               "--heldout-clips", "6", "--steps", "3,3,3,3", "--seed", "5",
                               "--random-fragments"],
                              capture_output=True, text=True, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        built.append(out / "model")
    first, second = built
    assert "stage 2 3 (fragments at random places" in (first / "README.md").read_text()
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()
    evaluated = [json.loads((model / "eval.json").read_text())["eval"] for model in built]
    assert evaluated[0] == evaluated[1]
