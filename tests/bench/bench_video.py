"""Benchmark: load_video against `ffmpeg -i X -f null -` (a full decode), plus peak memory.

    python tests/bench/bench_video.py [--workdir DIR] [--reps 3] [--long-reps 1] [--skip-long] [--wait-idle S]

Makes two H.264 1080p clips with ffmpeg (Debian's, installed with apt-get if missing; not a project
dependency): 10 s at 30 fps, 8 Mbit/s, and 10 minutes at 25 fps, 4 Mbit/s (a 20 s segment repeated by
stream copy, so it takes a minute or two, not an hour). Test pattern plus temporal noise keeps the
encoder spending its bitrate, like camera footage. For each clip it alternates ffmpeg and load_video
runs on the same file and reports the medians and their ratio; load_video runs in a fresh
subprocess each time (timed inside, imports excluded) that also reports its peak RSS
(`resource.getrusage(...).ru_maxrss`). CPU seconds (user + system, all threads) are reported beside
wall time: on a shared machine they are the steadier comparison. Targets: load_video <= 1.3x ffmpeg; peak RSS of the 10-minute
clip < 2 GB. Other processes on the machine skew absolute times; the ratio is the figure to read.
Each run also reports the CPU time other processes used meanwhile (`others_cpu_s`, from /proc/stat);
`quiet_ratio` is the ratio of medians over the pairs where that stayed under 0.1 s for both, and
`--wait-idle S` waits for S idle seconds before each pair (for a machine shared with bursty jobs).
"""

from __future__ import annotations

import argparse
import inspect
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


def busy_seconds() -> float:
    """CPU seconds all processes have used since boot (Linux /proc/stat; 0 elsewhere)."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:9]]
    except OSError:
        return 0.0
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait


CHILD = inspect.getsource(busy_seconds) + """
import json, os, resource, sys, time
import vqa2cli.video as video
before = resource.getrusage(resource.RUSAGE_SELF)
busy = busy_seconds()
start = time.perf_counter()
sample = video.load_video(sys.argv[1])
seconds = time.perf_counter() - start
busy = busy_seconds() - busy
after = resource.getrusage(resource.RUSAGE_SELF)
cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
print(json.dumps({"seconds": seconds, "cpu": cpu, "others_cpu": busy - cpu,
                  "peak_mb": after.ru_maxrss / 1024, "base_mb": before.ru_maxrss / 1024,
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


def time_ffmpeg(path: Path) -> tuple[float, float, float]:
    """Wall and CPU seconds of a full decode, and the CPU seconds other processes used meanwhile."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy = busy_seconds()
    start = time.perf_counter()
    ffmpeg("-i", str(path), "-f", "null", "-")
    seconds = time.perf_counter() - start
    busy = busy_seconds() - busy
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return seconds, cpu, busy - cpu


def wait_until_idle(seconds: float, give_up: float = 600.0) -> None:
    """Until the machine has been under 10% busy for `seconds` (at most `give_up` seconds)."""
    deadline = time.monotonic() + give_up
    while time.monotonic() < deadline:
        busy = busy_seconds()
        time.sleep(seconds)
        if busy_seconds() - busy < 0.1 * seconds * (os.cpu_count() or 1):
            return


def run_load_video(path: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(path)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench(path: Path, reps: int, wait_idle: float = 0.0) -> dict:
    load_before = os.getloadavg()[0]
    ours, theirs, their_cpu, their_others, runs = [], [], [], [], []
    for _ in range(reps):
        if wait_idle:
            wait_until_idle(wait_idle)
        seconds, cpu, others = time_ffmpeg(path)
        theirs.append(seconds)
        their_cpu.append(cpu)
        their_others.append(others)
        runs.append(run_load_video(path))
        ours.append(runs[-1]["seconds"])
    our_cpu = [r["cpu"] for r in runs]
    # Pairs where other processes used under 0.1 s of CPU during both runs: a quiet machine's numbers.
    quiet = [i for i, r in enumerate(runs) if their_others[i] < 0.1 and r["others_cpu"] < 0.1]
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
            "load_avg": [round(load_before, 2), round(os.getloadavg()[0], 2)],
            "others_cpu_s": {"ffmpeg": [round(t, 2) for t in their_others],
                             "load_video": [round(r["others_cpu"], 2) for r in runs]},
            "quiet_pairs": len(quiet),
            "quiet_ratio": round(statistics.median(ours[i] for i in quiet)
                                 / statistics.median(theirs[i] for i in quiet), 3) if quiet else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/vqa2-bench"))
    parser.add_argument("--reps", type=int, default=3, help="runs of each tool on the 10 s clip")
    parser.add_argument("--long-reps", type=int, default=1, help="runs of each tool on the 10 min clip")
    parser.add_argument("--skip-long", action="store_true", help="only the 10 s clip")
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                        help="before each pair of runs, wait until the machine has been idle this long")
    args = parser.parse_args()
    ensure_ffmpeg()
    clips = make_clips(args.workdir, long=not args.skip_long)
    for clip, reps in zip(clips, (args.reps, args.long_reps)):
        print(json.dumps(bench(clip, reps, args.wait_idle)), flush=True)


if __name__ == "__main__":
    main()
