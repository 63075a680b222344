"""Reading and writing VQA² weights.

Three formats:

* the official LLaVA-NeXT `llava_qwen` layout of the published checkpoints (`config.json` with
  `model_type: llava_qwen`, safetensors shards + `model.safetensors.index.json`, Qwen2 tokenizer files),
  mapped name by name onto `VQA2Model` (`OFFICIAL_TO_OURS`); a plain LLaVA-OneVision checkpoint (same
  layout, no motion weights) too, with the motion branch taken from SlowFast Kinetics weights;
* pytorchvideo's Kinetics `SLOWFAST_8x8_R50.pyth` (a dict whose `model_state` holds tensors), read with
  `torch.load(weights_only=True)` only;
* our own model directory: `config.json` (`"format": "vqa2"`), `model.safetensors` under our names,
  tokenizer files, `README.md`; written atomically.

Loading is strict: every parameter and persistent buffer of the model must come from the files, nothing
may be left over, shapes must match; otherwise `CheckpointError` with a one-line, truncated list. All of it
is checked from the safetensors headers before a byte of weights is read. The model is built empty (on
`meta`) and filled tensor by tensor from `safe_open`, each converted (or quantized) on arrival to its final
dtype and device, so peak memory stays about one model, not two.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from vqa2cli.config import FORMAT, VQA2Config, parse_json
from vqa2cli.errors import CheckpointError, ModelNotFoundError, SetupError
from vqa2cli.quantization import Precision, load_weight, prepare, weight_bytes

# Official name prefix -> our prefix, first match wins. transformers 5's SiglipVisionModel has no
# `vision_model.` level in its own names, so that level is dropped.
OFFICIAL_TO_OURS = (
    ("model.vision_tower.vision_tower.vision_model.", "vision_tower."),
    ("model.mm_projector.", "mm_projector."),
    ("model.image_newline", "image_newline"),
    ("model.slowfast.feature_extraction.", "motion_encoder.blocks."),
    ("model.slowfast.position_embedding.", "motion_encoder.position_embedding."),
    ("model.slowfast_projector.", "motion_projector."),
    ("model.embed_tokens.", "language_model.model.embed_tokens."),
    ("model.layers.", "language_model.model.layers."),
    ("model.norm.", "language_model.model.norm."),
    ("lm_head.", "language_model.lm_head."),
)
# Present only in VQA² checkpoints, not in the LLaVA-OneVision base they start from.
MOTION_PREFIXES = ("motion_encoder.", "motion_projector.")
# What `load_official` initialises at random for such a base (the SlowFast blocks come from Kinetics weights).
FRESH_MOTION = ("motion_projector.", "motion_encoder.position_embedding.")
OFFICIAL_INDEX = "model.safetensors.index.json"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
SHOWN = 5  # names listed in an error before "+N more"
MAP_WINDOW = 256 * 2**20  # bytes read through one memory map before it is released (see `fill`)


def official_to_ours(name: str) -> str | None:
    for official, ours in OFFICIAL_TO_OURS:
        if name == official or (official.endswith(".") and name.startswith(official)):
            return ours + name[len(official):]
    return None


def ours_to_official(name: str) -> str | None:
    for official, ours in OFFICIAL_TO_OURS:
        if name == ours or (ours.endswith(".") and name.startswith(ours)):
            return official + name[len(ours):]
    return None


# ---- what a checkpoint holds ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorRef:
    file: Path
    key: str  # name inside the file
    shape: tuple[int, ...]


def _read_headers(files: list[Path]) -> dict[str, TensorRef]:
    """Name -> where it is, from safetensors headers only (no tensor data read)."""
    from safetensors import SafetensorError, safe_open

    refs = {}
    for file in files:
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                for key in f.keys():
                    if key in refs:
                        raise CheckpointError(f"{file}: tensor {key} is also in {refs[key].file.name}")
                    refs[key] = TensorRef(file, key, tuple(f.get_slice(key).get_shape()))
        except (OSError, ValueError, SafetensorError) as error:
            raise CheckpointError(f"{file}: not a readable safetensors file ({_first_line(error)})") from error
    return refs


def official_files(directory: Path) -> list[Path]:
    """The safetensors files of an official checkpoint: the shards its index names, or one model file."""
    index = directory / OFFICIAL_INDEX
    if index.is_file():
        try:
            weight_map = parse_json(index.read_text())["weight_map"]
            names = list(dict.fromkeys(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise CheckpointError(f"{index}: not a safetensors index ({_first_line(error)})") from error
        files = [directory / _shard_name(index, name) for name in names]
    else:
        files = sorted(directory.glob("*.safetensors"))
    missing = [f.name for f in files if not f.is_file()]
    if not files or missing:
        what = f"shards missing: {_listing(missing)}" if missing else "no *.safetensors files"
        raise CheckpointError(f"checkpoint {directory}: {what}")
    return files


def _shard_name(index: Path, name) -> str:
    """`name` from the index's weight_map, if it names a file inside the index's own folder. Checked by its
    text, not by resolving links: a Hugging Face cache snapshot holds links into its blobs/ folder."""
    parts = Path(name).parts if isinstance(name, str) and name else ()
    if not parts or Path(name).is_absolute() or ".." in parts or "\\" in name:
        raise CheckpointError(f"{index}: names {name!r} as a shard; an index may only name files inside its folder")
    return name


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:SHOWN])
    return shown + (f", +{len(names) - SHOWN} more" if len(names) > SHOWN else "")


# ---- building and filling the model ---------------------------------------------------------------------


def check_fits(config: VQA2Config, precision: Precision, device: torch.device, label: str) -> None:
    """Refuse, before anything is built, a model whose weights cannot fit in the device's memory (the
    machine's RAM for the CPU), by the config's parameter estimate at `precision`; the config's numbers
    themselves were checked when it was read (`VQA2Config`)."""
    from transformers.activations import ACT2FN

    from vqa2cli.output import human_size

    if config.vision.hidden_act not in ACT2FN:
        raise CheckpointError(f"{label}: unknown vision.hidden_act {config.vision.hidden_act!r}")
    need = weight_bytes(config, precision)
    have, where = _memory_of(device)
    if have and need > have:
        hint = " (try --quant 4bit)" if precision.quant == "none" else ""
        raise CheckpointError(f"{label}: its weights need about {human_size(need)} in {precision.describe()}, "
                              f"more than the {human_size(have)} {where}{hint}")


def _memory_of(device: torch.device) -> tuple[int | None, str]:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.get_device_properties(index).total_memory, f"of GPU {index}"
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not a POSIX system
        total = None
    try:  # a container's memory limit (cgroup v2) is what this process may use
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit.isdigit():
            total = min(total or int(limit), int(limit))
    except OSError:
        pass
    return total, "of memory this machine has"


def build_empty(config: VQA2Config):
    """A `VQA2Model` whose parameters are on `meta`. Buffers are real: the non-persistent ones (RoPE's
    inverse frequencies, SigLIP's position ids) are computed at construction and not in checkpoints."""
    from accelerate import init_empty_weights

    from vqa2cli.modeling import VQA2Model

    with init_empty_weights():
        return VQA2Model(config)


def expected_tensors(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Our name -> shape of everything a checkpoint must provide: parameters and persistent buffers,
    each shared tensor once (tied embeddings) and under its first name."""
    seen, out = set(), {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        out[name] = tuple(tensor.shape)
    return out


def check_tensors(
    expected: dict[str, tuple[int, ...]],
    found: dict[str, TensorRef],
    label: str,
    display=lambda name: name,
):
    """Raise `CheckpointError` unless `found` (our names) covers `expected` exactly with the same shapes.

    `display` turns our names back into the checkpoint's own for the message.
    """
    missing = [display(n) for n in expected if n not in found]
    unexpected = [found[n].key for n in found if n not in expected]
    wrong = [
        f"{found[n].key} {list(found[n].shape)} (expected {list(shape)})"
        for n, shape in expected.items()
        if n in found and found[n].shape != shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing ({_listing(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected ({_listing(unexpected)})")
    if wrong:
        problems.append(f"{len(wrong)} with the wrong shape ({_listing(wrong)})")
    if problems:
        raise CheckpointError(f"{label} does not match the model: " + "; ".join(problems))


def fill(model: torch.nn.Module, refs: dict[str, TensorRef], device: torch.device, dtype: torch.dtype):
    """Load every `refs` tensor (already checked) into `model`, file by file, one tensor at a time."""
    from safetensors import safe_open

    by_file: dict[Path, list[tuple[str, TensorRef]]] = {}
    for name, ref in refs.items():
        by_file.setdefault(ref.file, []).append((name, ref))
    for file, items in by_file.items():
        # safe_open memory-maps the file and the pages read stay resident until it is closed: reopening
        # every MAP_WINDOW bytes keeps a big single-file model from costing twice its size in RAM.
        start = 0
        while start < len(items):
            mapped = 0
            with safe_open(file, framework="pt", device="cpu") as f:
                while start < len(items) and mapped < MAP_WINDOW:
                    name, ref = items[start]
                    tensor = f.get_tensor(ref.key)
                    mapped += tensor.numel() * tensor.element_size()
                    module_name, _, attr = name.rpartition(".")
                    load_weight(model.get_submodule(module_name), attr, tensor, device, dtype)
                    del tensor
                    start += 1


def finish(model: torch.nn.Module, device: torch.device):
    """After filling: re-tie shared weights, move the non-persistent buffers, check nothing is left empty."""
    lm = model.language_model
    if lm.config.tie_word_embeddings:
        lm.lm_head.weight = lm.get_input_embeddings().weight
    for module in model.modules():
        for key, buffer in module._buffers.items():
            if buffer is not None and buffer.device != device:
                module._buffers[key] = buffer.to(device)  # keeps dtype: RoPE frequencies stay float32
    empty = [n for n, p in model.named_parameters() if p.is_meta]
    if empty:
        raise CheckpointError(f"internal: parameters left unloaded: {_listing(empty)}")
    model.eval()
    return model


def init_fresh(module: torch.nn.Module, device: torch.device, dtype: torch.dtype):
    """Materialise an empty submodule with its own default initialisation (for weights a checkpoint
    legitimately lacks: the motion projector and position table of a LLaVA-OneVision base)."""
    module.to_empty(device=device)
    for sub in module.modules():
        if hasattr(sub, "reset_parameters"):
            sub.reset_parameters()
    module.to(dtype)


# ---- any model a name stands for -----------------------------------------------------------------------


@dataclass
class LoadedModel:
    name: str  # what output records call it: registry name, repo id or directory as given
    model: torch.nn.Module  # VQA2Model, in eval mode
    tokenizer: object
    # Parameters the files lack, initialised at random: a plain LLaVA-OneVision base's motion projector and
    # position table. Fine-tuning saves them with its trained tensors, so every later load uses the same draw.
    fresh: list[str]


def load_any(
    name_or_path: str | os.PathLike | None,
    task: str = "score",
    *,
    device: torch.device | str = "cpu",
    precision: Precision | None = None,
    allow_missing_motion: bool = False,
    slowfast_weights: str | os.PathLike | None = None,
) -> LoadedModel:
    """The one place that decides what a model name is and how to read it: resolved by the registry (a
    registry name, a directory, a Hugging Face repo id), then read as our model directory or as an official
    llava_qwen checkpoint (`allow_missing_motion`, `slowfast_weights`: see `load_official`)."""
    resolved, config = read_config(name_or_path, task)
    path = resolved.path
    if is_model_dir(path):
        model, tokenizer = load_model_dir(path, device=device, precision=precision)
        return LoadedModel(resolved.name, model, tokenizer, [])
    model = load_official(path, device=device, precision=precision, config=config,
                          allow_missing_motion=allow_missing_motion, slowfast_weights=slowfast_weights)
    fresh = []
    if allow_missing_motion and not _has_motion_weights(path):
        fresh = [name for name, _ in model.named_parameters() if name.startswith(FRESH_MOTION)]
    return LoadedModel(resolved.name, model, load_tokenizer(path), fresh)


def _has_motion_weights(directory: Path) -> bool:
    names = (official_to_ours(key) or key for key in _read_headers(official_files(directory)))
    return any(name.startswith(MOTION_PREFIXES) for name in names)


# ---- official llava_qwen checkpoints ---------------------------------------------------------------------


def is_official(directory: Path) -> bool:
    try:
        return parse_json((directory / CONFIG_FILE).read_text()).get("model_type") == "llava_qwen"
    except (OSError, ValueError, AttributeError):  # AttributeError: not a JSON object
        return False


def official_config(directory: Path, **overrides) -> VQA2Config:
    """`VQA2Config` of an official checkpoint. An optional `"vqa2"` object in its config.json overrides
    top-level fields (vision, motion, pooled_grid, ...) for official-layout checkpoints whose shapes are
    not the release's (test checkpoints, variants); the released checkpoints have none."""
    path = directory / CONFIG_FILE
    try:
        raw = parse_json(path.read_text())
        section = raw.get("vqa2", {})
        if "vision" in section:  # the section's tower replaces the one `mm_vision_tower` names
            raw = {k: v for k, v in raw.items() if k != "mm_hidden_size"}
        return VQA2Config.from_llava_qwen(raw, **{**section, **overrides})
    except OSError as error:
        raise CheckpointError(f"{path}: cannot read ({_first_line(error)})") from error
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{path}: unusable llava_qwen config ({_first_line(error)})") from error


def load_official(
    directory: str | os.PathLike,
    *,
    device: torch.device | str = "cpu",
    precision: Precision | None = None,
    config: VQA2Config | None = None,
    allow_missing_motion: bool = False,
    slowfast_weights: str | os.PathLike | None = None,
):
    """A `VQA2Model` from a checkpoint in the official `llava_qwen` layout.

    With `allow_missing_motion`, a checkpoint without any motion weights (a plain LLaVA-OneVision one, the
    starting point of fine-tuning) is accepted: the SlowFast blocks then come from `slowfast_weights`
    (pytorchvideo's Kinetics `.pyth`), the motion projector and position table are freshly initialised.
    A checkpoint with only some motion weights is an error either way.
    """
    directory = Path(directory)
    device = torch.device(device)
    precision = precision or Precision("none", torch.float32)
    config = config or official_config(directory)
    check_fits(config, precision, device, f"checkpoint {directory}")
    model = build_empty(config)
    expected = all_expected = expected_tensors(model)  # before quantization swaps modules
    prepare(model, precision)
    # Our name -> tensor; a name outside the mapping keeps its own and is reported as unexpected.
    found = {official_to_ours(key) or key: ref for key, ref in _read_headers(official_files(directory)).items()}

    motion_expected = {n for n in expected if n.startswith(MOTION_PREFIXES)}
    fresh_motion = allow_missing_motion and not motion_expected & found.keys()
    slowfast = None
    if fresh_motion:
        if slowfast_weights is None:
            raise CheckpointError(
                f"checkpoint {directory} has no motion weights: pass the SlowFast Kinetics weights "
                "(pytorchvideo's SLOWFAST_8x8_R50.pyth) to initialise the motion encoder"
            )
        slowfast = read_slowfast(slowfast_weights)
        expected = {n: s for n, s in expected.items() if n not in motion_expected}

    check_tensors(expected, found, f"checkpoint {directory}", display=lambda n: ours_to_official(n) or n)
    if slowfast is not None:
        blocks = {n: s for n, s in all_expected.items() if n.startswith("motion_encoder.blocks.")}
        check_slowfast(blocks, slowfast, slowfast_weights)

    fill(model, found, device, precision.dtype)
    if slowfast is not None:
        for name, tensor in slowfast.items():
            module_name, _, attr = name.rpartition(".")
            load_weight(model.get_submodule(module_name), attr, tensor, device, precision.dtype)
        init_fresh(model.motion_encoder.position_embedding, device, precision.dtype)
        init_fresh(model.motion_projector, device, precision.dtype)
    return finish(model, device)


def llava_qwen_config(config: VQA2Config) -> dict:
    """The official config.json describing `config`; fields the llava_qwen format cannot express (a tower
    or motion encoder of another size) go into the `"vqa2"` object that `official_config` reads back."""
    text = config.text
    raw = {
        "architectures": ["LlavaQwenForCausalLM"],
        "model_type": "llava_qwen",
        "mm_vision_tower": "google/siglip-so400m-patch14-384",
        "mm_projector_type": "mlp2x_gelu",
        "mm_hidden_size": config.vision.hidden_size,
        "mm_vision_select_layer": -2,
        "mm_patch_merge_type": "spatial_unpad",
        "mm_newline_position": "one_token",
        "mm_spatial_pool_mode": "bilinear",
        "hidden_size": text.hidden_size,
        "intermediate_size": text.intermediate_size,
        "num_hidden_layers": text.num_hidden_layers,
        "num_attention_heads": text.num_attention_heads,
        "num_key_value_heads": text.num_key_value_heads,
        "vocab_size": text.vocab_size,
        "max_position_embeddings": text.max_position_embeddings,
        "rope_theta": text.rope_theta,
        "rms_norm_eps": text.rms_norm_eps,
        "tie_word_embeddings": text.tie_word_embeddings,
        "torch_dtype": "float16",
    }
    ours = config.to_dict()
    derived = VQA2Config.from_llava_qwen({k: v for k, v in raw.items() if k != "mm_hidden_size"}).to_dict()
    section = {k: v for k, v in ours.items() if k not in ("format", "text") and derived[k] != v}
    if section:
        raw["vqa2"] = section
    return raw


def save_official(model, tokenizer, directory: str | os.PathLike, max_shard_bytes: int = 5 * 2**30, dtype=None):
    """Write `model` in the official llava_qwen layout: shards + index + config.json + tokenizer (what the
    release's code and `load_official` read). `dtype` converts floating tensors (the release ships fp16)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in _unique_state(model):
        tensor = tensor.detach().to("cpu")
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][ours_to_official(name)] = tensor.contiguous()
        size += nbytes
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, directory / file, metadata={"format": "pt"})
        for key, tensor in shard.items():
            weight_map[key] = file
            total += tensor.numel() * tensor.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / OFFICIAL_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    (directory / CONFIG_FILE).write_text(json.dumps(llava_qwen_config(model.config), indent=2) + "\n")
    tokenizer.save_pretrained(directory)
    return directory


# ---- pytorchvideo SlowFast Kinetics weights ------------------------------------------------------------


def read_slowfast(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Blocks 0..4 of pytorchvideo's SlowFast state dict (`.pyth`: `{"model_state": {...}}`, or a bare
    state dict), under our names (`motion_encoder.blocks.{i}.*`). The classification head (blocks 5+) is
    dropped. Only plain tensors are unpickled (`weights_only=True`)."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as error:
        raise CheckpointError(f"{path}: no such file") from error
    except Exception as error:  # pickle.UnpicklingError and friends: refuse anything but tensors
        raise CheckpointError(
            f"{path}: not a plain tensor checkpoint, refusing to unpickle it ({_first_line(error)})"
        ) from error
    if isinstance(state, dict) and isinstance(state.get("model_state"), dict):
        state = state["model_state"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a SlowFast state dict of tensors")
    out = {}
    for key, tensor in state.items():
        key = key.removeprefix("module.")  # saved from DistributedDataParallel
        parts = key.split(".")
        if parts[0] == "blocks" and len(parts) > 2 and parts[1].isdigit() and int(parts[1]) < 5:
            out["motion_encoder." + key] = tensor
    return out


def check_slowfast(expected: dict[str, tuple[int, ...]], tensors: dict[str, torch.Tensor], path):
    found = {n: TensorRef(Path(path), n.removeprefix("motion_encoder."), tuple(t.shape)) for n, t in tensors.items()}
    check_tensors(expected, found, f"SlowFast weights {path}", display=lambda n: n.removeprefix("motion_encoder."))


# ---- our model directory -------------------------------------------------------------------------------


def is_model_dir(directory: Path) -> bool:
    try:
        return parse_json((directory / CONFIG_FILE).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):  # AttributeError: not a JSON object
        return False


def save_model_dir(model, tokenizer, directory: str | os.PathLike, card: str | None = None,
                   merge: bool = False) -> Path:
    """Write `model` + `tokenizer` as a vqa2 model directory, atomically (`files.staged_dir`): a crash never
    leaves a half-written model where a good one was. With `merge`, the files go into the existing
    `directory` beside what it holds (a fine-tuning run's checkpoints and log), config.json last: it is
    what marks a folder as a model directory."""
    from safetensors.torch import save_file

    from vqa2cli.files import staged_dir

    quantized = [n for n, m in model.named_modules() if type(m).__module__.startswith("bitsandbytes.")]
    if quantized:
        raise SetupError("cannot save a quantized model; load it with quant='none' to save or fine-tune it")
    with staged_dir(directory, merge=merge, last=(CONFIG_FILE,)) as tmp:
        state = {n: t.detach().to("cpu").contiguous() for n, t in _unique_state(model)}
        save_file(state, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        model.config.save(tmp / CONFIG_FILE)
        tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(card if card is not None else _default_card(model.config))
    return Path(directory)


def _unique_state(model) -> Iterator[tuple[str, torch.Tensor]]:
    names = expected_tensors(model)
    for name, tensor in model.state_dict().items():
        if name in names:
            yield name, tensor


def _default_card(config: VQA2Config) -> str:
    return (
        "# VQA² model\n\nA vqa2 model directory: `config.json` (VQA2Config), `model.safetensors`, tokenizer.\n"
        f"Language model: {config.text.num_hidden_layers} layers of width {config.text.hidden_size}; "
        f"token layout `{config.token_layout}`; scoring prompt `{config.prompt}`.\n"
    )


def load_model_dir(
    directory: str | os.PathLike,
    *,
    device: torch.device | str = "cpu",
    precision: Precision | None = None,
):
    """(model, tokenizer) from a vqa2 model directory, strictly."""
    directory = Path(directory)
    device = torch.device(device)
    precision = precision or Precision("none", torch.float32)
    config = _model_dir_config(directory)
    check_fits(config, precision, device, f"model directory {directory}")
    model = build_empty(config)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"model directory {directory}: {WEIGHTS_FILE} is missing")
    refs = _read_headers([weights])
    check_tensors(expected_tensors(model), refs, f"model directory {directory}")
    prepare(model, precision)
    fill(model, refs, device, precision.dtype)
    return finish(model, device), load_tokenizer(directory)


def _model_dir_config(directory: Path) -> VQA2Config:
    try:
        return VQA2Config.load(directory / CONFIG_FILE)
    except OSError as error:
        raise CheckpointError(f"{directory / CONFIG_FILE}: cannot read ({_first_line(error)})") from error
    except (ValueError, TypeError) as error:
        raise CheckpointError(f"{directory / CONFIG_FILE}: {_first_line(error)}") from error


def read_config(name_or_path: str | os.PathLike | None, task: str = "score"):
    """(the resolved model, its config), read without any weights: what `load_any` builds the model from, and all
    that a process which only decodes needs (`config.sampling()`). Our model directory or an official checkpoint,
    whose scoring prompt, and whether it was trained on still images, the registry knows (official configs do not
    say either)."""
    from vqa2cli import registry

    resolved = registry.resolve(name_or_path, task)
    if is_model_dir(resolved.path):
        return resolved, _model_dir_config(resolved.path)
    if is_official(resolved.path):
        overrides = {"prompt": resolved.prompt, "images": resolved.images} if resolved.entry else {}
        return resolved, official_config(resolved.path, **overrides)
    raise ModelNotFoundError(
        f"{resolved.path} is not a model directory (no config.json with \"format\": \"vqa2\" "
        "or \"model_type\": \"llava_qwen\")"
    )


def load_tokenizer(directory: Path):
    """The tokenizer files of a model directory (ours or official). Never runs code from the directory."""
    from transformers import AutoTokenizer, Qwen2Config

    try:
        # AutoTokenizer otherwise parses config.json as a transformers config, and warns about
        # `llava_qwen`; the language model, and so the tokenizer family, is Qwen2's.
        return AutoTokenizer.from_pretrained(str(directory), config=Qwen2Config(), trust_remote_code=False)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{directory}: cannot load the tokenizer ({_first_line(error)})") from error
