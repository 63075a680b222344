"""The base model and what of it trains: each stage's parts, freezing, LoRA adapters and their merging.

What trains (reference, "Training"): stage 1 the visual side of the distortion kinds in the data (spatial:
vision tower + projector; motion: SlowFast + motion projector), LLM frozen; stages 2 and 3 everything but
the text embeddings. `--method lora` puts LoRA adapters on the LLM's linear layers instead of training the
LLM itself (other selected parts still train fully); `qlora` does that on a 4-bit (NF4) LLM.
"""

from __future__ import annotations

import re

import torch

from vqa2cli.data import Record
from vqa2cli.errors import SetupError

# Everything before the language model: what FeatureCache needs frozen.
ENCODER_PARTS = ("vision_tower", "mm_projector", "image_newline", "motion_encoder", "motion_projector")
PARTS = ENCODER_PARTS + ("language_model",)
STAGE1_PARTS = {"spatial": ("vision_tower", "mm_projector"), "motion": ("motion_encoder", "motion_projector")}
EMBEDDINGS = "language_model.model.embed_tokens"  # frozen unless named explicitly in --train
VISION_PREFIX = "vision_tower."  # trained at --vision-lr
LLM_PREFIX = "language_model."
# The decoder's linear layers (attention and MLP projections); lm_head stays as it is.
LORA_TARGETS = r"language_model\.model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"


def load_base(options, device: torch.device, precision):
    """`options.model` (`checkpoint.LoadedModel`): a vqa2 model directory, a registry name, or an official
    checkpoint, a VQA² one or a plain LLaVA-OneVision one plus --slowfast-weights (its `fresh` parameters
    are saved with the trained tensors, so a resumed run and the final model use the same draw even where
    they are not trained)."""
    from vqa2cli.checkpoint import load_any

    return load_any(options.model, "score", device=device, precision=precision, allow_missing_motion=True,
                    slowfast_weights=options.slowfast_weights)


def stage_parts(stage: int, part: str | None, records: list[Record]) -> tuple[str, ...]:
    """The submodules a stage trains. Stage 1: `part`, else the distortion kinds in the records (a record
    whose kind is unknown counts as both)."""
    if stage in (2, 3):
        return PARTS
    if part is None:
        kinds = {record.kind for record in records}
        part = "both" if None in kinds or kinds == set(STAGE1_PARTS) else kinds.pop()
    if part == "both":
        return STAGE1_PARTS["spatial"] + STAGE1_PARTS["motion"]
    if part not in STAGE1_PARTS:
        raise SetupError(f"unknown stage-1 part {part!r}: expected spatial, motion or both")
    return STAGE1_PARTS[part]


def under(name: str, part: str) -> bool:
    """Whether parameter or module `name` is `part` or inside it."""
    return name == part or name.startswith(part + ".")


def select_trainable(model: torch.nn.Module, parts: tuple[str, ...]) -> list[str]:
    """Set requires_grad on the parameters under `parts` (submodule names or dotted paths), the text
    embeddings excepted unless named; everything else frozen. Returns the trainable names."""
    explicit_embeddings = any(under(p, EMBEDDINGS) for p in parts)
    trainable = []
    for name, param in model.named_parameters():
        wanted = any(under(name, p) for p in parts)
        if under(name, EMBEDDINGS) and not explicit_embeddings:
            wanted = False
        param.requires_grad_(wanted)
        if wanted:
            trainable.append(name)
    return trainable


def add_lora(model: torch.nn.Module, options, targets: list[str]) -> None:
    """LoRA adapters on the named linear layers, in place (4-bit layers get bitsandbytes adapters)."""
    from vqa2cli.quantization import forbid_hub_kernels

    forbid_hub_kernels()  # before peft imports bitsandbytes
    import peft

    config = peft.LoraConfig(
        r=options.lora_r, lora_alpha=options.lora_alpha, lora_dropout=options.lora_dropout, target_modules=targets
    )
    peft.inject_adapter_in_model(config, model)


def merge_lora(model: torch.nn.Module) -> torch.nn.Module:
    """Fold every LoRA adapter into its base weight and put the plain layer back."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.get_base_layer())
    return model


def configure_model(model, options, parts: tuple[str, ...]) -> list[str]:
    """Freeze, add adapters, make trained tensors float32; the names of the trainable parameters.

    With lora/qlora, the decoder projections inside the selected LLM parts get adapters and the rest of
    those parts stays frozen; an LLM part without any projection (lm_head, a norm) trains fully."""
    names = [name for name, _ in model.named_parameters()]
    for part in parts:
        if not any(under(name, part) for name in names):
            raise SetupError(f"--train: {part!r} names no parameters of the model (parts: {', '.join(PARTS)})")
    targets, full_parts = [], parts
    if options.method in ("lora", "qlora"):
        projections = [name for name, _ in model.named_modules() if re.fullmatch(LORA_TARGETS, name)]
        targets = [t for t in projections if any(under(p, LLM_PREFIX[:-1]) and under(t, p) for p in parts)]
        full_parts = tuple(p for p in parts if not any(under(t, p) for t in targets))
    if targets:
        add_lora(model, options, targets)
    select_trainable(model, full_parts)
    for name, param in model.named_parameters():
        if ".lora_" in name:
            param.requires_grad_(True)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise SetupError("nothing to train: the selected parts have no trainable parameters")
    with torch.no_grad():
        for name in trainable:
            param = model.get_parameter(name)
            if param.dtype != torch.float32:
                param.data = param.data.float()  # optimizer updates at lr 2e-6 vanish in bf16
        for module in model.modules():
            # BatchNorm's backward (CUDA) wants its running statistics in its weight's dtype.
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.weight is not None:
                for key in ("running_mean", "running_var"):
                    setattr(module, key, getattr(module, key).to(module.weight.dtype))
    return trainable


def set_train_mode(model: torch.nn.Module) -> None:
    """Dropout on, BatchNorm kept in eval: one clip's frame statistics would wreck SlowFast's running ones."""
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()
