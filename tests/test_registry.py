"""Model registry and Hugging Face cache resolution, all offline (HF_HOME in a temporary directory)."""

import json
import os
import subprocess
import sys

import pytest

from vqa2cli import registry
from vqa2cli.errors import ModelNotFoundError

UGC = "q-future/VQA-UGC-Scorer-llava_qwen"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


def _cache_repo(home, repo_id, files):
    """Lay out a repo the way huggingface_hub stores it: blobs, refs/main, snapshots/<commit>/ symlinks."""
    repo = home / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    for name, data in files.items():
        blob = repo / "blobs" / f"blob-{name}"
        blob.write_bytes(data)
        (snapshot / name).symlink_to(blob)
    return snapshot


def test_published_checkpoints_and_defaults():
    repos = {e.repo_id: e for e in registry.registry() if e.repo_id}  # shipped models (vqa2-tiny) have a path instead
    assert set(repos) == {
        "q-future/VQA-UGC-Scorer-llava_qwen",
        "q-future/VQA-Streaming-Scorer-llava_qwen",
        "q-future/VQA-Assistant-llava_qwen",
        "q-future/VQA-Assistant-llava-qwen-enhanced",
    }
    assert registry.default_entry("score").repo_id == UGC
    assert registry.default_entry("ask").repo_id == "q-future/VQA-Assistant-llava_qwen"
    assert repos["q-future/VQA-Streaming-Scorer-llava_qwen"].prompt == "streaming"
    assert repos["q-future/VQA-Assistant-llava-qwen-enhanced"].prompt == "enhanced"
    names = [e.name for e in registry.registry()]
    assert len(names) == len(set(names))


def test_older_repo_ids_are_aliases_of_the_published_checkpoints(hf_home):
    """The release's older README spelled the repos without "-llava_qwen": they resolve to the same entries and
    fetch the canonical repo, while records keep the name the user gave."""
    snapshot = _cache_repo(hf_home, UGC, {"config.json": b'{"model_type": "llava_qwen"}'})
    for alias in ("q-future/VQA-UGC-Scorer", "Q-Future/vqa-ugc-scorer"):
        resolved = registry.resolve(alias)
        assert resolved.entry.name == "vqa2-ugc-scorer" and resolved.path == snapshot and resolved.name == alias
    assert registry.get_entry("q-future/VQA-Streaming-Scorer").name == "vqa2-streaming-scorer"
    assert registry.get_entry("q-future/VQA-Assistant").name == "vqa2-assistant"
    # a cached copy under an alias's own folder keeps the entry too
    old = _cache_repo(hf_home, "q-future/VQA-Assistant", {"config.json": b"{}"})
    assert registry.resolve(old).entry.name == "vqa2-assistant"
    with pytest.raises(ModelNotFoundError, match="hf download q-future/VQA-Assistant-llava_qwen"):
        registry.resolve("q-future/VQA-Assistant")


def test_what_each_model_can_do():
    entries = {e.name: e for e in registry.registry()}
    # only the enhanced checkpoint was trained on still images
    assert [name for name, e in entries.items() if e.images] == ["vqa2-assistant-enhanced"]
    # models that both score and answer explain their own scores (--explain)
    assert [name for name, e in entries.items() if set(e.tasks) == {"score", "ask"}] == [
        "vqa2-assistant-enhanced", "vqa2-tiny"]
    assert entries["vqa2-ugc-scorer"].tasks == ("score",) and entries["vqa2-assistant"].tasks == ("ask",)


def test_offline_missing_weights_one_line_error(hf_home):
    with pytest.raises(ModelNotFoundError) as info:
        registry.resolve(None, task="score")
    message = str(info.value)
    assert "\n" not in message
    assert f"hf download {UGC}" in message
    assert "HF_HUB_OFFLINE" in message and str(hf_home / "hub") in message
    assert message.endswith("; or try `--model vqa2-tiny`, shipped with vqa2 (a small demo model that works offline)")
    with pytest.raises(ModelNotFoundError, match="hf download some-org/some-model"):
        registry.resolve("some-org/some-model")


def test_no_network_says_which_model_works_offline(hf_home, monkeypatch):
    # the first run of a new user without network: the hub is unreachable (not HF_HUB_OFFLINE)
    import socket

    monkeypatch.delenv("HF_HUB_OFFLINE")

    def unreachable(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", unreachable)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_ETAG_TIMEOUT", 1)
    with pytest.raises(ModelNotFoundError) as info:
        registry.resolve(None, task="score")
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"model vqa2-ugc-scorer: could not fetch {UGC} from the Hugging Face Hub")
    assert f"download it with `hf download {UGC}`; or try `--model vqa2-tiny`, shipped with vqa2" in message


def test_resolves_from_cache_by_name_repo_id_and_default(hf_home):
    snapshot = _cache_repo(hf_home, UGC, {"config.json": b'{"model_type": "llava_qwen"}', "model.safetensors": b"x" * 1000})
    for name in ("vqa2-ugc-scorer", UGC, None):
        resolved = registry.resolve(name, task="score")
        assert resolved.path == snapshot
        assert resolved.entry.name == "vqa2-ugc-scorer" and resolved.prompt == "ugc"
    assert registry.resolve(None).name == "vqa2-ugc-scorer"
    # Asking for the assistant finds nothing: a different repo.
    with pytest.raises(ModelNotFoundError, match="VQA-Assistant-llava_qwen"):
        registry.resolve(None, task="ask")


def test_snapshot_without_config_is_not_present(hf_home):
    _cache_repo(hf_home, UGC, {"README.md": b"card"})
    with pytest.raises(ModelNotFoundError):
        registry.resolve("vqa2-ugc-scorer")


def test_local_directory_wins_and_cache_path_keeps_entry(hf_home, tmp_path):
    local = tmp_path / "mine"
    local.mkdir()
    resolved = registry.resolve(str(local))
    assert resolved.path == local and resolved.entry is None and resolved.name == str(local)
    snapshot = _cache_repo(hf_home, "q-future/VQA-Streaming-Scorer-llava_qwen", {"config.json": b"{}"})
    assert registry.resolve(snapshot).prompt == "streaming"


def test_unknown_name(hf_home):
    with pytest.raises(ModelNotFoundError, match="not a directory, a known name"):
        registry.resolve("no-such-model")


def test_list_models_offline(hf_home):
    _cache_repo(hf_home, UGC, {"config.json": b"{}", "model.safetensors": b"x" * 1000})
    statuses = {s.entry.name: s for s in registry.list_models()}
    assert statuses["vqa2-ugc-scorer"].present
    assert statuses["vqa2-ugc-scorer"].size_bytes == 1002
    assert not statuses["vqa2-assistant"].present and statuses["vqa2-assistant"].size_bytes == 0


def test_shipped_path_entry(monkeypatch, tmp_path):
    """An entry with "path" points inside the vqa2cli_weights package (the shipped small model)."""
    package = tmp_path / "pkg"
    (package / "tiny").mkdir(parents=True)
    (package / "registry.json").write_text(
        json.dumps({"models": [{"name": "tiny", "path": "tiny", "purpose": "t", "prompt": "ugc", "default_for": ["score"]}]})
    )

    class Files:
        def joinpath(self, name):
            return package / name

    monkeypatch.setattr(registry.resources, "files", lambda _: Files())
    registry.registry.cache_clear()
    try:
        with pytest.raises(ModelNotFoundError, match="reinstall"):
            registry.resolve("tiny")
        (package / "tiny" / "config.json").write_text("{}")
        assert registry.resolve(None).path == package / "tiny"
        [status] = registry.list_models()
        assert status.present and status.size_bytes == 2
    finally:
        registry.registry.cache_clear()


def test_registry_does_not_import_torch():
    """`vqa2 models` lists models without paying for torch/transformers."""
    code = "import sys, vqa2cli.registry as r; r.list_models(); print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.stdout.strip() == "[]"
