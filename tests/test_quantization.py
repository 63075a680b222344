"""Precision policy and bitsandbytes 4-bit / 8-bit loading through its CPU backend."""

import pytest
import torch

from tests.fixtures.models import assert_within_spread, quantized_modules, tiny_sample
from vqa2cli.errors import SetupError
from vqa2cli.pipeline import load_model
from vqa2cli.quantization import MIN_QUANT_WIDTH, Precision, choose_precision


def test_precision_policy():
    assert choose_precision(torch.device("cuda"), "auto") == Precision("4bit", torch.bfloat16)
    assert choose_precision(torch.device("cuda"), "none") == Precision("none", torch.bfloat16)
    assert choose_precision(torch.device("cuda"), "8bit") == Precision("8bit", torch.bfloat16)
    assert choose_precision(torch.device("cpu"), "auto") == Precision("none", torch.float32)
    assert choose_precision(torch.device("cpu"), "auto", "bf16") == Precision("none", torch.bfloat16)
    assert choose_precision(torch.device("cpu"), "4bit") == Precision("4bit", torch.float32)
    with pytest.raises(SetupError, match="unknown quantization"):
        choose_precision(torch.device("cpu"), "3bit")
    with pytest.raises(SetupError, match="float16 is not supported on CPU"):
        choose_precision(torch.device("cpu"), "none", torch.float16)


def test_4bit_on_cpu(wide_model_dir):
    import bitsandbytes as bnb

    q4 = load_model(str(wide_model_dir), device="cpu", quant="4bit")
    quantized = quantized_modules(q4.model)
    # 2 layers x (q, k, v, o, gate, up, down); nothing outside the decoder layers.
    assert len(quantized) == 14 and set(quantized.values()) == {"Linear4bit"}
    assert all(n.startswith("language_model.model.layers.") for n in quantized)
    layer = q4.model.language_model.model.layers[0]
    assert isinstance(layer.self_attn.k_proj, bnb.nn.Linear4bit)
    assert layer.self_attn.k_proj.weight.quant_state.quant_type == "nf4"
    assert layer.self_attn.k_proj.weight.quant_state.nested  # double quantization
    assert type(q4.model.language_model.lm_head) is torch.nn.Linear
    assert type(q4.model.mm_projector[0]) is torch.nn.Linear
    sample = tiny_sample(q4.config)
    assert q4.score(sample) == q4.score(sample)  # repeatable when quantized too


def test_narrow_layers_stay_unquantized(tiny_model_dir):
    """The default tiny model's k/v projections are 32 wide: bitsandbytes' 64-value blocks do not fit."""
    q4 = load_model(str(tiny_model_dir), device="cpu", quant="4bit")
    quantized = quantized_modules(q4.model)
    attn = "language_model.model.layers.0.self_attn"
    assert f"{attn}.q_proj" in quantized
    assert f"{attn}.k_proj" not in quantized and f"{attn}.v_proj" not in quantized
    k_proj = q4.model.get_submodule(f"{attn}.k_proj")
    assert type(k_proj) is torch.nn.Linear and k_proj.out_features < MIN_QUANT_WIDTH
    assert 0.0 <= q4.score(tiny_sample(q4.config)).score <= 1.0


def test_8bit_on_cpu(wide_model_dir):
    q8 = load_model(str(wide_model_dir), device="cpu", quant="8bit")
    assert set(quantized_modules(q8.model).values()) == {"Linear8bitLt"}


def test_bf16_on_cpu(wide_model_dir):
    model = load_model(str(wide_model_dir), device="cpu", dtype="bf16")
    assert {p.dtype for p in model.model.parameters()} == {torch.bfloat16}
    # RoPE frequencies are buffers computed in float32 and must stay so.
    assert model.model.language_model.model.rotary_emb.inv_freq.dtype == torch.float32


# Measured on graded_clips (spread 0.51): the largest move is 0.0077 for 4-bit, 0.0010 for 8-bit, 0.0028 for
# bf16 (1.5%, 0.2% and 0.6% of the spread); the tolerances leave a margin of at least 3.3x.
@pytest.mark.parametrize("options, fraction", [({"quant": "4bit"}, 0.05), ({"quant": "8bit"}, 0.02),
                                               ({"dtype": "bf16"}, 0.04)])
def test_lower_precision_keeps_the_trained_models_scores(graded_reference, options, fraction):
    samples, reference = graded_reference
    model = load_model("vqa2-tiny", device="cpu", **options)
    assert_within_spread(reference, [model.score(sample).score for sample in samples], fraction)


def test_quantized_model_cannot_be_saved(tiny_model_dir, tmp_path):
    from vqa2cli.checkpoint import save_model_dir

    q4 = load_model(str(tiny_model_dir), device="cpu", quant="4bit")
    with pytest.raises(SetupError, match="cannot save a quantized model"):
        save_model_dir(q4.model, q4.tokenizer, tmp_path / "out")
