"""How vqa2-tiny does on real-photo content: clean clips panned over photographs, distorted by `vqa2 synth`.

    python weights/photos_vqa2_tiny.py PHOTOS_DIR [--work DIR] [--model vqa2-tiny]

vqa2-tiny learns from procedural clips only (1/f textures, stripes, shapes). This measures it on content it never
saw the like of. Each photo (PNG/JPEG, read with PyAV, at least 192 px on its short side) is shrunk to 1.5-2.5 x
128 px on that side (or left as it is when smaller), and a 128 px window pans over it at 1-3 px a frame: 4 s at
12 fps, lossless H.264, as `vqa2 synth` makes its own clips. `vqa2 synth --clips` then applies the labelled
distortions to those clean clips, and `vqa2 eval` scores the MOS labels and the "Is there <distortion> in this
video?" questions, as `build_vqa2_tiny.py` does for its held-out set. The motion and the damage are still
synthetic; only the content is real.

The photos measured in the README are scikit-image 0.26.0's bundled ones (not shipped with vqa2):

    pip download scikit-image==0.26.0 --no-deps -d /tmp/skimage
    unzip -j /tmp/skimage/*.whl 'skimage/data/*' -d /tmp/skimage/data
    mkdir /tmp/photos && cd /tmp/skimage/data && cp astronaut.png brick.png camera.png chelsea.png coffee.png \\
        coins.png grass.png gravel.png hubble_deep_field.jpg moon.png motorcycle_left.png rocket.jpg /tmp/photos
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from vqa2cli_weights.build_vqa2_tiny import evaluate, run, yes_no_questions

SIZE, FPS, SECONDS = 128, 12.0, 4.0
MIN_SHORT_SIDE = 3 * SIZE // 2
PHOTO_SUFFIXES = (".png", ".jpg", ".jpeg")


def read_photo(path: Path):
    """The photo as a PyAV RGB frame; ValueError when it is not a readable image."""
    import av

    try:
        with av.open(str(path)) as container:
            frame = next(container.decode(video=0))
            return frame.reformat(format="rgb24")
    except (av.FFmpegError, StopIteration, IndexError, OSError) as error:  # IndexError: no video stream
        raise ValueError(f"not a readable image ({error.__class__.__name__})") from None


def pan_frames(photo, rng, n_frames: int):
    """Float RGB frames of a SIZE px window panning in a straight line over the photo, shrunk (area averaging)
    so its short side is 1.5-2.5 x SIZE or kept as it is when smaller; the whole path stays inside the photo.
    Never enlarged: that would blur a clip labelled clean."""
    short = min(photo.width, photo.height)
    if short < MIN_SHORT_SIDE:
        raise ValueError(f"a {photo.width}x{photo.height} photo is too small (short side under {MIN_SHORT_SIDE} px)")
    for _ in range(1000):
        scale = min(rng.uniform(1.5, 2.5) * SIZE / short, 1.0)
        width, height = round(photo.width * scale), round(photo.height * scale)
        speed, angle = rng.uniform(1.0, 3.0), rng.uniform(0, 2 * math.pi)
        dx, dy = speed * math.cos(angle), speed * math.sin(angle)
        span_x, span_y = abs(dx) * (n_frames - 1), abs(dy) * (n_frames - 1)
        room_x, room_y = width - SIZE - 1 - span_x, height - SIZE - 1 - span_y
        if room_x >= 0 and room_y >= 0:
            break
    else:
        raise ValueError(f"a {photo.width}x{photo.height} photo is too small for a {SIZE} px pan")
    image = photo.reformat(width=width, height=height, interpolation="AREA").to_ndarray().astype(np.float32)
    x0 = rng.uniform(0, room_x) + (span_x if dx < 0 else 0)
    y0 = rng.uniform(0, room_y) + (span_y if dy < 0 else 0)
    for i in range(n_frames):
        x, y = x0 + dx * i, y0 + dy * i
        left, top = math.floor(x), math.floor(y)
        fx, fy = x - left, y - top
        patch = image[top : top + SIZE + 1, left : left + SIZE + 1]
        rows = (1 - fx) * patch[:, :SIZE] + fx * patch[:, 1:]
        yield (1 - fy) * rows[:SIZE] + fy * rows[1:]


def make_clips(photos_dir: Path, out: Path, per_photo: int, seed: int) -> list[Path]:
    """`per_photo` clean clips of each photo in `photos_dir` (sorted by name); a photo that cannot be used is
    skipped with a one-line warning."""
    from vqa2cli.synth import encode_clip

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    clips = []
    for path in sorted(p for p in photos_dir.iterdir() if p.suffix.lower() in PHOTO_SUFFIXES):
        try:
            photo = read_photo(path)
            for k in range(per_photo):
                clip = out / f"{path.stem}_{k}.mp4"
                encode_clip(clip, pan_frames(photo, rng, round(FPS * SECONDS)), SIZE, SIZE, FPS)
                clips.append(clip)
        except ValueError as error:
            print(f"warning: skipped {path}: {error}", file=sys.stderr)
    return clips


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("photos", type=Path, help="folder of PNG/JPEG photographs")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "vqa2-tiny-photos", help="clips and data (replaced)")
    parser.add_argument("--model", default="vqa2-tiny")
    parser.add_argument("--per-photo", type=int, default=3, help="clean clips panned over each photo")
    parser.add_argument("--count", type=int, default=200, help="distorted (and clean) clips to evaluate")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    if not args.photos.is_dir():
        sys.exit(f"photos_vqa2_tiny: {args.photos} is not a folder")
    work = args.work.resolve()
    if work.exists():
        shutil.rmtree(work)
    logs = work / "logs"
    logs.mkdir(parents=True)
    clips = make_clips(args.photos, work / "clean", args.per_photo, args.seed)
    if not clips:
        sys.exit(f"photos_vqa2_tiny: no usable photo in {args.photos}")
    data = work / "set"
    run(["synth", str(data), "--clips", str(work / "clean"), "--count", str(args.count), "--seed", str(args.seed),
         "--quiet"], logs / "synth.log")
    questions = yes_no_questions(data / "stage3.csv", data / "yes_no.csv")
    scores = evaluate(args.model, data / "labels.csv", logs / "eval-scores.log")
    yes_no = evaluate(args.model, data / "yes_no.csv", logs / "eval-yes-no.log")
    photos = {clip.stem.rsplit("_", 1)[0] for clip in clips}
    print(json.dumps({"photos": len(photos), "clean_clips": len(clips),
                      "scores": {"count": scores["evaluated"], **{k: scores[k] for k in ("srcc", "plcc", "krcc", "rmse")}},
                      "yes_no": {"count": questions, "accuracy": yes_no["accuracy"]}}, indent=2))


if __name__ == "__main__":
    main()
