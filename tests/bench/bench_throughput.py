"""Folder throughput of `vqa2 score`'s pipeline: clips/s scored against clips/s only decoded, per worker count.

For each number of decode worker processes (--workers, default 0 1 2 4; 0 is a decode thread in this
process, the pipeline before worker processes), in the same run and on the same files, alternating,
--reps times:

* decode only: `Prefetcher(paths, model.sampling().load, workers=W)` drained without a model: the pace of
  pure decoding with W workers;
* scored: `batch.score_videos(model, paths, workers=W, batch_size=B)`, the `vqa2 score` pipeline;

and prints, from the median wall times: clips/s for both and their ratio (scored / decoded: 1.0 means
scoring goes at the pace of pure decoding, the model keeps up), the share of wall time the model was
computing (`model_busy`: a GPU's busy share when the model is on one) and the pace the model alone
would allow (`model_clips_s`: clips over its compute time), the same rates after the first result
(`steady_*_clips_s`: a long catalogue's pace once the pipeline has filled, to read only with several
times more clips than workers; `first_result_s`: how long filling took), and the CPU seconds other
processes on the machine used during the runs (`others_cpu_s`, from /proc/stat; `--wait-idle S` waits
for quiet moments on a shared machine). The clips are made here with PyAV (moving pattern, libx264,
30 fps, 10 s): --clips at 640x360, --hd at 1920x1080.

    python tests/bench/bench_throughput.py                                  # vqa2-tiny on CPU
    python tests/bench/bench_throughput.py --workers 0 1 2 --batch-size 1 2 4
    python tests/bench/bench_throughput.py --released-random --quant 4bit --clips 0 --hd 96 --workers 15 --reps 1
    python tests/bench/bench_throughput.py --transport                      # pickle vs shared memory
    python tests/bench/bench_throughput.py --model-only --batch-size 1 2 4  # batched model calls alone
    python tests/bench/bench_throughput.py --workers 0 --fragment-shifts 1  # vqa2-tiny without its 3 x 3 cuts

`--released-random` builds the released-size architecture with random weights on CUDA
(bench_model_gpu.random_model; needs a GPU, bitsandbytes for 4-bit): the issue-22 target is >= 4 ten-second
1080p clips/s on one H100/H200 in 4-bit. `--transport` measures what it costs this process to receive one
decoded 10 s 1080p clip at the released sizes (384 px, 300 motion frames) from a worker: pickled through
the pipe, or through shared memory (memfd) as the pool does. `--model-only` times the model alone on clips
decoded beforehand, `--batch-size` videos per call (wall and process CPU seconds per clip; on CUDA the
calls are synchronised): whether batched calls pay.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
# Nothing heavy at module level: every decode worker imports this module (multiprocessing's main module).


def make_clips(folder: Path, count: int, hd: int, seconds: int) -> list[str]:
    from tests.bench.bench_model_gpu import make_clip

    # One clip per size, copied: decoding costs the same whatever the pattern, and encoding each afresh
    # spent a GPU lease's minutes on making clips.
    paths = []
    for prefix, number, size in (("sd", count, (640, 360)), ("hd", hd, (1920, 1080))):
        for i in range(number):
            path = folder / f"{prefix}{i:02d}.mp4"
            if i == 0:
                make_clip(path, seconds=seconds, size=size)
            else:
                shutil.copyfile(folder / f"{prefix}00.mp4", path)
            paths.append(str(path))
    return paths


def load(args):
    """The model to score with: vqa2-tiny (or --model), or the released architecture with random weights."""
    from vqa2cli.pipeline import load_model

    if not args.released_random:
        model = load_model(args.model, device=args.device, quant=args.quant)
        if args.fragment_shifts:  # e.g. 1: vqa2-tiny scoring the centres alone, against its 3 x 3 cuts
            model.config = replace(model.config, fragment_shifts=args.fragment_shifts)
        return model
    import torch

    from tests.bench.bench_model_gpu import random_model
    from tests.fixtures.checkpoints import RELEASED_CONFIG
    from vqa2cli.config import VQA2Config
    from vqa2cli.pipeline import VQA2
    from vqa2cli.quantization import choose_precision
    from vqa2cli.tokenizer import build_tokenizer

    if not torch.cuda.is_available():
        sys.exit("--released-random needs a CUDA GPU")
    device = torch.device("cuda")
    precision = choose_precision(device, args.quant)
    model = random_model(VQA2Config.from_llava_qwen(RELEASED_CONFIG), device, precision)
    return VQA2(f"released-random-{args.quant}", model, build_tokenizer(), device, precision)


class ModelClock:
    """Wraps a loaded model's score calls to add up the time it computes (synchronised on CUDA)."""

    def __init__(self, model):
        self.model = model
        self.busy = 0.0
        self.name, self.config = model.name, model.config
        self.cuda = str(getattr(model, "device", "cpu")).startswith("cuda")

    def sampling(self, *args, **kwargs):
        return self.model.sampling(*args, **kwargs)

    def _timed(self, call, *args, **kwargs):
        start = time.perf_counter()
        result = call(*args, **kwargs)
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        self.busy += time.perf_counter() - start
        return result

    def score(self, *args, **kwargs):
        return self._timed(self.model.score, *args, **kwargs)

    def score_batch(self, *args, **kwargs):
        return self._timed(self.model.score_batch, *args, **kwargs)


def own_cpu() -> float:
    """CPU seconds of this process and of the forkserver's tree: the decode workers, ended ones included
    (the forkserver reaps them, which adds them to its children's times)."""
    import resource
    from multiprocessing import forkserver

    usage = resource.getrusage(resource.RUSAGE_SELF)
    total = usage.ru_utime + usage.ru_stime
    pid = getattr(forkserver._forkserver, "_forkserver_pid", None)
    if pid:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")  # utime stime cutime cstime
    return total


class Run:
    """Wall time of a measured run, when its first result came (`first`: the pipeline filling up), and the
    CPU that other processes on the machine used meanwhile."""

    def __enter__(self):
        from tests.bench.bench_video import busy_seconds

        self.busy, self.own, self.start = busy_seconds(), own_cpu(), time.perf_counter()
        self.first = None
        return self

    def results(self, items):
        """`items`, passed through, noting when the first one arrives."""
        for item in items:
            if self.first is None:
                self.first = time.perf_counter() - self.start
            yield item

    def __exit__(self, *exc_info):
        from tests.bench.bench_video import busy_seconds

        self.wall = time.perf_counter() - self.start
        self.others = (busy_seconds() - self.busy) - (own_cpu() - self.own)
        return False


def decode_only(model, paths, workers) -> Run:
    from vqa2cli.batch import Prefetcher

    with Run() as run:
        with Prefetcher(paths, model.sampling().load, workers=workers) as prefetcher:
            failed = [error for _, _, error, _ in run.results(prefetcher) if error]
    if failed:
        sys.exit(f"decoding failed: {failed[0]}")
    return run


def scored(model, paths, workers, batch_size) -> Run:
    from vqa2cli.batch import score_videos

    clock = ModelClock(model)
    with Run() as run:
        records = list(run.results(score_videos(clock, paths, workers=workers, batch_size=batch_size)))
    failed = [r.error for r in records if r.error]
    if failed:
        sys.exit(f"scoring failed: {failed[0]}")
    run.busy_share = clock.busy / run.wall
    return run


def throughput(args):
    import torch

    from tests.bench.bench_video import wait_until_idle
    from vqa2cli.prefetch import warm_up

    warm_up()
    model = load(args)
    print(f"model {model.name} on {getattr(model, 'device', '?')}, torch threads {torch.get_num_threads()}, "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_clips(Path(tmp), args.clips, args.hd, args.seconds)
        print(f"{len(paths)} clips made", file=sys.stderr, flush=True)
        scored(model, paths[:2], 1, 1)  # warm-up: model kernels, the worker's imports
        runs = {}
        for rep in range(args.reps):
            for workers in sorted(set(args.workers)):
                if args.wait_idle:
                    wait_until_idle(args.wait_idle)
                runs.setdefault(("decode", workers, 1), []).append(decode_only(model, paths, workers))
                for batch_size in args.batch_size:
                    if args.wait_idle:
                        wait_until_idle(args.wait_idle)
                    runs.setdefault(("score", workers, batch_size), []).append(scored(model, paths, workers, batch_size))
            print(f"rep {rep + 1}/{args.reps} done, load {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
    rate = {key: len(paths) / statistics.median(run.wall for run in found) for key, found in runs.items()}
    # After the first result: the pace a long catalogue settles at, once every worker is busy.
    steady = {key: (len(paths) - 1) / statistics.median(run.wall - run.first for run in found)
              for key, found in runs.items()}
    others = {key: statistics.median(run.others for run in found) for key, found in runs.items()}
    rows = []
    for workers in args.workers:
        for batch_size in args.batch_size:
            score_key, decode_key = ("score", workers, batch_size), ("decode", workers, 1)
            rows.append({"model": model.name, "clips": len(paths), "workers": workers, "batch_size": batch_size,
                         "decode_clips_s": round(rate[decode_key], 3),
                         "score_clips_s": round(rate[score_key], 3),
                         "ratio": round(rate[score_key] / rate[decode_key], 3),
                         "steady_decode_clips_s": round(steady[decode_key], 3),
                         "steady_score_clips_s": round(steady[score_key], 3),
                         "first_result_s": {kind: round(statistics.median(run.first for run in runs[key]), 2)
                                            for kind, key in (("decode", decode_key), ("score", score_key))},
                         "model_busy": round(statistics.median(run.busy_share for run in runs[score_key]), 3),
                         # the pace if decoding were free: clips over the model's own compute time
                         "model_clips_s": round(len(paths) / statistics.median(
                             run.busy_share * run.wall for run in runs[score_key]), 3),
                         "others_cpu_s": {"decode": round(others[decode_key], 1), "score": round(others[score_key], 1)},
                         "all_s": {"decode": [round(run.wall, 2) for run in runs[decode_key]],
                                   "score": [round(run.wall, 2) for run in runs[score_key]]}})
    return rows


def batching(args):
    """The model alone on decoded clips, --batch-size videos per call: wall and CPU seconds per clip."""
    import resource

    model = load(args)
    clock = ModelClock(model)
    with tempfile.TemporaryDirectory() as tmp:
        samples = [model.load_video(path) for path in make_clips(Path(tmp), args.clips, args.hd, args.seconds)]
    clock.score(samples[0])  # warm-up
    times = {size: [] for size in args.batch_size}
    for _ in range(args.reps):
        for size in args.batch_size:
            usage = resource.getrusage(resource.RUSAGE_SELF)
            cpu = usage.ru_utime + usage.ru_stime
            clock.busy = 0.0
            for start in range(0, len(samples), size):
                group = samples[start:start + size]
                clock.score_batch(group) if len(group) > 1 else clock.score(group[0])
            usage = resource.getrusage(resource.RUSAGE_SELF)
            times[size].append((clock.busy / len(samples), (usage.ru_utime + usage.ru_stime - cpu) / len(samples)))
    return [{"model": model.name, "clips": len(samples), "batch_size": size,
             "model_s_per_clip": round(statistics.median(t[0] for t in found), 4),
             "cpu_s_per_clip": round(statistics.median(t[1] for t in found), 4),
             "all_model_s_per_clip": [round(t[0], 4) for t in found]} for size, found in times.items()]


def _sender(conn, method):
    from vqa2cli.prefetch import _send
    from vqa2cli.video import Sampling

    sample = Sampling(384, 384, 2000, 40).load(conn.recv())
    for index in range(conn.recv()):
        if method == "pickle":
            conn.send(("result", index, None, 0.0, __import__("pickle").dumps(sample, protocol=5), None))
        else:
            _send(conn, index, sample, None, 0.0)
        conn.recv()  # one at a time: the receiver's cost alone is measured


def transport(args):
    """This process's CPU and wall time to receive one decoded 1080p clip, per method."""
    from tests.bench.bench_model_gpu import make_clip
    from vqa2cli.prefetch import _context, _receive

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        clip = str(make_clip(Path(tmp) / "hd.mp4", seconds=args.seconds, size=(1920, 1080)))
        context = _context()
        for method in ["pickle", "memfd"] * args.reps:
            here, there = context.Pipe()
            process = context.Process(target=_sender, args=(there, method))
            process.start()
            here.send(clip)
            here.send(5)
            cpu, wall, touch = [], [], []
            for _ in range(5):
                here.poll(None)  # the worker has decoded and started sending
                start_cpu, start = time.thread_time(), time.perf_counter()
                sample = _receive(here, here.recv())[0]
                cpu.append(time.thread_time() - start_cpu)
                wall.append(time.perf_counter() - start)
                start = time.perf_counter()
                sample.motion.sum(), sample.keyframes.sum()  # first touch of every page
                touch.append(time.perf_counter() - start)
                megabytes = (sample.motion.nbytes + sample.keyframes.nbytes) / 1e6
                del sample
                here.send(None)
            process.join()
            rows.append({"method": method, "megabytes": round(megabytes, 1), "receive_cpu_s": round(statistics.median(cpu), 3),
                         "receive_wall_s": round(statistics.median(wall), 3),
                         "first_touch_s": round(statistics.median(touch), 3)})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vqa2-tiny")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quant", default="auto")
    parser.add_argument("--released-random", action="store_true",
                        help="the released-size architecture with random weights (CUDA)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2, 4],
                        help="worker counts to measure (0: decoding on a thread of this process)")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1])
    parser.add_argument("--clips", type=int, default=8, help="10 s 640x360 clips")
    parser.add_argument("--hd", type=int, default=2, help="10 s 1920x1080 clips")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="S",
                        help="before each run, wait until the machine has been idle for S seconds (shared machines)")
    parser.add_argument("--transport", action="store_true", help="measure pickle vs shared memory instead")
    parser.add_argument("--model-only", action="store_true",
                        help="measure the model alone on decoded clips, per --batch-size, instead")
    parser.add_argument("--fragment-shifts", type=int, help="score with this many cuts a side instead of the model's own")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    rows = transport(args) if args.transport else batching(args) if args.model_only else throughput(args)
    for row in rows:
        print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
