"""The fine-tuned model written into the output folder as a vqa2 model directory: the base's weights
(unquantized, on the CPU) with the trained tensors put in, LoRA merged, the scoring prompt the data used,
and a model card saying how it was made."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import torch

from vqa2cli import __version__
from vqa2cli.data import Dataset
from vqa2cli.finetune.options import FinetuneOptions
from vqa2cli.finetune.parts import configure_model, load_base, merge_lora
from vqa2cli.finetune.schedule import WARMUP_RATIO

STAGE_NAMES = ("distortion recognition", "quality scoring", "quality understanding")


def save_dtype(options: FinetuneOptions, cuda: bool) -> torch.dtype:
    from vqa2cli.quantization import DTYPES

    return DTYPES[options.save_dtype] if options.save_dtype else (torch.bfloat16 if cuda else torch.float32)


def write_model(options: FinetuneOptions, parts, trained: dict[str, torch.Tensor], output: Path, dataset: Dataset,
                step: int, loss: float | None, dtype: torch.dtype) -> None:
    """`trained` (on the CPU) put into a fresh copy of the base, saved as a model directory in `output`."""
    from vqa2cli.checkpoint import save_model_dir
    from vqa2cli.quantization import Precision

    base = load_base(options, torch.device("cpu"), Precision("none", dtype))
    model = base.model
    # same adapters as in training, on full-precision base weights
    configure_model(model, replace(options, method="lora" if options.method == "qlora" else options.method), parts)
    named = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in trained.items():
            named[name].data = tensor.to(dtype)
    adapters = any(".lora_" in name for name in trained)
    if adapters:
        merge_lora(model)
    model.requires_grad_(False)
    prompt = trained_prompt(dataset) if options.stage == 2 else None
    if prompt:  # `vqa2 score` then asks the fine-tuned model what it was trained on
        model.config.prompt = prompt
    card = model_card(options, parts, dataset, step, loss, base.name, dtype, adapters)
    # the output folder also holds the checkpoints and the log: the model's files go in beside them
    save_model_dir(model, base.tokenizer, output, card=card, merge=True)


def trained_prompt(dataset: Dataset) -> str | None:
    """The scoring prompt kind all stage-2 records were trained with, when they share one."""
    from vqa2cli.prompts import ENHANCED_USER, STREAMING_USER, UGC_USER

    for kind, user in (("ugc", UGC_USER), ("streaming", STREAMING_USER), ("enhanced", ENHANCED_USER)):
        # streaming data puts stalling information before the scorer's question
        if all(record.turns[0][1].endswith(user) for record in dataset.records):
            return kind
    return None


def model_card(options: FinetuneOptions, parts, dataset: Dataset, step: int, loss: float | None, base_name: str,
               dtype: torch.dtype, adapters: bool) -> str:
    lines = [
        "# VQA² fine-tune",
        "",
        f"Fine-tuned with `vqa2 finetune` (vqa2 {__version__}) on {datetime.now(timezone.utc):%Y-%m-%d}.",
        "",
        f"- base model: `{base_name}`",
        f"- stage: {options.stage} ({STAGE_NAMES[options.stage - 1]})",
        f"- method: {options.method}"
        + (f" (LoRA r={options.lora_r}, alpha={options.lora_alpha}, merged into the weights)" if adapters else ""),
        f"- trained parts: {', '.join(parts)}",
        f"- data: `{dataset.path.name}`, {len(dataset.records)} records"
        + (f" ({len(dataset.problems)} invalid records skipped)" if dataset.problems else ""),
        f"- steps: {step} (batch {options.batch_size} x accumulation {options.grad_accum} per process)",
        f"- learning rate: {options.lr:g} (vision tower {options.effective_vision_lr:g}), cosine, "
        f"{WARMUP_RATIO:.0%} warm-up",
        f"- final training loss: {loss:.4f}" if loss is not None else "- final training loss: n/a",
        f"- weights: {str(dtype).removeprefix('torch.')}",
        f"- scoring prompt: {trained_prompt(dataset) or 'as the base model'}" if options.stage == 2 else "",
        "",
        "Use it with `vqa2 score --model DIR` or `vqa2 ask --model DIR`. The training loss is not an evaluation: "
        "check the model on held-out videos before relying on it.",
        "",
    ]
    return "\n".join(lines)
