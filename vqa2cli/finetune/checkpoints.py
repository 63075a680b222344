"""A run's checkpoints: `OUTPUT/checkpoints/step-NNNNNNNN/`, the last `keep` of them.

    trainable.safetensors   the trained tensors (adapters, or the trained parts' weights), and the base's
                            randomly initialised ones (`checkpoint.LoadedModel.fresh`)
    optimizer.bin           accelerate's `save_state`: the optimizer's state, and the random generators
    random_states_N.pkl     (python, numpy, torch, CUDA) of each process; read back with
                            torch.load(weights_only=True), so a checkpoint can hold plain data only
    meta.json               step, data position, loss, the options that must match on --resume

Every process writes its own random generators into a shared temporary folder; when all are done, the main
process syncs it and renames it into place (`files.install_dir`), so an interrupted save leaves the previous
checkpoints as they were.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from vqa2cli.checkpoint import _first_line
from vqa2cli.errors import SetupError
from vqa2cli.files import install_dir

CHECKPOINTS = "checkpoints"
TENSORS = "trainable.safetensors"
META = "meta.json"


def checkpoint_dirs(output: Path) -> list[Path]:
    """Complete checkpoints (those with meta.json), oldest first."""
    root = Path(output) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if re.fullmatch(r"step-\d{8}", p.name) and (p / META).is_file()]
    return sorted(found, key=lambda p: int(p.name[5:]))


class Checkpoints:
    """Saves and loads the checkpoints of `output` for the optimizer `accelerator` prepared (the model's
    trained tensors are handed over explicitly; the learning-rate schedule is replayed from the step)."""

    def __init__(self, output: Path, accelerator, keep: int):
        self.output, self.accelerator, self.keep = Path(output), accelerator, keep
        self.root = self.output / CHECKPOINTS
        # accelerate would write and read the whole model (a 7B model's 15 GB) every time: the trained
        # tensors go to trainable.safetensors instead
        accelerator.register_save_state_pre_hook(lambda models, weights, folder: weights.clear())
        accelerator.register_load_state_pre_hook(lambda models, folder: models.clear())

    def save(self, step: int, tensors: dict[str, torch.Tensor], meta: dict) -> Path | None:
        """Called by every process; the checkpoint's path on the main one, None on the others."""
        from safetensors.torch import save_file

        accelerator, main = self.accelerator, self.accelerator.is_main_process
        final = self.root / f"step-{step:08d}"
        tmp = self.root / f".{final.name}.tmp-all"  # one name for all processes
        if main:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        accelerator.wait_for_everyone()
        try:
            accelerator.save_state(str(tmp))
            if main:
                save_file({n: t.detach().cpu().contiguous() for n, t in tensors.items()}, tmp / TENSORS)
                (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
        except BaseException:
            if main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        accelerator.wait_for_everyone()
        if not main:
            return None
        install_dir(tmp, final)  # replaces a checkpoint of the same step (an interrupt right after a save)
        for old in checkpoint_dirs(self.output)[: -self.keep]:
            shutil.rmtree(old)
        return final

    def read_meta(self, path: Path) -> dict:
        try:
            return json.loads((path / META).read_text())
        except (OSError, ValueError) as error:
            raise SetupError(f"checkpoint {path} cannot be read ({_first_line(error)})") from error

    def load(self, path: Path, names: list[str]) -> tuple[dict[str, torch.Tensor], dict]:
        """Restore the optimizer and this process's random generators from checkpoint `path`;
        its trained tensors (which must be exactly `names`) and meta.json."""
        from accelerate.utils import load
        from safetensors.torch import load_file

        meta = self.read_meta(path)
        rng = path / f"random_states_{self.accelerator.process_index}.pkl"
        try:
            tensors = load_file(path / TENSORS)
            if rng.exists():  # accelerate's load_state would only log it and go on with other random numbers
                load(rng)
            elif self.accelerator.is_main_process:
                raise FileNotFoundError(f"{rng.name} is missing")
        except Exception as error:  # unreadable, or not plain data: refuse rather than unpickle
            raise SetupError(f"checkpoint {path} cannot be read ({_first_line(error)})") from error
        missing, extra = sorted(set(names) - tensors.keys()), sorted(tensors.keys() - set(names))
        if missing or extra:
            raise SetupError(f"checkpoint {path} does not match the trained tensors "
                             f"(missing {missing[:3]}, unexpected {extra[:3]})")
        try:
            self.accelerator.load_state(str(path))
        except Exception as error:
            raise SetupError(f"checkpoint {path} cannot be read ({_first_line(error)})") from error
        return tensors, meta
