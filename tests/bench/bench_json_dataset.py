"""Benchmark: reading a LLaVA-style JSON training file (an array) against the same records as JSON Lines.

    python tests/bench/bench_json_dataset.py [--sizes 5000,10000,20000,40000] [--big-mb 100] [--workdir DIR]

For each size, writes the records the VQA² release's stage-2 data holds (id, image, a two-turn
conversation with the scorer's prompt, gt_score), as a JSON array indented like `vqa2 synth` writes it and
as JSON Lines, then times `vqa2cli.data.load_dataset(..., check_videos=False)` on each (parsing and
validating every record; no video is opened). JSON Lines is the baseline measured in the same run: the
ratio JSON/JSONL should stay flat as the file grows (it grew with the size when the array parser was
quadratic). `--big-mb` also reads one array of about that many MB in a fresh process and reports its
time and peak RSS. Only the public `load_dataset` is used, so the same script measures older versions
(PYTHONPATH=<old checkout>).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = ("The key frames of this video are:\n<image>. And the motion feature of the video is\n<image>. "
          "How would you rate the quality of this video?")


def records(count: int):
    for i in range(count):
        yield {"id": f"clip_{i:07d}_score", "image": f"videos/clip_{i % 1000:05d}.mp4",
               "conversations": [{"from": "human", "value": PROMPT},
                                 {"from": "gpt", "value": "The quality of this video is good."}],
               "gt_score": round(50 + (i % 97) / 2, 2)}


def write_pair(folder: Path, count: int) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    array, lines = folder / f"d{count}.json", folder / f"d{count}.jsonl"
    items = list(records(count))
    array.write_text(json.dumps(items, indent=1) + "\n")
    lines.write_text("".join(json.dumps(item) + "\n" for item in items))
    return array, lines


def timed_load(path: Path) -> float:
    from vqa2cli.data import load_dataset

    start = time.perf_counter()
    data = load_dataset(path, stage=2, check_videos=False)
    took = time.perf_counter() - start
    assert not data.problems and len(data.records) == data.total, data.problems[:3]
    return took


BIG_CHILD = """
import resource, sys, time
from vqa2cli.data import load_dataset
start = time.perf_counter()
data = load_dataset(sys.argv[1], stage=2, check_videos=False)
took = time.perf_counter() - start
print(len(data.records), round(took, 2), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="5000,10000,20000,40000")
    parser.add_argument("--big-mb", type=float, default=0, help="also read one array of about this many MB")
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-json-"))
    print(f"{'records':>8} {'MB':>6} {'JSON s':>8} {'JSONL s':>8} {'ratio':>6}")
    results = []
    for count in (int(n) for n in args.sizes.split(",")):
        array, lines = write_pair(workdir / str(count), count)
        json_s, jsonl_s = timed_load(array), timed_load(lines)
        size = array.stat().st_size / 1e6
        print(f"{count:>8} {size:>6.1f} {json_s:>8.2f} {jsonl_s:>8.2f} {json_s / jsonl_s:>6.1f}", flush=True)
        results.append({"records": count, "mb": round(size, 1), "json_s": round(json_s, 3),
                        "jsonl_s": round(jsonl_s, 3)})
    if args.big_mb:
        per_record = (workdir / str(count) / f"d{count}.json").stat().st_size / count
        count = int(args.big_mb * 1e6 / per_record)
        array, _ = write_pair(workdir / "big", count)
        out = subprocess.run([sys.executable, "-c", BIG_CHILD, str(array)], capture_output=True, text=True,
                             check=True)
        n, took, rss = out.stdout.split()
        print(f"big array: {array.stat().st_size / 1e6:.0f} MB, {n} records: {took} s, peak RSS {rss} MB")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
