"""Hostile input, kept so it stays handled: odd file names, datasets and model directories built to break
things, a machine without network. Every case ends in one line on stderr naming the thing at fault, no
traceback, the exit code of its kind (1 an input failed, 2 setup/usage), and no hang; where the attack is
on memory, the command runs under an address-space limit it could not get past by allocating.
(Signals are in test_cli.py: they need real processes.)"""

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.checkpoints import copy_checkpoint
from tests.fixtures.clips import make_clip

LIMIT_BYTES = 3 * 2**30  # a tiny model scores in well under 2 GB of address space


def assert_one_line(err: str, *parts: str):
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith("\n"), err
    assert "Traceback" not in err and "internal error" not in err, err
    for part in parts:
        assert part in lines[0], (part, err)


def run_limited(*args, env=None, timeout=300):
    """`python -m vqa2cli ARGS` in a process that cannot map more than LIMIT_BYTES."""
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (LIMIT_BYTES, LIMIT_BYTES))

    done = subprocess.run([sys.executable, "-m", "vqa2cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, preexec_fn=limit, env=env)
    return done.returncode, done.stdout, done.stderr


# ---- file names ------------------------------------------------------------------------------------

ODD_NAMES = [b"line\nbreak.mp4", b"esc\x1b[2J\x1b[31mred.mp4", b"latin1-\xe9t\xe9.mp4", b"rtl-\xe2\x80\xaegnp.mp4",
             b"[bold]markup[red].mp4"]


def test_odd_names_stay_one_line_each_and_true_in_the_data(tmp_path, tiny_model_dir):
    folder = tmp_path / "odd"
    folder.mkdir()
    for name in ODD_NAMES:
        with open(os.path.join(os.fsencode(folder), name), "wb") as file:
            file.write(b"not a video")
    # a strict UTF-8 stdout (a desktop locale), where a name that is not UTF-8 used to end the array
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    code, out, err = run_limited("score", folder, "--model", tiny_model_dir, "--json", env=env)
    assert code == 1
    records = json.loads(out)
    assert sorted(os.fsencode(r["path"]) for r in records) == sorted(os.fsencode(folder) + b"/" + n for n in ODD_NAMES)
    lines = err.splitlines()
    assert len(lines) == len(ODD_NAMES) + 1 and lines[-1].startswith("scored 0 video(s), 5 failed")
    assert "\x1b" not in err and "\u202e" not in err and "Traceback" not in err
    for line in lines[:-1]:
        assert line.startswith("error: ") and line.count(str(folder)) == 1, line
    assert any("esc\\x1b[2J\\x1b[31mred.mp4" in line for line in lines)
    assert any("latin1-\\udce9t\\udce9.mp4" in line for line in lines)


def test_a_named_folder_without_videos_fails_in_one_line(vqa2, tmp_path, tiny_model_dir):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("no videos here")
    code, out, err = vqa2("score", tmp_path / "empty", "--model", tiny_model_dir, "--json", "--quiet")
    assert code == 1 and json.loads(out)[0]["error"].startswith(f"{tmp_path / 'empty'}: no video files found")
    assert_one_line(err, "error: ", "no video files found", "1 subdirectory skipped (use --recursive)")


# ---- datasets ----------------------------------------------------------------------------------------


def test_json_nested_200k_deep_is_a_data_error(vqa2, tmp_path, tiny_model_dir):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "d.json").write_text("[" * 200_000 + "]" * 200_000)
    code, _, err = vqa2("finetune", "--stage", 3, tmp_path / "data" / "d.json", "--model", tiny_model_dir,
                        "-o", tmp_path / "o")
    assert code == 2
    assert_one_line(err, "d.json: record [0] (line 1) is nested too deeply to be read")


def test_a_synth_folder_trains_from_its_stage_file(vqa2, tmp_path, tiny_model_dir):
    # what `vqa2 synth` writes beside the stage files is never taken, nor listed as a choice
    data = tmp_path / "synth"
    data.mkdir()
    for name in ("synth.json", "manifest.csv", "labels.csv", "stage2.csv", "stage3.json"):
        (data / name).write_text("")
    (data / "stage2.json").write_text('[\n {"image": "videos/missing.mp4", "conversations": []}\n]\n')
    code, _, err = vqa2("finetune", "--stage", 2, data, "--model", tiny_model_dir, "-o", tmp_path / "o")
    assert code == 2 and "several data files" not in err
    assert err.splitlines()[0] == f"using stage2.json from {data}"
    assert "stage2.json [0] (line 2): 'conversations' must be a list of at least two turns" in err


# ---- model directories --------------------------------------------------------------------------------


def model_dir_with(tmp_path, tiny_model_dir, edit) -> Path:
    """A model directory sharing the tiny model's files, with `edit(config)` applied to its config.json."""
    directory = tmp_path / "model"
    directory.mkdir()
    for file in Path(tiny_model_dir).iterdir():
        if file.name != "config.json":
            (directory / file.name).symlink_to(file)
    config = json.loads((Path(tiny_model_dir) / "config.json").read_text())
    edit(config)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


@pytest.mark.parametrize("section, key, value, message", [
    ("text", "hidden_size", 1e9, "text.hidden_size must be a whole number, got 1000000000.0"),
    ("text", "vocab_size", 10**12, "the sizes describe about 1.3e+14 parameters, beyond any real model"),
    ("text", "intermediate_size", -5, "text.intermediate_size must be at least 1, got -5"),
    ("text", "num_attention_heads", 0, "text.num_attention_heads must be at least 1, got 0"),
    ("text", "num_attention_heads", 3, "text.hidden_size (64) must be a multiple of text.num_attention_heads (3)"),
    ("text", "num_key_value_heads", "two", "text.num_key_value_heads must be a whole number, got 'two'"),
    ("vision", "patch_size", 8.5, "vision.patch_size must be a whole number, got 8.5"),
    ("vision", "image_size", 10**5, "vision.image_size = 100000 is beyond any real model (at most 4096)"),
    ("motion", "model_depth", 34, "motion.model_depth must be one of (18, 50, 101, 152), got 34"),
    (None, "level_words", [], "level_words must be at least two words, got []"),
    (None, "vision", "big", "vision must be an object of vision config fields, got 'big'"),
])
def test_absurd_configs_are_refused_in_one_line(vqa2, tmp_path, tiny_model_dir, clip, section, key, value, message):
    def edit(config):
        (config[section] if section else config)[key] = value

    directory = model_dir_with(tmp_path, tiny_model_dir, edit)
    code, out, err = vqa2("score", clip, "--model", directory)
    assert code == 2 and out == ""
    assert_one_line(err, f"error: {directory / 'config.json'}: {message}")


@pytest.mark.parametrize("section, key, value, message", [
    ("text", "hidden_size", 10**9, "the sizes describe about 8.0e+18 parameters, beyond any real model (at most 1e+11)"),
    ("text", "num_hidden_layers", 10**6, "text.num_hidden_layers = 1000000 is beyond any real model (at most 1024)"),
    ("motion", "max_frames", 10**9, "motion.max_frames = 1000000000 is beyond any real model (at most 1000000)"),
])
def test_sizes_that_would_exhaust_memory_are_refused_before_allocating(tmp_path, tiny_model_dir, clip, section, key,
                                                                      value, message):
    # before: "tried to allocate 384000000000 bytes", or memory growing for minutes with a million layers
    directory = model_dir_with(tmp_path, tiny_model_dir, lambda config: config[section].update({key: value}))
    code, out, err = run_limited("score", clip, "--model", directory)
    assert code == 2 and out == ""
    assert_one_line(err, f"error: {directory / 'config.json'}: {message}")


def test_weights_bigger_than_the_machine_are_refused(vqa2, tmp_path, tiny_model_dir, clip, monkeypatch):
    from vqa2cli import checkpoint

    monkeypatch.setattr(checkpoint, "_memory_of", lambda device: (10**6, "of memory this machine has"))
    code, _, err = vqa2("score", clip, "--model", tiny_model_dir, "--device", "cpu")
    assert code == 2
    assert_one_line(err, "its weights need about 3.6 MB in float32, more than the 1.0 MB of memory this machine has")


@pytest.mark.parametrize("shard", ["/etc/hostname", "../../outside.safetensors", "sub/../../x.safetensors"])
def test_an_index_naming_files_outside_its_folder_is_refused(vqa2, tmp_path, tiny_official_checkpoint, clip, shard):
    # before: the loader read the named file, wherever it was (another model's weights scored)
    directory = copy_checkpoint(tiny_official_checkpoint, tmp_path)
    index_path = directory / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"] = {key: shard for key in index["weight_map"]}
    index_path.write_text(json.dumps(index))
    code, _, err = vqa2("score", clip, "--model", directory)
    assert code == 2
    assert_one_line(err, f"names '{shard}' as a shard; an index may only name files inside its folder")


def test_a_config_nested_200k_deep_is_not_a_model(vqa2, tmp_path, clip):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("[" * 200_000 + "]" * 200_000)
    code, _, err = vqa2("score", clip, "--model", tmp_path / "model")
    assert code == 2
    assert_one_line(err, "is not a model directory")


# ---- no network ----------------------------------------------------------------------------------------

NO_NETWORK = """
import socket, sys
def refuse(*args, **kwargs):
    print("network attempt:", args[:2], file=sys.stderr)
    raise OSError("no network in this test")
socket.getaddrinfo = refuse
socket.socket.connect = lambda self, address: refuse(address)
sys.argv = ["vqa2", *sys.argv[1:]]
from vqa2cli.cli import main
main()
"""


def test_first_run_without_network_names_the_model_that_works_offline(tmp_path, clip):
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_HUB_OFFLINE", None)
    env.pop("HF_HUB_CACHE", None)
    done = subprocess.run([sys.executable, "-c", NO_NETWORK, "score", str(clip)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 2 and done.stdout == ""
    err = "\n".join(line for line in done.stderr.splitlines() if not line.startswith("network attempt:")) + "\n"
    assert_one_line(err, "could not fetch q-future/VQA-UGC-Scorer-llava_qwen",
                    "or try `--model vqa2-tiny`, shipped with vqa2 (a small demo model that works offline)")


def test_4bit_on_cpu_reaches_for_no_remote_code(wide_model_dir, clip):
    # bitsandbytes' CPU backend asked the `kernels` package for kernels-community code on huggingface.co
    done = subprocess.run([sys.executable, "-c", NO_NETWORK, "score", str(clip), "--model", str(wide_model_dir),
                           "--quant", "4bit", "--device", "cpu", "--jsonl", "--quiet"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # no network attempt, no trust_remote_code note
    assert json.loads(done.stdout)["error"] is None
