"""Benchmark: what `--timeline` adds to decoding (CPU, wall time, peak memory), without a model.

    python tests/bench/bench_timeline.py [--workdir DIR] [--reps 3] [--seconds 40 160]

Makes 720p H.264 clips (25 fps, test pattern plus temporal noise, with PyAV) of the given lengths. For each
clip it alternates, in fresh subprocesses (timed inside, imports excluded), `load_video` at 384 px alone and
`load_video` with the timeline's `WindowSampler` (2 s windows, windows dropped as they come, as scoring
does), and reports medians of wall and CPU time, their ratios, and the peak RSS of each. A second
setting caps the whole clip's motion stream at 250 frames (--max-motion-frames 250): windows then need
frames the whole clip skips, which are resized once more. The memory a window-at-a-time path saves is
printed beside: holding every window of the clip at once would take frames x 3 x 384^2 bytes of motion
frames alone. Targets: peak RSS with windows within one window's frames (~25 MB at 50 frames) of
decoding alone, whatever the length; CPU ratio reported, not targeted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from fractions import Fraction
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CHILD = """
import json, resource, sys, time
from vqa2cli.video import Sampling
from vqa2cli.timeline import WindowSampler
path, windows, cap = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3])
sampling = Sampling(384, 384, cap, 40)
count = []
tap = WindowSampler(path, sampling, 2.0, lambda window: count.append(window.number)) if windows else None
before = resource.getrusage(resource.RUSAGE_SELF)
start = time.perf_counter()
sample = sampling.load(path, tap=tap)
if tap is not None:
    tap.close()
seconds = time.perf_counter() - start
after = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"seconds": seconds, "cpu": after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime,
                  "peak_mb": after.ru_maxrss / 1024, "base_mb": before.ru_maxrss / 1024,
                  "frames": sample.num_frames, "windows": len(count)}))
"""


def make_clip(path: Path, seconds: float, fps: int = 25, size=(1280, 720)) -> Path:
    import av
    import numpy as np

    if path.exists():
        return path
    rng = np.random.default_rng(0)
    width, height = size
    yy, xx = np.mgrid[0:height, 0:width]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "23"}
        for i in range(round(seconds * fps)):
            base = ((xx + 4 * i) % 256 + (yy // 2)) % 256
            noise = rng.integers(-12, 13, (height, width, 1))
            rgb = np.clip(np.stack([base, (base + 85) % 256, (255 - base)], -1) + noise, 0, 255).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def run(path: Path, windows: bool, cap: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), "1" if windows else "0", str(cap)],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "vqa2-bench-timeline")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--seconds", type=float, nargs="+", default=[40, 160])
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    for seconds in args.seconds:
        clip = make_clip(args.workdir / f"clip-{seconds:g}s.mp4", seconds)
        for cap in (2000, 250):
            plain, timed = [], []
            for _ in range(args.reps):
                plain.append(run(clip, False, cap))
                timed.append(run(clip, True, cap))
            med = {name: {key: statistics.median(r[key] for r in runs) for key in ("seconds", "cpu", "peak_mb")}
                   for name, runs in (("alone", plain), ("with_windows", timed))}
            frames = timed[0]["frames"]
            print(json.dumps({
                "clip_s": seconds, "frames": frames, "motion_cap": cap, "windows": timed[0]["windows"], **med,
                "wall_ratio": round(med["with_windows"]["seconds"] / med["alone"]["seconds"], 3),
                "cpu_ratio": round(med["with_windows"]["cpu"] / med["alone"]["cpu"], 3),
                "extra_peak_mb": round(med["with_windows"]["peak_mb"] - med["alone"]["peak_mb"], 1),
                "all_windows_at_once_mb": round(frames * 3 * 384 * 384 / 2**20),
            }), flush=True)


if __name__ == "__main__":
    main()
