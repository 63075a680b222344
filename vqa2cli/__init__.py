"""vqa2: video quality assessment with the VQA² model (arXiv 2411.03795).

    >>> import vqa2cli
    >>> model = vqa2cli.load_model("vqa2-tiny")
    >>> model.score("clip.mp4").score                  # decodes the clip the way this model takes it
    >>> sample = model.load_video("clip.mp4")          # or decode once, then score and ask about it
    >>> model.score(sample).level, model.ask(sample, "Is there any blur?")

Heavy libraries (torch, transformers) load on first use of a name below, so `import vqa2cli` and
`vqa2 --help` stay instant.
"""

from importlib import import_module

from vqa2cli.errors import (
    CheckpointError,
    DataError,
    InputError,
    ModelNotFoundError,
    SetupError,
    Vqa2Error,
)

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "load_video": "vqa2cli.video",
    "VideoSample": "vqa2cli.video",
    "VideoError": "vqa2cli.video",
    "load_model": "vqa2cli.pipeline",
    "VQA2": "vqa2cli.pipeline",
    "ScoreResult": "vqa2cli.pipeline",
}


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'vqa2cli' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "__version__",
    "Vqa2Error",
    "InputError",
    "SetupError",
    "ModelNotFoundError",
    "CheckpointError",
    "DataError",
    *_LAZY,
]
