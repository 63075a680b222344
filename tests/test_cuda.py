"""What only a CUDA GPU shows: bitsandbytes 4-bit / 8-bit on the GPU, CPU and GPU agreeing on the same
model, the CLI on `--device cuda`, and fine-tuning under bf16 autocast and QLoRA. Skipped without a GPU
(tests/conftest.py)."""

import json
import math

import pytest
import torch

from tests.fixtures.clips import make_clip
from tests.fixtures.finetune import finetune_options, quiet, write_stage_data
from tests.fixtures.models import quantized_modules, tiny_sample
from vqa2cli.finetune import run
from vqa2cli.pipeline import load_model

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_stage_data(tmp_path_factory.mktemp("data"))


def _on_cuda(module):
    return {p.device.type for p in module.parameters()} == {"cuda"}


def test_4bit_on_cuda(wide_model_dir):
    import bitsandbytes as bnb

    reference = load_model(str(wide_model_dir), device="cpu", quant="none")
    q4 = load_model(str(wide_model_dir), device="cuda")  # auto on CUDA: NF4, bf16 compute
    assert q4.precision.quant == "4bit" and q4.precision.dtype == torch.bfloat16
    assert _on_cuda(q4.model)
    quantized = quantized_modules(q4.model)
    assert len(quantized) == 14 and set(quantized.values()) == {"Linear4bit"}
    proj = q4.model.language_model.model.layers[0].self_attn.k_proj
    assert isinstance(proj, bnb.nn.Linear4bit) and proj.weight.dtype == torch.uint8
    assert proj.weight.quant_state.quant_type == "nf4" and proj.weight.quant_state.nested
    for seed in (0, 1):
        a, b = reference.score(tiny_sample(reference.config, seed)), q4.score(tiny_sample(q4.config, seed))
        assert abs(a.score - b.score) < 0.05
        assert max(abs(a.probs[k] - b.probs[k]) for k in a.probs) < 0.05
    sample = tiny_sample(q4.config)
    assert q4.score(sample) == q4.score(sample)


def test_8bit_and_bf16_on_cuda(wide_model_dir):
    reference = load_model(str(wide_model_dir), device="cpu", quant="none")
    q8 = load_model(str(wide_model_dir), device="cuda", quant="8bit")
    assert set(quantized_modules(q8.model).values()) == {"Linear8bitLt"} and _on_cuda(q8.model)
    # int8 as loaded, not at the first forward: loading must never hold the bf16 weights on the GPU
    assert q8.model.language_model.model.layers[0].mlp.up_proj.weight.dtype == torch.int8
    bf16 = load_model(str(wide_model_dir), device="cuda", quant="none")
    assert {p.dtype for p in bf16.model.parameters()} == {torch.bfloat16}
    sample = tiny_sample(reference.config)
    expected = reference.score(sample).score
    assert abs(q8.score(sample).score - expected) < 0.05
    assert abs(bf16.score(sample).score - expected) < 0.02


def test_float32_on_cuda_matches_cpu(tiny_model_dir, tmp_path):
    clip = make_clip(tmp_path / "clip.mp4", seconds=2, size=(160, 120))
    cpu = load_model(str(tiny_model_dir), device="cpu")
    gpu = load_model(str(tiny_model_dir), device="cuda", quant="none", dtype="float32")
    a, b = cpu.score(str(clip)), gpu.score(str(clip))
    assert abs(a.score - b.score) < 2e-3  # cuDNN may run convolutions in TF32
    assert a.level == b.level
    assert gpu.ask(str(clip), "Is there any blur?", max_new_tokens=4) == cpu.ask(str(clip), "Is there any blur?",
                                                                               max_new_tokens=4)


def test_shipped_model_scores_on_cuda_from_the_cli(vqa2, tmp_path):
    clips = tmp_path / "clips"
    clips.mkdir()
    for name, seconds in (("a.mp4", 2), ("b.mp4", 3)):
        make_clip(clips / name, seconds=seconds, size=(160, 120))
    code, out, err = vqa2("score", clips, "--model", "vqa2-tiny", "--device", "cpu", "--json")
    assert code == 0, err
    on_cpu = {r["path"]: r["score"] for r in json.loads(out)}
    code, out, err = vqa2("score", clips, "--model", "vqa2-tiny", "--device", "cuda", "--json")
    assert code == 0, err
    on_gpu = {r["path"]: r["score"] for r in json.loads(out)}
    assert on_gpu.keys() == on_cpu.keys() and len(on_gpu) == 2
    for path, score in on_cpu.items():
        assert abs(on_gpu[path] - score) < 0.01, (path, score, on_gpu[path])


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_finetune_on_cuda(wide_model_dir, data, tmp_path, method):
    out = tmp_path / "run"
    result = run(finetune_options(wide_model_dir, data, out, stage=2, method=method, device="cuda", max_steps=3),
                 say=quiet)
    assert result.step == 3 and math.isfinite(result.loss)
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    tuned = load_model(str(out), device="cuda", quant="none")
    assert 0.0 <= tuned.score(str(data / "b1.mp4")).score <= 1.0
