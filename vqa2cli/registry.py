"""Model names -> where the weights are: a local directory, the shipped package, or a Hugging Face repo.

The registry (`weights/registry.json`, installed as `vqa2cli_weights`) lists the published checkpoints under
short names, what each is for, which scoring prompt it was trained with, what it can do (`tasks`: score,
ask; `images`: trained on still images too), and which command uses it by default. An entry has either a
`repo_id` (fetched through huggingface_hub's cache) or a `path` relative to the `vqa2cli_weights` package (a
model shipped inside the wheel); `aliases` are other repo ids that name the same model (the release's older
README spelled them without the `-llava_qwen` suffix), resolved to the entry's own repo.

Resolution never touches the network when the weights are already cached, and never at all when
HF_HUB_OFFLINE is set; missing weights become a one-line `ModelNotFoundError` saying what to download.
Only the standard library and huggingface_hub are imported here, so `vqa2 models` stays quick.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

from vqa2cli.errors import ModelNotFoundError, SetupError

TASKS = ("score", "ask")

# Only what loading reads: configs, safetensors shards and index, tokenizer files (vocab.json, merges.txt,
# tokenizer.json, *_config.json) and the model card. Skips pickled *.bin duplicates some repos carry.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.md"]

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ModelEntry:
    name: str
    purpose: str
    prompt: str  # scoring prompt kind the checkpoint was trained with: ugc, streaming, enhanced
    default_for: tuple[str, ...] = ()
    repo_id: str | None = None
    path: str | None = None  # relative to the vqa2cli_weights package
    aliases: tuple[str, ...] = ()  # other repo ids naming this model
    tasks: tuple[str, ...] = ("score",)  # what it was trained for: score, ask (both: it explains its own scores)
    images: bool = False  # trained on still images too (scores photos)

    @property
    def source(self) -> str:
        return self.repo_id or f"vqa2cli_weights/{self.path}"


@dataclass(frozen=True)
class ResolvedModel:
    name: str  # what output records call the model: registry name, repo id or directory as given
    path: Path  # directory holding config.json, weights and tokenizer
    entry: ModelEntry | None  # registry entry, when the model is a known one

    @property
    def prompt(self) -> str | None:
        return self.entry.prompt if self.entry else None

    @property
    def images(self) -> bool:
        return bool(self.entry and self.entry.images)


@dataclass(frozen=True)
class ModelStatus:
    entry: ModelEntry
    present: bool  # loadable right now without network
    path: Path | None  # local directory when present
    size_bytes: int  # on disk (HF cache blobs or shipped directory); 0 when absent


@lru_cache(maxsize=1)
def registry() -> tuple[ModelEntry, ...]:
    text = resources.files("vqa2cli_weights").joinpath("registry.json").read_text(encoding="utf-8")
    entries = []
    for raw in json.loads(text)["models"]:
        if bool(raw.get("repo_id")) == bool(raw.get("path")):
            raise SetupError(f"registry.json: entry {raw.get('name')!r} needs exactly one of 'repo_id' and 'path'")
        entries.append(
            ModelEntry(
                name=raw["name"],
                purpose=raw["purpose"],
                prompt=raw["prompt"],
                default_for=tuple(raw.get("default_for", ())),
                repo_id=raw.get("repo_id"),
                path=raw.get("path"),
                aliases=tuple(raw.get("aliases", ())),
                tasks=tuple(raw.get("tasks", ("score",))),
                images=bool(raw.get("images", False)),
            )
        )
    return tuple(entries)


def get_entry(name: str) -> ModelEntry | None:
    """The entry called `name`, or whose repo id or an alias is `name` (so a raw repo id keeps its prompt kind)."""
    for entry in registry():
        repo_ids = ((entry.repo_id,) if entry.repo_id else ()) + entry.aliases
        if name == entry.name or name.lower() in (repo_id.lower() for repo_id in repo_ids):
            return entry
    return None


def default_entry(task: str) -> ModelEntry:
    if task not in TASKS:
        raise SetupError(f"unknown task {task!r}: expected one of {', '.join(TASKS)}")
    for entry in registry():
        if task in entry.default_for:
            return entry
    raise SetupError(f"registry.json names no default model for {task!r}")


def hub_offline() -> bool:
    # Read at call time: huggingface_hub reads it once at import, but tests and users may set it later.
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_cache_dir() -> Path:
    """The hub cache as huggingface_hub would compute it from the environment now."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def download_command(repo_id: str) -> str:
    return f"hf download {repo_id}"


def resolve(name_or_path: str | os.PathLike | None = None, task: str = "score") -> ResolvedModel:
    """Find the directory of a model: a local directory, a registry name, or a Hugging Face repo id.

    None means the registry's default for `task`. Hub repos come from the local cache when present;
    otherwise they are downloaded unless HF_HUB_OFFLINE is set.
    """
    if name_or_path is None:
        entry = default_entry(task)
        return _resolve_entry(entry, entry.name)
    text = os.fspath(name_or_path)
    local = Path(text).expanduser()
    if local.is_dir():
        return ResolvedModel(name=text, path=local, entry=_entry_for_cache_path(local))
    entry = get_entry(text)
    if entry is not None:
        return _resolve_entry(entry, text)
    if _REPO_ID.match(text) and not local.exists():
        return ResolvedModel(name=text, path=_hub_snapshot(text, label=text), entry=None)
    known = ", ".join(e.name for e in registry())
    raise ModelNotFoundError(
        f"model {text!r} not found: not a directory, a known name ({known}) or a Hugging Face repo id"
    )


def _resolve_entry(entry: ModelEntry, name: str) -> ResolvedModel:
    if entry.path is not None:
        path = _shipped_path(entry)
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"model {entry.name!r}: the shipped directory {path} is missing or incomplete; reinstall vqa2"
            )
        return ResolvedModel(name=name, path=path, entry=entry)
    label = entry.name if entry.name == name else f"{name} ({entry.name})"
    return ResolvedModel(name=name, path=_hub_snapshot(entry.repo_id, label=label), entry=entry)


def _shipped_path(entry: ModelEntry) -> Path:
    return Path(str(resources.files("vqa2cli_weights").joinpath(entry.path)))


def _local_snapshot(repo_id: str) -> Path | None:
    """The cached snapshot of `repo_id`, without any network access; None if absent or incomplete."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        path = snapshot_download(
            repo_id, cache_dir=hub_cache_dir(), local_files_only=True, allow_patterns=HUB_PATTERNS
        )
    except LocalEntryNotFoundError:  # includes IncompleteSnapshotError
        return None
    path = Path(path)
    # A snapshot folder can exist with only some files fetched (e.g. `hf download repo config.json`).
    return path if (path / "config.json").is_file() else None


def offline_hint() -> str:
    """Where a user without the network can turn: the models shipped inside the package."""
    shipped = [entry.name for entry in registry() if entry.path is not None]
    if not shipped:
        return ""
    return f"; or try `--model {shipped[0]}`, shipped with vqa2 (a small demo model that works offline)"


def _hub_snapshot(repo_id: str, label: str) -> Path:
    cached = _local_snapshot(repo_id)
    if cached is not None:
        return cached
    how = f"download it with `{download_command(repo_id)}`"
    if hub_offline():
        raise ModelNotFoundError(
            f"model {label}: {repo_id} is not in the Hugging Face cache ({hub_cache_dir()}) "
            f"and HF_HUB_OFFLINE is set; {how} on a machine with network access{offline_hint()}"
        )
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(repo_id, cache_dir=hub_cache_dir(), allow_patterns=HUB_PATTERNS)
    except Exception as error:  # network, auth, missing repo: all mean "not available here"
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelNotFoundError(
            f"model {label}: could not fetch {repo_id} from the Hugging Face Hub ({reason[:200]}); {how}"
            f"{offline_hint()}"
        ) from error
    return Path(path)


def _entry_for_cache_path(path: Path) -> ModelEntry | None:
    """A directory inside the HF cache (.../models--org--name/snapshots/<hash>) keeps its registry entry."""
    for part in path.resolve().parts:
        if part.startswith("models--"):
            return get_entry(part[len("models--"):].replace("--", "/", 1))
    return None


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def list_models() -> list[ModelStatus]:
    """Every registry entry, with whether it can be loaded offline and its size on disk. No network."""
    statuses = []
    for entry in registry():
        if entry.path is not None:
            path = _shipped_path(entry)
            present = (path / "config.json").is_file()
            statuses.append(ModelStatus(entry, present, path if present else None, _dir_size(path) if present else 0))
            continue
        snapshot = _local_snapshot(entry.repo_id)
        size = 0
        if snapshot is not None:
            # Snapshots hold symlinks into blobs/: the blobs are what takes space.
            blobs = hub_cache_dir() / ("models--" + entry.repo_id.replace("/", "--")) / "blobs"
            size = _dir_size(blobs) if blobs.is_dir() else _dir_size(snapshot)
        statuses.append(ModelStatus(entry, snapshot is not None, snapshot, size))
    return statuses
