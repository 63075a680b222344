"""Benchmark: `vqa2 synth` clips per second with one process against --jobs N, on the same dataset.

    python tests/bench/bench_synth.py [--count 200] [--jobs N] [--reps 2] [--workdir DIR]

Runs `vqa2 synth` (default settings, seed 1: the vqa2-tiny training clips' settings) alternately with
`--jobs 1` and `--jobs N` (default: the CPUs this process may use), each in a fresh subprocess into a fresh
folder, and reports the median wall time of each, clips per second and the speed-up (the figure to read:
other processes on the machine skew absolute times). It also checks that both runs wrote the same label
files, as `--jobs` promises.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vqa2cli.synth import usable_cpus

LABEL_FILES = ("labels.csv", "stage1.csv", "stage2.csv", "stage3.csv", "manifest.csv")


def synth_seconds(out: Path, count: int, jobs: int) -> float:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "vqa2cli", "synth", str(out), "--count", str(count), "--seed", "1",
                    "--jobs", str(jobs), "--quiet"], check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--jobs", type=int, default=usable_cpus())
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-synth-"))
    times = {1: [], args.jobs: []}
    for _ in range(args.reps):
        for jobs in times:
            times[jobs].append(synth_seconds(work / f"jobs{jobs}", args.count, jobs))
    same = all((work / "jobs1" / name).read_bytes() == (work / f"jobs{args.jobs}" / name).read_bytes()
               for name in LABEL_FILES)
    one, many = statistics.median(times[1]), statistics.median(times[args.jobs])
    print(json.dumps({"count": args.count, "jobs": args.jobs, "reps": args.reps,
                      "seconds_jobs1": round(one, 1), f"seconds_jobs{args.jobs}": round(many, 1),
                      "clips_per_s_jobs1": round(args.count / one, 2),
                      f"clips_per_s_jobs{args.jobs}": round(args.count / many, 2),
                      "speedup": round(one / many, 2), "same_labels": same}, indent=1))
    if args.workdir is None:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
