"""GPU benchmark: how far vqa2-tiny's scores move on CUDA, per precision, from float32 on the CPU.

    python tests/bench/bench_tiny_gpu_precision.py [--workdir DIR]

Makes two `vqa2 synth` sets: the CUDA tests' graded set (8 clips, 128 px, 4 s at 12 fps, seed 11; `graded_clips` in
tests/fixtures/models.py) and 40 clips at the README quick start's 320x180 (seed 5). Each clip is decoded
once; every precision scores the same samples. For each precision it prints the largest move from the CPU
float32 score as a fraction of the CPU scores' spread (the measure tests/test_cuda.py asserts), the mean
move, and the SRCC of the CUDA scores against the CPU ones; then how many float32 answers on CUDA equal
the CPU's ("Is there any blur?", 8 tokens). Needs a CUDA GPU and bitsandbytes.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.fixtures.models import graded_settings  # noqa: E402
from vqa2cli import synth  # noqa: E402
from vqa2cli.metrics import srcc  # noqa: E402
from vqa2cli.pipeline import load_model  # noqa: E402

SETS = {
    "graded (tests/test_cuda.py: 8 clips, 128 px, seed 11)": graded_settings(),
    "quick-start size (40 clips, 320x180, seed 5)": synth.SynthSettings(count=40, seed=5, width=320, height=180),
}
PRECISIONS = {
    "auto: NF4, bf16 compute": {},
    "8-bit": {"quant": "8bit"},
    "bf16": {"quant": "none"},
    "float32": {"quant": "none", "dtype": "float32"},
}


def compare(cpu, models, samples):
    reference = np.array([cpu.score(sample).score for sample in samples])
    spread = reference.max() - reference.min()
    print(f"  CPU float32 scores {reference.min():.3f}-{reference.max():.3f} (spread {spread:.3f})")
    for name, model in models.items():
        scores = np.array([model.score(sample).score for sample in samples])
        moves = np.abs(scores - reference)
        print(f"  {name:24s} largest move {moves.max():.4f} = {moves.max() / spread:6.2%} of the spread, "
              f"mean {moves.mean():.4f}, SRCC against CPU {srcc(reference, scores):.4f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", help="where the clips go (default: a temporary folder)")
    args = parser.parse_args()
    cpu = load_model("vqa2-tiny", device="cpu", quant="none")
    models = {name: load_model("vqa2-tiny", device="cuda", **options) for name, options in PRECISIONS.items()}
    with tempfile.TemporaryDirectory() as tmp:
        for label, settings in SETS.items():
            folder = Path(args.workdir or tmp) / f"seed{settings.seed}"
            synth.generate_dataset(folder, settings)
            samples = [cpu.load_video(clip) for clip in sorted((folder / "videos").glob("*.mp4"))]
            print(f"\n{label}")
            compare(cpu, models, samples)
            question = "Is there any blur?"
            same = sum(models["float32"].ask(s, question, max_new_tokens=8) == cpu.ask(s, question, max_new_tokens=8)
                       for s in samples)
            print(f"  float32 answers on CUDA equal the CPU's on {same} of {len(samples)}")


if __name__ == "__main__":
    main()
