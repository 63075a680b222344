"""The one place that imports pytorchvideo's SlowFast builder.

pytorchvideo 0.1.5 (its last release) imports `torchvision.ops.RoIAlign` at module level for a detection
head we never build. torchvision is deliberately absent (no CPU wheel matches our torch; the CUDA wheel
breaks transformers at import), so while importing we put a throw-away `torchvision.ops` module carrying
only a `RoIAlign` name into `sys.modules`, then remove it at once: a lingering fake `torchvision` (whose
`__spec__` is None) makes transformers' availability checks fail.

When a real torchvision is importable it is used untouched.
"""

from __future__ import annotations

import importlib.util
import sys
import types


def _import_create_slowfast():
    if importlib.util.find_spec("torchvision") is not None:
        from pytorchvideo.models.slowfast import create_slowfast

        return create_slowfast

    class RoIAlign:  # placeholder name only; pytorchvideo uses it in create_slowfast_with_roi_head
        def __init__(self, *args, **kwargs):
            raise RuntimeError("torchvision.ops.RoIAlign is unavailable (torchvision is not installed)")

    tv = types.ModuleType("torchvision")
    ops = types.ModuleType("torchvision.ops")
    ops.RoIAlign = RoIAlign
    tv.ops = ops
    sys.modules["torchvision"] = tv
    sys.modules["torchvision.ops"] = ops
    try:
        from pytorchvideo.models.slowfast import create_slowfast
    finally:
        del sys.modules["torchvision"]
        del sys.modules["torchvision.ops"]
    return create_slowfast


create_slowfast = _import_create_slowfast()
