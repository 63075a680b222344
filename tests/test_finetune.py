"""Fine-tuning end to end on the tiny model: data made here, a few steps each, all on CPU."""

import json
import math
import os
import signal
import socket
import stat
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.fixtures.checkpoints import write_tiny_model_dir
from tests.fixtures.clips import make_clip
from tests.fixtures.finetune import finetune_options as options
from tests.fixtures.finetune import quiet, write_stage_data
from vqa2cli.errors import DataError, SetupError
from vqa2cli.finetune import FinetuneOptions, run
from vqa2cli.finetune.checkpoints import Checkpoints, checkpoint_dirs
from vqa2cli.finetune.output_folder import OutputFolder
from vqa2cli.finetune.schedule import lr_schedule, shard_order

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


def interrupt_after_step(monkeypatch, step: int):
    """A real SIGINT to the run once `step` is logged; returns the function that stops sending it."""
    append = OutputFolder.append_metrics

    def append_and_interrupt(folder, record):
        append(folder, record)
        if record["step"] == step:
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(OutputFolder, "append_metrics", append_and_interrupt)
    return lambda: monkeypatch.setattr(OutputFolder, "append_metrics", append)


def test_interrupted_then_resumed_equals_uninterrupted(base, data, tmp_path, monkeypatch, stop_signals_armed):
    lora = dict(max_steps=6, method="lora", train=("language_model", "mm_projector"))  # dropout draws from the RNG
    whole = run(options(base, data, tmp_path / "whole", **lora), say=quiet)
    assert whole.step == 6
    # a real SIGINT during step 3: the run finishes that step, checkpoints it and stops
    undo = interrupt_after_step(monkeypatch, 2)
    opts = options(base, data, tmp_path / "parts", **lora)
    first = run(opts, say=quiet)
    assert first.interrupted and first.step == 2 and first.checkpoint.name == "step-00000002"
    assert not (tmp_path / "parts" / "model.safetensors").exists()
    undo()
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


def test_a_checkpoint_from_before_an_option_existed_resumes_with_the_option_at_its_default(tmp_path):
    from vqa2cli.finetune.loop import check_resume

    opts = FinetuneOptions(stage=2, data=str(tmp_path), model="m", output=str(tmp_path / "out"))
    now = {**opts.resume_values(), "parts": ["mm_projector"], "base_model": "m", "data": "d", "world": 1,
           "total_steps": 5}
    older = {k: v for k, v in now.items() if k != "random_fragments"}
    check_resume(older, now, say=quiet)
    with pytest.raises(SetupError, match="random_fragments: False then, True now"):
        check_resume(older, {**now, "random_fragments": True}, say=quiet)


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


@pytest.fixture
def prepared():
    """(accelerator, weight, optimizer, schedule) of a one-tensor model, prepared as a run prepares its own."""
    from vqa2cli.finetune.loop import _accelerator

    with _accelerator("cpu") as accelerator:
        weight = torch.nn.Parameter(torch.ones(3))
        optimizer = torch.optim.AdamW([weight], lr=0.1)
        prepared_optimizer = accelerator.prepare_optimizer(optimizer, device_placement=False)
        yield accelerator, weight, prepared_optimizer, lr_schedule(optimizer, 10)


def draws():
    import random

    import numpy as np

    return random.random(), float(np.random.rand()), float(torch.rand(1))


def test_checkpoints_are_atomic_pruned_and_restore_the_run(tmp_path, prepared, monkeypatch):
    accelerator, weight, optimizer, scheduler = prepared
    checkpoints = Checkpoints(tmp_path, accelerator, keep=2)
    for step in (1, 2, 3):
        weight.grad = torch.full((3,), float(step))
        optimizer.step()
        scheduler.step()
        checkpoints.save(step, {"w": weight}, {"step": step})
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step-00000002", "step-00000003"]
    saved_weight, saved_moment = weight.detach().clone(), optimizer.state[weight]["exp_avg"].clone()
    saved_lr, expected_draws = optimizer.param_groups[0]["lr"], draws()  # what follows the save

    def crash(*args, **kwargs):
        raise OSError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", crash)
        with pytest.raises(OSError, match="disk full"):
            checkpoints.save(4, {"w": torch.zeros(3)}, {"step": 4})
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step-00000002", "step-00000003"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000002", "step-00000003"]

    weight.grad = torch.full((3,), 9.0)  # the run goes on, then is restored from step 3
    optimizer.step()
    scheduler.step()
    draws()
    loaded, meta = checkpoints.load(checkpoint_dirs(tmp_path)[-1], ["w"])
    assert torch.equal(loaded["w"], saved_weight) and meta["step"] == 3
    assert torch.equal(optimizer.state[weight]["exp_avg"], saved_moment)
    assert optimizer.param_groups[0]["lr"] == saved_lr
    assert draws() == expected_draws  # python, numpy and torch generators, read with weights_only
    with pytest.raises(SetupError, match="does not match the trained tensors"):
        checkpoints.load(checkpoint_dirs(tmp_path)[-1], ["w", "v"])


@pytest.mark.parametrize("victim", ["optimizer.bin", "random_states_0.pkl"])
def test_checkpoint_state_is_never_unpickled(tmp_path, prepared, victim):
    accelerator, weight, _, _ = prepared
    checkpoints = Checkpoints(tmp_path, accelerator, keep=1)
    path = checkpoints.save(1, {"w": weight}, {"step": 1})
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    torch.save({"x": Evil()}, path / victim)
    with pytest.raises(SetupError, match="cannot be read"):
        checkpoints.load(path, ["w"])
    assert not marker.exists()


def test_schedule_and_sharding():
    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([weight], lr=1.0)
    schedule, factors = lr_schedule(optimizer, 100), []
    for _ in range(100):
        factors.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    # 3 warm-up steps (3% of 100) reach the peak, then cosine from the peak over the 97 steps left
    assert factors[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    for step in (3, 50, 99):
        assert factors[step] == pytest.approx(0.5 * (1 + math.cos(math.pi * (step - 3) / 97)))
    assert 0 < factors[-1] < 0.001
    resumed = torch.optim.AdamW([weight], lr=1.0)
    lr_schedule(resumed, 100, start=57)
    assert resumed.param_groups[0]["lr"] == factors[57]  # replayed to a resumed step: bit for bit
    one_step = torch.optim.AdamW([weight], lr=1.0)
    lr_schedule(one_step, 1)
    assert one_step.param_groups[0]["lr"] == 1.0  # a one-step run trains at the peak
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


def test_cli_exit_codes_report_interrupt_and_resume(base, data, tmp_path, monkeypatch, vqa2, stop_signals_armed):
    out = tmp_path / "run"
    common = ["--stage", "2", "--model", base, "--output", out, "--max-steps", "3", "--device", "cpu"]
    code, _, err = vqa2("finetune", data / "s2", *common)
    assert code == 2 and "needs --mos-range LO HI" in err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "d.csv").write_text("video,mos\nmissing.mp4,3\n")
    code, _, err = vqa2("finetune", tmp_path / "bad", *common, "--mos-range", 1, 5)
    assert code == 2 and "d.csv line 2: video 'missing.mp4': file not found" in err and "--skip-invalid" in err

    append = OutputFolder.append_metrics

    # each stop signal (`kill`, `timeout`, a closed terminal) saves like Ctrl-C and exits 128 + its number
    for signum, expected in ((signal.SIGHUP, 129), (signal.SIGTERM, 143), (signal.SIGINT, 130)):
        def append_and_interrupt(folder, record, signum=signum):
            append(folder, record)
            signal.raise_signal(signum)

        monkeypatch.setattr(OutputFolder, "append_metrics", append_and_interrupt)
        stopped = ["--output", out.with_name(signum.name)] if signum != signal.SIGINT else []
        code, _, err = vqa2("finetune", data / "s2", *common, *stopped, "--mos-range", 1, 5)
        assert code == expected and "interrupted at step 1 of 3" in err and "--resume" in err, (signum, err)
    monkeypatch.setattr(OutputFolder, "append_metrics", append)
    code, _, err = vqa2("finetune", data / "s2", *common, "--mos-range", 1, 5, "--resume")
    assert code == 0 and "resuming from" in err and "done: 3 steps" in err
    assert (out / "config.json").is_file() and len((out / "metrics.jsonl").read_text().splitlines()) == 3


def test_parameter_selection_by_submodule_name():
    from tests.fixtures.models import make_tiny_model
    from vqa2cli.finetune.parts import configure_model

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
    from vqa2cli.finetune.examples import answer_loss, answer_span
    from vqa2cli.prompts import UGC_USER, training_example

    rows = [training_example([{"from": "human", "value": UGC_USER}, {"from": "gpt", "value": "Good, very good."}],
                             tiny_tokenizer),
            training_example([{"from": "human", "value": "<image><image>Is it sharp?"}, {"from": "gpt", "value": "No."},
                              {"from": "human", "value": "Why?"}, {"from": "gpt", "value": "Blur."}], tiny_tokenizer)]
    ids = [torch.tensor(r[0]) for r in rows]
    labels = [torch.tensor(r[1]) for r in rows]
    videos = [tiny_video(tiny_config, num_keyframes=2, num_motion=8, seed=s) for s in (0, 1)]
    with torch.no_grad():
        encoded = [tiny_model.encode_video(keyframes, motion) for keyframes, motion in videos]
        full = tiny_model(ids, encoded, labels=labels).loss
        keep = answer_span(labels)
        short = tiny_model(ids, encoded, logits_to_keep=keep).logits
    assert short.shape[1] == keep < 30
    assert float(answer_loss(short, labels, keep)) == pytest.approx(float(full), rel=1e-5)


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
    saved = load_file(checkpoint_dirs(tmp_path / "run")[-1] / "trainable.safetensors")
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
    from vqa2cli.finetune.examples import ask_user_turn
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


def test_random_fragments_are_new_each_time_and_the_same_after_a_resume(tmp_path, monkeypatch, stop_signals_armed):
    import vqa2cli.video

    folder = tmp_path / "data"
    folder.mkdir()
    for name in ("a", "b"):  # gradients: a crop's pixels depend on where it is cut
        make_clip(folder / f"{name}.mp4", size=(96, 80), frames=8, fps=8)
    (folder / "mos.csv").write_text("video,mos\na.mp4,4.5\nb.mp4,1.5\n")
    base = write_tiny_model_dir(tmp_path / "fragments", keyframe_fragments=4)  # 56 px: 4 x 4 crops of 14 px
    real, places = vqa2cli.video.load_video, []

    def load_video(path, **kwargs):
        places.append((Path(path).name, kwargs["fragment_places"]))
        return real(path, **kwargs)

    monkeypatch.setattr(vqa2cli.video, "load_video", load_video)
    # the projector alone trains: what the vision tower sees reaches the weights, the cache would apply
    jitter = dict(stage=2, data=str(folder), max_steps=4, train=("mm_projector",), mos_range=(1, 5),
                  random_fragments=True)
    lines = []
    run(options(base, folder, tmp_path / "whole", **jitter), say=lines.append)
    assert not any("encoded once" in line for line in lines)
    drawn = [p for _, p in places]
    assert all(p.shape == (4, 4, 2) for p in drawn) and len(drawn) >= 4
    assert len({p.tobytes() for p in drawn}) == len(drawn)  # each use of a clip cut anew
    undo = interrupt_after_step(monkeypatch, 2)
    opts = options(base, folder, tmp_path / "parts", **jitter)
    assert run(opts, say=quiet).interrupted
    undo()
    run(replace(opts, resume=True), say=quiet)
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "parts")
    assert all(torch.equal(a[n], b[n]) for n in a)
    # the centres (and so other weights) without the option
    places.clear()
    run(options(base, folder, tmp_path / "centred", **{**jitter, "random_fragments": False}), say=quiet)
    assert all(p is None for _, p in places)
    centred = weights(tmp_path / "centred")
    assert not torch.equal(a["mm_projector.0.weight"], centred["mm_projector.0.weight"])


def test_random_fragments_need_a_fragment_model(base, data, tmp_path):
    with pytest.raises(SetupError, match="--random-fragments: .* takes whole keyframes, not fragments"):
        run(options(base, data, tmp_path / "run", random_fragments=True), say=quiet)


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


def test_a_second_run_into_the_same_output_refuses_until_the_first_is_killed(base, data, tmp_path):
    """Regression (issue 27): two runs into one --output both started; their metrics interleaved and one ended
    with an internal FileNotFoundError. A run locks the folder for its life; a run killed by SIGKILL cannot
    release its lock, and the next run takes it over."""
    from vqa2cli.finetune.output_folder import LOCK

    out = tmp_path / "run"
    out.mkdir()
    hold = "import sys, time; from vqa2cli.files import FolderLock; FolderLock(*sys.argv[1:]).acquire(); " \
           "print('held', flush=True); time.sleep(600)"
    holder = subprocess.Popen([sys.executable, "-c", hold, str(out), LOCK], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(SetupError) as refused:
            run(options(base, data, out, max_steps=1), say=quiet)
        message = str(refused.value)
        assert f"--output {out} is in use by another vqa2 finetune (pid {holder.pid} on {socket.gethostname()}, " \
               "started " in message and "\n" not in message
        assert sorted(p.name for p in out.iterdir()) == [LOCK]  # the holder's folder is left alone
    finally:
        holder.kill()
        holder.wait()
    lines = []
    result = run(options(base, data, out, max_steps=1), say=lines.append)
    assert result.step == 1 and (out / "model.safetensors").is_file()
    assert any(f"(pid {holder.pid} on " in line and "no longer running" in line for line in lines), lines
    assert not (out / LOCK).exists()  # released when the run ended


@pytest.mark.parametrize("mask", [0o022, 0o077], ids=["umask-022", "umask-077"])
def test_saved_files_follow_the_umask(base, data, tmp_path, mask):
    """Regression (issue 27): model.safetensors and the checkpoints' tensors were written 0600 whatever the
    umask (safetensors creates its files private), so a group could not read a model shared with it."""
    out = tmp_path / "run"
    previous = os.umask(mask)
    try:
        run(options(base, data, out, max_steps=1), say=quiet)
    finally:
        os.umask(previous)
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {"model.safetensors", "config.json", "tokenizer.json", "trainable.safetensors", "optimizer.bin",
            "random_states_0.pkl", "meta.json", "metrics.jsonl"} <= {p.name for p in files}
    assert {oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {oct(0o666 & ~mask)}
    folders = [out, *(p for p in out.rglob("*") if p.is_dir())]
    assert {oct(stat.S_IMODE(p.stat().st_mode)) for p in folders} == {oct(0o777 & ~mask)}


def test_a_folder_left_by_a_validation_stop_is_a_fresh_output(base, data, tmp_path):
    """Regression (issue 27): a run stopped at validation leaves invalid_records.txt alone in --output; the next
    run takes the folder as new, and once its data is valid no earlier report claims invalid records."""
    folder, out = tmp_path / "fixed", tmp_path / "run"
    folder.mkdir()
    os.link(data / "b1.mp4", folder / "b1.mp4")
    (folder / "d.csv").write_text("video,question,answer\nb1.mp4,q?,yes\nmissing.mp4,q?,no\n")
    with pytest.raises(DataError, match="1 of 2 records"):
        run(options(base, data, out, data=str(folder), max_steps=1), say=quiet)
    assert sorted(p.name for p in out.iterdir()) == ["invalid_records.txt"]
    (folder / "d.csv").write_text("video,question,answer\nb1.mp4,q?,yes\n")
    assert run(options(base, data, out, data=str(folder), max_steps=1), say=quiet).step == 1
    assert not (out / "invalid_records.txt").exists()


def test_options_are_declared_once_and_checked_the_same_from_python_and_the_cli(base, data, tmp_path, vqa2):
    from dataclasses import fields

    code, out, _ = vqa2("finetune", "--help")
    for field in fields(FinetuneOptions):
        spec = field.metadata["option"]
        shown = field.name.upper() if spec.argument else (spec.flags or ("--" + field.name.replace("_", "-"),))[-1]
        assert shown in out and spec.help.split()[0] in out, field.name
    with pytest.raises(SetupError, match=r"^--batch-size 0: must be at least 1$"):
        run(options(base, data, tmp_path / "a", batch_size=0), say=quiet)
    with pytest.raises(SetupError, match=r"^--method 'dora': expected one of full, lora, qlora$"):
        run(options(base, data, tmp_path / "a", method="dora"), say=quiet)
    common = ["--model", base, "--output", tmp_path / "b", "--device", "cpu"]
    code, _, err = vqa2("finetune", "--stage", "2", data / "s2", *common, "--mos-range", 5, 1)
    assert code == 2 and "error: --mos-range 5 1: LO must be below HI" in err
    code, _, err = vqa2("finetune", "--stage", "3", data / "s3", *common, "--lora-dropout", 1)
    assert code == 2 and "--lora-dropout" in err and "0<=x<1" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
