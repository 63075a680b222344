"""Still images for models trained on them (`VQA2Config.images`; of the release, only the enhanced checkpoint).

The release's image path (`quality_scoring/llava/eval/model_score_image.py`, `llava_arch.py` at 935b0a1),
followed here:

* the picture is opened with PIL and converted to RGB (no EXIF rotation: the release applies none, so the
  model was trained on pictures as stored), resized bicubically to the keyframe size (aspect ratio not
  kept) and normalised like a video keyframe: it is the ONE keyframe;
* the motion stream is that keyframe repeated 4 times (SlowFast takes frames in fours);
* its keyframe tokens are NOT pooled (`VQA2Model.encode_keyframes(pool=False)`): the whole 27x27 = 729
  token grid, then the newline, where a video keyframe gives 14x14 = 196;
* the prompt has ONE `<image>` placeholder, which takes the keyframe block only (`prompts.image_scoring_prompt`):
  the release computes the repeated-frame motion features and never places them, so neither do we.

`load_image` is what `Sampling.load` falls back to when the decoder finds a still image and the model takes
images; models that do not refuse it with a one-line error (`Sampling.load`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from vqa2cli.video import VideoError, VideoSample, normalize

# Still-image files a folder walk picks up for models that take images (case-insensitive).
IMAGE_EXTENSIONS = frozenset(".bmp .jpeg .jpg .png .tif .tiff .webp".split())
MOTION_REPEATS = 4  # the release's `image.repeat(4, 1, 1, 1)`


def is_image_name(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS


@dataclass
class ImageSample(VideoSample):
    """A still image in a `VideoSample`'s shape: one keyframe, the motion stream that frame 4 times, no
    duration. Scoring sees the type and takes the image path (unpooled tokens, image prompt)."""


def load_image(path, keyframe_size: int = 384, motion_size: int = 384) -> ImageSample:
    """Open a picture as the release does and shape it like a decoded video (see the module docstring).
    Raises `VideoError` (one line naming the file) when PIL cannot read it."""
    path = os.fspath(path)
    try:
        with Image.open(path) as opened:
            rgb = opened.convert("RGB")
    except (UnidentifiedImageError, Image.DecompressionBombError) as error:
        raise VideoError(path, f"cannot read the image ({error})") from None
    except OSError as error:  # truncated or damaged image data
        raise VideoError(path, f"cannot read the image ({error.strerror or error})") from None
    width, height = rgb.size
    keyframe = _resized(rgb, keyframe_size)
    motion = keyframe if motion_size == keyframe_size else _resized(rgb, motion_size)
    return ImageSample(
        path=path,
        keyframes=normalize(keyframe[None]),
        motion=motion[None].repeat(MOTION_REPEATS, 1, 1, 1),
        keyframe_indices=[0],
        motion_indices=[0] * MOTION_REPEATS,
        fps=0.0,
        duration=0.0,
        num_frames=1,
        width=width,
        height=height,
    )


def _resized(rgb: Image.Image, size: int):
    """[3, size, size] uint8: PIL bicubic, as the release's `image.resize((384, 384))` (Pillow's default)."""
    import torch

    square = rgb if rgb.size == (size, size) else rgb.resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.array(square)).permute(2, 0, 1).contiguous()
