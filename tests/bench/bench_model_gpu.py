"""GPU benchmark: the released VQA² architecture (random weights) scoring a 10 s 1080p clip.

For each precision asked for (default: 4-bit NF4 and bf16), builds the released-size model from the
released config.json fields, fills it with random weights through the same per-tensor path as checkpoint
loading (`quantization.load_weight`: bf16 tensors, NF4-quantized on arrival for the LLM's linears), then
measures on CUDA:

* load: seconds to build and fill the model (random weights, so no disk reads: NOT a checkpoint load time),
  or with `--from-disk`, seconds for `load_model` to read the same random model saved once as a bf16 vqa2
  model directory (one 16 GB `model.safetensors`): a real checkpoint load, cold when `--drop-caches` works;
* memory after load, peak memory while loading, and peak while scoring (`torch.cuda.max_memory_allocated`);
* decode: seconds for `load_video` on the clip (CPU, PyAV);
* score: seconds per `VQA2.score(sample)` on the decoded sample (model only; median of --runs after one
  warm-up), with the sequence length it ran.

Needs a CUDA GPU, bitsandbytes (4-bit/8-bit) and pytorchvideo; no network. Run from the repository root:

    python tests/bench/bench_model_gpu.py                     # 4bit and none (bf16), 5 runs each
    python tests/bench/bench_model_gpu.py --quant 4bit --runs 10 --json bench.json
    python tests/bench/bench_model_gpu.py --from-disk /tmp/released-random --drop-caches   # needs ~16 GB of disk

The clip is generated with PyAV (moving pattern, libx264, 30 fps, 1920x1080, 10 s = 300 frames), so the
model sees 10 keyframes (+1 for the last partial second if any) and 300 motion frames.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.fixtures.checkpoints import RELEASED_CONFIG  # noqa: E402


def random_model(config, device, precision, seed=0):
    """A model of `config` with random weights, loaded tensor by tensor like a checkpoint."""
    import torch

    from vqa2cli.checkpoint import build_empty, expected_tensors, finish
    from vqa2cli.quantization import load_weight, prepare

    model = build_empty(config)
    shapes = expected_tensors(model)
    prepare(model, precision)
    # Drawn on the GPU: 8 B values from a CPU generator take minutes.
    generator = torch.Generator(device).manual_seed(seed)
    for name, shape in shapes.items():
        module_name, _, attr = name.rpartition(".")
        if attr == "num_batches_tracked":
            tensor = torch.zeros(shape, dtype=torch.long, device=device)
        elif attr == "running_var" or ("norm" in module_name.rsplit(".", 1)[-1] and attr == "weight"):
            tensor = torch.ones(shape, device=device)  # variances and norm scales of 1 keep activations in range
        elif name.endswith(("bias", "running_mean")):
            tensor = torch.zeros(shape, device=device)
        else:
            tensor = torch.randn(shape, generator=generator, dtype=torch.bfloat16, device=device) * 0.02
        load_weight(model.get_submodule(module_name), attr, tensor, device, precision.dtype)
    return finish(model, device)


def make_clip(path, seconds=10, fps=30, size=(1920, 1080)):
    import av
    import numpy as np

    width, height = size
    ys, xs = np.mgrid[0:height, 0:width]
    # uint8 wraps at 256 by itself and keeps a 10 s 1080p clip to seconds of work (int64 frames: 4x slower)
    xs, ys, diagonal = (xs % 256).astype(np.uint8), (ys % 256).astype(np.uint8), ((xs + ys) // 16 % 256).astype(np.uint8)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps, options={"preset": "ultrafast"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(seconds * fps):
            rgb = np.stack([xs + np.uint8(8 * i % 256), ys + np.uint8(4 * i % 256), diagonal], axis=-1)
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def write_model_dir(directory):
    """The released architecture with random bf16 weights, saved once as a vqa2 model directory."""
    import torch

    from vqa2cli.checkpoint import is_model_dir, save_model_dir
    from vqa2cli.config import VQA2Config
    from vqa2cli.quantization import Precision
    from vqa2cli.tokenizer import build_tokenizer

    directory = Path(directory)
    if is_model_dir(directory):
        return
    start = time.perf_counter()
    model = random_model(VQA2Config.from_llava_qwen(RELEASED_CONFIG), torch.device("cuda"),
                         Precision("none", torch.bfloat16))
    save_model_dir(model, build_tokenizer(), directory)
    del model
    print(f"wrote {directory} in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)


def drop_page_cache() -> bool:
    """Make the next read come from disk (Linux, root); False when not allowed."""
    import os

    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def bench(quant, clip, runs, model_dir=None, drop_caches=False):
    import torch

    from vqa2cli.config import VQA2Config
    from vqa2cli.pipeline import VQA2, load_model
    from vqa2cli.prompts import scoring_prompt, tokenize_prompt
    from vqa2cli.quantization import choose_precision
    from vqa2cli.tokenizer import build_tokenizer

    device = torch.device("cuda")
    precision = choose_precision(device, quant)
    gc.collect()
    torch.cuda.empty_cache()
    cold = drop_caches and drop_page_cache()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    if model_dir:
        vqa2 = load_model(str(model_dir), device=device, quant=quant)
        loaded_from = f"disk ({'page cache dropped' if cold else 'file may be in the page cache'})"
    else:
        model = random_model(VQA2Config.from_llava_qwen(RELEASED_CONFIG), device, precision)
        # A small Qwen2-style tokenizer (the real one is not reachable offline): only the few text tokens
        # around the ~2,300 visual tokens differ from the released prompt.
        vqa2 = VQA2(f"released-random-{quant}", model, build_tokenizer(), device, precision)
        loaded_from = "random weights, no disk reads"
    torch.cuda.synchronize()
    load_s = time.perf_counter() - start
    print(f"{quant}: model loaded ({loaded_from}) in {load_s:.1f} s", file=sys.stderr, flush=True)
    loaded_bytes = torch.cuda.memory_allocated()
    peak_loading = torch.cuda.max_memory_allocated()

    start = time.perf_counter()
    sample = vqa2.load_video(clip)
    decode_s = time.perf_counter() - start
    print(f"{quant}: clip decoded in {decode_s:.1f} s", file=sys.stderr, flush=True)
    ids = tokenize_prompt(scoring_prompt(vqa2.config.prompt), vqa2.tokenizer)
    tokens = len(ids) - 2 + sample.keyframes.shape[0] * vqa2.config.tokens_per_keyframe + 1 + sample.motion.shape[0]

    vqa2.score(sample)  # warm-up: kernels, allocator
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times, results = [], []
    for _ in range(runs):
        start = time.perf_counter()
        results.append(vqa2.score(sample))
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    record = {
        "quant": precision.describe(),
        "gpu": torch.cuda.get_device_name(device),
        "loaded_from": loaded_from,
        "load_s": round(load_s, 2),
        "memory_after_load_gib": round(loaded_bytes / 2**30, 2),
        "peak_memory_loading_gib": round(peak_loading / 2**30, 2),
        "peak_memory_scoring_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "decode_s": round(decode_s, 3),
        "score_s_median": round(statistics.median(times), 4),
        "score_s_all": [round(t, 4) for t in times],
        "keyframes": int(sample.keyframes.shape[0]),
        "motion_frames": int(sample.motion.shape[0]),
        "sequence_length": int(tokens),
        "repeatable": all(r == results[0] for r in results),
    }
    del vqa2, sample
    return record


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quant", action="append", choices=["4bit", "8bit", "none"],
                        help="precision(s) to measure (repeatable); default: 4bit and none (bf16)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--clip", help="use this video instead of the generated 10 s 1080p clip")
    parser.add_argument("--json", help="also write the records to this file")
    parser.add_argument("--from-disk", metavar="DIR",
                        help="load a saved model directory here (written first if absent) instead of random weights")
    parser.add_argument("--drop-caches", action="store_true",
                        help="with --from-disk: drop the page cache before each load (root) so it reads from disk")
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        sys.exit("bench_model_gpu.py needs a CUDA GPU")
    if args.from_disk:
        write_model_dir(args.from_disk)
    with tempfile.TemporaryDirectory() as tmp:
        clip = args.clip or make_clip(Path(tmp) / "clip_1080p_10s.mp4")
        records = []
        for quant in args.quant or ["4bit", "none"]:
            record = bench(quant, clip, args.runs, args.from_disk, args.drop_caches)
            print(json.dumps(record), flush=True)
            records.append(record)
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=2) + "\n")


if __name__ == "__main__":
    main()
