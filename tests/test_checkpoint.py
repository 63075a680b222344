"""Checkpoint formats: official llava_qwen layout (strict), LLaVA-OneVision base + SlowFast .pyth, our directory."""

import json
import os
import shutil
import stat

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.fixtures.checkpoints import RELEASED_CONFIG, copy_checkpoint, rewrite_official, write_tiny_pyth
from tests.fixtures.models import make_tiny_model
from vqa2cli import checkpoint as ck
from vqa2cli.config import VQA2Config, tiny_config
from vqa2cli.errors import CheckpointError


# ---- name mapping ----------------------------------------------------------------------------------


def test_official_names_map_both_ways():
    cases = {
        "model.layers.3.self_attn.q_proj.weight": "language_model.model.layers.3.self_attn.q_proj.weight",
        "model.embed_tokens.weight": "language_model.model.embed_tokens.weight",
        "model.norm.weight": "language_model.model.norm.weight",
        "lm_head.weight": "language_model.lm_head.weight",
        "model.vision_tower.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight": "vision_tower.encoder.layers.0.mlp.fc1.weight",
        "model.vision_tower.vision_tower.vision_model.post_layernorm.bias": "vision_tower.post_layernorm.bias",
        "model.mm_projector.2.bias": "mm_projector.2.bias",
        "model.image_newline": "image_newline",
        "model.slowfast.feature_extraction.4.res_blocks.2.branch2.conv_b.weight": "motion_encoder.blocks.4.res_blocks.2.branch2.conv_b.weight",
        "model.slowfast.position_embedding.weight": "motion_encoder.position_embedding.weight",
        "model.slowfast_projector.0.weight": "motion_projector.0.weight",
    }
    for official, ours in cases.items():
        assert ck.official_to_ours(official) == ours
        assert ck.ours_to_official(ours) == official
    for unknown in ("model.vision_resampler.weight", "model.image_newline_x", "transformer.h.0.weight", "modelx.norm.weight"):
        assert ck.official_to_ours(unknown) is None


@pytest.fixture(scope="module")
def released_model():
    return ck.build_empty(VQA2Config.from_llava_qwen(RELEASED_CONFIG))


def test_mapping_covers_the_released_architecture(released_model):
    """Every tensor of the released-size model (built on meta) has an official name that maps back."""
    expected = ck.expected_tensors(released_model)
    official = {ck.ours_to_official(name): name for name in expected}
    assert None not in official and len(official) == len(expected)
    assert all(ck.official_to_ours(o) == name for o, name in official.items())
    slowfast = [o for o in official if o.startswith("model.slowfast.feature_extraction.")]
    assert len(slowfast) == 660
    assert sum(o.endswith("num_batches_tracked") for o in slowfast) == 110
    assert not any("vision_model.head" in o or ".encoder.layers.26." in o for o in official)
    assert "model.vision_tower.vision_tower.vision_model.encoder.layers.25.mlp.fc2.weight" in official
    assert "model.vision_tower.vision_tower.vision_model.post_layernorm.weight" in official
    shapes = {o: expected[name] for o, name in official.items()}
    assert shapes["model.mm_projector.0.weight"] == (3584, 1152)
    assert shapes["model.mm_projector.2.weight"] == (3584, 3584)
    assert shapes["model.slowfast_projector.0.weight"] == (3584, 256)
    assert shapes["model.slowfast_projector.2.weight"] == (3584, 3584)
    assert shapes["model.slowfast.position_embedding.weight"] == (2000, 256)
    assert shapes["model.image_newline"] == (3584,)
    assert shapes["lm_head.weight"] == (152064, 3584)


def test_released_config_round_trips(released_model):
    """The config we would write for the released architecture is the release's, with no extra section."""
    written = ck.llava_qwen_config(released_model.config)
    assert "vqa2" not in written
    assert {k: written[k] for k in RELEASED_CONFIG} == RELEASED_CONFIG


# ---- official checkpoints: strictness -----------------------------------------------------------------


def test_tiny_official_checkpoint_is_sharded(tiny_official_checkpoint):
    index = json.loads((tiny_official_checkpoint / ck.OFFICIAL_INDEX).read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert "model.slowfast.position_embedding.weight" in index["weight_map"]
    assert ck.is_official(tiny_official_checkpoint)
    assert (tiny_official_checkpoint / "tokenizer.json").is_file()


def test_loads_exactly_the_saved_weights(tiny_official_checkpoint):
    model = ck.load_official(tiny_official_checkpoint)
    reference = make_tiny_model(tiny_config(), seed=0).state_dict()
    loaded = model.state_dict()
    assert loaded.keys() == reference.keys()
    assert all(torch.equal(loaded[k], reference[k]) for k in reference)
    assert not model.training


def test_missing_key_is_reported(tiny_official_checkpoint, tmp_path):
    directory = copy_checkpoint(tiny_official_checkpoint, tmp_path)
    gone = "model.layers.1.mlp.down_proj.weight"
    rewrite_official(directory, drop=lambda key: key == gone)
    with pytest.raises(CheckpointError) as info:
        ck.load_official(directory)
    message = str(info.value)
    assert "\n" not in message
    assert f"1 missing ({gone})" in message and "unexpected" not in message


def test_unexpected_key_is_reported(tiny_official_checkpoint, tmp_path):
    directory = copy_checkpoint(tiny_official_checkpoint, tmp_path)
    rewrite_official(directory, add={"model.vision_resampler.weight": torch.zeros(3)})
    with pytest.raises(CheckpointError, match=r"1 unexpected \(model\.vision_resampler\.weight\)"):
        ck.load_official(directory)


def test_many_missing_keys_are_truncated(tiny_official_checkpoint, tmp_path):
    directory = copy_checkpoint(tiny_official_checkpoint, tmp_path)
    rewrite_official(directory, drop=lambda key: key.startswith("model.layers.1."))
    with pytest.raises(CheckpointError, match=r"missing \(model\.layers\.1\.[^)]*, \+\d+ more\)"):
        ck.load_official(directory)


def test_wrong_shape_is_reported(tiny_official_checkpoint, tmp_path):
    directory = copy_checkpoint(tiny_official_checkpoint, tmp_path)
    rewrite_official(directory, drop=lambda key: key == "model.image_newline", add={"model.image_newline": torch.zeros(7)})
    with pytest.raises(CheckpointError, match=r"1 with the wrong shape \(model\.image_newline \[7\] \(expected \[64\]\)\)"):
        ck.load_official(directory)


def test_missing_shard_is_reported(tiny_official_checkpoint, tmp_path):
    directory = copy_checkpoint(tiny_official_checkpoint, tmp_path)
    (directory / "model-00002-of-00005.safetensors").unlink()
    with pytest.raises(CheckpointError, match="shards missing: model-00002-of-00005.safetensors"):
        ck.load_official(directory)


def test_tensor_in_two_shards_is_reported(tiny_official_checkpoint, tmp_path):
    directory = copy_checkpoint(tiny_official_checkpoint, tmp_path)
    first, *_, last = sorted(directory.glob("model-*.safetensors"))
    key, tensor = next(iter(load_file(first).items()))
    tensors = load_file(last)
    tensors[key] = tensor
    save_file(tensors, last)
    with pytest.raises(CheckpointError, match=f"tensor {key} is also in {first.name}"):
        ck.load_official(directory)

# ---- LLaVA-OneVision base + SlowFast Kinetics weights ------------------------------------------------



def test_pyth_is_read_with_weights_only(tmp_path):
    state = write_tiny_pyth(tmp_path / "slowfast.pyth")
    tensors = ck.read_slowfast(tmp_path / "slowfast.pyth")
    assert set(tensors) == {f"motion_encoder.{k}" for k in state if k.split(".")[1] in "01234"}
    assert not any(k.startswith("motion_encoder.blocks.5") for k in tensors)  # the head is dropped
    # A pickled module (like JZHWS/slowfast's slowfast.pth) is refused, not unpickled.
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pth")
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        ck.read_slowfast(tmp_path / "module.pth")


def test_build_from_plain_onevision(tiny_official_checkpoint, tmp_path):
    directory = copy_checkpoint(tiny_official_checkpoint, tmp_path)
    rewrite_official(directory, drop=lambda key: key.startswith(("model.slowfast.", "model.slowfast_projector.")))
    state = write_tiny_pyth(tmp_path / "slowfast.pyth")

    with pytest.raises(CheckpointError, match=r"missing \(model\.slowfast"):
        ck.load_official(directory)  # strict by default
    with pytest.raises(CheckpointError, match="SLOWFAST_8x8_R50.pyth"):
        ck.load_official(directory, allow_missing_motion=True)

    model = ck.load_official(directory, allow_missing_motion=True, slowfast_weights=tmp_path / "slowfast.pyth")
    blocks = model.motion_encoder.blocks.state_dict()
    assert all(torch.equal(blocks[k.removeprefix("blocks.")], v) for k, v in state.items() if k.split(".")[1] in "01234")
    reference = make_tiny_model(tiny_config(), seed=0)
    assert torch.equal(model.mm_projector[0].weight, reference.mm_projector[0].weight)  # base weights kept
    for p in [*model.motion_projector.parameters(), model.motion_encoder.position_embedding.weight]:
        assert not p.is_meta and torch.isfinite(p).all() and p.abs().sum() > 0


def test_slowfast_of_another_depth_is_rejected(tiny_official_checkpoint, tmp_path):
    from vqa2cli._pytorchvideo import create_slowfast

    directory = copy_checkpoint(tiny_official_checkpoint, tmp_path)
    rewrite_official(directory, drop=lambda key: key.startswith(("model.slowfast.", "model.slowfast_projector.")))
    network = create_slowfast(model_depth=50, stem_dim_outs=(16, 2))
    torch.save({"model_state": network.state_dict()}, tmp_path / "r50.pyth")
    with pytest.raises(CheckpointError, match=r"SlowFast weights .*r50\.pyth does not match the model: .*unexpected"):
        ck.load_official(directory, allow_missing_motion=True, slowfast_weights=tmp_path / "r50.pyth")


def test_partial_motion_weights_are_an_error_even_when_allowed(tiny_official_checkpoint, tmp_path):
    directory = copy_checkpoint(tiny_official_checkpoint, tmp_path)
    rewrite_official(directory, drop=lambda key: key.startswith("model.slowfast_projector."))
    write_tiny_pyth(tmp_path / "slowfast.pyth")
    with pytest.raises(CheckpointError, match=r"4 missing \(model\.slowfast_projector"):
        ck.load_official(directory, allow_missing_motion=True, slowfast_weights=tmp_path / "slowfast.pyth")


# ---- our model directory --------------------------------------------------------------------------------


def test_model_dir_contents(tiny_model_dir):
    names = {p.name for p in tiny_model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md"} <= names
    assert json.loads((tiny_model_dir / "config.json").read_text())["format"] == "vqa2"
    model, tokenizer = ck.load_model_dir(tiny_model_dir)
    reference = make_tiny_model(tiny_config(), seed=0).state_dict()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in reference.items())
    assert tokenizer("<|im_start|>user", add_special_tokens=False)["input_ids"][0] == 1


def test_save_is_atomic(tmp_path, tiny_tokenizer):
    target = tmp_path / "model"
    first = make_tiny_model(tiny_config(), seed=0)
    ck.save_model_dir(first, tiny_tokenizer, target, card="first")

    class BrokenTokenizer:
        def save_pretrained(self, directory):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        ck.save_model_dir(make_tiny_model(tiny_config(), seed=1), BrokenTokenizer(), target)
    assert (target / "README.md").read_text() == "first"  # the good model is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary left behind

    previous = os.umask(0o022)
    try:
        ck.save_model_dir(make_tiny_model(tiny_config(), seed=1), tiny_tokenizer, target, card="second")
    finally:
        os.umask(previous)
    assert (target / "README.md").read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    # safetensors writes its file 0600: a saved model is readable as the umask allows (issue 27)
    assert {stat.S_IMODE(p.stat().st_mode) for p in [target, *target.iterdir()]} == {0o755, 0o644}
    loaded, _ = ck.load_model_dir(target)
    assert torch.equal(loaded.image_newline, make_tiny_model(tiny_config(), seed=1).image_newline)


def test_model_dir_is_strict(tiny_model_dir, tmp_path):
    directory = shutil.copytree(tiny_model_dir, tmp_path / "m")
    tensors = load_file(directory / "model.safetensors")
    del tensors["motion_projector.2.bias"]
    tensors["extra.weight"] = torch.zeros(1)
    save_file(tensors, directory / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"1 missing \(motion_projector\.2\.bias\); 1 unexpected \(extra\.weight\)"):
        ck.load_model_dir(directory)


def test_unreadable_weights_file(tiny_model_dir, tmp_path):
    directory = shutil.copytree(tiny_model_dir, tmp_path / "m")
    (directory / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        ck.load_model_dir(directory)


# ---- what a model directory may say ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["/etc/passwd", "../other/model.safetensors", "a/../../x.safetensors", "", None,
                                  "..\\x.safetensors"])
def test_an_index_may_only_name_files_inside_its_folder(tiny_official_checkpoint, tmp_path, name):
    directory = copy_checkpoint(tiny_official_checkpoint, tmp_path)
    index = json.loads((directory / ck.OFFICIAL_INDEX).read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = name
    (directory / ck.OFFICIAL_INDEX).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="an index may only name files inside its folder"):
        ck.official_files(directory)


def test_an_index_may_name_files_in_a_subfolder(tiny_official_checkpoint, tmp_path):
    directory = copy_checkpoint(tiny_official_checkpoint, tmp_path)
    index = json.loads((directory / ck.OFFICIAL_INDEX).read_text())
    (directory / "shards").mkdir()
    for file in set(index["weight_map"].values()):
        shutil.move(directory / file, directory / "shards" / file)
    index["weight_map"] = {key: f"shards/{file}" for key, file in index["weight_map"].items()}
    (directory / ck.OFFICIAL_INDEX).write_text(json.dumps(index))
    assert {f.parent.name for f in ck.official_files(directory)} == {"shards"}


def test_parameter_estimate_is_close_to_the_built_model(released_model):
    # the model counted tensor by tensor (built on meta) against the estimate from the config's numbers
    for config, model in ((tiny_config(), make_tiny_model()), (released_model.config, released_model)):
        counted = sum(t.numel() for t in model.state_dict().values())
        assert config.parameter_count() == pytest.approx(counted, rel=0.02)
        decoder = sum(m.weight.numel() for name, m in model.named_modules()
                      if type(m) is torch.nn.Linear and name.startswith("language_model.model.layers."))
        assert config.parameter_count(quantizable_only=True) == decoder
    assert released_model.config.parameter_count() == pytest.approx(8.08e9, rel=0.01)


def test_weights_bigger_than_the_machine_are_refused_before_building(tiny_model_dir, monkeypatch):
    from vqa2cli.quantization import Precision

    build = ck.build_empty
    built = []
    monkeypatch.setattr(ck, "build_empty", lambda config: built.append(config) or build(config))
    monkeypatch.setattr(ck, "_memory_of", lambda device: (2_000_000, "of memory this machine has"))
    # the tiny model has ~0.9 M parameters: 3.6 MB in float32, 1.8 MB in bfloat16
    with pytest.raises(CheckpointError, match=r"^model directory .*: its weights need about 3.6 MB in float32, more "
                                              r"than the 2.0 MB of memory this machine has \(try --quant 4bit\)$"):
        ck.load_model_dir(tiny_model_dir)
    assert built == []
    ck.load_model_dir(tiny_model_dir, precision=Precision("none", torch.bfloat16))
    assert len(built) == 1
