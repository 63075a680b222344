"""`FinetuneOptions`: every option of `vqa2 finetune`, declared once.

Each field carries its default, its help text and the values it accepts (`Option`); `vqa2 finetune`'s
command-line options are made from these fields (`vqa2cli.cli.dataclass_options`), `check()` applies the
same limits to options built in Python, and the fields marked `resume` are those a resumed run must share
with its checkpoint. Only the standard library is imported here: `vqa2 --help` reads this module.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields

METHODS = ("full", "lora", "qlora")
STAGE1_CHOICES = ("spatial", "motion", "both")
DEVICES = ("auto", "cuda", "cpu")
SAVE_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class Option:
    """How a field of FinetuneOptions is given on the command line, and what values it takes."""

    help: str
    flags: tuple[str, ...] = ()  # default: --the-field-name
    metavar: str | None = None
    argument: bool = False  # positional
    choices: tuple | None = None
    min: float | None = None
    min_open: bool = False  # the minimum itself is not allowed
    max: float | None = None
    max_open: bool = False
    path: str | None = None  # "file", "dir" or "any": the value names a path
    exists: bool = False  # ... that must exist
    resume: bool = False  # a resumed run must have the checkpoint's value


def option(help: str, default=MISSING, **spec):
    return field(default=default, metadata={"option": Option(help=help, **spec)})


@dataclass
class FinetuneOptions:
    stage: int = option("1 distortion recognition, 2 quality scoring, 3 quality understanding.", min=1, max=3,
                        resume=True)
    data: str = option("A data file, or a folder holding one.", argument=True, path="any", exists=True)
    model: str = option("Model to start from: a name from `vqa2 models`, a model directory, an official "
                        "llava_qwen checkpoint (VQA² or plain LLaVA-OneVision) or a Hugging Face repo id.",
                        flags=("-m", "--model"), metavar="NAME|DIR|REPO")
    output: str = option("Where the fine-tuned model, checkpoints and metrics.jsonl go (new or empty, or "
                         "--resume).", flags=("-o", "--output"), path="dir", metavar="DIR")
    method: str = option("full: train the parts' weights; lora: LoRA on the LLM's linear layers; qlora: LoRA on "
                         "a 4-bit LLM. LoRA is merged into the saved model.", "full", choices=METHODS, resume=True)
    train: tuple[str, ...] | None = option(
        "Override what trains: vision_tower, mm_projector, image_newline, motion_encoder, motion_projector, "
        "language_model (or dotted submodule paths).", None, metavar="PART,...")
    part: str | None = option("Stage 1: which branch trains [default: from the kinds of distortion in the data].",
                              None, choices=STAGE1_CHOICES)
    mos_range: tuple[float, float] | None = option("Stage-2 CSV: the scale of the mos column, e.g. 1 5 or 0 100.",
                                                   None, metavar="LO HI")
    skip_invalid: bool = option("Train without invalid records instead of stopping.", False)
    lr: float = option("Peak learning rate (cosine schedule, 3% warm-up).", 1e-5, min=0, min_open=True,
                       resume=True)
    vision_lr: float | None = option("Learning rate of the vision tower [default: LR / 5, the release's 2e-6 for "
                                     "1e-5].", None, min=0, min_open=True, resume=True)
    epochs: float = option("Passes over the data (fractions allowed).", 1.0, min=0, min_open=True)
    max_steps: int | None = option("Stop after this many optimizer steps (overrides --epochs).", None, min=1)
    batch_size: int = option("Videos per micro-batch and process.", 1, min=1, resume=True)
    grad_accum: int = option("Micro-batches per optimizer step.", 1, min=1, resume=True)
    weight_decay: float = option("AdamW weight decay.", 0.0, min=0, resume=True)
    max_grad_norm: float = option("Gradients are clipped to this total norm.", 1.0, min=0, min_open=True,
                                  resume=True)
    gradient_checkpointing: bool = option("Recompute activations in backward: less memory, slower.", False)
    save_every: int = option("Checkpoint every N optimizer steps (and at the end, and on Ctrl-C).", 500, min=1)
    keep: int = option("Checkpoints kept.", 2, min=1)
    resume: bool = option("Continue the run in --output from its last checkpoint.", False)
    seed: int = option("Data order and initialisation.", 0, min=0, max=2**32 - 1, resume=True)
    lora_r: int = option("LoRA rank.", 16, min=1, resume=True)
    lora_alpha: int = option("LoRA alpha (the adapters' output is scaled by alpha / r).", 32, min=1, resume=True)
    lora_dropout: float = option("Dropout on the LoRA adapters' input.", 0.05, min=0, max=1, max_open=True,
                                 resume=True)
    max_motion_frames: int = option("Longest motion stream; longer videos are sampled evenly down to it.", 2000,
                                    min=4, resume=True)
    slowfast_weights: str | None = option("pytorchvideo SLOWFAST_8x8_R50.pyth, when --model is a plain "
                                          "LLaVA-OneVision checkpoint.", None, path="file", exists=True,
                                          metavar="FILE")
    device: str = option("Where to train (auto: cuda when available).", "auto", choices=DEVICES)
    save_dtype: str | None = option("Weights of the saved model [default: bfloat16 after GPU training, float32 on "
                                    "CPU].", None, choices=SAVE_DTYPES)
    random_fragments: bool = option("Models that take keyframe fragments (vqa2-tiny): cut each training clip's "
                                    "fragments at random places in their cells, new each time it comes up "
                                    "(FAST-VQA's sampling; scoring takes the centres). No feature cache then.",
                                    False, resume=True)
    feature_cache_gb: float = option("When nothing before the LLM trains, encode each video once and keep up to "
                                     "this much of the encodings in memory (0: off).", 4.0, min=0)

    @property
    def effective_vision_lr(self) -> float:
        return self.vision_lr if self.vision_lr is not None else self.lr / 5

    def check(self) -> None:
        """SetupError naming the option when a value is outside what its field accepts."""
        from vqa2cli.errors import SetupError

        for f in fields(self):
            spec, value = f.metadata["option"], getattr(self, f.name)
            problem = None if value is None else _problem(spec, value)
            if problem:
                raise SetupError(f"--{f.name.replace('_', '-')} {value!r}: {problem}")
        if self.mos_range and not self.mos_range[0] < self.mos_range[1]:
            raise SetupError(f"--mos-range {self.mos_range[0]:g} {self.mos_range[1]:g}: LO must be below HI")

    @classmethod
    def resume_keys(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.metadata["option"].resume]

    def resume_values(self) -> dict:
        """The options a resumed run must share with its checkpoint (vision_lr as it applies)."""
        return {**{key: getattr(self, key) for key in self.resume_keys()}, "vision_lr": self.effective_vision_lr}


def _problem(spec: Option, value) -> str | None:
    if spec.choices is not None and value not in spec.choices:
        return f"expected one of {', '.join(map(str, spec.choices))}"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if spec.min is not None and (value < spec.min or (spec.min_open and value == spec.min)):
            return f"must be {'above' if spec.min_open else 'at least'} {spec.min:g}"
        if spec.max is not None and (value > spec.max or (spec.max_open and value == spec.max)):
            return f"must be {'below' if spec.max_open else 'at most'} {spec.max:g}"
    return None
