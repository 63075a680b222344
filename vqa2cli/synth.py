"""Synthetic training data: clean clips + graded, labelled distortions -> data for all three stages.

A dataset is planned first (every label is decided from the seed before a single frame is made), then
each clip is rendered as a stream: source frame -> distortions -> x264 encoder, one frame at a time, so
memory does not grow with clip length. Clips may render in parallel processes: each draws from its own
seeded streams, so the dataset does not depend on how many. Sources are the user's clean clips (`clips_dir`)
or procedural content (moving textures, gradients, shapes, zooms) whose variety is set by `ContentSettings`.

Label semantics (documented in the README):
- every distortion has a severity in [1, 4] and an extent: the whole clip, its first half or its second half;
- impairment(s) = 0.8 * (s / 4) ** 1.3 (0.13 at s=1 ... 0.80 at s=4); a distortion on half the clip
  counts 0.7 of that;
- MOS = 90 * prod(1 - impairment_i) on 0-100 (clean clips: 90; one distortion: about 80 down to 18).
"""

from __future__ import annotations

import csv
import io
import json
import math
import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np

from vqa2cli import files
from vqa2cli.errors import STOP_SIGNALS, InputError, SetupError
from vqa2cli.video import VIDEO_EXTENSIONS

CLEAN_MOS = 90.0
MAX_IMPAIRMENT = 0.8
IMPAIRMENT_EXPONENT = 1.3
PARTIAL_WEIGHT = 0.7
SEVERITY_RANGE = (1.0, 4.0)
EXTENTS = ("whole", "first half", "second half")
EXTENT_PROBS = (0.6, 0.2, 0.2)
# Share of clean clips and of clips with two distortions (one spatial + one motion); equal shares keep
# the yes/no questions balanced (see _questions).
CLEAN_SHARE = 0.15
DOUBLE_SHARE = 0.15
CONTENT_KINDS = ("texture", "gradient", "shapes", "zoom", "leaves", "photo")
DEFAULT_KINDS = ("texture", "gradient", "shapes", "zoom")  # procedural, when no --images are given
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}
FORMAT_VERSION = 1
# x264's macroblock tree made different bitstreams from identical frames, depending on what the process had
# encoded before (15 of the 47 x264-compressed clips differed between two syntheses of the same 1000-clip set);
# without it x264's output depends on its input alone.
X264_REPEATABLE = {"preset": "veryfast", "mbtree": "0"}


@dataclass(frozen=True)
class DistortionType:
    name: str  # identifier in the manifest
    kind: str  # spatial | motion
    phrase: str  # how labels and questions name it ("Is there <phrase> in this video?")


DISTORTIONS = {
    d.name: d
    for d in (
        DistortionType("blur", "spatial", "blur"),
        DistortionType("motion_blur", "spatial", "motion blur"),
        DistortionType("noise", "spatial", "noise"),
        DistortionType("compression", "spatial", "compression artifacts"),
        DistortionType("upscaling", "spatial", "low resolution"),
        DistortionType("blocking", "spatial", "compression blocking"),
        DistortionType("overexposure", "spatial", "over-exposure"),
        DistortionType("underexposure", "spatial", "under-exposure"),
        DistortionType("stutter", "motion", "stutter"),
        DistortionType("flicker", "motion", "flicker"),
        DistortionType("shake", "motion", "camera shake"),
    )
}
# Real damage by default; "blocking" (a synthetic 8x8 DCT quantisation, which real encoders do not make at these
# strengths) only when asked for.
DEFAULT_DISTORTIONS = tuple(name for name in DISTORTIONS if name != "blocking")


def impairment(severity: float, extent: str = "whole") -> float:
    """Fraction of quality a distortion takes away (0..0.8): grows with severity, less when partial."""
    value = MAX_IMPAIRMENT * (severity / 4.0) ** IMPAIRMENT_EXPONENT
    return value * (1.0 if extent == "whole" else PARTIAL_WEIGHT)


def mos_for(applied) -> float:
    """MOS (0-100) of a clip given its (severity, extent) pairs; impairments combine multiplicatively."""
    quality = CLEAN_MOS
    for severity, extent in applied:
        quality *= 1.0 - impairment(severity, extent)
    return quality


def level_for(mos: float) -> str:
    """The reference's level band of a 0-100 MOS, as `vqa2 finetune` converts it (stage 2)."""
    from vqa2cli.scoring import mos_to_level

    return mos_to_level(mos, (0.0, 100.0))


def severity_word(severity: float) -> str:
    return "slight" if severity < 1.75 else "moderate" if severity < 2.5 else "strong" if severity < 3.25 else "severe"


# ---------------------------------------------------------------- plan


@dataclass(frozen=True)
class ContentSettings:
    """Variety of procedural clips; a held-out set should use other values (and another seed)."""

    kinds: tuple = DEFAULT_KINDS
    # camera/object speed, pixels per frame at 128 px (scaled with frame size); slower hides stutter
    speed: tuple = (1.0, 3.0)
    detail: tuple = (0.9, 1.5)  # spectral slope of textures: 1 is natural-image-like, higher is smoother
    objects: tuple = (2, 6)  # moving shapes in 'shapes' clips
    # Sensor noise a clean camera recording already has, baked into photo and procedural content and labelled
    # clean: without it every noisy pixel reads as damage, so compression and blur (which remove noise) look
    # like repairs on real footage. Sigma in grey levels, drawn per clip; keep HI below noise severity 1 (6).
    grain: tuple = (0.0, 0.0)
    # Photo pixels per frame pixel, drawn log-uniformly per photo clip; 1 is the photo's own pixels. A photo shrunk
    # several times is crisper than any camera's own frames (docs/vqa2-tiny.md: camera resolution).
    # (0, 0): the frame covers 45-80% of the photo, whatever its size.
    photo_scale: tuple = (0.0, 0.0)

    def validate(self):
        unknown = [k for k in self.kinds if k not in CONTENT_KINDS]
        if not self.kinds or unknown:
            raise SetupError(f"unknown content kind(s) {unknown or '(none given)'}; choose from {', '.join(CONTENT_KINDS)}")
        for name in ("speed", "detail", "objects", "grain"):
            lo, hi = getattr(self, name)
            if not (0 <= lo <= hi) or (name == "speed" and lo == 0):
                # speed 0 would make still clips, on which stutter cannot be seen
                floor = "0 < LO" if name == "speed" else "0 <= LO"
                raise SetupError(f"--{name} must be {floor} <= HI, got {lo},{hi}")
        lo, hi = self.photo_scale
        if (lo, hi) != (0, 0) and not 1 <= lo <= hi:
            raise SetupError(f"--photo-scale must be 1 <= LO <= HI (or 0,0), got {lo},{hi}")


@dataclass
class AppliedDistortion:
    name: str
    severity: float
    extent: str

    @property
    def type(self) -> DistortionType:
        return DISTORTIONS[self.name]


@dataclass
class ClipPlan:
    index: int
    video: str  # path relative to the dataset folder
    source: str  # "procedural:<kind>", "photo:<path relative to images_dir>" or a user clip relative to clips_dir
    start: float  # seconds into a user clip
    fps: float
    n_frames: int
    distortions: list = field(default_factory=list)
    width: int = 128
    height: int = 128
    grain: float = 0.0  # sigma of the sensor noise in the clean content (not a distortion: MOS unaffected)
    photo_scale: float = 0.0  # photo pixels per frame pixel (photo content; 0: the frame covers 45-80% of it)

    @property
    def mos(self) -> float:
        return round(mos_for([(d.severity, d.extent) for d in self.distortions]), 2)


def _clip_rng(seed: int, index: int, purpose: int) -> np.random.Generator:
    # One independent stream per clip and purpose: any clip can be re-rendered alone, identically.
    return np.random.default_rng([seed, index, purpose])


def plan_dataset(settings, sources=None, images=()) -> list:
    """Decide every clip's source, size, length and distortions from the seed.

    `sources`: [(name, duration_s, fps)] of readable user clips; None for procedural or photo content.
    `images`: photo paths (relative to the images folder) that "photo" content pans over."""
    rng = np.random.default_rng([settings.seed, 0xD157])
    count, kinds, grain_range = settings.count, settings.content.kinds, settings.content.grain
    n_clean = round(CLEAN_SHARE * count)
    n_double = min(round(DOUBLE_SHARE * count), count - n_clean)
    categories = ["clean"] * n_clean + ["double"] * n_double + ["single"] * (count - n_clean - n_double)
    rng.shuffle(categories)
    names = list(settings.distortions)
    spatial = [n for n in names if DISTORTIONS[n].kind == "spatial"] or [None]
    motion = [n for n in names if DISTORTIONS[n].kind == "motion"] or [None]
    sizes = settings.sizes
    photos = []
    # Single-distortion clips cycle through shuffled rounds of all types, so counts stay balanced.
    singles = []
    plans = []
    for index, category in enumerate(categories):
        if category == "single":
            if not singles:
                singles = list(rng.permutation(names))
            chosen = [singles.pop()]
        elif category == "double":
            chosen = [n for n in (rng.choice(spatial), rng.choice(motion)) if n is not None]
        else:
            chosen = []
        distortions = [
            AppliedDistortion(
                str(name),
                round(float(rng.uniform(*SEVERITY_RANGE)), 2),
                EXTENTS[rng.choice(len(EXTENTS), p=EXTENT_PROBS)],
            )
            for name in chosen
        ]
        offset = float(rng.uniform())  # drawn for every clip so plans do not depend on the source kind
        width, height = sizes[rng.integers(len(sizes))]
        n_frames, fps = max(4, round(settings.seconds * settings.fps)), settings.fps
        if sources:
            source, duration, source_fps = sources[index % len(sources)]
            # Never faster than the source: a higher rate would repeat frames (unlabelled stutter).
            fps = min(settings.fps, source_fps) if source_fps > 0 else settings.fps
            # One frame of margin: container durations are often a frame longer than what decodes.
            available = math.floor(duration * fps) - 1
            n_frames = max(1, min(round(settings.seconds * fps), available))
            start = round(offset * max(0.0, duration - (n_frames + 1) / fps), 3)
        else:
            kind, start = kinds[rng.integers(len(kinds))], 0.0
            source = f"procedural:{kind}"
            if kind == "photo":
                if not photos:  # every photo once per round, in a shuffled order
                    photos = list(rng.permutation(len(images)))
                source = f"photo:{images[photos.pop()]}"
        # Own stream per clip, so turning grain on leaves every other draw of the plan as it was.
        grain = round(float(_clip_rng(settings.seed, index, 4).uniform(*grain_range)), 2) if not sources else 0.0
        photo_scale = 0.0
        if source.startswith("photo:") and settings.content.photo_scale != (0, 0):
            log_range = np.log(settings.content.photo_scale)
            photo_scale = round(float(np.exp(_clip_rng(settings.seed, index, 6).uniform(*log_range))), 2)
        plans.append(ClipPlan(index, f"videos/clip_{index:05d}.mp4", source, start, fps, n_frames, distortions,
                              int(width), int(height), grain, photo_scale))
    return plans


# ---------------------------------------------------------------- procedural content


def _noise_field(rng, height, width, slope):
    """Periodic 1/f^slope noise (zero mean, unit std): tiles seamlessly, so a camera can pan forever."""
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    freq = np.sqrt(fx**2 + fy**2)
    freq[0, 0] = 1.0
    amplitude = freq**-slope
    amplitude[0, 0] = 0.0
    phase = rng.uniform(0.0, 2 * np.pi, amplitude.shape)
    field_ = np.fft.irfft2(amplitude * np.exp(1j * phase), s=(height, width))
    return ((field_ - field_.mean()) / (field_.std() + 1e-12)).astype(np.float32)


def _dead_leaves(rng, height, width, detail, color_a, color_b, leaves=4000):
    """Periodic dead-leaves image, float32 [H, W, 3]: opaque discs of random colour painted one over another,
    radii drawn with density ~ r^-3 between 1.5 * detail px and a quarter of the short side, one-pixel
    anti-aliased edges. Flat regions and sharp edges at every scale, like a photograph (its spectrum falls as
    1/f^2 in energy), where 1/f noise textures have no edges: blur shows at every edge whatever the detail."""
    r_min, r_max = 1.5 * max(detail, 0.5), min(height, width) / 4.0
    u = rng.uniform(0.0, 1.0, leaves)
    radii = (r_min**-2 - u * (r_min**-2 - r_max**-2)) ** -0.5  # inverse CDF of the r^-3 density
    centres = rng.uniform(0.0, 1.0, (leaves, 2)) * (height, width)
    mix = rng.uniform(0.0, 1.0, (leaves, 1))
    colours = np.clip(color_a + (color_b - color_a) * mix + rng.uniform(-0.25, 0.25, (leaves, 1)), 0, 1)
    rgb = np.empty((height, width, 3), dtype=np.float32)
    rgb[:] = colours[0]
    for (cy, cx), r, colour in zip(centres, radii, colours.astype(np.float32)):
        reach = int(math.ceil(r)) + 1
        rows = np.arange(int(cy) - reach, int(cy) + reach + 1)
        cols = np.arange(int(cx) - reach, int(cx) + reach + 1)
        dist = np.hypot((rows - cy)[:, None], (cols - cx)[None, :]) - r
        coverage = np.clip(0.5 - dist, 0.0, 1.0)[..., None].astype(np.float32)
        window = np.ix_(rows % height, cols % width)  # wrap around: the canvas tiles seamlessly
        rgb[window] = rgb[window] * (1.0 - coverage) + colour * coverage
    return rgb


def _canvas(rng, kind, height, width, settings):
    """A periodic RGB canvas in [0, 1], float32 [H, W, 3]."""
    slope = rng.uniform(*settings.detail)
    lum = _noise_field(rng, height, width, slope)
    chroma_a = _noise_field(rng, height, width, slope + 1.0)
    chroma_b = _noise_field(rng, height, width, slope + 1.0)
    color_a, color_b = rng.uniform(0.15, 0.85, (2, 3)).astype(np.float32)
    tint = rng.uniform(-0.12, 0.12, 3).astype(np.float32)
    if kind == "gradient":
        # Smooth colour ramps plus a sharp periodic pattern (stripes or checks) and faint texture.
        ramp = np.clip(0.5 + 0.35 * _noise_field(rng, height, width, 3.0), 0, 1)[..., None]
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        ky, kx = rng.integers(2, 9, 2) * rng.choice([-1, 1], 2)
        wave = np.sin(2 * np.pi * (kx * xx / width + ky * yy / height))
        if rng.random() < 0.5:
            wave = np.sign(wave) * np.sign(np.sin(2 * np.pi * (-ky * xx / width + kx * yy / height)))
        detail = 0.12 * wave + 0.05 * lum
        rgb = color_a + (color_b - color_a) * ramp + detail[..., None]
    elif kind == "leaves":
        rgb = _dead_leaves(rng, height, width, slope, color_a, color_b) + 0.03 * lum[..., None]
    else:
        contrast = 0.1 if kind == "shapes" else 0.17  # shapes sit on a calmer background
        mix = np.clip(0.5 + 0.3 * chroma_a, 0, 1)[..., None]
        rgb = color_a + (color_b - color_a) * mix + contrast * lum[..., None] + tint * chroma_b[..., None]
    # Clean content is neither over- nor under-exposed: exposure distortions must be the only ones.
    rgb = rgb - rgb.mean() + rng.uniform(0.4, 0.6)
    return np.clip(rgb, 0.03, 0.97).astype(np.float32)


class ProceduralClip:
    """Frames of one procedural clip, made on demand: a periodic canvas seen by a moving camera
    (pan; for 'zoom', zoom and a slow rotation) and, for 'shapes', anti-aliased shapes moving on top."""

    def __init__(self, kind, rng, width, height, n_frames, settings):
        from scipy import ndimage

        self._ndimage = ndimage
        self.width, self.height, self.n_frames = width, height, n_frames
        scale = min(width, height) / 128.0
        self.canvas = _canvas(rng, kind, 2 * height, 2 * width, settings)
        speed = rng.uniform(*settings.speed) * scale
        if kind == "shapes":
            speed *= 0.3  # mostly steady camera; the shapes carry the motion
        angle = rng.uniform(0, 2 * np.pi)
        self.velocity = speed * np.array([np.sin(angle), np.cos(angle)])
        self.origin = rng.uniform(0, 1, 2) * np.array([2 * height, 2 * width])
        self.zoom = rng.uniform(0.2, 0.5) * rng.choice([-1, 1]) if kind == "zoom" else 0.0
        self.rotation = rng.uniform(-0.15, 0.15) if kind == "zoom" else 0.0
        self.shapes = []
        if kind == "shapes":
            for _ in range(int(rng.integers(settings.objects[0], settings.objects[1] + 1))):
                radius = rng.uniform(0.08, 0.2) * min(width, height)
                shape_speed = rng.uniform(*settings.speed) * scale
                direction = rng.uniform(0, 2 * np.pi)
                self.shapes.append(
                    dict(
                        type=rng.choice(["disk", "square", "ring"]),
                        center=rng.uniform(0, 1, 2) * np.array([height, width]),
                        velocity=shape_speed * np.array([np.sin(direction), np.cos(direction)]),
                        radius=radius,
                        color=rng.uniform(0.05, 0.95, 3).astype(np.float32),
                        stripes=rng.uniform(0.15, 0.6) / scale,
                        spin=rng.uniform(0, np.pi),
                    )
                )
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        self._grid = (yy - height / 2.0, xx - width / 2.0)

    def frame(self, i):
        """Frame i as float32 [H, W, 3] in 0..255."""
        t = i / max(self.n_frames - 1, 1)
        zoom = math.exp(self.zoom * t)
        cos, sin = math.cos(self.rotation * t) / zoom, math.sin(self.rotation * t) / zoom
        center = self.origin + self.velocity * i
        if self.zoom == 0.0:
            rgb = self._pan(center[0] - self.height / 2.0, center[1] - self.width / 2.0)
        else:
            gy, gx = self._grid
            coords = [center[0] + cos * gy + sin * gx, center[1] - sin * gy + cos * gx]
            rgb = np.stack(
                [self._ndimage.map_coordinates(self.canvas[..., c], coords, order=1, mode="grid-wrap")
                 for c in range(3)],
                axis=-1,
            )
        for shape in self.shapes:
            rgb = self._draw(rgb, shape, i)
        return np.clip(rgb * 255.0, 0, 255).astype(np.float32)

    def _pan(self, top, left):
        """The window at a sub-pixel offset of the periodic canvas, bilinearly interpolated (what
        map_coordinates would give for a pure translation, several times faster)."""
        iy, fy = math.floor(top), top - math.floor(top)
        ix, fx = math.floor(left), left - math.floor(left)
        rows = (np.arange(self.height + 1) + iy) % self.canvas.shape[0]
        cols = (np.arange(self.width + 1) + ix) % self.canvas.shape[1]
        patch = self.canvas[rows][:, cols]
        top_row = (1 - fx) * patch[:-1, :-1] + fx * patch[:-1, 1:]
        bottom_row = (1 - fx) * patch[1:, :-1] + fx * patch[1:, 1:]
        return ((1 - fy) * top_row + fy * bottom_row).astype(np.float32)

    def _draw(self, rgb, shape, i):
        # Bounce inside the frame: a triangle wave of the straight-line position.
        span = np.array([self.height, self.width], dtype=np.float64)
        pos = (shape["center"] + shape["velocity"] * i) % (2 * span)
        pos = np.where(pos > span, 2 * span - pos, pos)
        dy = self._grid[0] + self.height / 2.0 - pos[0]
        dx = self._grid[1] + self.width / 2.0 - pos[1]
        r = shape["radius"]
        if shape["type"] == "square":
            c, s = math.cos(shape["spin"]), math.sin(shape["spin"])
            dist = np.maximum(np.abs(c * dx + s * dy), np.abs(-s * dx + c * dy)) - r
        elif shape["type"] == "ring":
            dist = np.abs(np.hypot(dx, dy) - 0.7 * r) - 0.3 * r
        else:
            dist = np.hypot(dx, dy) - r
        coverage = np.clip(0.5 - dist, 0.0, 1.0)[..., None]  # one-pixel anti-aliased edge
        fill = shape["color"] * (1.0 + 0.25 * np.sin(shape["stripes"] * (dx + dy)))[..., None]
        return rgb * (1.0 - coverage) + np.clip(fill, 0, 1) * coverage


# ---------------------------------------------------------------- photographs


# Share of the photo one frame covers (width or height, whichever is tighter) without --photo-scale; the upper
# bound is also the cap with it, so the camera always has room to pan.
PHOTO_COVERAGE = (0.45, 0.8)


class PhotoClip:
    """Frames of a camera moving over a photograph: a straight pan with a gentle zoom in or out, each frame
    resampled from the photo with Lanczos at a sub-pixel box (so the camera neither blurs nor jumps), and up to
    `settings.objects` elliptical cut-outs of the photo gliding across it, like things moving in the scene.

    The photo is first scaled so the frame covers 45-80% of it, or with `photo_scale` so that one frame pixel
    spans that many photo pixels (the frame still covers at most 80% of it, so the camera has room to move):
    clips keep the photo's own detail (it is never upscaled past its resolution when it is large enough)."""

    def __init__(self, path, rng, width, height, n_frames, settings, photo_scale=0.0):
        from PIL import Image

        self.width, self.height, self.n_frames = width, height, n_frames
        try:
            with Image.open(path) as image:
                original = image.size
                # photo size -> the size it is resized to; the frame never covers more of it than the cap
                least = max(width / original[0], height / original[1]) / PHOTO_COVERAGE[1]
                shrink = max(1 / photo_scale, least) if photo_scale else 0
                # JPEG: decode at a fraction of a large photo's size, never below what it is resized to
                image.draft("RGB", (math.ceil(original[0] * shrink), math.ceil(original[1] * shrink)) if shrink
                            else (4 * width, 4 * height))
                photo = image.convert("RGB")
        except (OSError, ValueError) as error:
            raise InputError(f"{path}: cannot read image ({str(error).splitlines()[0]})") from None
        coverage = rng.uniform(*PHOTO_COVERAGE)  # drawn either way, so the clip's other draws do not move
        if shrink:
            size = (round(original[0] * shrink), round(original[1] * shrink))
        else:
            scale = max(width / photo.width, height / photo.height) / coverage
            size = (round(photo.width * scale), round(photo.height * scale))
        self.photo = photo.resize((max(width, size[0]), max(height, size[1])), Image.LANCZOS)
        pw, ph = self.photo.size
        zoom_end = rng.uniform(0.85, 1.15)
        span_w, span_h = width * max(1.0, zoom_end), height * max(1.0, zoom_end)
        speed = rng.uniform(*settings.speed) * min(width, height) / 128.0  # px per frame, like procedural content
        angle = rng.uniform(0, 2 * np.pi)
        travel = speed * (n_frames - 1) * np.array([np.cos(angle), np.sin(angle)])
        room = np.maximum([pw - span_w, ph - span_h], 0.0)
        travel = np.clip(travel, -room, room)  # the camera stays on the photo
        lo, hi = np.maximum(0.0, -travel), room - np.maximum(travel, 0.0)
        self.start, self.travel, self.zoom_end = lo + rng.uniform(0, 1, 2) * (hi - lo), travel, zoom_end
        self.objects = [self._cut_out(rng, speed) for _ in range(int(rng.integers(0, settings.objects[1] // 2 + 1)))]

    def _cut_out(self, rng, speed):
        from PIL import Image, ImageDraw

        w = int(rng.uniform(0.12, 0.3) * self.width)
        h = int(rng.uniform(0.12, 0.3) * self.height)
        pw, ph = self.photo.size
        x, y = rng.uniform(0, pw - w), rng.uniform(0, ph - h)
        patch = self.photo.crop((int(x), int(y), int(x) + w, int(y) + h))
        mask = Image.new("L", (4 * w, 4 * h), 0)
        ImageDraw.Draw(mask).ellipse((0, 0, 4 * w - 1, 4 * h - 1), fill=255)
        mask = mask.resize((w, h), Image.LANCZOS)  # drawn 4x and reduced: an anti-aliased edge
        direction = rng.uniform(0, 2 * np.pi)
        velocity = rng.uniform(1.0, 2.5) * speed * np.array([np.cos(direction), np.sin(direction)])
        position = rng.uniform(0, 1, 2) * np.array([self.width - w, self.height - h])
        return patch, mask, position, velocity

    def frame(self, i):
        """Frame i as float32 [H, W, 3] in 0..255."""
        from PIL import Image

        t = i / max(self.n_frames - 1, 1)
        zoom = 1.0 + (self.zoom_end - 1.0) * t
        w, h = self.width * zoom, self.height * zoom
        cx, cy = self.start + self.travel * t + np.array([self.width, self.height]) * max(1.0, self.zoom_end) / 2
        box = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
        image = self.photo.resize((self.width, self.height), Image.LANCZOS, box=box)
        for patch, mask, position, velocity in self.objects:
            # bounce inside the frame (a triangle wave of the straight-line position)
            span = np.array([self.width - patch.width, self.height - patch.height], dtype=np.float64)
            pos = (position + velocity * i) % (2 * np.maximum(span, 1))
            pos = np.where(pos > span, 2 * span - pos, pos)
            image.paste(patch, (int(round(pos[0])), int(round(pos[1]))), mask)
        return np.asarray(image, dtype=np.float32)


def find_images(images_dir) -> list:
    root = Path(images_dir)
    if not root.is_dir():
        raise SetupError(f"{images_dir}: not a folder of images")
    images = sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                    if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not images:
        raise SetupError(f"{images_dir}: no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return images


# ---------------------------------------------------------------- user clips


def probe_clip(path):
    """(duration_s, fps) of a user clip, or InputError naming it."""
    import av

    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or 0)
            if stream.duration is not None and stream.time_base is not None:
                duration = float(stream.duration * stream.time_base)
            elif container.duration is not None:
                duration = container.duration / 1_000_000
            else:  # no duration in the headers (some streamed formats): find the last frame's time
                last = max((float(f.time) for f in container.decode(stream) if f.time is not None), default=0.0)
                duration = last + (1.0 / fps if fps else 0.0)
    except (av.FFmpegError, IndexError, OSError) as error:
        reason = "no video stream" if isinstance(error, IndexError) else str(error).splitlines()[0]
        raise InputError(f"{path}: cannot read video ({reason})") from None
    return duration, fps


def _fit(image, width, height):
    """Centre-crop a uint8 RGB frame to the target aspect ratio, then resize (area filter)."""
    import av

    h, w = image.shape[:2]
    if w * height > h * width:
        new_w = max(1, round(h * width / height))
        x0 = (w - new_w) // 2
        image = image[:, x0 : x0 + new_w]
    else:
        new_h = max(1, round(w * height / width))
        y0 = (h - new_h) // 2
        image = image[y0 : y0 + new_h]
    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
    return frame.reformat(width=width, height=height, interpolation="AREA").to_ndarray(format="rgb24")


def user_clip_frames(path, width, height, fps, start, n_frames):
    """Frames of a user clip from `start` seconds, resampled to `fps` by taking the latest frame at each
    output time (never faster than the source, so no frame repeats are introduced), cropped and resized.
    Yields float32 [H, W, 3]; decodes as a stream."""
    import av

    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError) as error:
        raise InputError(f"{path}: cannot read video ({str(error).splitlines()[0]})") from None
    with container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        emitted = 0
        latest = None
        try:
            if start > 2.0 and stream.time_base:
                # Jump near the start (to the keyframe before it) instead of decoding everything before it.
                container.seek(int((start - 1.0) / stream.time_base), stream=stream, backward=True)
            for frame in container.decode(stream):
                if frame.time is None:
                    continue
                # Output frame k shows the latest source frame at time start + k / fps.
                while emitted < n_frames and latest is not None and start + emitted / fps < frame.time:
                    yield _fit(latest.to_ndarray(format="rgb24"), width, height).astype(np.float32)
                    emitted += 1
                if emitted >= n_frames:
                    return
                latest = frame
        except av.FFmpegError as error:
            raise InputError(f"{path}: decoding failed ({str(error).splitlines()[0]})") from None
        if latest is not None and emitted < n_frames:
            yield _fit(latest.to_ndarray(format="rgb24"), width, height).astype(np.float32)


# ---------------------------------------------------------------- distortions


def _dct_matrix(n=8):
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    m[0] /= math.sqrt(2.0)
    return m.astype(np.float32)


_JPEG_LUMA = np.array(
    [
        [16, 11, 10, 16, 24, 40, 51, 61],
        [12, 12, 14, 19, 26, 58, 60, 55],
        [14, 13, 16, 24, 40, 57, 69, 56],
        [14, 17, 22, 29, 51, 87, 80, 62],
        [18, 22, 37, 56, 68, 109, 103, 77],
        [24, 35, 55, 64, 81, 104, 113, 92],
        [49, 64, 78, 87, 103, 121, 120, 101],
        [72, 92, 95, 98, 112, 100, 103, 99],
    ],
    dtype=np.float32,
)
_JPEG_CHROMA = np.full((8, 8), 99.0, dtype=np.float32)
_JPEG_CHROMA[:4, :4] = [[17, 18, 24, 47], [18, 21, 26, 66], [24, 26, 56, 99], [47, 66, 99, 99]]


def _block_quantize(frame, quality):
    """JPEG-style 8x8 DCT quantisation at `quality` (1-100): the blocking of a starved codec."""
    h, w = frame.shape[:2]
    ph, pw = -h % 8, -w % 8
    padded = np.pad(frame, ((0, ph), (0, pw), (0, 0)), mode="edge")
    r, g, b = padded[..., 0], padded[..., 1], padded[..., 2]
    ycc = [
        0.299 * r + 0.587 * g + 0.114 * b - 128.0,
        -0.168736 * r - 0.331264 * g + 0.5 * b,
        0.5 * r - 0.418688 * g - 0.081312 * b,
    ]
    scale = (5000.0 / quality if quality < 50 else 200.0 - 2 * quality) / 100.0
    m = _dct_matrix()
    out = []
    for channel, table in zip(ycc, (_JPEG_LUMA, _JPEG_CHROMA, _JPEG_CHROMA)):
        H, W = channel.shape
        blocks = channel.reshape(H // 8, 8, W // 8, 8).transpose(0, 2, 1, 3)
        coeffs = m @ blocks @ m.T
        step = np.maximum(table * scale, 1.0)
        coeffs = np.round(coeffs / step) * step
        out.append((m.T @ coeffs @ m).transpose(0, 2, 1, 3).reshape(H, W))
    y, cb, cr = out[0] + 128.0, out[1], out[2]
    rgb = np.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], axis=-1)
    return rgb[:h, :w]


def _exposure(frame, ev):
    """Change exposure by `ev` stops in linear light (gamma 2.2), clipping what saturates."""
    linear = (np.clip(frame, 0, 255) / 255.0) ** 2.2 * (2.0**ev)
    return 255.0 * np.clip(linear, 0.0, 1.0) ** (1 / 2.2)


class DistortionRenderer:
    """Applies one planned distortion to a frame stream: `__call__(frame, i)` -> frame (float32 0..255).

    Parameters per severity s in [1, 4] (sizes scale with the frame's short side, relative to 128 px):
    blur: Gaussian sigma = s px; motion blur: a straight smear of (2 + 2.5 s) px in one direction;
    noise: either Gaussian, sigma 6 s grey levels per channel, or sensor-like (luma noise growing with
    brightness, 6 s at white, plus blotchy chroma noise at half resolution); low resolution: down by
    1.5 + 0.75 s (area) and back up (bicubic); compression: the frames through a real encoder (`Compressor`);
    blocking: JPEG quality 60 * 0.42^s on 8x8 blocks (not in the default set); over-exposure: +(0.5 s + 0.2)
    EV; under-exposure: -(0.7 s + 0.3) EV; stutter: either a lower frame rate by duplication (each frame held
    round(1 + s) frames) or freezes of round(fps (0.1 + 0.1 s)) frames every fps (1.2 - 0.2 s) frames, the
    source running on underneath; flicker: a luminance offset of up to 0.035 s * 255, either a 2-4 Hz sine
    with 10% jitter or a random level each frame; shake: a per-frame translation of up to 0.02 s * short side.
    """

    def __init__(self, distortion: AppliedDistortion, rng, width, height, fps, n_frames):
        from scipy import ndimage

        self._ndimage = ndimage
        self.name, s = distortion.name, distortion.severity
        half = n_frames // 2
        self.active = {"whole": (0, n_frames), "first half": (0, half), "second half": (half, n_frames)}[
            distortion.extent
        ]
        scale = min(width, height) / 128.0
        self.rng = rng
        self.mode = None
        if self.name == "blur":
            self.sigma = s * scale
        elif self.name == "motion_blur":
            length, angle = (2.0 + 2.5 * s) * scale, rng.uniform(0, np.pi)
            steps = np.linspace(-length / 2, length / 2, max(2, round(length) + 1))
            self.offsets = sorted({(round(d * math.sin(angle)), round(d * math.cos(angle))) for d in steps})
        elif self.name == "noise":
            self.sigma = 6.0 * s
            self.mode = "sensor" if rng.random() < 0.5 else "gaussian"
        elif self.name == "upscaling":
            self.factor = 1.5 + 0.75 * s
        elif self.name == "blocking":
            self.quality = max(1.0, 60.0 * 0.42**s)
        elif self.name == "overexposure":
            self.ev = 0.5 * s + 0.2
        elif self.name == "underexposure":
            self.ev = -(0.7 * s + 0.3)
        elif self.name == "stutter":
            self.mode = "duplicate" if rng.random() < 0.6 else "freeze"
            self.holds = self._hold_schedule(s, fps) if self.mode == "duplicate" else self._freeze_schedule(s, fps)
            self.held = None
        elif self.name == "flicker":
            amp = 0.035 * s * 255.0
            self.mode = "sine" if rng.random() < 0.5 else "random"
            if self.mode == "sine":
                freq = rng.uniform(min(2.0, 0.3 * fps), min(4.0, 0.45 * fps))  # below Nyquist at any rate
                t = np.arange(n_frames) / fps
                self.offsets = amp * (np.sin(2 * np.pi * freq * t + rng.uniform(0, 2 * np.pi))
                                      + rng.normal(0, 0.1, n_frames))
            else:
                self.offsets = rng.uniform(-amp, amp, n_frames)
        elif self.name == "shake":
            self.max_shift = max(1, round(0.02 * s * min(width, height)))
            self.shifts = rng.integers(-self.max_shift, self.max_shift + 1, (n_frames, 2))
        elif self.name != "compression":
            raise ValueError(f"unknown distortion {self.name}")

    def _hold_schedule(self, s, fps):
        """A lower frame rate: from a random phase on, every k-th frame of the active span held for k frames
        (the frames before the phase hold the span's first one)."""
        k = max(2, round(1 + s))
        lo, hi = self.active
        first = lo + int(self.rng.integers(k))
        shown = {i: lo if i < first else i - (i - first) % k for i in range(lo, hi)}
        return {i: source for i, source in shown.items() if source != i}

    def _freeze_schedule(self, s, fps):
        length = max(2, round(fps * (0.1 + 0.1 * s)))
        gap = max(2.0, fps * (1.2 - 0.2 * s))
        lo, hi = self.active
        frozen = {}  # output frame -> first frame of its freeze
        i = lo + int(self.rng.integers(1, max(2, round(gap))))
        while i < hi:
            for j in range(i, min(i + length, hi)):
                frozen[j] = i
            i += length + max(1, round(self.rng.uniform(0.6, 1.4) * gap))
        return frozen

    def __call__(self, frame, i):
        lo, hi = self.active
        if self.name == "stutter":
            # Output frame i shows source frame holds[i] (earlier, already seen) or its own; the source runs on
            # underneath, so the frames in between are dropped, not delayed.
            if self.holds.get(i, i) == i:
                self.held = frame
            return self.held
        if not lo <= i < hi or self.name == "compression":
            return frame
        if self.name == "blur":
            return self._ndimage.gaussian_filter(frame, sigma=(self.sigma, self.sigma, 0), mode="reflect")
        if self.name == "motion_blur":
            return _smear(frame, self.offsets)
        if self.name == "noise":
            return frame + self._noise(frame)
        if self.name == "upscaling":
            return _down_up(frame, self.factor)
        if self.name == "blocking":
            return _block_quantize(frame, self.quality)
        if self.name in ("overexposure", "underexposure"):
            return _exposure(frame, self.ev)
        if self.name == "flicker":
            return frame + np.float32(self.offsets[i])
        # shake: translate with reflected borders so no black edges appear
        dy, dx = self.shifts[i]
        m = self.max_shift
        padded = np.pad(frame, ((m, m), (m, m), (0, 0)), mode="reflect")
        h, w = frame.shape[:2]
        return padded[m + dy : m + dy + h, m + dx : m + dx + w]

    def _noise(self, frame):
        if self.mode == "gaussian":
            return self.rng.normal(0.0, self.sigma, frame.shape).astype(np.float32)
        return sensor_noise(frame, self.sigma, self.rng)


def sensor_noise(frame, sigma, rng):
    """Camera-like noise for float32 [H, W, 3] `frame`: luma noise that grows with the light, chroma noise at
    half resolution."""
    h, w = frame.shape[:2]
    luma = frame @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    # shot noise grows with the light; read noise keeps the shadows from being clean
    y = rng.normal(0.0, 1.0, (h, w)).astype(np.float32) * sigma * np.sqrt(0.2 + 0.8 * luma / 255.0)
    chroma = rng.normal(0.0, 0.7 * sigma, (2, (h + 1) // 2, (w + 1) // 2)).astype(np.float32)
    cb, cr = (np.repeat(np.repeat(c, 2, axis=0), 2, axis=1)[:h, :w] for c in chroma)
    return np.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], axis=-1)


def _smear(frame, offsets):
    """The mean of the frame shifted along a line (edge pixels repeated): motion blur of a moving camera."""
    reach = max(max(abs(dy), abs(dx)) for dy, dx in offsets)
    padded = np.pad(frame, ((reach, reach), (reach, reach), (0, 0)), mode="edge")
    h, w = frame.shape[:2]
    total = np.zeros_like(frame)
    for dy, dx in offsets:
        total += padded[reach + dy : reach + dy + h, reach + dx : reach + dx + w]
    return total / len(offsets)


def _down_up(frame, factor):
    """Down-scaled by `factor` (area average) and back up (bicubic), as a low-resolution source upscaled."""
    from PIL import Image

    h, w = frame.shape[:2]
    image = Image.fromarray(np.clip(np.rint(frame), 0, 255).astype(np.uint8))
    small = image.resize((max(1, round(w / factor)), max(1, round(h / factor))), Image.BOX)
    return np.asarray(small.resize((w, h), Image.BICUBIC), dtype=np.float32)


class Compressor:
    """Compression by a real encoder: the clip's frames are encoded and decoded again, and the decoded frames
    replace the originals over the distortion's span. The codec is drawn per clip: libx264 (60%, CRF
    26 + 6 s: 32 ... 50), libvpx-vp9 (20%, CRF 28 + 8.5 s: 36 ... 62) or MPEG-4 part 2 (20%, qscale 3 + 7 s:
    10 ... 31, its 8x8 blocking), each single-threaded and x264 as `X264_REPEATABLE`, so the same input gives the
    same frames."""

    def __init__(self, distortion: AppliedDistortion, rng, fps, n_frames):
        s = distortion.severity
        half = n_frames // 2
        self.active = {"whole": (0, n_frames), "first half": (0, half), "second half": (half, n_frames)}[
            distortion.extent
        ]
        draw = rng.random()
        if draw < 0.6:
            self.codec, self.decoder, self.options = "libx264", "h264", {"crf": str(round(26 + 6 * s)),
                                                                       **X264_REPEATABLE}
        elif draw < 0.8:
            self.codec, self.decoder, self.options = "libvpx-vp9", "vp9", {
                "crf": str(round(28 + 8.5 * s)), "b": "0", "deadline": "realtime", "cpu-used": "8"}
        else:  # qmin = qmax pins MPEG-4's quantiser, as `-qscale:v` does
            q = str(round(3 + 7 * s))
            self.codec, self.decoder, self.options = "mpeg4", "mpeg4", {"qmin": q, "qmax": q}
        self.fps = Fraction(fps).limit_denominator(1001)

    def __call__(self, frames: list) -> list:
        import av

        images = [np.clip(np.rint(f), 0, 255).astype(np.uint8) for f in frames]
        h, w = images[0].shape[:2]
        encoder = av.CodecContext.create(self.codec, "w")
        encoder.width, encoder.height, encoder.pix_fmt = w, h, "yuv420p"
        encoder.time_base, encoder.framerate = 1 / self.fps, self.fps
        encoder.options = self.options
        encoder.thread_count = 1
        decoder = av.CodecContext.create(self.decoder, "r")
        decoder.thread_count = 1
        decoded = []
        for i, image in enumerate([*images, None]):
            frame = None
            if image is not None:
                frame = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(format="yuv420p")
                frame.pts = i
            for packet in encoder.encode(frame):
                decoded += [f.to_ndarray(format="rgb24") for f in decoder.decode(packet)]
        decoded += [f.to_ndarray(format="rgb24") for f in decoder.decode(None)]
        if len(decoded) != len(frames):
            raise InputError(f"{self.codec} gave {len(decoded)} frames for {len(frames)}")
        lo, hi = self.active
        return [decoded[i].astype(np.float32) if lo <= i < hi else frames[i] for i in range(len(frames))]


# ---------------------------------------------------------------- encoding


def encode_clip(path, frames, width, height, fps, crf=0):
    """Encode float/uint8 RGB frames to H.264 yuv420p at `crf` (0: lossless, so the only damage is the
    labelled one). Returns the number of frames written."""
    import av

    written = 0
    with files.replacing(path) as tmp:  # a bad source clip, Ctrl-C: no half-written file is left behind
        with av.open(str(tmp), mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.options = {"crf": str(crf), **X264_REPEATABLE}
            stream.codec_context.thread_count = 1  # tiny clips encode fast anyway
            for frame in frames:
                image = np.clip(np.rint(frame), 0, 255).astype(np.uint8)
                # Converting to yuv420p here rather than in the encoder removed one source of run-to-run
                # differences in the bitstream (the other: see X264_REPEATABLE).
                video_frame = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(format="yuv420p")
                for packet in stream.encode(video_frame):
                    container.mux(packet)
                written += 1
            for packet in stream.encode():
                container.mux(packet)
    return written


# ---------------------------------------------------------------- labels

PROBLEMS_QUESTION = "What quality problems does this video have?"  # stage 3's open question
NO_DISTORTION = "no visible distortion"  # how its answer describes a clean clip


def _when(extent):
    return {"whole": "throughout the video", "first half": "in the first half of the video",
            "second half": "in the second half of the video"}[extent]


def _questions(plan: ClipPlan, rng, names=DEFAULT_DISTORTIONS) -> list:
    """Stage-3 (question, answer) pairs for one clip.

    Yes/no: a 'yes' for each distortion present and one 'no' about an absent one, so clean clips give one
    'no' and two-distortion clips two 'yes': with equal shares of both the yes/no split is even. Open
    questions: what is wrong (with severity and when), when each distortion occurs, how severe it is.
    """
    present = {d.name for d in plan.distortions}
    pairs = [(f"Is there {d.type.phrase} in this video?", "Yes.") for d in plan.distortions]
    absent = [n for n in names if n not in present]  # a distortion the dataset could have had
    pairs.append((f"Is there {DISTORTIONS[absent[rng.integers(len(absent))]].phrase} in this video?", "No."))
    level = level_for(plan.mos)
    if plan.distortions:
        problems = " and ".join(f"{severity_word(d.severity)} {d.type.phrase} {_when(d.extent)}" for d in plan.distortions)
        summary = f"The video has {problems}. Overall, the quality is {level}."
    else:
        summary = f"The video has {NO_DISTORTION}. Overall, the quality is {level}."
    pairs.append((PROBLEMS_QUESTION, summary))
    for d in plan.distortions:
        when = _when(d.extent)
        pairs.append((f"When does the {d.type.phrase} occur?", when[0].upper() + when[1:] + "."))
        pairs.append((f"How severe is the {d.type.phrase} in this video?", f"It is {severity_word(d.severity)}."))
    return pairs


def _csv_text(header, rows):
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def _conversation(record_id, video, question, answer, **extra):
    return {
        "id": record_id,
        "image": video,
        "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}],
        **extra,
    }


def label_files(plans, seed, names=DEFAULT_DISTORTIONS) -> dict:
    """File name -> text of every label file for the given (rendered) clips.

    The JSON files hold the same records as the stage CSVs, in the LLaVA-style format `vqa2 finetune`
    reads: stage 2 with the scorer's prompt (two <image> slots), stages 1 and 3 as bare questions. `names`: the
    distortions the dataset draws from (the 'No' questions ask about one of them that a clip lacks)."""
    from vqa2cli.data import distortion_answer, distortion_question
    from vqa2cli.prompts import UGC_USER
    from vqa2cli.scoring import answer_text

    stage1, stage2, stage3, manifest = [], [], [], []
    json1, json2, json3 = [], [], []
    for plan in plans:
        mos = plan.mos
        stage2.append((plan.video, f"{mos:.2f}"))
        json2.append(_conversation(f"clip_{plan.index:05d}_score", plan.video, UGC_USER,
                                   answer_text(level_for(mos)), gt_score=mos))
        for kind in ("spatial", "motion"):
            # The strongest distortion of each kind is "the main" one (plans hold at most one per kind).
            of_kind = sorted((d for d in plan.distortions if d.type.kind == kind), key=lambda d: -d.severity)
            if of_kind:
                stage1.append((plan.video, of_kind[0].type.phrase, kind))
                json1.append(_conversation(f"clip_{plan.index:05d}_{kind}", plan.video, distortion_question(kind),
                                           distortion_answer(of_kind[0].type.phrase)))
        for n, (question, answer) in enumerate(_questions(plan, _clip_rng(seed, plan.index, 3), names)):
            stage3.append((plan.video, question, answer))
            json3.append(_conversation(f"clip_{plan.index:05d}_q{n}", plan.video, question, answer))
        manifest.append(
            (
                plan.video,
                plan.source,
                f"{plan.start:.3f}",
                ";".join(f"{d.name}:{d.severity:.2f}:{d.extent}" for d in plan.distortions) or "none",
                f"{mos:.2f}",
                level_for(mos),
                f"{plan.grain:.2f}",
                f"{plan.photo_scale:.2f}",
            )
        )
    dump = lambda records: json.dumps(records, indent=1, ensure_ascii=False) + "\n"  # noqa: E731
    return {
        "labels.csv": _csv_text(("path", "mos"), stage2),
        "stage1.csv": _csv_text(("video", "distortion", "kind"), stage1),
        "stage2.csv": _csv_text(("video", "mos"), stage2),
        "stage3.csv": _csv_text(("video", "question", "answer"), stage3),
        "stage1.json": dump(json1),
        "stage2.json": dump(json2),
        "stage3.json": dump(json3),
        "manifest.csv": _csv_text(("video", "source", "start", "distortions", "mos", "level", "grain", "photo_scale"),
                                    manifest),
    }


# ---------------------------------------------------------------- the whole dataset


@dataclass
class SynthSettings:
    count: int = 200
    seed: int = 0
    width: int = 128
    height: int = 128
    fps: float = 12.0
    seconds: float = 4.0
    crf: int = 0  # 0 = lossless: only the labelled damage shows
    content: ContentSettings = field(default_factory=ContentSettings)
    more_sizes: tuple = ()  # each clip takes one of (width, height) and these, drawn from the seed
    distortions: tuple = DEFAULT_DISTORTIONS

    @property
    def sizes(self) -> tuple:
        return ((self.width, self.height), *(tuple(size) for size in self.more_sizes))

    def validate(self):
        if self.count < 1:
            raise SetupError(f"--count must be at least 1, got {self.count}")
        for width, height in self.sizes:
            if width < 16 or height < 16 or width % 2 or height % 2:
                raise SetupError(f"--size must be even and at least 16x16, got {width}x{height}")
        unknown = [name for name in self.distortions if name not in DISTORTIONS]
        if not self.distortions or unknown:
            raise SetupError(f"unknown distortion(s) {unknown or '(none given)'}; choose from {', '.join(DISTORTIONS)}")
        if not 1 <= self.fps <= 120:
            raise SetupError(f"--fps must be in [1, 120], got {self.fps}")
        if self.seconds * self.fps < 4:
            raise SetupError(f"clips need at least 4 frames: --seconds {self.seconds} at --fps {self.fps} is too short")
        if not 0 <= self.crf <= 51:
            raise SetupError(f"--crf must be in [0, 51], got {self.crf}")
        self.content.validate()


def find_clips(clips_dir) -> list:
    root = Path(clips_dir)
    if not root.is_dir():
        raise SetupError(f"{clips_dir}: not a folder of clips")
    clips = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS)
    if not clips:
        raise SetupError(f"{clips_dir}: no video files ({', '.join(sorted(VIDEO_EXTENSIONS))})")
    return clips


def generate_dataset(out, settings: SynthSettings, clips_dir=None, overwrite=False, on_clip=None, jobs=1,
                     images_dir=None) -> dict:
    """Write videos/ and the label files into `out`. `on_clip(plan, error_or_None)` reports progress, in plan
    order. Returns a summary dict. Unreadable user clips are skipped (named in the summary). On Ctrl-C the
    clips made so far are labelled (synth.json says `interrupted`) before KeyboardInterrupt goes on.

    `jobs` > 1 renders clips in that many processes; every clip draws from its own seeded streams, so the
    dataset is the same whatever `jobs` is. The workers are spawned, so a script calling this with `jobs` > 1
    must do so under `if __name__ == "__main__":`."""
    settings.validate()
    if clips_dir is not None and images_dir is not None:
        raise SetupError("use --clips or --images, not both")
    if jobs < 1:
        raise SetupError(f"--jobs must be at least 1, got {jobs}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SetupError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise SetupError(f"{out}: folder is not empty (use --overwrite to replace its dataset)")
    sources, skipped = None, []
    if clips_dir is not None:
        sources = []
        root = Path(clips_dir)
        for clip in find_clips(clips_dir):
            try:
                duration, fps = probe_clip(clip)
            except InputError as error:
                skipped.append(str(error))
                continue
            usable_fps = min(settings.fps, fps) if fps > 0 else settings.fps
            if math.floor(duration * usable_fps) - 1 < 4:  # the margin plan_dataset keeps
                skipped.append(f"{clip}: too short ({duration:.2f} s) to make a clip of at least 4 frames")
                continue
            sources.append((clip.relative_to(root).as_posix(), duration, fps))
        if not sources:
            raise SetupError(f"{clips_dir}: none of the clips could be read ({skipped[0]})")
    images = ()
    if "photo" in settings.content.kinds:
        if images_dir is None:
            raise SetupError("photo content needs --images DIR (a folder of photographs)")
        images = find_images(images_dir)
    plans = plan_dataset(settings, sources, images)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    done, failed = [], []

    def keep(plan, error):
        if error:
            failed.append(error)
        else:
            done.append(plan)

    def record(plan, error):
        keep(plan, error)
        if on_clip:
            on_clip(plan, InputError(error) if error else None)

    interrupted = False
    try:
        if jobs == 1:
            for plan in plans:
                record(plan, _render_outcome(out, plan, settings, clips_dir, images_dir))
        else:
            with _worker_pool(jobs) as pool:
                futures = [pool.submit(_render_outcome, out, plan, settings, clips_dir, images_dir) for plan in plans]
                try:
                    for plan, future in zip(plans, futures):
                        record(plan, future.result())
                except BaseException as error:
                    # Clips not started are dropped; the ones being made are finished, and on Ctrl-C labelled.
                    pool.shutdown(wait=True, cancel_futures=True)
                    if isinstance(error, KeyboardInterrupt):
                        recorded = len(done) + len(failed)
                        for plan, future in zip(plans[recorded:], futures[recorded:]):
                            if not future.cancelled():
                                keep(plan, future.result())
                    raise
    except KeyboardInterrupt:
        interrupted = True  # label what was made, then stop
    if not done:
        if interrupted:
            raise KeyboardInterrupt
        raise SetupError(f"no clip could be made ({failed[0]})")
    for name, text in label_files(done, settings.seed, settings.distortions).items():
        files.write_text(out / name, text)
    meta = {
        "format_version": FORMAT_VERSION,
        "settings": {**asdict(settings), "content": asdict(settings.content)},
        "clips_dir": str(clips_dir) if clips_dir is not None else None,
        "images_dir": str(images_dir) if images_dir is not None else None,
        "clips": len(done),
        "interrupted": interrupted,
        "failed": failed,
        "skipped_sources": skipped,
        "mos": {"clean": CLEAN_MOS, "max_impairment": MAX_IMPAIRMENT, "exponent": IMPAIRMENT_EXPONENT,
                "partial_weight": PARTIAL_WEIGHT},
    }
    files.write_text(out / "synth.json", json.dumps(meta, indent=1, default=list) + "\n")
    if interrupted:
        raise KeyboardInterrupt
    return meta


def clean_frames(plan: ClipPlan, settings: SynthSettings, clips_dir=None, images_dir=None):
    """The undistorted frames of a planned clip (a generator of float32 [H, W, 3])."""
    kind, _, name = plan.source.partition(":")
    if kind in ("procedural", "photo"):
        rng = _clip_rng(settings.seed, plan.index, 1)
        if kind == "photo":
            clip = PhotoClip(Path(images_dir) / name, rng, plan.width, plan.height, plan.n_frames, settings.content,
                             plan.photo_scale)
        else:
            clip = ProceduralClip(name, rng, plan.width, plan.height, plan.n_frames, settings.content)
        if plan.grain > 0:
            grain_rng = _clip_rng(settings.seed, plan.index, 5)
            return (frame + sensor_noise(frame, plan.grain, grain_rng) for frame in map(clip.frame, range(plan.n_frames)))
        return (clip.frame(i) for i in range(plan.n_frames))
    return user_clip_frames(Path(clips_dir) / plan.source, plan.width, plan.height, plan.fps, plan.start,
                            plan.n_frames)


def _render_outcome(out, plan, settings, clips_dir, images_dir=None):
    """Make one clip: None when it is written, else why it could not be (the message crosses processes)."""
    try:
        _render(out, plan, settings, clips_dir, images_dir)
    except InputError as error:
        return str(error)
    return None


def _init_worker():
    # Ctrl-C (and `timeout`'s SIGTERM) reach the whole process group: workers finish their clip and the
    # parent decides what to keep. A worker left behind by a parent killed at once exits by itself.
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    threading.Thread(target=_exit_when_orphaned, args=(os.getppid(),), daemon=True).start()


def _exit_when_orphaned(parent: int):
    while os.getppid() == parent:
        time.sleep(1)
    os._exit(1)


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity where the OS says, e.g. under taskset or a container)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _worker_pool(jobs):
    # spawn, not fork: forking while the progress bar's thread holds a lock can deadlock the child.
    return ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker)


def _render(out, plan, settings, clips_dir, images_dir=None):
    if plan.n_frames < 4:
        raise InputError(f"{plan.source}: too short to make a clip (under 4 frames)")
    rng = _clip_rng(settings.seed, plan.index, 2)
    stages = [Compressor(d, rng, plan.fps, plan.n_frames) if d.name == "compression"
              else DistortionRenderer(d, rng, plan.width, plan.height, plan.fps, plan.n_frames)
              for d in plan.distortions]
    frames = clean_frames(plan, settings, clips_dir, images_dir)
    for stage in stages:
        frames = _applied(stage, frames)
    written = encode_clip(out / plan.video, frames, plan.width, plan.height, plan.fps, settings.crf)
    if written < plan.n_frames:
        # Labels (which half is distorted, where freezes fall) assume the planned length.
        (out / plan.video).unlink(missing_ok=True)
        raise InputError(f"{plan.source}: decoded {written} frames, fewer than the {plan.n_frames} planned")


def _applied(stage, frames):
    if isinstance(stage, Compressor):  # an encoder works on the whole clip (its frames reference each other)
        yield from stage(list(frames))
    else:
        for i, frame in enumerate(frames):
            yield stage(frame, i)
