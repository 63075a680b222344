"""`vqa2 finetune`: the three VQA² training stages on the user's own data.

    >>> from vqa2cli.finetune import FinetuneOptions, run
    >>> result = run(FinetuneOptions(stage=2, data="scores.csv", model="vqa2-tiny", output="my-scorer",
    ...                              mos_range=(1, 5)))

    options.py        FinetuneOptions: every option, its help and its limits, declared once (the CLI is made
                      from it)
    parts.py          the base model and what of it trains: stage parts, freezing, LoRA
    schedule.py       which records each optimizer step takes, and the learning-rate schedule
    examples.py       records + decoded videos -> token ids, labels, frames; the answer loss; FeatureCache
    checkpoints.py    atomic checkpoints with accelerate's state (optimizer, random generators)
    output_folder.py  the --output folder: its lock, what a new or resumed run may find there, metrics.jsonl
    export.py         the fine-tuned model written as a vqa2 model directory (LoRA merged, model card)
    loop.py           run(): the training loop on accelerate (DDP, gradient accumulation), signals, resume

The options (`options.py`) import only the standard library, so `vqa2 finetune --help` stays instant; the
rest loads on first use of `run`.
"""

from importlib import import_module

from vqa2cli.finetune.options import FinetuneOptions

_HEAVY = {"run": "loop", "FinetuneResult": "loop", "select_trainable": "parts"}  # they import torch


def __getattr__(name):
    if name not in _HEAVY:
        raise AttributeError(f"module 'vqa2cli.finetune' has no attribute {name!r}")
    return getattr(import_module(f"vqa2cli.finetune.{_HEAVY[name]}"), name)


__all__ = ["FinetuneOptions", *_HEAVY]
