"""Precision choice and bitsandbytes quantization of the LLM's linear layers.

Policy (issue 3): on CUDA, `quant="auto"` is NF4 4-bit with double quantization and bf16 compute for the
decoder's linear layers, everything else (vision tower, SlowFast, projectors, embeddings, norms, lm_head) in
bf16. `"8bit"` (LLM.int8) and `"none"` can be asked for. On CPU the default is unquantized fp32 (bf16 may be
asked for); 4-bit and 8-bit run through bitsandbytes' CPU backend, which saves memory but is not faster.

Quantized modules are never cast after the fact (the release's `.half()` after 4-bit loading is what
breaks it): `prepare` swaps `nn.Linear` for bitsandbytes modules while the model is still an empty (meta)
skeleton, and `load_weight` quantizes each weight as it arrives from the checkpoint, on the target device.
bitsandbytes is imported only when a quantized precision is used (it costs seconds to import).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from vqa2cli.errors import SetupError

QUANT_CHOICES = ("auto", "4bit", "8bit", "none")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}

# bitsandbytes quantizes in blocks of 64 values; narrower layers are tiny anyway, keep them exact.
MIN_QUANT_WIDTH = 64
# Only the decoder's projections are quantized: the LLM holds ~7.6 B of the ~8 B parameters.
QUANT_PREFIX = "language_model.model.layers."


@dataclass(frozen=True)
class Precision:
    quant: str  # "none", "4bit" or "8bit"
    dtype: torch.dtype  # unquantized weights; also the compute dtype of 4-bit layers

    def describe(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        return dtype if self.quant == "none" else f"{self.quant} ({dtype} compute)"


def choose_precision(device: torch.device, quant: str = "auto", dtype: str | torch.dtype | None = None) -> Precision:
    """The precision for `device`: see the module docstring for the defaults."""
    if quant not in QUANT_CHOICES:
        raise SetupError(f"unknown quantization {quant!r}: expected one of {', '.join(QUANT_CHOICES)}")
    cuda = torch.device(device).type == "cuda"
    if dtype is None:
        dtype = torch.bfloat16 if cuda else torch.float32
    elif isinstance(dtype, str):
        if dtype not in DTYPES:
            raise SetupError(f"unknown dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    if not cuda and dtype == torch.float16:
        raise SetupError("float16 is not supported on CPU; use float32 or bfloat16")
    if quant == "auto":
        quant = "4bit" if cuda else "none"
    return Precision(quant=quant, dtype=dtype)


# Bytes a quantized weight takes on the device: the packed values plus their per-block scales (blocks of 64).
_QUANTIZED_BYTES = {"4bit": 0.5 + 4 / 64, "8bit": 1 + 4 / 64}


def weight_bytes(config, precision: Precision) -> int:
    """About how many bytes the weights of a model of `config` take once loaded at `precision`."""
    total = config.parameter_count()
    itemsize = precision.dtype.itemsize
    if precision.quant == "none":
        return total * itemsize
    quantized = config.parameter_count(quantizable_only=True)
    return int(quantized * _QUANTIZED_BYTES[precision.quant] + (total - quantized) * itemsize)


def quantizable(name: str, module: torch.nn.Module) -> bool:
    return (
        type(module) is torch.nn.Linear
        and name.startswith(QUANT_PREFIX)
        and min(module.in_features, module.out_features) >= MIN_QUANT_WIDTH
    )


def prepare(model: torch.nn.Module, precision: Precision) -> list[str]:
    """Swap the quantizable `nn.Linear`s of an empty (meta) model for bitsandbytes modules; their names."""
    if precision.quant == "none":
        return []
    bnb = _import_bnb()
    if precision.quant == "8bit":
        # LLM.int8 quantizes activations from float16 by design, and logs that on every matmul otherwise.
        logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    names = [name for name, module in model.named_modules() if quantizable(name, module)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
        bias = old.bias is not None
        with torch.device("meta"):
            if precision.quant == "4bit":
                new = bnb.nn.Linear4bit(
                    old.in_features, old.out_features, bias=bias, compute_dtype=precision.dtype,
                    compress_statistics=True, quant_type="nf4",
                )
            else:
                new = bnb.nn.Linear8bitLt(
                    old.in_features, old.out_features, bias=bias, has_fp16_weights=False, threshold=6.0
                )
        new.requires_grad_(False)
        setattr(parent, child, new)
    return names


def load_weight(module: torch.nn.Module, attr: str, tensor: torch.Tensor, device: torch.device, dtype: torch.dtype):
    """Put one checkpoint tensor into `module.<attr>` on `device`, quantizing bitsandbytes weights.

    Floating tensors take `dtype`; integer buffers (BatchNorm's `num_batches_tracked`) keep theirs.
    """
    if attr == "weight" and _is_bnb(module):
        bnb = _import_bnb()
        if isinstance(module, bnb.nn.Linear4bit):
            data = tensor.to(device=device, dtype=dtype)  # convert where it is fastest; quantized there next
            param = bnb.nn.Params4bit(
                data, requires_grad=False, compress_statistics=module.weight.compress_statistics,
                quant_type=module.weight.quant_type, module=module,
            )
        else:
            # Int8Params quantizes only when it moves off the CPU: one already on the GPU would stay in
            # bf16 until the first forward, so loading would peak at the unquantized model's size.
            param = bnb.nn.Int8Params(tensor.to(device="cpu", dtype=dtype), requires_grad=False,
                                      has_fp16_weights=False)
        # Moving a not-yet-quantized bitsandbytes parameter to a real device is what quantizes it.
        module.weight = param.to(device)
        return
    value = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
    if value.data_ptr() == tensor.data_ptr():
        # Same device and dtype: `.to` returned the file's buffer, which safetensors packs without
        # alignment. CPU kernels pick code paths by alignment, so results would depend on where a tensor
        # sat in the file; a fresh allocation makes them depend on the weights only.
        value = value.clone()
    if attr in module._parameters:
        module._parameters[attr] = torch.nn.Parameter(value, requires_grad=module._parameters[attr].requires_grad)
    elif attr in module._buffers:
        module._buffers[attr] = value
    else:
        raise KeyError(f"{type(module).__name__} has no parameter or buffer {attr!r}")


def _is_bnb(module: torch.nn.Module) -> bool:
    return type(module).__module__.startswith("bitsandbytes.")


def forbid_hub_kernels():
    """Make the `kernels` package (a transformers dependency) refuse to fetch code from the Hugging Face
    Hub in this process. Importing bitsandbytes (also done by `import peft`) asks it for compiled CPU code
    from kernels-community, a network request and remote code; nothing we run may load remote code, and
    bitsandbytes keeps its own kernels when the request is refused. Call before importing either."""
    try:
        import kernels
    except ImportError:
        return
    kernels.get_kernel = _refuse_hub_kernel
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_hide_refusal)  # its note about the refusal


def _refuse_hub_kernel(repo_id, *args, **kwargs):
    raise RuntimeError(f"vqa2 loads no code from the Hugging Face Hub ({repo_id})")


def _hide_refusal(record: logging.LogRecord) -> bool:
    return "vqa2 loads no code from the Hugging Face Hub" not in record.getMessage()


def _import_bnb():
    forbid_hub_kernels()
    try:
        import bitsandbytes
    except ImportError as error:
        raise SetupError(f"quantization needs bitsandbytes ({error}); install it or use --quant none") from error
    return bitsandbytes
