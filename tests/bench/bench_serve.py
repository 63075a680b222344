"""Benchmark: `vqa2 serve` under load against the same clips scored in-process, in the same run.

    python tests/bench/bench_serve.py [--model vqa2-tiny] [--device cpu] [--clips 6] [--rounds 4]
                                      [--clients 1 4 16] [--size 320x240] [--seconds 2] [--json FILE]

Makes `--clips` H.264 clips (tests/fixtures/clips.py), loads the model here and starts a real
`vqa2 serve` process beside it (port 0, --queue large enough that nothing is refused), then runs
`--rounds` rounds, each of:
- in-process: `model.score(path)` on each clip, one after another (decode + model, as a request does);
- served, for each number of clients: max(clips, 2 x clients) uploads of the clips to POST /score from
  that many connections at once (httpx, one client each).
The ways alternate within each round, so other jobs on a shared machine weigh on all of them alike.
It reports requests/s, p50/p95 latency and CPU per request (the scoring process's: this one in-process,
the server's when served) for each, and the ratios to in-process: requests/s over the in-process rate,
and at 1 client the p50 latency and CPU beyond in-process (the HTTP overhead of one request: upload,
temporary file, threads, JSON). While the most clients run, a thread polls GET /health every 50 ms and
its latency is reported too (it must stay low while the model works). Every served record must carry
the in-process score of its clip, or the run fails. `others_cpu_s` is the CPU other processes used
meanwhile (a shared machine skews absolute times; the ratios and CPU per request are steadier).

OMP_WAIT_POLICY=PASSIVE is set for both processes unless the caller sets it: on a machine shared with
other jobs, libgomp's spin-waiting made torch in the main thread (in-process) cost ~0.5 s CPU per tiny
score against ~0.07 s in the server's worker threads (libgomp throttles spinning once more threads use
OpenMP than there are cores), which measured OpenMP, not HTTP.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads libgomp; see above
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench_video import busy_seconds  # noqa: E402  (same folder)

from tests.fixtures.clips import make_clip  # noqa: E402


def percentile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def process_cpu(pid) -> float:
    """CPU seconds (user + system) process `pid` has used (Linux /proc; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Tally:
    """Latencies, wall time and CPU of one way of scoring, summed over the rounds."""

    def __init__(self):
        self.latencies, self.health = [], []
        self.wall = self.cpu = self.client_cpu = self.others = 0.0

    @contextlib.contextmanager
    def timed(self, pid=None):
        busy, start = busy_seconds(), time.perf_counter()
        own, worker = time.process_time(), process_cpu(pid) if pid else 0.0
        yield
        self.wall += time.perf_counter() - start
        own, worker = time.process_time() - own, (process_cpu(pid) - worker) if pid else 0.0
        # the scoring process's CPU: this one in-process, the server's when served (the client's apart)
        self.cpu += worker if pid else own
        self.client_cpu += own if pid else 0.0
        self.others += busy_seconds() - busy - own - worker

    def summary(self) -> dict:
        count = len(self.latencies)
        result = {"requests": count, "requests_per_s": round(count / self.wall, 2),
                  "p50_ms": round(1000 * percentile(self.latencies, 50), 1),
                  "p95_ms": round(1000 * percentile(self.latencies, 95), 1),
                  "cpu_ms_per_request": round(1000 * self.cpu / count, 1), "others_cpu_s": round(max(self.others, 0), 1)}
        if self.client_cpu:
            result["client_cpu_ms_per_request"] = round(1000 * self.client_cpu / count, 1)
        if self.health:
            result["health_p50_ms"] = round(1000 * percentile(self.health, 50), 1)
            result["health_max_ms"] = round(1000 * max(self.health), 1)
        return result


def make_clips(folder: Path, count: int, size, seconds: float) -> list[Path]:
    import numpy as np

    def pattern(seed):
        rng = np.random.default_rng(seed)
        base = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        return lambda index, width, height: np.roll(base, index * (seed + 1), axis=1)

    return [make_clip(folder / f"clip{i}.mp4", seconds=seconds, size=size, pattern=pattern(i)) for i in range(count)]


def in_process(model, clips, scores, tally: Tally):
    with tally.timed():
        for clip in clips:
            begin = time.perf_counter()
            score = model.score(str(clip)).score
            tally.latencies.append(time.perf_counter() - begin)
            if scores.setdefault(clip.name, score) != score:
                raise SystemExit(f"{clip.name}: in-process scores differ between rounds")


def start_server(model_name, device, queue, folder):
    log = open(folder / "server.log", "w")
    command = [sys.executable, "-m", "vqa2cli", "serve", "--model", model_name, "--device", device, "--port", "0",
               "--queue", str(queue), "--tmp-dir", str(folder), "--quiet"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, cwd=REPO,
                               env={**os.environ, "PYTHONPATH": str(REPO)})
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        text = (folder / "server.log").read_text()
        if "listening on " in text:
            return process, text.split("listening on ")[1].split()[0]
        if process.poll() is not None:
            raise SystemExit(f"vqa2 serve exited with {process.returncode}:\n{text}")
        time.sleep(0.1)
    process.kill()
    raise SystemExit("vqa2 serve did not start in 300 s")


def served(url, pid, clips, clients, scores, tally: Tally, health_poll=False):
    """max(clips, 2 x clients) uploads of the clips in turn, from `clients` connections at once."""
    data = {clip.name: clip.read_bytes() for clip in clips}
    names = [clips[i % len(clips)].name for i in range(max(len(clips), 2 * clients))]
    done = threading.Event()

    def worker(mine):
        with httpx.Client(base_url=url, timeout=600) as client:
            for name in mine:
                begin = time.perf_counter()
                response = client.post("/score", files={"file": (name, data[name])})
                tally.latencies.append(time.perf_counter() - begin)
                if response.status_code != 200 or response.json()["score"] != scores[name]:
                    raise SystemExit(f"{name}: {response.status_code} {response.text}")

    def poll_health():
        with httpx.Client(base_url=url, timeout=60) as client:
            while not done.is_set():
                begin = time.perf_counter()
                client.get("/health").raise_for_status()
                tally.health.append(time.perf_counter() - begin)
                done.wait(0.05)

    poller = threading.Thread(target=poll_health)
    with tally.timed(pid):
        if health_poll:
            poller.start()
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(worker, [names[i::clients] for i in range(clients)]))
        done.set()
        if health_poll:
            poller.join()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vqa2-tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--clips", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--size", default="320x240")
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    size = tuple(int(part) for part in args.size.split("x"))

    from vqa2cli import load_model

    with tempfile.TemporaryDirectory(prefix="bench-serve-") as work:
        work = Path(work)
        clips = make_clips(work, args.clips, size, args.seconds)
        model = load_model(args.model, device=args.device)
        process, url = start_server(args.model, args.device, queue=max(args.clients), folder=work)
        tallies = {"in_process": Tally(), **{clients: Tally() for clients in args.clients}}
        scores = {}
        try:
            in_process(model, clips[:1], scores, Tally())  # warm-up, both
            served(url, process.pid, clips[:1], 1, scores, Tally())
            # rounds alternate the ways, so that other jobs on a shared machine weigh on all of them alike
            for _ in range(args.rounds):
                in_process(model, clips, scores, tallies["in_process"])
                for clients in args.clients:
                    served(url, process.pid, clips, clients, scores, tallies[clients],
                           health_poll=clients == max(args.clients))
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=120)
        leftovers = list(work.rglob("upload-*"))
        if leftovers:
            raise SystemExit(f"uploads left behind: {leftovers}")
    baseline = tallies["in_process"].summary()
    results = {"in_process": baseline, "served": {}}
    print(f"in-process   {json.dumps(baseline)}")
    for clients in args.clients:
        result = tallies[clients].summary()
        result["rate_ratio"] = round(result["requests_per_s"] / baseline["requests_per_s"], 2)
        results["served"][clients] = result
        print(f"{clients:2d} client(s) {json.dumps(result)}")
    if 1 in args.clients:
        one = results["served"][1]
        results["overhead_ms"] = {"p50": round(one["p50_ms"] - baseline["p50_ms"], 1),
                                  "cpu": round(one["cpu_ms_per_request"] - baseline["cpu_ms_per_request"], 1)}
        print(f"HTTP overhead of one request at 1 client: {results['overhead_ms']['p50']} ms p50 latency, "
              f"{results['overhead_ms']['cpu']} ms server CPU (over in-process)")
    results["settings"] = {**vars(args), "cpus": os.cpu_count(), "OMP_WAIT_POLICY": os.environ["OMP_WAIT_POLICY"]}
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
