"""Build `vqa2-tiny` from nothing, with vqa2's own commands, and measure it on held-out clips.

    python tools/build_vqa2_tiny.py                      # full build into weights/vqa2-tiny
    python tools/build_vqa2_tiny.py --work /tmp/b --out /tmp/b/model --train-clips 40 --heldout-clips 20 \
        --steps 5,5,5,5                                    # a quick smoke run

Steps (each a `vqa2` command, so the build exercises what users run):
 1. `vqa2 synth` training clips (seed 1, default content settings) and held-out clips (seed 2, other motion
    speeds, texture detail and object counts);
 2. a fresh tiny model directory: `tiny_config` widened a little, random weights, our own BPE tokenizer;
 3. `vqa2 finetune` stage 1 -> 2 -> 3, each starting from the previous stage's output, then a yes/no pass:
    stage 3 once more with its yes/no questions repeated (and the scoring records), the LLM alone training;
 4. `vqa2 eval` on the held-out MOS labels and on the held-out "Is there <distortion> in this video?" questions;
 5. the model files, a model card with the measured numbers, and `eval.json` copied into --out.

Deviations from the release's recipe, because this model starts from random weights rather than from a
pretrained LLaVA-OneVision: the LLM and text embeddings train too (the release freezes the LLM in stage 1 and
the text embeddings throughout, which only makes sense for a pretrained LLM), at a learning rate of 1e-3, the
vision tower included (the release slows it); the patch embedding and the fast pathway's stem are fixed filters
that never train (see PARTS, `dct_patch_embedding_`, `temporal_difference_stem_`), and the vision tower's
layers start as identities (`identity_vision_layers_`) and the keyframe projector as a rectifier of the DCT
channels (`rectifying_projector_`); stage 3 also replays the stage-2 scoring records so
that learning to answer questions does not erase the score; a yes/no pass follows stage 3 (`mixed_stage3`).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
VQA2 = [sys.executable, "-m", "vqa2cli"]
# Every stage trains every part except the two fixed first layers (the DCT patch embedding and the
# temporal-difference stem, see below), all at lr 1e-3. Held-out SRCC after stage 2, on the build's data: 0.69
# this way with 600 stage-1 + 400 stage-2 steps (0.72 in the shipped build, 600 + 600), against 0.57-0.61 for
# the previous recipe (all of stage 1 trainable, then the motion encoder frozen and the vision tower at lr/10)
# and 0.59 with the towers frozen in stage 1. Why the first layers stay fixed: the towers alone, trained to
# regress MOS, reached 0.72-0.74 with them fixed and 0.60-0.70 with them trainable (single runs).
# Hard level words stay: soft targets (the MOS split between the two neighbouring levels, so the expected
# level weight equals MOS/100), used for stage 2 and every scoring replay, lifted stage 2 to 0.76 at seed 0
# (0.67 at seed 1) but ended at 0.772 / 0.758 against this recipe's 0.786 / 0.765 (experiment, not landed).
TOWERS = "vision_tower.embeddings.position_embedding,vision_tower.encoder," \
         "motion_encoder.blocks.0.multipathway_blocks.1.norm,motion_encoder.blocks.1,motion_encoder.blocks.2," \
         "motion_encoder.blocks.3,motion_encoder.blocks.4,motion_encoder.position_embedding"
LLM_PARTS = "language_model,language_model.model.embed_tokens"
PARTS = TOWERS + ",mm_projector,image_newline,motion_projector," + LLM_PARTS
TRAIN_SEED, HELDOUT_SEED = 1, 2
# 4 s at 12 fps: every frame of a training clip has a trained position row; longer videos are sampled down.
MAX_MOTION_FRAMES = 48
# Training clips: photographs (tools/training_photos.py) a camera moves over, a fifth procedural; sizes from 2x to
# ~4x the keyframes' 128 px, so damage is made at a resolution above the model's, as in real footage; every
# distortion of synth, the synthetic 8x8 blocking included as one of eleven (a minority).
TRAIN_DATA = ["--size", "256x144,320x180,384x216,480x270,240x240", "--fps", "12", "--seconds", "4",
              "--distortions", "blur,motion_blur,noise,compression,upscaling,blocking,overexposure,underexposure,"
              "stutter,flicker,shake"]
# The synthetic held-out set of the first vqa2-tiny, unchanged: procedural content at 128 px with the eight
# distortions it was built with, other motion speeds, texture detail and object counts than any training.
HELDOUT_CONTENT = ["--speed", "1,4", "--detail", "1.2,1.8", "--objects", "3,8",
                   "--distortions", "blur,noise,blocking,overexposure,underexposure,stutter,flicker,shake"]
YES_NO = re.compile(r"^Is there (.+) in this video\?$")
YES_NO_REPEATS = 3
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def tiny_vqa2_config():
    """`tiny_config` with frames big enough to see noise, blocking and 1-px motion in 128 px clips."""
    from vqa2cli.config import MotionConfig, TextConfig, VisionConfig, tiny_config

    return tiny_config(
        # 128 px keyframes in 16 px patches: an 8x8 grid pooled to 4x4 = 16 tokens per keyframe.
        vision=VisionConfig(hidden_size=96, intermediate_size=192, num_hidden_layers=3, num_attention_heads=4,
                            image_size=128, patch_size=16),
        # The fast pathway gets 4 stem channels (tiny_config: 2). 48 positions = one synth clip (4 s at 12 fps):
        # longer videos are sampled down to 48 motion frames, so no untrained position row is ever used.
        motion=MotionConfig(model_depth=18, stem_dim_outs=(32, 4), max_frames=MAX_MOTION_FRAMES),
        text=TextConfig(vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                        rope_theta=10000.0),
        # Keyframes as 8 x 8 crops of 16 px at the video's own resolution, one per patch: a whole frame shrunk
        # to 128 px hides codec damage and noise (docs/vqa2-tiny.md, v4). Scoring averages 3 x 3 shifted cuts:
        # within-clip SRCC on the real-footage set, seeds 0 / 1 / 2, compression +0.81 / +0.86 / +0.66 ->
        # +0.94 / +0.92 / +0.71 and blur +0.84 / +0.91 / +0.68 -> +0.97 / +0.99 / +0.70 (docs/vqa2-tiny.md).
        pooled_grid=4, keyframe_size=128, keyframe_fragments=8, fragment_shifts=3, motion_size=64,
    )


def dct_luma_channels(width: int) -> int:
    """How many of the patch embedding's `width` channels are luma DCT filters (the rest, a third rounded
    down to an even count, are colour differences)."""
    return width - 2 * (width // 6)


def dct_patch_embedding_(conv) -> None:
    """Start the vision tower's patch embedding as a 2D DCT basis: luma filters spread from the lowest to the
    highest frequency, then colour-difference filters (B-R, R-G) at the lowest ones. Each basis is scaled
    by 1 + its radial frequency, which roughly whitens a natural image's 1/f spectrum.

    A random projection of a patch is dominated by its low frequencies, so the tower began blind to fine
    detail: trained alone on these keyframes it barely learned blur, noise or blocking (held-out accuracy
    mostly 0-30% over 300-1000 steps); started from this basis it found them within 200 steps (65-90%).
    Measured with a ViT-only classifier on the synth keyframes; the weights stay trainable."""
    import math

    import torch

    out, _, p, _ = conv.weight.shape
    n = torch.arange(p, dtype=torch.float64)

    def basis(u, v):
        bu, bv = (torch.cos(math.pi * (2 * n + 1) * f / (2 * p)) for f in (u, v))
        b = torch.outer(bu / bu.norm(), bv / bv.norm())
        return b * (1 + math.hypot(u, v))

    by_radius = sorted(((u, v) for u in range(p) for v in range(p)), key=lambda f: (f[0] ** 2 + f[1] ** 2, f))
    n_luma = dct_luma_channels(out)
    n_colour = out - n_luma
    spread = torch.linspace(0, len(by_radius) - 1, n_luma).round().long().tolist()
    weight = torch.zeros(out, 3, p, p, dtype=torch.float64)
    for row, index in enumerate(spread):
        weight[row] = basis(*by_radius[index]) / math.sqrt(3)
    for k, freq in enumerate(by_radius[: n_colour // 2]):
        b = basis(*freq) / math.sqrt(2)
        weight[n_luma + 2 * k, 2], weight[n_luma + 2 * k, 0] = b, -b  # B - R
        weight[n_luma + 2 * k + 1, 0], weight[n_luma + 2 * k + 1, 1] = b, -b  # R - G
    with torch.no_grad():
        conv.weight.copy_(weight.to(conv.weight.dtype))
        conv.bias.zero_()


def rectifying_projector_(projector, n_luma: int, gain: float = 4.0) -> None:
    """Start the keyframe projector as a rectifier of the luma DCT channels: hidden unit pair 2c, 2c+1 is
    GELU(+g x_c), GELU(-g x_c); output c is their sum / g (~|x_c|, the channel's energy) and output n_luma + c
    their difference / g (exactly x_c, since GELU(z) - GELU(-z) = z). The colour channels start unread.

    Bilinear pooling averages 2x2 patches after the projector: of signed DCT coefficients, the average keeps
    little of the fine detail that blur and compression remove and noise adds; of their magnitudes it keeps
    the patches' spectrum, and the LLM's RMSNorm turns that into its shape, whatever the contrast. From a
    random projector, stage 2 alone (600 steps, seed 0) barely learned spatial damage: on the real-footage
    held-out set, blur sigma 6 lowered a clip's score by 0.00-0.3 (mostly < 0.05) and the overall SRCC was
    0.356; from this one, by 0.1-0.4, and 0.473. A random second layer after the same first one: 0.336."""
    import torch

    first, second = projector[0], projector[2]
    pairs = min(n_luma, first.out_features // 2)
    with torch.no_grad():
        for linear in (first, second):
            linear.weight.zero_()
            linear.bias.zero_()
        for c in range(pairs):
            first.weight[2 * c, c], first.weight[2 * c + 1, c] = gain, -gain
            second.weight[c, 2 * c] = second.weight[c, 2 * c + 1] = 1 / gain
            if pairs + c < second.out_features:
                second.weight[pairs + c, 2 * c], second.weight[pairs + c, 2 * c + 1] = 1 / gain, -1 / gain


def temporal_difference_stem_(conv) -> None:
    """Start the fast pathway's stem filters as +/- the first and +/- the second temporal difference of
    spatially blurred luma (ReLU follows, so each pair measures both signs).

    Stutter is a run of zero differences, flicker a global oscillating one, shake an irregular one (a large
    second difference where a smooth pan has almost none). From random filters the 4-channel stem did not
    start learning these in 300 steps (loss stayed at chance); from these it told them apart within 100
    (held-out stutter/flicker/shake 60-100%), measured with the motion branch alone on synth clips."""
    import torch

    out, _, kt, kh, kw = conv.weight.shape
    y, x = torch.meshgrid(torch.arange(kh) - kh // 2, torch.arange(kw) - kw // 2, indexing="ij")
    blur = torch.exp(-(x**2 + y**2) / (2 * 1.5**2))
    blur = blur / blur.sum()
    c = kt // 2
    first = torch.zeros(kt)
    first[c - 1], first[c] = -1.0, 1.0
    second = torch.zeros(kt)
    second[c - 1], second[c], second[c + 1] = 1.0, -2.0, 1.0
    # x4: the frames are normalised to [-1, 1], so a one-grey-level change is ~0.008 before this gain
    filters = [4 * d[:, None, None] * blur / 3 for d in (first, -first, second, -second)]
    with torch.no_grad():
        conv.weight.zero_()
        for k in range(out):
            conv.weight[k] = filters[k % len(filters)][None]


def identity_vision_layers_(tower) -> None:
    """Zero each vision layer's attention output and second MLP projection: every layer starts as the
    identity on its residual stream, so the untrained tower outputs its embeddings (DCT coefficients plus
    position embedding) unchanged.

    With random layers the tower's output kept little of what the patch embedding sees: a ridge probe
    predicting held-out MOS from the mean/std of the projected keyframe tokens fell from 0.46-0.51 (patch
    embedding) to 0.27-0.30. From this start, stage 2 alone with the towers frozen reached held-out SRCC 0.65
    in 500 steps."""
    import torch

    with torch.no_grad():
        for layer in tower.encoder.layers:
            for linear in (layer.self_attn.out_proj, layer.mlp.fc2):
                linear.weight.zero_()
                linear.bias.zero_()


def init_model(directory: Path, seed: int) -> dict:
    import torch

    from vqa2cli.checkpoint import save_model_dir
    from vqa2cli.modeling import VQA2Model
    from vqa2cli.tokenizer import build_tokenizer

    torch.manual_seed(seed)
    config = tiny_vqa2_config()
    model = VQA2Model(config)
    with torch.no_grad():
        # nn.Embedding's N(0, 1) rows are ~15x the untrained fast pathway's features (std ~0.06, measured):
        # motion tokens would be mostly position noise, and the motion branch barely learned.
        model.motion_encoder.position_embedding.weight.normal_(std=0.02)
    dct_patch_embedding_(model.vision_tower.embeddings.patch_embedding)
    # Tried and not kept: 8 more vision channels, and layer 0's MLP set to write into 6 of them each band's
    # mean |luma DCT coefficient| after the layer norm (so a per-patch spectrum shape that contrast does not
    # change; radial bands 2-3, 3-5, 5-8, 8-11, 11-14, 14+, via GELU(2x)+GELU(-2x) of the coefficient minus a
    # channel held at zero). The tower alone, regressing MOS on clean and spatially distorted clips, went from
    # SRCC 0.60-0.65 to 0.72-0.76, and the full build saw blur (held-out within-blur SRCC 0.49, the shipped one 0.04),
    # but scored 0.760 / yes/no 84.8% (seed 0) and 0.766 / 77.0% (seed 1), and 0.499 / 59.5% on
    # photos_vqa2_tiny.py's set (seed 0): worse SRCC on both sets (this recipe: 0.786 and 0.765 at seeds 0 and 1).
    identity_vision_layers_(model.vision_tower)
    rectifying_projector_(model.mm_projector, n_luma=dct_luma_channels(config.vision.hidden_size))
    temporal_difference_stem_(model.motion_encoder.blocks[0].multipathway_blocks[1].conv)
    tokenizer = build_tokenizer(config.text.vocab_size)
    save_model_dir(model, tokenizer, directory, card="# vqa2-tiny, random initialisation\n")
    return {"parameters": sum(p.numel() for p in model.parameters())}


def run(args: list[str], log: Path) -> str:
    """One vqa2 command; stderr goes to `log`, stdout is returned, and the build stops if it fails."""
    print("$ vqa2 " + " ".join(args), flush=True)
    with open(log, "w") as handle:
        done = subprocess.run(VQA2 + args, stdout=subprocess.PIPE, stderr=handle, text=True)
    if done.returncode != 0:
        sys.exit(f"vqa2 {args[0]} failed (exit {done.returncode}); see {log}:\n" + log.read_text()[-2000:])
    return done.stdout


def yes_no_questions(stage3: Path, out: Path) -> int:
    """The held-out questions asking whether a named distortion is present (answers Yes./No.)."""
    with open(stage3, newline="") as src, open(out, "w", newline="") as dst:
        rows = [row for row in csv.DictReader(src) if YES_NO.match(row["question"])]
        writer = csv.DictWriter(dst, fieldnames=["video", "question", "answer"])
        writer.writeheader()
        writer.writerows(rows)
    return len(rows)


def mixed_stage3(train: Path, yes_no_repeats: int = 1) -> Path:
    """Stage-3 data with each yes/no question `yes_no_repeats` times, plus the stage-2 scoring records (LLaVA
    JSON), shuffled by finetune's seeded order: stage 3's data (once) and the yes/no pass's (YES_NO_REPEATS).

    Not the stage-1 records: replaying them as well kept stage 1's skill (held-out, the right name is the
    likeliest of the kind's names for 83-93% of clips, against 30-34% without) but cost held-out SRCC
    (0.73-0.74 against 0.79, 1500 stage-3 steps).

    Why the yes/no pass: after stage 3 both halves of the answer are in the LLM's state at the answer
    position (linear probes read the asked distortion 100% right and the distortions present well above their
    base rates; a small MLP on that state answers 86% of the held-out questions), but the LLM learns to combine
    them only after some 10,000 yes/no examples, and stage 3 (a third of its records yes/no, all parts
    training) was still at 58% after 1500 steps. With the towers frozen `vqa2 finetune` encodes each clip once
    (its FeatureCache), and a step costs 0.25 s instead of 0.69 with everything training (0.51 before the cache).
    Measured from the stage-3 weights: yes_no_repeats=3 -> 80.2% held-out and SRCC 0.786 after
    2500 steps (the default; 0.767 and 57.8% before the pass), 78% and 0.795 after 2200; at 2200, 2 repeats
    -> SRCC 0.777 and 65 of tests/test_tiny_model.py's 80 yes/no questions right (3 repeats: 68); the yes/no
    and scoring records alone reached 80% in 2500 steps but the model then answered every open question with
    "Yes." or "No."; stage 3's data without repeats was at 64% after 2000 steps."""
    stage3 = json.loads((train / "stage3.json").read_text())
    yes_no = [r for r in stage3 if YES_NO.match(r["conversations"][0]["value"])]
    records = stage3 + yes_no * (yes_no_repeats - 1) + json.loads((train / "stage2.json").read_text())
    out = train / f"stage3_yes_no_x{yes_no_repeats}_with_scoring.json"
    out.write_text(json.dumps(records))
    return out


def finetune(stage: int, data: Path, base: Path, out: Path, steps: int, args, log: Path, parts: str = PARTS) -> None:
    extra = ["--mos-range", "0", "100"] if stage == 2 else []
    if stage == 2 and args.random_fragments:
        extra.append("--random-fragments")
    run(["finetune", "--stage", str(stage), str(data), "--model", str(base), "--output", str(out),
         "--train", parts, "--lr", str(args.lr), "--vision-lr", str(args.lr), "--max-steps", str(steps),
         "--batch-size", str(args.batch_size), "--seed", str(args.seed), "--save-every", str(max(steps, 1)),
         "--keep", "1", "--device", "cpu", *extra], log)


def evaluate(model: Path, labels: Path, log: Path) -> dict:
    predictions = labels.with_suffix(".predictions.csv")
    out = run(["eval", str(labels), "--model", str(model), "--device", "cpu", "--json", "--max-new-tokens", "8",
               "--predictions", str(predictions), "--quiet"], log)
    return json.loads(out)[0]


def real_footage(model: Path, heldout: Path, work: Path, logs: Path) -> dict:
    """Per-family within-source SRCC and overall SRCC on the real-footage held-out set (tools/real_footage.py)."""
    predictions = work / "real-footage.predictions.csv"
    run(["eval", str(heldout / "labels.csv"), "--model", str(model), "--device", "cpu", "--json", "--quiet",
         "--predictions", str(predictions)], logs / "eval-real-footage.log")
    done = subprocess.run([sys.executable, str(HERE / "real_footage.py"), "report", str(heldout), str(predictions),
                           "--json"], stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(done.stdout)


def model_card(info: dict) -> str:
    s, q, real = info["eval"]["scores"], info["eval"]["yes_no"], info["eval"].get("real_footage")
    sizes, config = info["data"], info["config"]
    grid, size = config.get("keyframe_fragments", 0), config["keyframe_size"]
    keyframes = (f"{size} px keyframes made of {grid}x{grid} crops of {size // grid} px at the video's own resolution"
                 if grid else f"{size} px keyframes")
    shifts = config.get("fragment_shifts", 1)
    if shifts > 1:
        keyframes += f" (a score is the mean over {shifts}x{shifts} cuts, the crops shifted within their cells)"

    # --data: the clips came from an earlier build, so the minutes leave out making them
    reused = ", not counting the clips, reused from an earlier build" if info["data"].get("reused") else ""
    real_table = "(not measured in this build: pass --real-heldout)"
    if real:
        families = [name for name in real if name != "overall"]
        real_table = ("| " + " | ".join(families) + " | overall SRCC |\n|" + "---|" * (len(families) + 1) + "\n| "
                      + " | ".join(f"{real[name]:+.2f}" for name in families) + f" | {real['overall']:.3f} |")
    return f"""# vqa2-tiny

A tiny model with the VQA² architecture (SigLIP-style vision tower, SlowFast-R18 fast pathway, Qwen2
decoder), trained from random weights by `tools/build_vqa2_tiny.py` with `vqa2 synth` data and `vqa2
finetune` stages 1 -> 2 -> 3. **It is a demo, CI and offline model, not a substitute for the released VQA²
checkpoints**: 4 M parameters, {keyframes}, trained on {sizes["train_clips"]} four-second clips. It ranks
common damage of real footage the right way round (numbers below); its absolute scores are rough.

- parameters: {info["parameters"]:,} (float32, {info["weights_bytes"] / 2**20:.1f} MiB safetensors)
- vision: {config["vision"]["num_hidden_layers"]} layers of width {config["vision"]["hidden_size"]}, \
{keyframes}, {config["vision"]["patch_size"]} px patches, \
{config["pooled_grid"]}x{config["pooled_grid"]} tokens per keyframe; the patch embedding is a fixed 2D DCT basis,
  and the projector starts as a rectifier of its luma channels (magnitude and value of each)
- motion: SlowFast depth {config["motion"]["model_depth"]}, stem widths {config["motion"]["stem_dim_outs"]} \
(a fixed temporal-difference stem), {config["motion_size"]} px, at most {config["motion"]["max_frames"]} motion \
frames (longer videos are sampled down)
- language model: {config["text"]["num_hidden_layers"]} Qwen2 layers of width {config["text"]["hidden_size"]}; \
tokenizer: `build_tokenizer({config["text"]["vocab_size"]})`, the five level words single tokens
- training data: {sizes["train_clips"]} clips from `vqa2 synth --images PHOTOS --seed {TRAIN_SEED} {" ".join(TRAIN_DATA)}`:
  a camera moving over 45 photographs from Debian packages (`tools/training_photos.py`: mate-backgrounds,
  plasma-workspace-wallpapers, ukui-wallpapers, opencv-doc; GPL-2+, CC-BY-SA, Apache-2.0/BSD), a fifth
  procedural; damage by real encoders (x264, VP9, MPEG-4), blur, motion blur, sensor noise, low resolution,
  exposure, stutter, flicker and shake, plus the synthetic blocking as one type of eleven. Records: stage 1
  {sizes["stage1"]}, stage 2 {sizes["stage2"]}, stage 3 {sizes["stage3"]} (+ the stage-2 records replayed)
- steps (batch {info["batch_size"]}, lr {info["lr"]:g}, cosine, seed {info["seed"]}): stage 1 {info["steps"][0]}, \
stage 2 {info["steps"][1]}{" (fragments at random places: `--random-fragments`)" if info["random_fragments"] else ""}, \
stage 3 {info["steps"][2]}; every part trains except the two fixed first layers; then
  a yes/no pass of {info["steps"][3]} steps (stage 3 again with its yes/no questions {YES_NO_REPEATS} times over and
  the stage-2 records; the language model alone training)

## Real footage with real damage (held out)

`tools/real_footage.py make`: 12 of scikit-image's photographs panned at their own resolution and OpenCV's
sample videos `vtest.avi` and `tree.avi`, none of them in training, each clean and with five ffmpeg-style
damage ladders of four levels (x264 CRF 30-49, Gaussian blur sigma 1-6 px, Gaussian noise sigma 5-30,
frame-rate stutter keeping every 2nd-8th frame, brightness flicker up to 5-30 levels). Each family's figure is
the Spearman correlation between damage level and score within each source (clean plus four levels),
averaged over the sources: 1 is every ladder ranked right, negative is backwards.

{real_table}

## Synthetic held-out set (the first vqa2-tiny's)

{sizes["heldout_clips"]} clips from `vqa2 synth --seed {HELDOUT_SEED} {" ".join(HELDOUT_CONTENT)}` (procedural content
at 128 px, other seed and content settings than any training), evaluated with `vqa2 eval`:

| MOS (`labels.csv`, {s["count"]} videos) | SRCC | PLCC | KRCC | RMSE (0-100) |
|---|---|---|---|---|
| vqa2-tiny | {s["srcc"]:.3f} | {s["plcc"]:.3f} | {s["krcc"]:.3f} | {s["rmse"]:.1f} |

"Is there <distortion> in this video?" ({q["count"]} questions, half Yes, half No): accuracy {q["accuracy"]:.1%}.

Reproduce (the numbers above, and `eval.json` beside this card; {info["build_minutes"]:.0f} minutes on the 2 CPU
cores it was built on{reused}):

```
python tools/training_photos.py photos/
python tools/real_footage.py make real-heldout/ --videos OPENCV_SAMPLES/   # vtest.avi, tree.avi (opencv-doc)
python tools/build_vqa2_tiny.py --images photos/ --real-heldout real-heldout/ --seed {info["seed"]}
```
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "vqa2-tiny-build",
                        help="data, stage outputs, logs (replaced)")
    parser.add_argument("--out", type=Path, default=HERE.parent / "weights" / "vqa2-tiny",
                        help="where the shipped model goes (the repository's weights/vqa2-tiny)")
    # Training clips with synth's default content. Adding `leaves` (dead leaves, a fifth of the 700 clips) gave
    # held-out SRCC 0.752 / 0.726 and yes/no 74.8% / 80.5% at seeds 0 / 1, and on photos_vqa2_tiny.py's set
    # 0.543 / 0.624 (this model: 0.600): no better on either.
    parser.add_argument("--images", type=Path, required=True,
                        help="the training photographs (python tools/training_photos.py DIR)")
    parser.add_argument("--real-heldout", type=Path,
                        help="a real-footage held-out set (python tools/real_footage.py make DIR) to measure on")
    parser.add_argument("--data", type=Path,
                        help="reuse the train/ and heldout/ folders of an earlier build's --work: the clips do not "
                             "depend on --seed (synth is deterministic), so seeds can share them")
    parser.add_argument("--train-clips", type=int, default=1000)
    parser.add_argument("--heldout-clips", type=int, default=200)
    # More steps for stages 2 and 3 (600,900,1100,2500: 42 minutes) gave held-out SRCC 0.750 and yes/no 81.0%,
    # against 0.786 and 80.2% with these (one run each).
    parser.add_argument("--steps", default="600,600,700,2500",
                        help="optimizer steps of stages 1, 2, 3 and the yes/no pass")
    # With --steps 600,1200,700,2500 it lifted stage 2's real-footage SRCC (seeds 0 / 1: 0.596 / 0.445 against
    # 0.567 / 0.354), but the finished builds were no better (0.57 / 0.43 against 0.56 / 0.46): docs/vqa2-tiny.md.
    parser.add_argument("--random-fragments", action="store_true",
                        help="stage 2 cuts each clip's fragments at random places (vqa2 finetune --random-fragments)")
    parser.add_argument("--batch-size", type=int, default=8)
    # --lr 5e-4 did not make builds steadier: held-out SRCC 0.753 / 0.688, yes/no 84.8% / 73.8% at seeds 0 / 2.
    parser.add_argument("--lr", type=float, default=1e-3)
    # Seeds 0 (shipped), 1 and 2 gave held-out SRCC 0.786, 0.765 and 0.661, yes/no 80.2%, 83.3% and 69.8%:
    # judge a change of recipe by several seeds, never by one build.
    parser.add_argument("--seed", type=int, default=0, help="initialisation and data order")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per command; 1 leaves the other core to video decoding (prefetch)")
    args = parser.parse_args()
    steps = [int(s) for s in args.steps.split(",")]
    if len(steps) != 4:
        parser.error("--steps needs four numbers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the build never needs the network
    # A tiny model's ops are too small to gain from a second thread, and on a busy machine OpenMP's
    # spinning threads made training steps 3-10x slower (measured); decoding runs on its own thread anyway.
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(args.threads)

    work = args.work.resolve()
    if work.exists():
        shutil.rmtree(work)
    logs = work / "logs"
    logs.mkdir(parents=True)
    began = time.monotonic()
    timings = {}

    def mark(name, start):
        timings[name] = round(time.monotonic() - start, 1)
        print(f"  {name}: {timings[name]:.0f} s", flush=True)

    t = time.monotonic()
    train, heldout = work / "train", work / "heldout"
    if args.data:
        for name in ("train", "heldout"):
            shutil.copytree(args.data / name, work / name)
    else:
        run(["synth", str(train), "--images", str(args.images), "--count", str(args.train_clips), "--seed",
             str(TRAIN_SEED), *TRAIN_DATA, "--quiet"], logs / "synth-train.log")
        run(["synth", str(heldout), "--count", str(args.heldout_clips), "--seed", str(HELDOUT_SEED),
             *HELDOUT_CONTENT, "--quiet"], logs / "synth-heldout.log")
    n_questions = yes_no_questions(heldout / "stage3.csv", heldout / "yes_no.csv")
    mark("synth", t)

    t = time.monotonic()
    info = init_model(work / "init", args.seed)
    mark("init", t)

    base = work / "init"
    stage_data = [train / "stage1.csv", train / "stage2.csv", mixed_stage3(train)]
    for stage, (data, n) in enumerate(zip(stage_data, steps), start=1):
        t = time.monotonic()
        finetune(stage, data, base, work / f"stage{stage}", n, args, logs / f"stage{stage}.log")
        base = work / f"stage{stage}"
        mark(f"stage{stage}", t)
    t = time.monotonic()
    finetune(3, mixed_stage3(train, YES_NO_REPEATS), base, work / "yes-no-pass", steps[3], args,
             logs / "yes-no-pass.log", parts=LLM_PARTS)
    base = work / "yes-no-pass"
    mark("yes-no-pass", t)

    t = time.monotonic()
    scores = evaluate(base, heldout / "labels.csv", logs / "eval-scores.log")
    yes_no = evaluate(base, heldout / "yes_no.csv", logs / "eval-yes-no.log")
    real = real_footage(base, args.real_heldout, work, logs) if args.real_heldout else None
    mark("eval", t)

    def rows(path):
        with open(path, newline="") as handle:
            return sum(1 for _ in csv.DictReader(handle))

    info.update(
        config=json.loads((base / "config.json").read_text()),
        weights_bytes=(base / "model.safetensors").stat().st_size,
        data={"train_clips": args.train_clips, "heldout_clips": args.heldout_clips, "reused": bool(args.data),
              "stage1": rows(train / "stage1.csv"), "stage2": rows(train / "stage2.csv"),
              "stage3": rows(train / "stage3.csv"), "heldout_yes_no": n_questions},
        steps=steps, random_fragments=args.random_fragments, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
        eval={"scores": {"count": scores["evaluated"], **{k: scores[k] for k in ("srcc", "plcc", "krcc", "rmse")}},
              "yes_no": {"count": yes_no["evaluated"], "accuracy": yes_no["accuracy"]}, "real_footage": real},
        timings_s=timings, build_minutes=(time.monotonic() - began) / 60,
    )

    out = args.out.resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for name in MODEL_FILES:
        shutil.copy2(base / name, out / name)
    (out / "README.md").write_text(model_card(info))
    (out / "eval.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info["eval"], indent=2))
    print(f"vqa2-tiny written to {out} in {info['build_minutes']:.1f} minutes")


if __name__ == "__main__":
    main()
