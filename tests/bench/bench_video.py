"""Benchmark: load_video against `ffmpeg -i X -f null -` (a full decode), plus peak memory.

    python tests/bench/bench_video.py [--workdir DIR] [--reps 3] [--long-reps 1] [--skip-long]

Makes two H.264 1080p clips with ffmpeg (Debian's, installed with apt-get if missing; not a project
dependency): 10 s at 30 fps, 8 Mbit/s, and 10 minutes at 25 fps, 4 Mbit/s (a 20 s segment repeated by
stream copy, so it takes a minute or two, not an hour). Test pattern plus temporal noise keeps the
encoder spending its bitrate, like camera footage. For each clip it alternates ffmpeg and load_video
runs on the same file and reports the medians and their ratio; load_video runs in a fresh
subprocess each time (timed inside, imports excluded) that also reports its peak RSS
(`resource.getrusage(...).ru_maxrss`). CPU seconds (user + system, all threads) are reported beside
wall time: on a shared machine they are the steadier comparison. Targets: load_video <= 1.3x ffmpeg; peak RSS of the 10-minute
clip < 2 GB. Other processes on the machine skew absolute times; the ratio is the figure to read.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

SOURCE = "testsrc2=size=1920x1080:rate={fps},noise=alls=6:allf=t"

CHILD = """
import json, resource, sys, time
import vqa2cli.video as video
before = resource.getrusage(resource.RUSAGE_SELF)
start = time.perf_counter()
sample = video.load_video(sys.argv[1])
seconds = time.perf_counter() - start
after = resource.getrusage(resource.RUSAGE_SELF)
cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
print(json.dumps({"seconds": seconds, "cpu": cpu, "peak_mb": after.ru_maxrss / 1024, "base_mb": before.ru_maxrss / 1024,
                  "frames": sample.num_frames, "keyframes": len(sample.keyframe_indices),
                  "motion": len(sample.motion_indices), "warnings": sample.warnings}))
"""


def ensure_ffmpeg() -> str:
    found = shutil.which("ffmpeg")
    if found:
        return found
    print("ffmpeg not found: installing Debian's package (apt-get install -y ffmpeg)", flush=True)
    subprocess.run(["apt-get", "install", "-y", "ffmpeg"], check=True, stdout=subprocess.DEVNULL)
    return shutil.which("ffmpeg") or sys.exit("ffmpeg still missing after apt-get")


def ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-v", "error", "-nostdin", "-y", *args], check=True)


def encode(path: Path, seconds: float, fps: int, bitrate: str) -> None:
    ffmpeg("-f", "lavfi", "-i", SOURCE.format(fps=fps), "-t", str(seconds), "-c:v", "libx264",
           "-preset", "veryfast", "-b:v", bitrate, "-maxrate", bitrate, "-bufsize", bitrate,
           "-pix_fmt", "yuv420p", str(path))


def make_clips(workdir: Path, long: bool) -> list[Path]:
    workdir.mkdir(parents=True, exist_ok=True)
    short = workdir / "1080p_10s.mp4"
    if not short.exists():
        print("encoding", short, flush=True)
        encode(short, 10, 30, "8M")
    clips = [short]
    if long:
        clip = workdir / "1080p_10min.mp4"
        if not clip.exists():
            segment = workdir / "1080p_20s.mp4"
            print("encoding", clip, flush=True)
            encode(segment, 20, 25, "4M")
            ffmpeg("-stream_loop", "29", "-i", str(segment), "-c", "copy", str(clip))
        clips.append(clip)
    return clips


def time_ffmpeg(path: Path) -> tuple[float, float]:
    """Wall and CPU seconds of a full decode."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    ffmpeg("-i", str(path), "-f", "null", "-")
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return seconds, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def run_load_video(path: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(path)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench(path: Path, reps: int) -> dict:
    load_before = os.getloadavg()[0]
    ours, theirs, their_cpu, runs = [], [], [], []
    for _ in range(reps):
        seconds, cpu = time_ffmpeg(path)
        theirs.append(seconds)
        their_cpu.append(cpu)
        runs.append(run_load_video(path))
        ours.append(runs[-1]["seconds"])
    our_cpu = [r["cpu"] for r in runs]
    last = runs[-1]
    return {"file": path.name, "size_mb": round(path.stat().st_size / 2**20, 1), "frames": last["frames"],
            "keyframes": last["keyframes"], "motion": last["motion"],
            "ffmpeg_s": [round(t, 2) for t in theirs], "load_video_s": [round(t, 2) for t in ours],
            "ffmpeg_median_s": round(statistics.median(theirs), 2),
            "load_video_median_s": round(statistics.median(ours), 2),
            "ratio": round(statistics.median(ours) / statistics.median(theirs), 3),
            "ffmpeg_cpu_median_s": round(statistics.median(their_cpu), 2),
            "load_video_cpu_median_s": round(statistics.median(our_cpu), 2),
            "cpu_ratio": round(statistics.median(our_cpu) / statistics.median(their_cpu), 3),
            "peak_rss_mb": round(max(r["peak_mb"] for r in runs)),
            "rss_after_imports_mb": round(last["base_mb"]), "warnings": last["warnings"],
            # 1-minute load average before and after: other work on the machine skews the ratio.
            "load_avg": [round(load_before, 2), round(os.getloadavg()[0], 2)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/vqa2-bench"))
    parser.add_argument("--reps", type=int, default=3, help="runs of each tool on the 10 s clip")
    parser.add_argument("--long-reps", type=int, default=1, help="runs of each tool on the 10 min clip")
    parser.add_argument("--skip-long", action="store_true", help="only the 10 s clip")
    args = parser.parse_args()
    ensure_ffmpeg()
    clips = make_clips(args.workdir, long=not args.skip_long)
    for clip, reps in zip(clips, (args.reps, args.long_reps)):
        print(json.dumps(bench(clip, reps)), flush=True)


if __name__ == "__main__":
    main()
