"""What only a CUDA GPU shows: bitsandbytes 4-bit / 8-bit on the GPU, CPU and GPU agreeing on the same
model, the CLI on `--device cuda`, and fine-tuning under bf16 autocast and QLoRA. Skipped without a GPU
(tests/conftest.py).

Precision is judged on the trained vqa2-tiny over clips it scores 0.37-0.88 (`graded_reference`), as a
fraction of that spread: on CPU, 4-bit moves a score by at most 1.5% of it, 8-bit by 0.2%, bf16 by 0.6%
(tests/test_quantization.py). On the GPU the compute is bf16 as well, hence the wider margins. Measured on an
H200 with vqa2-tiny v4 on this graded set: 4-bit 1.5%, 8-bit 0.6%, bf16 0.6%, float32 0.02% (BENCHMARKS.md,
tests/bench/bench_tiny_gpu_precision.py).
"""

import json
import math

import pytest
import torch

from tests.fixtures.finetune import finetune_options, quiet
from tests.fixtures.models import assert_within_spread, quantized_modules, tiny_sample
from vqa2cli.finetune import run
from vqa2cli.pipeline import load_model

pytestmark = pytest.mark.cuda


def _on_cuda(module):
    return {p.device.type for p in module.parameters()} == {"cuda"}


def test_4bit_on_cuda(wide_model_dir):
    import bitsandbytes as bnb

    q4 = load_model(str(wide_model_dir), device="cuda")  # auto on CUDA: NF4, bf16 compute
    assert q4.precision.quant == "4bit" and q4.precision.dtype == torch.bfloat16
    assert _on_cuda(q4.model)
    quantized = quantized_modules(q4.model)
    assert len(quantized) == 14 and set(quantized.values()) == {"Linear4bit"}
    proj = q4.model.language_model.model.layers[0].self_attn.k_proj
    assert isinstance(proj, bnb.nn.Linear4bit) and proj.weight.dtype == torch.uint8
    assert proj.weight.quant_state.quant_type == "nf4" and proj.weight.quant_state.nested
    sample = tiny_sample(q4.config)
    assert q4.score(sample) == q4.score(sample)


def test_8bit_and_bf16_on_cuda(wide_model_dir):
    q8 = load_model(str(wide_model_dir), device="cuda", quant="8bit")
    assert set(quantized_modules(q8.model).values()) == {"Linear8bitLt"} and _on_cuda(q8.model)
    # int8 as loaded, not at the first forward: loading must never hold the bf16 weights on the GPU
    assert q8.model.language_model.model.layers[0].mlp.up_proj.weight.dtype == torch.int8
    bf16 = load_model(str(wide_model_dir), device="cuda", quant="none")
    assert {p.dtype for p in bf16.model.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("options, fraction", [
    ({}, 0.08),  # auto: NF4 with bf16 compute
    ({"quant": "8bit"}, 0.05),
    ({"quant": "none"}, 0.05),  # bf16
    ({"quant": "none", "dtype": "float32"}, 0.01),  # cuDNN may run convolutions in TF32
])
def test_the_trained_model_on_cuda_scores_like_on_cpu(graded_reference, options, fraction):
    samples, reference = graded_reference
    model = load_model("vqa2-tiny", device="cuda", **options)
    assert_within_spread(reference, [model.score(sample).score for sample in samples], fraction)


def test_float32_on_cuda_answers_like_cpu(graded_reference):
    samples, _ = graded_reference
    cpu = load_model("vqa2-tiny", device="cpu")
    gpu = load_model("vqa2-tiny", device="cuda", quant="none", dtype="float32")
    for sample in samples[:3]:
        question = "Is there any blur?"
        assert gpu.ask(sample, question, max_new_tokens=8) == cpu.ask(sample, question, max_new_tokens=8)


def test_shipped_model_scores_on_cuda_from_the_cli(vqa2, graded_clips):
    folder = graded_clips[0].parent
    results = {}
    for device in ("cpu", "cuda"):
        code, out, err = vqa2("score", folder, "--model", "vqa2-tiny", "--device", device, "--json")
        assert code == 0, err
        results[device] = {r["path"]: r["score"] for r in json.loads(out)}
    assert results["cuda"].keys() == results["cpu"].keys() and len(results["cpu"]) == len(graded_clips)
    paths = sorted(results["cpu"])
    assert_within_spread([results["cpu"][p] for p in paths], [results["cuda"][p] for p in paths], 0.05)


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_finetune_on_cuda(wide_model_dir, stage_data, tmp_path, method):
    out = tmp_path / "run"
    result = run(finetune_options(wide_model_dir, stage_data, out, stage=2, method=method, device="cuda",
                                  max_steps=3), say=quiet)
    assert result.step == 3 and math.isfinite(result.loss)
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    tuned = load_model(str(out), device="cuda", quant="none")
    assert 0.0 <= tuned.score(str(stage_data / "b1.mp4")).score <= 1.0
