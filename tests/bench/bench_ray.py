"""Benchmark: `vqa2 score DIR --ray` against `vqa2 score DIR` on the same folder (the overhead of Ray).

    python tests/bench/bench_ray.py [--clips 40] [--seconds 4] [--size 320x240] [--reps 2] [--model vqa2-tiny]

Makes the clips once (`vqa2 synth`), then runs each command alternately in a fresh subprocess, `--reps`
times, and reports the median wall time of each (whole command: start-up, Ray's local cluster start when
--ray, decoding, scoring, output) and their ratio, the figure to read on a noisy machine. It also checks
that both runs gave the same records (paths, errors and scores within 1e-6).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VQA2 = [sys.executable, "-m", "vqa2cli"]


def timed(command: list[str]) -> tuple[float, list[dict]]:
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode not in (0, 1):
        sys.exit(f"{' '.join(command)} failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    return seconds, [json.loads(line) for line in done.stdout.splitlines()]


def same_records(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        x["path"] == y["path"] and x["error"] == y["error"]
        and (x["score"] is None) == (y["score"] is None)
        and (x["score"] is None or abs(x["score"] - y["score"]) <= 1e-6)
        for x, y in zip(a, b)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=40)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--size", default="320x240")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--model", default="vqa2-tiny")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        data = Path(work) / "data"
        subprocess.run([*VQA2, "synth", str(data), "--count", str(args.clips), "--seconds", str(args.seconds),
                        "--size", args.size, "--seed", "7", "-q"], check=True)
        local_cmd = [*VQA2, "score", str(data / "videos"), "--model", args.model, "--jsonl", "-q"]
        ray_cmd = [*local_cmd, "--ray"]
        times = {"local": [], "ray": []}
        outputs = {}
        for _ in range(args.reps):
            for name, command in (("local", local_cmd), ("ray", ray_cmd)):
                seconds, outputs[name] = timed(command)
                times[name].append(seconds)
        local, remote = (statistics.median(times[name]) for name in ("local", "ray"))
        print(f"{args.clips} clips of {args.seconds:g} s at {args.size}, model {args.model}, {args.reps} reps")
        print(f"local: {local:.1f} s ({args.clips / local:.2f} clips/s)   runs {[round(t, 1) for t in times['local']]}")
        print(f"--ray: {remote:.1f} s ({args.clips / remote:.2f} clips/s)   runs {[round(t, 1) for t in times['ray']]}")
        print(f"ratio --ray / local: {remote / local:.2f}")
        print(f"same records: {same_records(outputs['local'], outputs['ray'])}")


if __name__ == "__main__":
    main()
