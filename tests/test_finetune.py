"""Fine-tuning end to end on the tiny model: data made here, a few steps each, all on CPU."""

import json
import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.fixtures.checkpoints import write_tiny_model_dir
from tests.fixtures.finetune import finetune_options as options
from tests.fixtures.finetune import quiet, write_stage_data
from vqa2cli.errors import DataError, SetupError
from vqa2cli.finetune import (
    FinetuneOptions,
    checkpoint_dirs,
    load_checkpoint,
    lr_factor,
    run,
    save_checkpoint,
    shard_order,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return write_tiny_model_dir(tmp_path_factory.mktemp("base") / "tiny")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_stage_data(tmp_path_factory.mktemp("data"))


def weights(path):
    return load_file(Path(path) / "model.safetensors")


def changed(before, after):
    """Top-level parts whose tensors changed, and those that did not."""
    moved, still = set(), set()
    for name, tensor in before.items():
        part = name.split(".")[0]
        if name.startswith("language_model.model.embed_tokens."):
            part = "embed_tokens"
        (moved if not torch.equal(tensor, after[name]) else still).add(part)
    return moved, still - moved


@pytest.fixture(scope="module")
def trained(base, data, tmp_path_factory):
    """A short full fine-tune (stage 3) shared by the tests that look at its outputs."""
    out = tmp_path_factory.mktemp("trained") / "run"
    result = run(options(base, data, out, max_steps=12, lr=5e-3, vision_lr=5e-3), say=quiet)
    return out, result


def test_loss_falls_on_a_learnable_set(trained):
    out, result = trained
    assert result.step == 12 and not result.interrupted
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 12
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.7 * first, losses


def test_the_output_folder_is_a_model_that_scores_and_answers(trained, data):
    out, result = trained
    card = (out / "README.md").read_text()
    assert "- stage: 3 (quality understanding)" in card and "- steps: 12" in card and f"{result.loss:.4f}" in card
    assert [p.name for p in checkpoint_dirs(out)] == ["step-00000012"]
    from vqa2cli.pipeline import load_model

    model = load_model(str(out), device="cpu", quant="none")
    scored = model.score(str(data / "b1.mp4"))
    assert 0.0 <= scored.score <= 1.0 and set(scored.probs) == {"high", "good", "fair", "poor", "low"}
    answer = model.ask(str(data / "b1.mp4"), "Is this video bright?", max_new_tokens=4)
    assert isinstance(answer, str)


@pytest.mark.parametrize("stage, extra, trained, frozen", [
    (1, {}, {"vision_tower", "mm_projector"},
     {"motion_encoder", "motion_projector", "language_model", "image_newline", "embed_tokens"}),
    (1, {"part": "motion"}, {"motion_encoder", "motion_projector"},
     {"vision_tower", "mm_projector", "language_model", "image_newline", "embed_tokens"}),
    (2, {"gradient_checkpointing": True},
     {"vision_tower", "mm_projector", "image_newline", "motion_encoder", "motion_projector", "language_model"},
     {"embed_tokens"}),
    (3, {"train": ("mm_projector",)}, {"mm_projector"},
     {"vision_tower", "motion_encoder", "motion_projector", "language_model", "image_newline", "embed_tokens"}),
])
def test_each_stage_trains_only_its_parts(base, data, tmp_path, stage, extra, trained, frozen):
    run(options(base, data, tmp_path / "run", stage=stage, max_steps=1, **extra), say=quiet)
    moved, still = changed(weights(base), weights(tmp_path / "run"))
    assert moved == trained and still == frozen


def test_lora_is_merged_into_the_language_model(base, data, tmp_path):
    run(options(base, data, tmp_path / "run", method="lora", train=("language_model",), max_steps=1), say=quiet)
    before, after = weights(base), weights(tmp_path / "run")
    assert set(after) == set(before)  # no adapter tensors left
    differs = {name for name in before if not torch.equal(before[name], after[name])}
    projections = {n for n in before if n.startswith("language_model.model.layers.") and "_proj." in n
                   and n.endswith(".weight")}
    assert differs == projections  # only the adapted linear layers (not norms, embeddings or lm_head)


def test_qlora_trains_on_a_4bit_base_and_saves_full_precision(base, data, tmp_path):
    result = run(options(base, data, tmp_path / "run", stage=2, method="qlora", train=("language_model",), max_steps=1),
                 say=quiet)
    assert result.step == 1
    before, after = weights(base), weights(tmp_path / "run")
    assert after.keys() == before.keys()
    assert all(t.dtype == torch.float32 for t in after.values() if t.is_floating_point())
    # a 4-bit-quantized layer (width >= 64) got an adapter folded into its original full-precision weight
    name = "language_model.model.layers.0.mlp.up_proj.weight"
    delta = (after[name] - before[name]).abs()
    assert 0 < delta.max() < 0.1


def test_interrupted_then_resumed_equals_uninterrupted(base, data, tmp_path, monkeypatch):
    lora = dict(max_steps=6, method="lora", train=("language_model", "mm_projector"))  # dropout draws from the RNG
    whole = run(options(base, data, tmp_path / "whole", **lora), say=quiet)
    assert whole.step == 6
    # a real SIGINT during step 3: the run finishes that step, checkpoints it and stops
    import vqa2cli.finetune as finetune

    append = finetune._append_metrics

    def append_and_interrupt(path, record):
        append(path, record)
        if record["step"] == 2:
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(finetune, "_append_metrics", append_and_interrupt)
    opts = options(base, data, tmp_path / "parts", **lora)
    first = run(opts, say=quiet)
    assert first.interrupted and first.step == 2 and first.checkpoint.name == "step-00000002"
    assert not (tmp_path / "parts" / "model.safetensors").exists()
    monkeypatch.setattr(finetune, "_append_metrics", append)
    with open(tmp_path / "parts" / "metrics.jsonl", "a") as log:
        log.write('{"step": 3, "lo')  # a line cut short by a crash after the checkpoint
    second = run(replace(opts, resume=True), say=quiet)
    assert second.step == 6 and not second.interrupted
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "parts")
    worst = max(float((a[n] - b[n]).abs().max()) for n in a)
    assert worst <= 1e-6, worst
    whole_log = (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()
    parts_log = (tmp_path / "parts" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["loss"] for x in whole_log] == pytest.approx([json.loads(x)["loss"] for x in parts_log],
                                                                       abs=1e-6)


def test_resume_refuses_changed_options(base, data, tmp_path):
    opts = options(base, data, tmp_path / "run", max_steps=1, batch_size=3)  # 3 videos padded together
    run(opts, say=quiet)
    with pytest.raises(SetupError, match="holds checkpoints of an earlier run"):
        run(opts, say=quiet)
    with pytest.raises(SetupError, match="lr: 0.001 then, 0.002 now"):
        run(replace(opts, resume=True, lr=2e-3), say=quiet)


def test_invalid_records_stop_before_training_or_are_skipped(base, data, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("b1", "d1"):
        os.link(data / f"{name}.mp4", bad / f"{name}.mp4")
    (bad / "d.csv").write_text("video,question,answer\nb1.mp4,q?,yes\nnope.mp4,q?,no\n../x.mp4,q?,no\nd1.mp4,q?,no\n")
    lines = []
    with pytest.raises(DataError, match="2 of 4 records in .* are invalid"):
        run(options(base, bad.parent, tmp_path / "run", data=str(bad)), say=lines.append)
    assert lines[:2] == [f"using d.csv from {bad}", "d.csv: 2 of 4 records are invalid:"]
    assert lines[2].startswith("  d.csv line 3: video 'nope.mp4': file not found")
    assert "d.csv line 4: video path '../x.mp4' leaves the data folder" in lines[3]
    assert not checkpoint_dirs(tmp_path / "run")
    assert (tmp_path / "run" / "invalid_records.txt").read_text().count("\n") == 2
    result = run(options(base, bad.parent, tmp_path / "run", data=str(bad), skip_invalid=True, max_steps=1),
                 say=lines.append)
    assert result.step == 1 and "skipping 2 invalid records; training on 2" in lines


def test_output_folder_is_never_clobbered(base, data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SetupError, match="not empty"):
        run(options(base, data, out), say=quiet)
    assert (out / "notes.txt").read_text() == "mine"


def test_checkpoints_are_atomic_and_pruned(tmp_path, monkeypatch):
    tensors = {"w": torch.ones(3)}
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, tensors, {"step": torch.tensor(step)}, {"step": step}, keep=2)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step-00000002", "step-00000003"]

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 4, {"w": torch.zeros(3)}, {}, {"step": 4}, keep=2)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step-00000002", "step-00000003"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000002", "step-00000003"]
    loaded, state, meta = load_checkpoint(checkpoint_dirs(tmp_path)[-1])
    assert torch.equal(loaded["w"], torch.ones(3)) and meta["step"] == 3 and int(state["step"]) == 3


def test_checkpoint_state_is_never_unpickled(tmp_path):
    path = save_checkpoint(tmp_path, 1, {"w": torch.ones(1)}, {}, {"step": 1}, keep=1)

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    import pickle

    (path / "state.pt").write_bytes(pickle.dumps({"x": Evil()}))
    with pytest.raises(SetupError, match="cannot be read"):
        load_checkpoint(path)


def test_schedule_and_sharding():
    total = 100
    factors = [lr_factor(s, total) for s in range(total)]
    assert factors[0] == pytest.approx(1 / 3) and factors[2] == 1.0  # 3 warm-up steps
    assert all(a >= b for a, b in zip(factors[2:], factors[3:])) and factors[-1] < 0.01
    shards = [shard_order(5, epoch=0, seed=0, rank=r, world=2) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 3 and set(shards[0] + shards[1]) == set(range(5))
    assert shard_order(5, 1, 0, 0, 1) != shard_order(5, 0, 0, 0, 1)  # a new order each epoch


@pytest.mark.slow  # two fresh interpreters import torch and transformers: ~30 s on 2 cores
def test_two_processes_on_gloo_match_one_process(base, data, tmp_path):
    """torchrun with 2 CPU ranks (DDP, gloo): rank r takes every other record, gradients are averaged, so 2
    steps equal 2 steps of one process that accumulates the same 2 records per step."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "vqa2cli", "finetune", "--stage", "3", str(data / "s3"), "--model", str(base),
               "--output", str(tmp_path / "ddp"), "--lr", "1e-3", "--max-steps", "2", "--device", "cpu"]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stderr.count("2 process(es)") == 1  # only rank 0 talks
    assert len((tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()) == 2
    run(options(base, data, tmp_path / "one", max_steps=2, grad_accum=2), say=quiet)
    a, b = weights(tmp_path / "ddp"), weights(tmp_path / "one")
    # Summation order differs (all-reduce vs accumulation); Adam's normalisation turns that rounding into
    # up to ~1% of a step (lr 1e-3) on parameters whose gradients are ~0. 5% of one step is the bound.
    worst = max(float((a[n].double() - b[n].double()).abs().max()) for n in a)
    assert worst < 5e-5, worst
    assert any(not torch.equal(a[n], weights(base)[n]) for n in a)
    losses = [[json.loads(x)["loss"] for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
              for d in ("ddp", "one")]
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)


def test_cli_exit_codes_report_interrupt_and_resume(base, data, tmp_path, monkeypatch, vqa2):
    import vqa2cli.finetune as finetune

    out = tmp_path / "run"
    common = ["--stage", "2", "--model", base, "--output", out, "--max-steps", "3", "--device", "cpu"]
    code, _, err = vqa2("finetune", data / "s2", *common)
    assert code == 2 and "needs --mos-range LO HI" in err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "d.csv").write_text("video,mos\nmissing.mp4,3\n")
    code, _, err = vqa2("finetune", tmp_path / "bad", *common, "--mos-range", 1, 5)
    assert code == 2 and "d.csv line 2: video 'missing.mp4': file not found" in err and "--skip-invalid" in err

    append = finetune._append_metrics

    def append_and_interrupt(path, record):
        append(path, record)
        signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(finetune, "_append_metrics", append_and_interrupt)
    code, _, err = vqa2("finetune", data / "s2", *common, "--mos-range", 1, 5)
    assert code == 130 and "interrupted at step 1 of 3" in err and "--resume" in err
    monkeypatch.setattr(finetune, "_append_metrics", append)
    code, _, err = vqa2("finetune", data / "s2", *common, "--mos-range", 1, 5, "--resume")
    assert code == 0 and "resuming from" in err and "done: 3 steps" in err
    assert (out / "config.json").is_file() and len((out / "metrics.jsonl").read_text().splitlines()) == 3


def test_parameter_selection_by_submodule_name():
    from tests.fixtures.models import make_tiny_model
    from vqa2cli.finetune import configure_model

    lora = FinetuneOptions(stage=3, data="", model="", output="", method="lora")
    model = make_tiny_model()
    parts = ("language_model.model.layers.1", "language_model.lm_head", "mm_projector")
    trainable = configure_model(model, lora, parts)
    adapted = {n.split(".lora_")[0] for n in trainable if ".lora_" in n}
    assert adapted == {f"language_model.model.layers.1.{m}" for m in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    full = {n for n in trainable if ".lora_" not in n}
    assert full == {"language_model.lm_head.weight", *(n for n, _ in model.mm_projector.named_parameters(
        prefix="mm_projector"))}  # lm_head has no projection to adapt: it trains fully
    full_model = make_tiny_model()
    names = configure_model(full_model, replace(lora, method="full"), ("language_model",))
    assert "language_model.model.embed_tokens.weight" not in names and "language_model.lm_head.weight" in names
    names = configure_model(full_model, replace(lora, method="full"), ("language_model.model.embed_tokens",))
    assert names == ["language_model.model.embed_tokens.weight"]
    with pytest.raises(SetupError, match="'vision' names no parameters"):
        configure_model(make_tiny_model(), lora, ("vision",))


def test_answer_loss_equals_the_full_sequence_loss(tiny_model, tiny_tokenizer, tiny_config):
    from tests.fixtures.models import tiny_video
    from vqa2cli.finetune import answer_loss, answer_span
    from vqa2cli.prompts import UGC_USER, training_example

    rows = [training_example([{"from": "human", "value": UGC_USER}, {"from": "gpt", "value": "Good, very good."}],
                             tiny_tokenizer),
            training_example([{"from": "human", "value": "<image><image>Is it sharp?"}, {"from": "gpt", "value": "No."},
                              {"from": "human", "value": "Why?"}, {"from": "gpt", "value": "Blur."}], tiny_tokenizer)]
    ids = [torch.tensor(r[0]) for r in rows]
    labels = [torch.tensor(r[1]) for r in rows]
    videos = [tiny_video(tiny_config, num_keyframes=2, num_motion=8, seed=s) for s in (0, 1)]
    keyframes, motion = [v[0] for v in videos], [v[1] for v in videos]
    with torch.no_grad():
        full = tiny_model(ids, keyframes, motion, labels=labels).loss
        keep = answer_span(labels)
        short = tiny_model(ids, keyframes, motion, logits_to_keep=keep).logits
    assert short.shape[1] == keep < 30
    assert float(answer_loss(short, labels, keep)) == pytest.approx(float(full), rel=1e-5)


def test_rng_state_round_trips_through_a_safe_load(tmp_path):
    import random

    import numpy as np

    from vqa2cli.finetune import rng_state, set_rng_state

    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    random.random(), np.random.rand(), torch.rand(3)  # move every generator on
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected


def test_starts_from_an_official_llava_qwen_checkpoint(tiny_official_checkpoint, data, tmp_path):
    result = run(options(tiny_official_checkpoint, data, tmp_path / "run", stage=2, max_steps=1), say=quiet)
    assert result.step == 1
    from vqa2cli.checkpoint import is_model_dir, load_model_dir

    assert is_model_dir(tmp_path / "run")
    model, _ = load_model_dir(tmp_path / "run")
    assert model.config.prompt == "ugc"


def test_plain_onevision_base_keeps_its_fresh_motion_weights(tiny_official_checkpoint, data, tmp_path):
    """A LLaVA-OneVision base has no motion projector: the loader draws one. Stage 1 spatial does not train
    it, yet the checkpoint and the final model must hold the very draw the run used."""
    from tests.fixtures.checkpoints import copy_checkpoint, rewrite_official, write_tiny_pyth

    base = copy_checkpoint(tiny_official_checkpoint, tmp_path)
    rewrite_official(base, drop=lambda key: key.startswith(("model.slowfast.", "model.slowfast_projector.")))
    write_tiny_pyth(tmp_path / "slowfast.pyth")
    opts = options(base, data, tmp_path / "run", stage=1, max_steps=1, slowfast_weights=str(tmp_path / "slowfast.pyth"))
    run(opts, say=quiet)
    saved, _, _ = load_checkpoint(checkpoint_dirs(tmp_path / "run")[-1])
    fresh = {n for n in saved if n.startswith(("motion_projector.", "motion_encoder.position_embedding."))}
    assert fresh == {"motion_projector.0.weight", "motion_projector.0.bias", "motion_projector.2.weight",
                     "motion_projector.2.bias", "motion_encoder.position_embedding.weight"}
    final = weights(tmp_path / "run")
    assert all(torch.equal(final[n], saved[n]) for n in fresh)


def test_stage2_sets_the_scoring_prompt_it_trained_with(data, tmp_path):
    streaming_base = write_tiny_model_dir(tmp_path / "base", prompt="streaming")
    run(options(streaming_base, data, tmp_path / "run", stage=2, max_steps=1), say=quiet)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["prompt"] == "ugc"  # the CSV records carry the UGC scorer's question
    assert "- scoring prompt: ugc" in (tmp_path / "run" / "README.md").read_text()


def test_a_video_that_fails_during_training_is_skipped(base, data, tmp_path, monkeypatch):
    """Validation only probes the first frame: a video that fails later is skipped, named, and counted."""
    import vqa2cli.video
    from vqa2cli.video import VideoError

    real = vqa2cli.video.load_video

    def load_video(path, **kwargs):
        if Path(path).name == "d1.mp4":
            raise VideoError(str(path), "damaged after the first frame")
        return real(path, **kwargs)

    monkeypatch.setattr(vqa2cli.video, "load_video", load_video)
    lines = []
    result = run(options(base, data, tmp_path / "run", max_steps=4), say=lines.append)  # one epoch: 4 records
    assert result.step == 4 and result.loss is not None
    assert sum("warning: skipped d.csv line 4:" in line and "d1.mp4" in line for line in lines) == 1
    log = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [entry["loss"] is None for entry in log].count(True) == 1 and log[-1]["skipped"] == 1
    assert (tmp_path / "run" / "config.json").is_file()


def test_bare_questions_train_on_the_prompt_ask_sends():
    from vqa2cli.finetune import ask_user_turn
    from vqa2cli.prompts import chatml, question_prompt

    trained = chatml([("user", ask_user_turn(" Is it sharp? ", 3, 48)), ("assistant", None)])
    assert trained == question_prompt("Is it sharp?", num_keyframes=3, num_frames=48)


def test_frozen_encoders_encode_each_video_once_with_the_same_result(base, data, tmp_path, monkeypatch):
    import vqa2cli.video

    real = vqa2cli.video.load_video
    decoded = []

    def load_video(path, **kwargs):
        decoded.append(Path(path).name)
        return real(path, **kwargs)

    monkeypatch.setattr(vqa2cli.video, "load_video", load_video)
    llm_only = dict(max_steps=6, batch_size=2, train=("language_model",))  # 3 epochs of the 4 records
    lines = []
    cached = run(options(base, data, tmp_path / "cached", **llm_only), say=lines.append)
    # Each video once, give or take the micro-batch decoded ahead while the previous one is encoded.
    assert set(decoded) == {"b1.mp4", "b2.mp4", "d1.mp4", "d2.mp4"}
    assert len(decoded) <= 4 + 2 * 2 and max(map(decoded.count, decoded)) <= 2
    assert any("encoded once" in line for line in lines)
    decoded.clear()
    plain = run(options(base, data, tmp_path / "plain", feature_cache_gb=0, **llm_only), say=quiet)
    assert len(decoded) >= 12  # every use (and the batches read ahead)
    a, b = weights(tmp_path / "cached"), weights(tmp_path / "plain")
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert cached.loss == plain.loss
    # Once anything before the LLM trains, its encodings change every step: no cache.
    decoded.clear()
    run(options(base, data, tmp_path / "projector", max_steps=6, batch_size=2,
                train=("language_model", "mm_projector")), say=quiet)
    assert len(decoded) >= 12  # every use (and the batches read ahead)


def test_videos_longer_than_the_position_table_are_sampled_down(tmp_path, vqa2):
    """Regression: finetune decoded with the default 2000-frame cap, so vqa2-tiny (48 positions) failed on any
    clip over ~2 s with "motion frames exceed the model's position table"."""
    from tests.fixtures.clips import make_clip

    folder = tmp_path / "data"
    folder.mkdir()
    make_clip(folder / "long.mp4", seconds=5, fps=24, size=(64, 64))  # 120 frames
    (folder / "mos.csv").write_text("video,mos\nlong.mp4,3.5\n")
    code, out, err = vqa2("finetune", "--stage", "2", str(folder), "--mos-range", "1", "5", "--model", "vqa2-tiny",
                          "--output", str(tmp_path / "out"), "--max-steps", "1", "--device", "cpu")
    assert code == 0, err
    assert "error" not in err and (tmp_path / "out" / "model.safetensors").exists()
