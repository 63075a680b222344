"""Benchmark: what one `vqa2` invocation costs before its first score, against `import torch`.

    python tests/bench/bench_startup.py [--reps 5] [--compare OLD_CHECKOUT] [--breakdown]

Times, in fresh processes, alternating so that load on the machine hits all alike: `python -c "import
torch"` (the baseline: no scoring command can start faster), `python -c "<the model classes' imports>"`
(torch, transformers' Qwen2 and SigLIP modeling, pytorchvideo's SlowFast: what building any model needs),
`vqa2 --version`, and `vqa2 score clip.mp4 --model vqa2-tiny --json` on a 1 s 64x48 clip made with PyAV.
Reports the median wall time and CPU time (user + system, all threads) of each and their ratio to the
baseline; on a machine shared with other jobs the CPU times are the steadier comparison. `--compare DIR`
also times the score command with DIR (another checkout of the repository, e.g. `git archive` of an older
commit) first on PYTHONPATH. `--breakdown` times the phases of one score in one process: the imports,
building and filling the model, the tokenizer, decoding, the first and a second score.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODEL_IMPORTS = ("import torch, transformers.models.qwen2.modeling_qwen2, transformers.models.siglip.modeling_siglip, "
                 "vqa2cli._pytorchvideo")


def timed(command: list[str], env=None) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one run of `command`, which must succeed."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


BREAKDOWN = """
import sys, time
marks = [(time.perf_counter(), time.process_time())]
def mark(name):
    now = (time.perf_counter(), time.process_time())
    print(f"  {name:34s} wall {now[0] - marks[-1][0]:5.2f} s  cpu {now[1] - marks[-1][1]:5.2f} s")
    marks.append(now)
import torch; mark("import torch")
import transformers; mark("import transformers (package)")
import transformers.modeling_utils; mark("transformers.modeling_utils")
import transformers.models.qwen2.modeling_qwen2, transformers.models.siglip.modeling_siglip; mark("Qwen2 + SigLIP modeling")
import vqa2cli.modeling, vqa2cli.pipeline; mark("vqa2cli (pytorchvideo, video, ...)")
from vqa2cli import checkpoint, registry
from vqa2cli.pipeline import VQA2
from vqa2cli.quantization import Precision
from vqa2cli.config import VQA2Config
directory = registry.resolve("vqa2-tiny").path
config = VQA2Config.load(directory / "config.json")
model = checkpoint.build_empty(config); mark("build the empty model")
refs = checkpoint._read_headers([directory / checkpoint.WEIGHTS_FILE])
checkpoint.fill(model, refs, torch.device("cpu"), torch.float32)
checkpoint.finish(model, torch.device("cpu")); mark("fill it from model.safetensors")
tokenizer = checkpoint.load_tokenizer(directory); mark("load the tokenizer")
vqa2 = VQA2("vqa2-tiny", model, tokenizer, torch.device("cpu"), Precision("none", torch.float32))
sample = vqa2.load_video(sys.argv[1]); mark("decode the clip")
vqa2.score(sample); mark("first score")
vqa2.score(sample); mark("second score")
print(f"  {'total':34s} wall {marks[-1][0] - marks[0][0]:5.2f} s  cpu {marks[-1][1] - marks[0][1]:5.2f} s")
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--compare", type=Path, help="another checkout to time `vqa2 score` from, for before/after")
    parser.add_argument("--breakdown", action="store_true", help="also time the phases of one score")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from tests.fixtures.clips import make_clip

    clip = make_clip(Path(tempfile.mkdtemp(prefix="bench-startup-")) / "clip.mp4", seconds=1.0)
    python = sys.executable
    score = [python, "-m", "vqa2cli", "score", str(clip), "--model", "vqa2-tiny", "--json"]
    runs = {
        "python -c 'import torch'": ([python, "-c", "import torch"], None),
        "model classes' imports": ([python, "-c", MODEL_IMPORTS], None),
        "vqa2 --version": ([python, "-m", "vqa2cli", "--version"], None),
        "vqa2 score clip --model vqa2-tiny": (score, None),
    }
    if args.compare:
        env = {**os.environ, "PYTHONPATH": str(args.compare.resolve())}
        runs[f"  the same from {args.compare}"] = (score, env)
    print(f"load average before: {load_average()}")
    times = {name: [] for name in runs}
    for command, env in runs.values():  # warm the page cache
        timed(command, env)
    for _ in range(args.reps):
        for name, (command, env) in runs.items():
            times[name].append(timed(command, env))
    base_wall = statistics.median(w for w, _ in times["python -c 'import torch'"])
    base_cpu = statistics.median(c for _, c in times["python -c 'import torch'"])
    print(f"{'':36s} {'wall s':>7} {'cpu s':>7} {'wall/torch':>10} {'cpu/torch':>9}   (medians of {args.reps})")
    for name, samples in times.items():
        wall = statistics.median(w for w, _ in samples)
        cpu = statistics.median(c for _, c in samples)
        print(f"{name:36s} {wall:7.2f} {cpu:7.2f} {wall / base_wall:10.2f} {cpu / base_cpu:9.2f}")
    print(f"load average after: {load_average()}")
    if args.breakdown:
        print("phases of one score, in one process:")
        subprocess.run([python, "-c", BREAKDOWN, str(clip)], check=True, stderr=subprocess.DEVNULL)


if __name__ == "__main__":
    main()
