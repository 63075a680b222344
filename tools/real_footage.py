"""A real-footage held-out set with ffmpeg-style damage ladders, and its per-family report.

    python tools/real_footage.py make OUT [--videos DIR]       # clips, labels.csv, manifest.csv
    vqa2 eval OUT/labels.csv --model vqa2-tiny --predictions OUT/predictions.csv
    python tools/real_footage.py report OUT [OUT/predictions.csv] [--breakdown]

Sources: scikit-image's bundled photographs (12, none of them in vqa2-tiny's training content), each turned
into a 4 s clip at 24 fps by a slow camera pan and zoom at the photo's own resolution (a window of its pixels,
never upscaled), plus any real video clips in --videos (e.g. OpenCV's sample footage `vtest.avi` and
`tree.avi` from Debian's opencv-doc package). Each source gets a clean version and five families of damage
at four levels, made the way ffmpeg filters make them, at the source's resolution:

    compression  libx264 at CRF 30, 37, 43, 49 (the file as the encoder wrote it)
    blur         Gaussian blur, sigma 1, 2, 3.5, 6 px                       (ffmpeg gblur)
    noise        additive Gaussian noise, sigma 5, 10, 18, 30 grey levels   (ffmpeg noise)
    stutter      every 2nd, 3rd, 5th, 8th frame kept and repeated           (ffmpeg fps=N then fps=24)
    flicker      per-frame brightness offsets, up to 5, 10, 18, 30 levels  (ffmpeg eq=brightness)

Undamaged and non-compression versions are written as x264 at CRF 16 (visually lossless). x264 keeps its
macroblock tree on, as ffmpeg does, so a second `make` can write slightly different compressed clips (synth turns
it off for that reason: `vqa2cli.synth.X264_REPEATABLE`). labels.csv gives
each clip the MOS that `vqa2 synth` gives one distortion of the same severity (level k -> severity k,
clean -> 90), so `vqa2 eval` can report SRCC over the whole set; `report` adds the figure that matters most:
for each family, the Spearman correlation between damage level and score within each source clip (clean plus
the four levels), averaged over sources. A model that ranks a family backwards gets a negative number.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np

FPS = 24
SECONDS = 4.0
FAMILIES = {
    "compression": (30, 37, 43, 49),
    "blur": (1.0, 2.0, 3.5, 6.0),
    "noise": (5.0, 10.0, 18.0, 30.0),
    "stutter": (2, 3, 5, 8),
    "flicker": (5.0, 10.0, 18.0, 30.0),
}
CLEAN_CRF = 16
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "stereo_motorcycle", "camera", "hubble_deep_field",
                  "immunohistochemistry", "retina", "brick", "grass", "gravel")


# ---------------------------------------------------------------- sources


def skimage_photo(name: str) -> np.ndarray:
    import skimage.data

    image = getattr(skimage.data, name)()
    if name == "stereo_motorcycle":  # (left view, right view, disparity)
        image = image[0]
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    return np.ascontiguousarray(image[..., :3]).astype(np.uint8)


def camera_frames(photo: np.ndarray, seed: int, n_frames: int = round(FPS * SECONDS)) -> list[np.ndarray]:
    """A slow pan with a gentle zoom over `photo`: a window of 75% of its size (even sides) moving along a
    straight line and narrowing by up to 10%, sampled with bilinear interpolation at the window's own
    resolution (nothing is upscaled by more than the zoom's 10%)."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    h, w = photo.shape[:2]
    out_h, out_w = int(0.75 * h) // 2 * 2, int(0.75 * w) // 2 * 2
    start = rng.uniform(0, [h - out_h, w - out_w])
    end = rng.uniform(0, [h - out_h, w - out_w])
    zoom_end = rng.uniform(0.9, 1.0)
    yy, xx = np.mgrid[0:out_h, 0:out_w].astype(np.float32)
    frames = []
    for i in range(n_frames):
        t = i / (n_frames - 1)
        top, left = start + (end - start) * t
        scale = 1.0 + (zoom_end - 1.0) * t
        cy, cx = top + out_h / 2, left + out_w / 2
        coords = [cy + (yy - out_h / 2) * scale, cx + (xx - out_w / 2) * scale]
        frame = np.stack([ndimage.map_coordinates(photo[..., c].astype(np.float32), coords, order=1,
                                                  mode="nearest") for c in range(3)], axis=-1)
        frames.append(frame)
    return frames


def video_frames(path: Path, n_frames: int = round(FPS * SECONDS)) -> list[np.ndarray]:
    """The first `n_frames` frames of a real clip at its own rate (re-timed to 24 fps), cropped to even sides."""
    import av

    frames = []
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            rgb = frame.to_ndarray(format="rgb24")
            frames.append(rgb[: rgb.shape[0] // 2 * 2, : rgb.shape[1] // 2 * 2].astype(np.float32))
            if len(frames) == n_frames:
                break
    return frames


# ---------------------------------------------------------------- damage


def damaged(family: str, level: float, frames: list[np.ndarray], seed: int) -> list[np.ndarray]:
    """The frames with one family's damage at `level` (compression is done by the encoder, not here)."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    if family == "blur":
        return [ndimage.gaussian_filter(f, sigma=(level, level, 0)) for f in frames]
    if family == "noise":
        return [f + rng.normal(0, level, f.shape).astype(np.float32) for f in frames]
    if family == "stutter":
        return [frames[i - i % int(level)] for i in range(len(frames))]
    if family == "flicker":
        return [f + np.float32(rng.uniform(-level, level)) for f in frames]
    return frames


def write_clip(path: Path, frames: list[np.ndarray], crf: int) -> None:
    import av

    h, w = frames[0].shape[:2]
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(FPS))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": str(crf), "preset": "medium"}
        for frame in frames:
            image = np.clip(np.rint(frame), 0, 255).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def label_mos(level_index: int) -> float:
    """What `vqa2 synth` gives one whole-clip distortion of severity k (k = 1..4); 90 for a clean clip."""
    from vqa2cli.synth import mos_for

    return round(mos_for([(level_index, "whole")] if level_index else []), 2)


def make(out: Path, videos: Path | None) -> None:
    sources = [(name, lambda name=name, k=k: camera_frames(skimage_photo(name), seed=k))
               for k, name in enumerate(SKIMAGE_PHOTOS)]
    if videos is not None:
        for path in sorted(p for p in videos.iterdir() if p.suffix.lower() in (".avi", ".mp4", ".mkv", ".mov")):
            sources.append((path.stem, lambda path=path: video_frames(path)))
    (out / "videos").mkdir(parents=True, exist_ok=False)
    rows = []
    for s, (name, load) in enumerate(sources):
        frames = load()
        clean = f"videos/{name}_clean.mp4"
        write_clip(out / clean, frames, CLEAN_CRF)
        rows.append((clean, label_mos(0), name, "clean", 0, ""))
        for family, levels in FAMILIES.items():
            for k, level in enumerate(levels, start=1):
                video = f"videos/{name}_{family}{k}.mp4"
                crf = int(level) if family == "compression" else CLEAN_CRF
                write_clip(out / video, damaged(family, level, frames, seed=1000 * s + k), crf)
                rows.append((video, label_mos(k), name, family, k, level))
        print(f"{name}: {len(frames)} frames at {frames[0].shape[1]}x{frames[0].shape[0]}", flush=True)
    with open(out / "labels.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([("path", "mos"), *[(r[0], f"{r[1]:.2f}") for r in rows]])
    with open(out / "manifest.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([("path", "mos", "source", "family", "level", "parameter"), *rows])
    print(f"{len(rows)} clips from {len(sources)} sources in {out}")


# ---------------------------------------------------------------- report


def spearman(a, b) -> float:
    from scipy.stats import spearmanr

    value = spearmanr(a, b).statistic
    return float(value) if value == value else 0.0  # constant scores rank nothing: count as 0


def _scored(out: Path, predictions: Path) -> tuple[dict, list[dict], dict]:
    """({path: score}, the manifest's rows, {source: its clean clip's score})."""
    with open(predictions, newline="") as handle:
        scores = {row["path"]: float(row["score"]) for row in csv.DictReader(handle) if row.get("score")}
    with open(out / "manifest.csv", newline="") as handle:
        manifest = list(csv.DictReader(handle))
    clean = {row["source"]: scores[row["path"]] for row in manifest if row["family"] == "clean"}
    return scores, manifest, clean


def report(out: Path, predictions: Path) -> dict:
    """{family: mean within-source SRCC of (level, -score)} and the overall SRCC of score against MOS."""
    scores, manifest, clean = _scored(out, predictions)
    result = {}
    for family in FAMILIES:
        per_source = []
        for source, clean_score in clean.items():
            ladder = sorted((int(r["level"]), scores[r["path"]]) for r in manifest
                            if r["source"] == source and r["family"] == family)
            levels = [0] + [k for k, _ in ladder]
            per_source.append(spearman(levels, [-clean_score] + [-v for _, v in ladder]))
        result[family] = statistics.mean(per_source)
    paths = [r["path"] for r in manifest]
    result["overall"] = spearman([float(r["mos"]) for r in manifest], [scores[p] for p in paths])
    return result


def breakdown(out: Path, predictions: Path) -> dict:
    """Where the overall SRCC is lost: the mean score at each level of each family ("clean" is level 0), each
    source's clean score, and the overall SRCC two idealised models would get: one that scores every clip
    with the mean of its family and level (no content bias), and one whose scores have each source's clean score
    moved to the mean clean score (no offset between sources, the families weighed as they are)."""
    scores, manifest, clean = _scored(out, predictions)
    by_level = {}
    for row in manifest:
        by_level.setdefault((row["family"], int(row["level"])), []).append(scores[row["path"]])
    means = {key: statistics.mean(values) for key, values in by_level.items()}
    mean_clean = statistics.mean(clean.values())
    mos = [float(row["mos"]) for row in manifest]
    return {
        "levels": {family: [means[(family, k)] for k in sorted(k for f, k in means if f == family)]
                   for family in ("clean", *FAMILIES)},
        "clean": clean,
        "without_content_bias": spearman(mos, [means[(r["family"], int(r["level"]))] for r in manifest]),
        "without_source_offset": spearman(mos, [scores[r["path"]] - clean[r["source"]] + mean_clean
                                                for r in manifest]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    make_parser = sub.add_parser("make", help="write the held-out set into OUT (a new folder)")
    make_parser.add_argument("out", type=Path)
    make_parser.add_argument("--videos", type=Path, help="a folder of real clips to add as sources")
    report_parser = sub.add_parser("report", help="per-family within-source SRCC from vqa2 eval's predictions")
    report_parser.add_argument("out", type=Path)
    report_parser.add_argument("predictions", type=Path, nargs="?")
    report_parser.add_argument("--json", action="store_true", help="one JSON object instead of lines")
    report_parser.add_argument("--breakdown", action="store_true",
                               help="also where the overall SRCC is lost (mean score per family and level, ...)")
    args = parser.parse_args()
    if args.command == "make":
        make(args.out, args.videos)
        return
    predictions = args.predictions or args.out / "predictions.csv"
    result = report(args.out, predictions)
    extra = breakdown(args.out, predictions) if args.breakdown else {}
    if args.json:
        print(json.dumps({**result, **({"breakdown": extra} if extra else {})}))
        return
    for name, value in result.items():
        print(f"{name:12s} {value:+.3f}")
    if extra:
        print("\nmean score: clean clips, then each family at levels 1-4")
        for family, values in extra["levels"].items():
            print(f"  {family:12s} " + " ".join(f"{v:.3f}" for v in values))
        print("clean score by source: " + ", ".join(f"{s} {v:.2f}" for s, v in sorted(extra["clean"].items(),
                                                                                     key=lambda item: item[1])))
        print(f"overall SRCC without content bias (each clip at its family-level mean): "
              f"{extra['without_content_bias']:+.3f}")
        print(f"overall SRCC without the offset between sources' clean scores: {extra['without_source_offset']:+.3f}")
    if any(math.isnan(v) for v in result.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
