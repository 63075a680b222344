"""`vqa2 finetune`: the three VQA² training stages on the user's own data.

One process or many: under `torchrun` / `accelerate launch` (WORLD_SIZE > 1) the same code initialises
the process group (NCCL on GPUs, gloo on CPUs), wraps the model in DistributedDataParallel, gives each rank
its slice of every epoch's shuffled order, and lets rank 0 alone write logs, checkpoints and the model.

What trains (reference, "Training"): stage 1 the visual side of the distortion kinds in the data (spatial:
vision tower + projector; motion: SlowFast + motion projector), LLM frozen; stages 2 and 3 everything but
the text embeddings. `--method lora` puts LoRA adapters on the LLM's linear layers instead of training the
LLM itself (other selected parts still train fully); `qlora` does that on a 4-bit (NF4) LLM.

Output directory:
    DIR/config.json, model.safetensors, tokenizer files, README.md   the fine-tuned model (LoRA merged)
    DIR/metrics.jsonl                                                one line per optimizer step
    DIR/checkpoints/step-NNNNNNNN/                                   last `keep` checkpoints
        trainable.safetensors   trained tensors (adapters, or the trained parts' weights), and the base's
                                randomly initialised ones (see load_base)
        state.pt                optimizer, scheduler, RNG of every rank (plain tensors/containers:
                                loaded with torch.load(weights_only=True))
        meta.json               step, data position, loss, the options that must match on --resume
A checkpoint is written into a temporary folder, synced, and renamed into place; an interrupted save leaves
the previous checkpoints untouched.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import torch

from vqa2cli import __version__
from vqa2cli.data import Dataset, Record, format_problems, load_dataset
from vqa2cli.errors import DataError, InputError, SetupError

# Everything before the language model: what FeatureCache needs frozen.
ENCODER_PARTS = ("vision_tower", "mm_projector", "image_newline", "motion_encoder", "motion_projector")
PARTS = ENCODER_PARTS + ("language_model",)
STAGE1_PARTS = {"spatial": ("vision_tower", "mm_projector"), "motion": ("motion_encoder", "motion_projector")}
EMBEDDINGS = "language_model.model.embed_tokens"  # frozen unless named explicitly in --train
VISION_PREFIX = "vision_tower."
LLM_PREFIX = "language_model."
# The decoder's linear layers (attention and MLP projections); lm_head stays as it is.
LORA_TARGETS = r"language_model\.model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
METHODS = ("full", "lora", "qlora")
# What checkpoint.load_official initialises at random when the base has no motion weights.
FRESH_MOTION = ("motion_projector.", "motion_encoder.position_embedding.")
STAGE_NAMES = ("distortion recognition", "quality scoring", "quality understanding")
WARMUP_RATIO = 0.03
CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
INVALID_REPORT = "invalid_records.txt"
# Options a resumed run must share with the checkpoint for the continuation to be the same run.
RESUME_KEYS = ("stage", "method", "parts", "lr", "vision_lr", "batch_size", "grad_accum", "seed", "weight_decay",
               "lora_r", "lora_alpha", "lora_dropout", "max_grad_norm", "base_model", "max_motion_frames")


@dataclass
class FinetuneOptions:
    stage: int
    data: str
    model: str
    output: str
    method: str = "full"
    train: tuple[str, ...] | None = None  # override of the stage's trained parts (submodule names)
    part: str | None = None  # stage 1: "spatial", "motion" or "both"; default: the kinds in the data
    lr: float = 1e-5
    vision_lr: float | None = None  # default lr / 5 (the release: 1e-5 and 2e-6)
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 1
    grad_accum: int = 1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    save_every: int = 500
    keep: int = 2
    resume: bool = False
    seed: int = 0
    gradient_checkpointing: bool = False
    mos_range: tuple[float, float] | None = None
    skip_invalid: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    max_motion_frames: int = 2000
    slowfast_weights: str | None = None  # Kinetics SlowFast weights when BASE is a plain LLaVA-OneVision
    device: str = "auto"
    save_dtype: str | None = None  # default: bfloat16 after GPU training, float32 after CPU training
    feature_cache_gb: float = 4.0  # FeatureCache's memory; 0 turns it off


@dataclass
class FinetuneResult:
    output: Path
    step: int
    total_steps: int
    loss: float | None  # mean training loss of the last optimizer step
    interrupted: bool  # stopped by a signal; a checkpoint of `step` was written
    checkpoint: Path | None


# ---- what trains ---------------------------------------------------------------------------------------


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


def _under(name: str, part: str) -> bool:
    return name == part or name.startswith(part + ".")


def select_trainable(model: torch.nn.Module, parts: tuple[str, ...]) -> list[str]:
    """Set requires_grad on the parameters under `parts` (submodule names or dotted paths), the text
    embeddings excepted unless named; everything else frozen. Returns the trainable names."""
    explicit_embeddings = any(_under(p, EMBEDDINGS) for p in parts)
    trainable = []
    for name, param in model.named_parameters():
        wanted = any(_under(name, p) for p in parts)
        if _under(name, EMBEDDINGS) and not explicit_embeddings:
            wanted = False
        param.requires_grad_(wanted)
        if wanted:
            trainable.append(name)
    return trainable


def add_lora(model: torch.nn.Module, options: FinetuneOptions, targets: list[str]) -> None:
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


def configure_model(model, options: FinetuneOptions, parts: tuple[str, ...]) -> list[str]:
    """Freeze, add adapters, make trained tensors float32; the names of the trainable parameters.

    With lora/qlora, the decoder projections inside the selected LLM parts get adapters and the rest of
    those parts stays frozen; an LLM part without any projection (lm_head, a norm) trains fully."""
    names = [name for name, _ in model.named_parameters()]
    for part in parts:
        if not any(_under(name, part) for name in names):
            raise SetupError(f"--train: {part!r} names no parameters of the model (parts: {', '.join(PARTS)})")
    targets, full_parts = [], parts
    if options.method in ("lora", "qlora"):
        projections = [name for name, _ in model.named_modules() if re.fullmatch(LORA_TARGETS, name)]
        targets = [t for t in projections if any(_under(p, LLM_PREFIX[:-1]) and _under(t, p) for p in parts)]
        full_parts = tuple(p for p in parts if not any(_under(t, p) for t in targets))
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


def lr_factor(step: int, total: int) -> float:
    """Linear warm-up over the first 3% of the steps, then cosine to 0; `step` is 0-based."""
    warmup = max(1, math.ceil(WARMUP_RATIO * total))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# ---- processes -----------------------------------------------------------------------------------------


class Processes:
    """One process, or one rank of a torchrun / accelerate launch job (detected from WORLD_SIZE)."""

    def __init__(self, device: str = "auto"):
        import torch.distributed as dist

        self.dist = dist
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device == "auto":
            device = f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu"
        elif device == "cuda":
            device = f"cuda:{self.local_rank}"
        self.device = torch.device(device)
        if self.device.type == "cuda":
            if not torch.cuda.is_available():
                raise SetupError(f"device {device}: CUDA is not available")
            torch.cuda.set_device(self.device)
        self.owns_group = False
        if self.world > 1 and not dist.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            # Rank 0 alone writes the final model (minutes for a 7B one) while the others wait.
            dist.init_process_group(backend, timeout=timedelta(hours=2))
            self.owns_group = True

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_max(self, value: float) -> float:
        if self.world == 1:
            return value
        tensor = torch.tensor([float(value)], device=self.comm_device)
        self.dist.all_reduce(tensor, op=self.dist.ReduceOp.MAX)
        return float(tensor.item())

    def all_mean(self, value: float) -> float:
        if self.world == 1:
            return value
        tensor = torch.tensor([float(value)], dtype=torch.float64, device=self.comm_device)
        self.dist.all_reduce(tensor)
        return float(tensor.item()) / self.world

    def gather(self, obj) -> list:
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        self.dist.all_gather_object(out, obj)
        return out

    def barrier(self):
        if self.world > 1:
            self.dist.barrier()

    @property
    def comm_device(self):
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def close(self):
        if self.owns_group:
            self.dist.destroy_process_group()


def shard_order(n: int, epoch: int, seed: int, rank: int, world: int) -> list[int]:
    """This rank's record indices for `epoch`: a seeded permutation, padded by wrapping to a multiple of the
    world size (like DistributedSampler) so every rank does the same number of steps."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
    total = math.ceil(n / world) * world
    order += order[: total - n]
    while len(order) < total:  # fewer records than ranks
        order += order[: total - len(order)]
    return order[rank::world]


def plan_steps(n: int, options: FinetuneOptions, rank: int, world: int, epoch: int, position: int):
    """Optimizer steps from (epoch, position) on, forever: (epoch, position after the step, micro-batches)."""
    per_step = options.batch_size * options.grad_accum
    while True:
        order = shard_order(n, epoch, options.seed, rank, world)
        while position < len(order):
            items = order[position : position + per_step]
            position += len(items)
            yield epoch, position, [items[i : i + options.batch_size] for i in range(0, len(items), options.batch_size)]
        epoch, position = epoch + 1, 0


# ---- RNG and checkpoints -------------------------------------------------------------------------------


def rng_state() -> dict:
    """Every generator training draws from, as plain containers (safe to load with weights_only=True)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_dirs(output: Path) -> list[Path]:
    """Complete checkpoints (those with meta.json), oldest first."""
    root = output / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if re.fullmatch(r"step-\d{8}", p.name) and (p / "meta.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def save_checkpoint(output: Path, step: int, tensors: dict[str, torch.Tensor], state: dict, meta: dict,
                    keep: int) -> Path:
    """Write a checkpoint atomically (temporary folder, fsync, rename), then drop all but the last `keep`."""
    from safetensors.torch import save_file

    root = output / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):  # left by a save that was killed
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    tmp.mkdir()
    try:
        save_file({n: t.detach().cpu().contiguous() for n, t in tensors.items()}, tmp / "trainable.safetensors")
        torch.save(state, tmp / "state.pt")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        for file in tmp.iterdir():
            _fsync(file)
        if final.exists():  # the same step saved again (e.g. an interrupt right after a periodic save)
            old = root / f".tmp-old-{step:08d}-{os.getpid()}"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old)
        else:
            tmp.rename(final)
        _fsync(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in checkpoint_dirs(output)[:-keep]:
        shutil.rmtree(old)
    return final


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    from safetensors.torch import load_file

    try:
        meta = json.loads((path / "meta.json").read_text())
        tensors = load_file(path / "trainable.safetensors")
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except Exception as error:  # unreadable or not plain data: refuse rather than unpickle
        reason = str(error).splitlines()[0] if str(error) else repr(error)
        raise SetupError(f"checkpoint {path} cannot be read ({reason})") from error
    return tensors, state, meta


def _fingerprint(dataset: Dataset) -> str:
    digest = hashlib.sha256()
    for record in dataset.records:
        # relative paths: the same data resumed from another mount point is still the same data
        digest.update(json.dumps([str(record.video.relative_to(dataset.root)), record.turns]).encode())
    return digest.hexdigest()[:16]


# ---- examples ------------------------------------------------------------------------------------------


def ask_user_turn(question: str, num_keyframes: int, num_frames: int) -> str:
    """The user turn `vqa2 ask` sends, so a bare question trains on the prompt the model will see."""
    from vqa2cli.prompts import ASSISTANT_PREAMBLE, MEDIA_LINES

    return ASSISTANT_PREAMBLE.format(num_keyframes=num_keyframes, num_frames=num_frames) + "\n" + MEDIA_LINES + \
        question.strip()


def build_example(record: Record, sample, tokenizer):
    """(input_ids, labels, keyframes, motion, motion splits) of one record with its decoded video; the
    splits (motion frames of each keyframe's second) place the motion tokens in the per_second layout."""
    from vqa2cli.modeling import motion_splits
    from vqa2cli.prompts import training_example

    turns = list(record.turns)
    if record.wrapped:
        turns[0] = ("human", ask_user_turn(turns[0][1], len(sample.keyframe_indices), len(sample.motion_indices)))
    ids, labels = training_example([{"from": role, "value": text} for role, text in turns], tokenizer)
    splits = motion_splits(sample.keyframe_indices, sample.motion_indices)
    return torch.tensor(ids), torch.tensor(labels), sample.keyframes, sample.motion, splits


def answer_span(labels) -> int:
    """How many positions at the end of the (left-padded) sequences the loss needs: from the one before the
    first supervised token to the last. Everything supervised is text after the video blocks, so this
    counts the same in token ids as in the expanded embeddings."""
    from vqa2cli.prompts import IGNORE_INDEX

    span = 0
    for row in labels:
        supervised = (row != IGNORE_INDEX).nonzero()
        if len(supervised):
            span = max(span, len(row) - int(supervised[0]) + 1)
    return max(span, 2)


def answer_loss(logits: torch.Tensor, labels, keep: int) -> torch.Tensor:
    """Mean next-token cross-entropy over the answer tokens, from the last `keep` logits of each row.

    Same value as the language model's own loss on the full sequence, without materialising logits for
    the thousands of video positions (at 152k vocabulary words each)."""
    from vqa2cli.prompts import IGNORE_INDEX

    tail = torch.full((len(labels), keep), IGNORE_INDEX, dtype=torch.long)
    for b, row in enumerate(labels):
        piece = row[-keep:]
        tail[b, keep - len(piece):] = piece
    tail = tail.to(logits.device)
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].float().flatten(0, 1), tail[:, 1:].flatten(), ignore_index=IGNORE_INDEX
    )


class FeatureCache:
    """Each video's encoders-and-projectors output (`EncodedVideo`), made the first time one of its records
    comes up and reused for its other records and later epochs, in CPU memory up to `limit_bytes` (videos
    beyond that are decoded and encoded every time, as without the cache).

    Only when nothing before the language model trains and none of it has dropout (`applies`): then a
    video's encoding is the same every time, so training gives the same weights with or without the cache
    (tests/test_finetune.py). With the encoders frozen, decoding and encoding were most of a step: vqa2-tiny's
    yes/no pass (batch 8, LLM only) takes 0.25 s a step with the cache, 0.51 without."""

    def __init__(self, model, limit_bytes: int, autocast):
        self.model, self.limit, self.autocast = model, limit_bytes, autocast
        self.used = 0
        self.videos: dict[Path, object] = {}  # video -> its VideoSample, frames replaced by the encoding

    @staticmethod
    def applies(model, trainable: list[str]) -> bool:
        if any(_under(name, part) for name in trainable for part in ENCODER_PARTS):
            return False
        encoders = [getattr(model, part) for part in ENCODER_PARTS]
        return not any(isinstance(m, torch.nn.Dropout) and m.p > 0
                       for part in encoders if isinstance(part, torch.nn.Module) for m in part.modules())

    def get(self, video: Path):
        """The cached sample of `video` (its `keyframes` an EncodedVideo), or None."""
        return self.videos.get(video)

    def encoded(self, video: Path, sample, example):
        """`example` (from build_example) with the video's encoding in place of its frames; the encoding is
        kept if there is room."""
        from vqa2cli.modeling import EncodedVideo

        ids, labels, keyframes, motion, splits = example
        if isinstance(keyframes, EncodedVideo):
            return example
        with torch.no_grad(), self.autocast():
            encoding = self.model.encode_video(keyframes, motion)
        encoding = EncodedVideo(*(None if b is None else b.to("cpu") for b in (encoding.keyframe_block,
                                                                                encoding.motion_block)))
        if self.used + encoding.nbytes <= self.limit:
            self.videos[video] = replace(sample, keyframes=encoding, motion=None)
            self.used += encoding.nbytes
        return ids, labels, encoding, None, splits


# ---- progress ------------------------------------------------------------------------------------------


class Progress:
    """One status line on stderr: rewritten in place on a terminal, a line every ~5% (or 30 s) otherwise."""

    def __init__(self, total: int, start: int, stream=None):
        self.total, self.start = total, start
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.began = time.monotonic()
        self.last_line = 0.0
        self.every = max(1, total // 20)

    def update(self, step: int, loss: float | None, lr: float) -> None:
        elapsed = time.monotonic() - self.began
        done = step - self.start
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - step) / rate if rate > 0 else 0.0
        width = 24
        filled = int(width * step / max(1, self.total))
        shown = f"{loss:.4f}" if loss is not None else "n/a (all videos failed)"
        line = (f"[{'#' * filled}{'.' * (width - filled)}] step {step}/{self.total}  loss {shown}  lr {lr:.2e}  "
                f"{rate:.2f} step/s  ETA {_clock(eta)}")
        if self.tty:
            self.stream.write("\r" + line + "\x1b[K")
            self.stream.flush()
        elif step == self.total or step % self.every == 0 or time.monotonic() - self.last_line > 30:
            self.stream.write(line + "\n")
            self.stream.flush()
            self.last_line = time.monotonic()

    def close(self):
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class StopSignal:
    """First SIGINT/SIGTERM: finish the optimizer step, save, stop. A second SIGINT aborts at once, except
    under torchrun/accelerate, whose launcher forwards the user's Ctrl-C to ranks that already got it."""

    def __init__(self, say, abort_on_second: bool):
        self.say = say
        self.abort_on_second = abort_on_second
        self.requested = False
        self.previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            if self.abort_on_second and signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.requested = True
        again = " (Ctrl-C again to abort at once)" if self.abort_on_second else ""
        self.say(f"\nstopping: finishing this step and saving a checkpoint{again}")

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


# ---- the run -------------------------------------------------------------------------------------------


def _prepare_output(output: Path, resume: bool) -> None:
    """Refuse to mix a new run into a folder holding something else; nothing of the user's is overwritten."""
    ours = {METRICS, INVALID_REPORT, CHECKPOINTS}
    if checkpoint_dirs(output) and not resume:
        raise SetupError(f"{output} holds checkpoints of an earlier run: pass --resume to continue it, "
                         "or choose another --output")
    if output.exists() and not output.is_dir():
        raise SetupError(f"--output {output} is a file")
    if output.is_dir() and not checkpoint_dirs(output) and any(p.name not in ours for p in output.iterdir()):
        raise SetupError(f"--output {output} is not empty; choose a new or empty folder")


def _validated_data(options: FinetuneOptions, output: Path, procs: Processes, say) -> Dataset:
    dataset = load_dataset(options.data, options.stage, mos_range=options.mos_range, say=say if procs.main else None)
    if dataset.problems:
        if procs.main:
            output.mkdir(parents=True, exist_ok=True)
            (output / INVALID_REPORT).write_text("\n".join(str(p) for p in dataset.problems) + "\n")
            for line in format_problems(dataset):
                say(line)
        if not options.skip_invalid:
            raise DataError(
                f"{len(dataset.problems)} of {dataset.total} records in {dataset.path} are invalid (full list in "
                f"{output / INVALID_REPORT}); fix them, or pass --skip-invalid to train without them"
            )
        say(f"skipping {len(dataset.problems)} invalid records; training on {len(dataset.records)}")
    if not dataset.records:
        raise DataError(f"{dataset.path}: no usable records")
    return dataset


def load_base(options: FinetuneOptions, device: torch.device, precision):
    """(model, tokenizer, name, fresh) of BASE: a vqa2 model directory, a registry name, or an official
    checkpoint (a VQA² one, or a plain LLaVA-OneVision one plus --slowfast-weights). `fresh` names the
    parameters the base files lack and the loader initialised at random (a LLaVA-OneVision base's motion
    projector and position table): they are saved with the trained tensors, so a resumed run and the
    final model use the same draw even where they are not trained."""
    from vqa2cli import checkpoint, registry

    resolved = registry.resolve(options.model, task="score")
    path = resolved.path
    fresh = []
    if checkpoint.is_model_dir(path):
        model, tokenizer = checkpoint.load_model_dir(path, device=device, precision=precision)
    elif checkpoint.is_official(path):
        overrides = {"prompt": resolved.prompt} if resolved.prompt else {}
        model = checkpoint.load_official(
            path, device=device, precision=precision, config=checkpoint.official_config(path, **overrides),
            allow_missing_motion=True, slowfast_weights=options.slowfast_weights,
        )
        tokenizer = checkpoint.load_tokenizer(path)
        if not any(key.startswith("model.slowfast") for key in _official_keys(checkpoint.official_files(path))):
            fresh = [n for n, _ in model.named_parameters() if n.startswith(FRESH_MOTION)]
    else:
        raise SetupError(
            f"--model {options.model}: {path} is neither a vqa2 model directory nor a llava_qwen checkpoint"
        )
    return model, tokenizer, resolved.name, fresh


def _official_keys(files) -> set[str]:
    from safetensors import safe_open

    keys = set()
    for file in files:
        with safe_open(str(file), "pt") as handle:
            keys.update(handle.keys())
    return keys


def _check_resume(meta: dict, run: dict, say) -> None:
    saved = meta["run"]
    different = [k for k in RESUME_KEYS + ("data",) if saved.get(k) != run.get(k)]
    if different:
        listing = "; ".join(f"{k}: {saved.get(k)!r} then, {run.get(k)!r} now" for k in different)
        raise SetupError(f"--resume: this run differs from the checkpoint's ({listing}); use the same options "
                         "and data, or a new --output")
    if saved.get("world") != run["world"]:
        say(f"note: the checkpoint was written by {saved.get('world')} processes, this run has {run['world']}; "
            "the data order from here on differs from an uninterrupted run")
    if saved.get("total_steps") != run["total_steps"]:
        say(f"note: the run length changed ({saved.get('total_steps')} -> {run['total_steps']} steps); the learning "
            "rate schedule follows the new length")


def run(options: FinetuneOptions, say=None) -> FinetuneResult:
    """Train, checkpoint, and write the fine-tuned model into `options.output`."""
    say = say or (lambda text: print(text, file=sys.stderr, flush=True))
    if options.stage not in (1, 2, 3):
        raise SetupError(f"unknown stage {options.stage} (1, 2 or 3)")
    if options.method not in METHODS:
        raise SetupError(f"unknown method {options.method!r}: expected {', '.join(METHODS)}")
    if options.batch_size < 1 or options.grad_accum < 1 or options.keep < 1 or options.save_every < 1:
        raise SetupError("--batch-size, --grad-accum, --keep and --save-every must be at least 1")
    procs = Processes(options.device)
    main_say = say if procs.main else (lambda text: None)
    try:
        return _run(options, procs, main_say)
    finally:
        procs.close()


def _run(options: FinetuneOptions, procs: Processes, say) -> FinetuneResult:
    from vqa2cli.quantization import Precision

    output = Path(options.output)
    _prepare_output(output, options.resume)
    dataset = _validated_data(options, output, procs, say)
    if options.mos_range and not (options.stage == 2 and dataset.path.suffix.lower() == ".csv"):
        say("note: --mos-range only applies to stage-2 CSV data; ignored")
    if options.part and (options.stage != 1 or options.train):
        say("note: --part only applies to stage 1 without --train; ignored")
    parts = tuple(options.train) if options.train else stage_parts(options.stage, options.part, dataset.records)
    vision_lr = options.vision_lr if options.vision_lr is not None else options.lr / 5

    # Seeded before the model is touched: fresh LoRA adapters are drawn from these generators.
    random.seed(options.seed)
    np.random.seed(options.seed % 2**32)
    torch.manual_seed(options.seed)
    cuda = procs.device.type == "cuda"
    amp = cuda and torch.cuda.is_bf16_supported()
    # Frozen weights may stay in bf16 on a GPU (computed in bf16 under autocast anyway); trained ones are
    # made float32 in configure_model.
    dtype = torch.bfloat16 if amp else torch.float32
    precision = Precision("4bit" if options.method == "qlora" else "none", dtype)
    say(f"loading {options.model} ({options.method}, {precision.describe()}) on {procs.device}")
    model, tokenizer, base_name, fresh = load_base(options, procs.device, precision)
    trainable = configure_model(model, options, parts)
    saved_names = trainable + [n for n in fresh if n not in trainable]  # what checkpoints hold
    if options.gradient_checkpointing:
        for module in (model.language_model, model.vision_tower):
            module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    set_train_mode(model)
    named = dict(model.named_parameters())
    n_trained = sum(named[n].numel() for n in trainable)
    adapters = any(".lora_" in n for n in trainable)
    say(f"training {', '.join(parts)} ({n_trained:,} parameters in {len(trainable)} tensors"
        f"{', LoRA on the language model' if adapters else ''})")
    if options.method != "full" and not adapters:
        say(f"note: no language-model layer is trained, so --method {options.method} has nothing to adapt: "
            "the selected parts train fully")

    groups = [
        {"params": [named[n] for n in trainable if not n.startswith(VISION_PREFIX)], "lr": options.lr},
        {"params": [named[n] for n in trainable if n.startswith(VISION_PREFIX)], "lr": vision_lr},
    ]
    groups = [g for g in groups if g["params"]]
    optimizer = torch.optim.AdamW(groups, weight_decay=options.weight_decay, betas=(0.9, 0.999), eps=1e-8)

    n = len(dataset.records)
    shard_len = len(shard_order(n, 0, options.seed, procs.rank, procs.world))
    steps_per_epoch = math.ceil(shard_len / (options.batch_size * options.grad_accum))
    total = options.max_steps or max(1, math.ceil(options.epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total))

    run_info = {
        "stage": options.stage, "method": options.method, "parts": list(parts), "lr": options.lr,
        "vision_lr": vision_lr, "batch_size": options.batch_size, "grad_accum": options.grad_accum,
        "seed": options.seed, "weight_decay": options.weight_decay, "max_grad_norm": options.max_grad_norm,
        "lora_r": options.lora_r, "lora_alpha": options.lora_alpha, "lora_dropout": options.lora_dropout,
        "max_motion_frames": options.max_motion_frames, "base_model": base_name,
        "data": _fingerprint(dataset), "data_file": str(dataset.path), "world": procs.world, "total_steps": total,
    }
    step, epoch, position, loss = 0, 0, 0, None
    latest = checkpoint_dirs(output)[-1:] if options.resume else []
    if options.resume and not latest:
        say(f"--resume: no checkpoint in {output / CHECKPOINTS}; starting from the beginning")
    if latest:
        tensors, state, meta = load_checkpoint(latest[0])
        _check_resume(meta, run_info, say)
        missing = sorted(set(saved_names) - tensors.keys())
        extra = sorted(tensors.keys() - set(saved_names))
        if missing or extra:
            raise SetupError(f"checkpoint {latest[0]} does not match the trained tensors "
                             f"(missing {missing[:3]}, unexpected {extra[:3]})")
        with torch.no_grad():
            for name, tensor in tensors.items():
                named[name].copy_(tensor)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"][min(procs.rank, len(state["rng"]) - 1)])
        step, epoch, position, loss = meta["step"], meta["epoch"], meta["position"], meta.get("loss")
        say(f"resuming from {latest[0]} (step {step} of {total})")
    if procs.main:
        output.mkdir(parents=True, exist_ok=True)
        _trim_metrics(output / METRICS, step)

    train_model = model
    if procs.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        # find_unused_parameters: SlowFast's slow pathway is trained in stages 2-3 but never computed.
        train_model = DistributedDataParallel(
            model, device_ids=[procs.device.index] if cuda else None, find_unused_parameters=True
        )

    # the model's own sizes, and the motion cap held within its position table
    sampling = model.config.sampling(options.max_motion_frames)
    trained_params = [named[n] for n in trainable]

    def autocast():
        return torch.autocast(procs.device.type, dtype=torch.bfloat16, enabled=amp)

    cache = None
    if options.feature_cache_gb > 0 and FeatureCache.applies(model, trainable):
        cache = FeatureCache(model, int(options.feature_cache_gb * 2**30), autocast)
        say(f"the encoders are frozen: each video is encoded once (up to {options.feature_cache_gb:g} GB kept)")

    def load(job):
        """Decode and tokenise one micro-batch (in a background thread); failed records come back as text."""
        examples, failures = [], []
        for index in job[-1]:
            record = dataset.records[index]
            try:
                sample = cache.get(record.video) if cache else None
                if sample is None:
                    sample = sampling.load(record.video)
                examples.append((record.video, sample, build_example(record, sample, tokenizer)))
            except InputError as error:
                failures.append(f"{record.where}: {error}")
        return examples, failures

    def micro_jobs():
        for s, (ep, pos, micros) in enumerate(plan_steps(n, options, procs.rank, procs.world, epoch, position),
                                              start=step):
            for m, items in enumerate(micros):
                yield s, ep, pos, m, len(micros), items

    def checkpoint_now(at_step, at_epoch, at_position, at_loss):
        rngs = procs.gather(rng_state())
        if not procs.main:
            return None
        meta = {"step": at_step, "epoch": at_epoch, "position": at_position, "loss": at_loss, "run": run_info,
                "vqa2": __version__, "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rngs}
        return save_checkpoint(output, at_step, {n: named[n] for n in saved_names}, state, meta, options.keep)

    progress = Progress(total, step) if procs.main else None
    saved = None
    interrupted = False
    skipped = 0
    if step < total:
        say(f"{n} records, {procs.world} process(es), {steps_per_epoch} steps per epoch, {total} steps")
    began = time.monotonic()
    with StopSignal(say, abort_on_second=procs.world == 1) as stop, ThreadPoolExecutor(max_workers=1) as pool:
        jobs = micro_jobs()
        pending = deque()
        micro_losses = []
        synced = True
        while step < total:
            while len(pending) < 2:  # decode the next micro-batches while this one computes
                job = next(jobs)
                pending.append((job, pool.submit(load, job)))
            job, future = pending.popleft()
            s, ep, pos, m, n_micro, _ = job
            loaded, failures = future.result()
            examples = [cache.encoded(*item) if cache else item[2] for item in loaded]
            for failure in failures:
                say(f"warning: skipped {failure}")
            skipped += len(failures)
            # every rank must run the same micro-steps (DDP's collective calls): skip one only all together
            usable = procs.all_max(0.0 if examples else 1.0) == 0.0
            if usable:
                last = m == n_micro - 1
                sync = last or procs.world == 1
                context = train_model.no_sync() if (procs.world > 1 and not sync) else contextlib.nullcontext()
                with context, autocast():
                    ids, labels, keyframes, motion, splits = zip(*examples)
                    keep = answer_span(labels)
                    out = train_model(input_ids=list(ids), keyframes=list(keyframes), motion=list(motion),
                                      logits_to_keep=keep, motion_splits=list(splits))
                    micro_loss = answer_loss(out.logits, labels, keep)
                    del out  # the logits of a long video are large: free them before the next forward
                    (micro_loss / n_micro).backward()
                synced = sync
                micro_losses.append(float(micro_loss.detach()))
            if m < n_micro - 1:
                continue
            # end of an optimizer step
            if procs.world > 1 and micro_losses and not synced:
                _all_reduce_grads(trained_params, procs)  # the step's last micro-batch was skipped
            grad_norm = float(torch.nn.utils.clip_grad_norm_(trained_params, options.max_grad_norm)) \
                if micro_losses else 0.0
            lr = optimizer.param_groups[0]["lr"]
            if micro_losses:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step, epoch, position = s + 1, ep, pos
            # ranks skip micro-batches together, so they agree on whether this step had any
            step_loss = procs.all_mean(sum(micro_losses) / len(micro_losses)) if micro_losses else None
            loss = step_loss if step_loss is not None else loss  # the model card reports the last known one
            micro_losses = []
            if procs.main:
                _append_metrics(output / METRICS, {
                    "step": step, "epoch": round(ep + pos / shard_len, 4), "loss": step_loss, "lr": lr,
                    "grad_norm": grad_norm, "elapsed_s": round(time.monotonic() - began, 3), "skipped": skipped,
                })
                progress.update(step, step_loss, lr)
            stop_now = procs.all_max(1.0 if stop.requested else 0.0) > 0
            if step % options.save_every == 0 or step == total or stop_now:
                saved = checkpoint_now(step, epoch, position, loss) or saved
            if stop_now:
                interrupted = step < total
                break
        for _, future in pending:
            future.cancel()
    if progress:
        progress.close()
    if interrupted:
        if saved:
            say(f"interrupted at step {step} of {total}; checkpoint {saved}. Continue with --resume.")
        return FinetuneResult(output, step, total, loss, True, saved)
    if latest and saved is None:  # resumed a run that had already finished
        saved = latest[0]
    procs.barrier()
    if procs.main:
        say(f"writing the fine-tuned model to {output}")
        # trained weights go to the CPU in the saved precision at once (a 7B model's fp32 copy is 30 GB)
        out_dtype = save_dtype(options, cuda)
        final = {n: named[n].detach().to("cpu", dtype=named[n].dtype if ".lora_" in n else out_dtype, copy=True)
                 for n in saved_names}
        del train_model, model, optimizer, scheduler, named, trained_params
        if cuda:
            torch.cuda.empty_cache()
        write_model(options, parts, final, output, dataset, step, loss, base_name, cuda)
    return FinetuneResult(output, step, total, loss, False, saved)


def _all_reduce_grads(params, procs: Processes) -> None:
    for param in params:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        procs.dist.all_reduce(param.grad)
        param.grad /= procs.world


def _append_metrics(path: Path, record: dict) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def _trim_metrics(path: Path, step: int) -> None:
    """Drop log lines past the step a run resumes from (written after its last checkpoint)."""
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    kept = [line for line in lines if _logged_step(line) <= step]
    if len(kept) != len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)


def _logged_step(line: str) -> float:
    """The step of a metrics line; infinity for a line cut short by a crash (so it is dropped)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def save_dtype(options: FinetuneOptions, cuda: bool) -> torch.dtype:
    from vqa2cli.quantization import DTYPES

    return DTYPES[options.save_dtype] if options.save_dtype else (torch.bfloat16 if cuda else torch.float32)


def write_model(options: FinetuneOptions, parts, trained: dict[str, torch.Tensor], output: Path, dataset: Dataset,
                step: int, loss: float | None, base_name: str, cuda: bool) -> None:
    """The fine-tuned model as a vqa2 model directory in `output`: the base weights (unquantized, on CPU)
    with the trained tensors put in and any LoRA merged."""
    from vqa2cli.checkpoint import save_model_dir
    from vqa2cli.quantization import Precision

    dtype = save_dtype(options, cuda)
    model, tokenizer, _, _ = load_base(options, torch.device("cpu"), Precision("none", dtype))
    # same adapters as in training, on full-precision base weights
    lora_options = replace(options, method="lora" if options.method == "qlora" else options.method)
    configure_model(model, lora_options, parts)
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
    card = model_card(options, parts, dataset, step, loss, base_name, dtype, adapters)
    # save_model_dir replaces its target whole; the output folder also holds checkpoints and the log, so
    # the model is written beside them and its files moved in, config.json last (it marks a model dir).
    staging = output / f".model-{os.getpid()}"
    save_model_dir(model, tokenizer, staging / "model", card=card)
    files = sorted((staging / "model").iterdir(), key=lambda p: p.name == "config.json")
    for file in files:
        os.replace(file, output / file.name)
    shutil.rmtree(staging)


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
    vision_lr = options.vision_lr if options.vision_lr is not None else options.lr / 5
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
        f"- learning rate: {options.lr:g} (vision tower {vision_lr:g}), cosine, {WARMUP_RATIO:.0%} warm-up",
        f"- final training loss: {loss:.4f}" if loss is not None else "- final training loss: n/a",
        f"- weights: {str(dtype).removeprefix('torch.')}",
        f"- scoring prompt: {trained_prompt(dataset) or 'as the base model'}" if options.stage == 2 else "",
        "",
        "Use it with `vqa2 score --model DIR` or `vqa2 ask --model DIR`. The training loss is not an evaluation: "
        "check the model on held-out videos before relying on it.",
        "",
    ]
    return "\n".join(lines)
