import dataclasses
import warnings

import pytest
import torch

from tests.fixtures.checkpoints import RELEASED_CONFIG
from tests.fixtures.models import make_tiny_model, tiny_video
from vqa2cli import prompts
from vqa2cli.config import VQA2Config
from vqa2cli.config import tiny_config as make_tiny_config
from vqa2cli.modeling import (KEYFRAME, MOTION, NEWLINE, PAD, TEXT, EncodedVideo, LongSequenceWarning, VQA2Model,
                              motion_splits)

IMG = prompts.IMAGE_TOKEN_INDEX


def _ids(tokenizer, kind="ugc"):
    return torch.tensor(prompts.tokenize_prompt(prompts.scoring_prompt(kind), tokenizer))


# ---- branches ---------------------------------------------------------------------------------------


def test_keyframe_branch_equals_transformers_llava_onevision(tiny_model, tiny_config):
    """The keyframe block is what transformers' LLaVA-OneVision computes for a video with the same weights:
    SigLIP's last kept layer (no post-LN), the 2-layer GELU projector, 2D bilinear pooling to ceil(G/2),
    frames in order, then the newline."""
    from transformers import LlavaOnevisionConfig
    from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel

    config = LlavaOnevisionConfig(
        vision_config=tiny_config.vision.siglip_config().to_dict(), text_config=tiny_config.text.qwen2_config().to_dict(),
        vision_feature_layer=-1, vision_feature_select_strategy="full", projector_hidden_act="gelu",
    )
    reference = LlavaOnevisionModel(config).eval()
    weights = {f"vision_tower.{k}": v for k, v in tiny_model.vision_tower.state_dict().items()}
    for ours, theirs in ((0, "linear_1"), (2, "linear_2")):
        weights[f"multi_modal_projector.{theirs}.weight"] = tiny_model.mm_projector[ours].weight
        weights[f"multi_modal_projector.{theirs}.bias"] = tiny_model.mm_projector[ours].bias
    weights["image_newline"] = tiny_model.image_newline
    missing, unexpected = reference.load_state_dict(weights, strict=False)
    assert not unexpected and all(k.startswith("language_model.") for k in missing)
    keyframes, _ = tiny_video(tiny_config, num_keyframes=3)
    with torch.no_grad():
        expected = reference.get_video_features(keyframes[None], vision_feature_layer=-1, output_hidden_states=True,
                                                vision_feature_select_strategy="full").pooler_output[0]
        block = tiny_model.encode_keyframes(keyframes)
    assert block.shape == (3 * tiny_config.tokens_per_keyframe + 1, tiny_config.text.hidden_size)
    assert torch.equal(block, expected)


def test_released_geometry_with_tiny_widths():
    """384 px keyframes, 14 px patches: 27x27 = 729 tokens pooled to 14x14 = 196, as released."""
    from vqa2cli.config import VisionConfig

    vision = VisionConfig(hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    config = make_tiny_config(vision=vision, pooled_grid=14, keyframe_size=384, motion_size=384)
    model = make_tiny_model(config)
    keyframes, motion = tiny_video(config, num_keyframes=2, num_motion=4)
    with torch.no_grad():
        assert model.vision_tower.embeddings(keyframes).shape == (2, 729, 32)
        assert model.encode_keyframes(keyframes).shape == (2 * 196 + 1, config.text.hidden_size)
        assert model.encode_motion(motion).shape == (4, config.text.hidden_size)


def test_vision_tower_is_cut_and_headless(tiny_model, tiny_config):
    assert len(tiny_model.vision_tower.encoder.layers) == tiny_config.vision.num_hidden_layers
    assert not hasattr(tiny_model.vision_tower, "head")
    # post_layernorm stays (its weights are in the checkpoints) but does not touch the features.
    assert hasattr(tiny_model.vision_tower, "post_layernorm")


def test_motion_branch_shapes(tiny_model, tiny_config):
    _, motion = tiny_video(tiny_config, num_motion=12)
    with torch.no_grad():
        feats = tiny_model.motion_encoder(motion.float().div(255).sub(0.5).div(0.5))
        out = tiny_model.encode_motion(motion)
    assert feats.shape == (12, tiny_config.motion.feature_size)
    assert out.shape == (12, tiny_config.text.hidden_size)
    # uint8 input is normalised with mean=std=0.5, the same as passing the normalised floats.
    with torch.no_grad():
        assert torch.equal(out, tiny_model.encode_motion(motion.float().div(255).sub(0.5).div(0.5)))


def test_fast_pathway_equals_full_slowfast(tiny_config):
    """The fast-only forward gives exactly the fast output of the two-pathway SlowFast, whatever the slow
    input is (laterals go fast -> slow only)."""
    model = make_tiny_model(tiny_config)
    enc = model.motion_encoder
    torch.manual_seed(1)
    fast = torch.randn(1, 3, 8, 32, 32)
    with torch.no_grad():
        outs = []
        for slow in (fast[:, :, :2].clone(), torch.randn(1, 3, 2, 32, 32)):
            x = [slow, fast.clone()]  # fresh list: the fusions overwrite it in place
            for block in enc.blocks:
                x = block(x)
            outs.append(x[1])
        assert torch.equal(outs[0], outs[1])
        # The release's pooling: AdaptiveAvgPool2d(1) on [1, C, T, h, w], then + position table.
        pooled = torch.nn.AdaptiveAvgPool2d(1)(outs[0]).squeeze(0).squeeze(-1).squeeze(-1).transpose(0, 1)
        ours = enc(fast[0].transpose(0, 1))
    assert torch.equal(ours, pooled + enc.position_embedding.weight[:8])
    # The slow pathway and fusions exist (strict loading of the released weights needs them).
    assert enc.blocks[0].multipathway_blocks[0] is not None
    assert any(k.startswith("blocks.0.multipathway_fusion") for k in enc.state_dict())


def test_chunked_motion_equals_one_pass(tiny_config):
    model = make_tiny_model(tiny_config)
    enc = model.motion_encoder
    # pytorchvideo zero-initialises each residual branch's last BatchNorm, which would hide the temporal
    # reach of the res stages; give every BatchNorm real statistics first.
    torch.manual_seed(0)
    for bn in (m for m in enc.modules() if isinstance(m, torch.nn.BatchNorm3d)):
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.1, 0.1)
        bn.running_var.uniform_(0.5, 1.5)
    _, motion = tiny_video(tiny_config, num_motion=40)
    assert enc.halo == 6  # depth 18: stem kernel 5 (2) + four res blocks with temporal kernel 3 (1 each)
    with torch.no_grad():
        enc.chunk_frames = 0
        whole = enc(motion)
        enc.chunk_frames = 8
        chunked = enc(motion)
        enc.halo -= 1  # one frame of context short: the chunk borders go wrong
        short = enc(motion)
    assert torch.allclose(chunked, whole, atol=1e-5, rtol=0)
    assert not torch.allclose(short, whole, atol=1e-4, rtol=0)


def test_motion_longer_than_position_table_is_refused(tiny_model, tiny_config):
    too_many = tiny_config.motion.max_frames + 4
    frames = torch.zeros(too_many, 3, 8, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="position table"):
        tiny_model.encode_motion(frames)


# ---- token layout -----------------------------------------------------------------------------------


def test_official_layout_positions(tiny_model, tiny_config, tiny_tokenizer):
    ids = _ids(tiny_tokenizer)
    keyframes, motion = tiny_video(tiny_config, num_keyframes=3, num_motion=8)
    with torch.no_grad():
        inp = tiny_model.build_inputs(ids, tiny_model.encode_video(keyframes, motion))
        kf = tiny_model.encode_keyframes(keyframes)
        mo = tiny_model.encode_motion(motion).to(kf.dtype)
        text = tiny_model.language_model.get_input_embeddings()(ids[ids != IMG])
    slots = (ids == IMG).nonzero().flatten().tolist()
    n_kf = 3 * tiny_config.tokens_per_keyframe
    types = inp.token_types[0]
    emb = inp.inputs_embeds[0]
    assert emb.shape[0] == len(ids) - 2 + n_kf + 1 + 8
    a = slots[0]  # keyframe block starts where the first <image> was
    b = slots[1] - 1 + n_kf + 1  # motion block: second <image>, shifted by the keyframe block
    assert (types[:a] == TEXT).all()
    assert (types[a : a + n_kf] == KEYFRAME).all() and types[a + n_kf] == NEWLINE
    assert (types[a + n_kf + 1 : b] == TEXT).all()
    assert (types[b : b + 8] == MOTION).all() and (types[b + 8 :] == TEXT).all()
    assert torch.equal(emb[a : a + n_kf + 1], kf)
    assert torch.equal(emb[b : b + 8], mo)
    assert torch.equal(emb[types == TEXT], text)
    assert inp.attention_mask.all() and torch.equal(inp.position_ids[0], torch.arange(emb.shape[0]))


def test_per_second_layout_positions(tiny_config, tiny_tokenizer):
    config = dataclasses.replace(tiny_config, token_layout="per_second")
    model = make_tiny_model(config)
    keyframes, motion = tiny_video(config, num_keyframes=2, num_motion=8)
    with torch.no_grad():
        kf = model.encode_keyframes(keyframes)
        mo = model.encode_motion(motion).to(kf.dtype)
    per = config.tokens_per_keyframe

    def check(ids, splits, cut):
        with torch.no_grad():
            inp = model.build_inputs(ids, EncodedVideo(kf, mo), motion_splits=splits)
        a = (ids == IMG).nonzero()[0].item()
        emb, types = inp.inputs_embeds[0], inp.token_types[0]
        want_types = [KEYFRAME] * per + [MOTION] * cut + [KEYFRAME] * per + [MOTION] * (8 - cut) + [NEWLINE]
        assert types[a : a + len(want_types)].tolist() == want_types
        want = torch.cat([kf[:per], mo[:cut], kf[per : 2 * per], mo[cut:], kf[-1:]])
        assert torch.equal(emb[a : a + len(want_types)], want)
        return inp

    one = torch.tensor(prompts.tokenize_prompt(f"a{prompts.IMAGE_TOKEN}b", tiny_tokenizer))
    check(one, None, 4)  # no splits: near-equal runs
    check(one, [5, 3], 5)
    # The official two-placeholder prompts work too: the second placeholder is left empty.
    two = _ids(tiny_tokenizer)
    inp = check(two, [6, 2], 6)
    assert inp.inputs_embeds.shape[1] == len(two) - 2 + 2 * per + 8 + 1
    assert (inp.token_types[0] == MOTION).sum() == 8
    with pytest.raises(ValueError, match="splits"):
        model.build_inputs(one, EncodedVideo(kf, mo), motion_splits=[4, 3])


def test_motion_splits_follow_source_frames():
    # 25 fps clip of 2.5 s: keyframes at frames 0, 25, 50; motion = frames 0..59 (a multiple of 4).
    assert motion_splits([0, 25, 50], list(range(60))) == [25, 25, 10]
    # Motion capped to its first 32 frames: the later seconds get none.
    assert motion_splits([0, 25, 50], list(range(32))) == [25, 7, 0]
    assert motion_splits([0], [0, 1, 2, 3]) == [4]


def test_single_placeholder_takes_keyframes_only(tiny_model, tiny_config, tiny_tokenizer):
    """The streaming scorer's prompt has one <image>: like the release, it gets the keyframe block only."""
    ids = _ids(tiny_tokenizer, "streaming")
    keyframes, motion = tiny_video(tiny_config)
    assert not tiny_model.places_motion(ids) and tiny_model.places_motion(_ids(tiny_tokenizer))
    with torch.no_grad():
        without_motion = tiny_model.encode_video(keyframes)
        inp = tiny_model.build_inputs(ids, without_motion)
        # a motion block given anyway takes no place: the release never computes it for this prompt
        assert torch.equal(tiny_model.build_inputs(ids, tiny_model.encode_video(keyframes, motion)).inputs_embeds,
                           inp.inputs_embeds)
    types = inp.token_types[0]
    assert (types == MOTION).sum() == 0 and (types == NEWLINE).sum() == 1
    assert (types == KEYFRAME).sum() == 2 * tiny_config.tokens_per_keyframe
    with pytest.raises(ValueError, match="motion"):
        tiny_model.build_inputs(_ids(tiny_tokenizer), without_motion)
    three = torch.tensor(prompts.tokenize_prompt("<image><image><image>", tiny_tokenizer))
    with pytest.raises(ValueError, match="3 <image> placeholders"):
        tiny_model.build_inputs(three, without_motion)


def test_labels_are_expanded_with_ignore_on_media(tiny_model, tiny_config, tiny_tokenizer):
    ids, labels = prompts.training_example(
        [{"from": "human", "value": prompts.UGC_USER}, {"from": "gpt", "value": "The quality of this video is good."}],
        tiny_tokenizer,
    )
    ids, labels = torch.tensor(ids), torch.tensor(labels)
    keyframes, motion = tiny_video(tiny_config)
    model = make_tiny_model(tiny_config)
    inp = model.build_inputs(ids, model.encode_video(keyframes, motion), labels=labels)
    media = (inp.token_types != TEXT)[0]
    assert (inp.labels[0][media] == prompts.IGNORE_INDEX).all()
    assert torch.equal(inp.labels[0][~media], labels[ids != IMG])  # text labels keep their order
    out = model(ids, model.encode_video(keyframes, motion), labels=labels)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert model.motion_projector[0].weight.grad is not None
    assert model.mm_projector[0].weight.grad is not None


# ---- LLM, batching, repeatability -------------------------------------------------------------------


def test_forward_is_bitwise_repeatable(tiny_model, tiny_config, tiny_tokenizer):
    ids = _ids(tiny_tokenizer)
    keyframes, motion = tiny_video(tiny_config)
    with torch.no_grad():
        first = tiny_model(ids, tiny_model.encode_video(keyframes, motion)).logits
        second = tiny_model(ids, tiny_model.encode_video(keyframes, motion)).logits
    assert first.shape == (1, first.shape[1], tiny_config.text.vocab_size)
    assert torch.equal(first, second)


def test_batch_matches_single(tiny_model, tiny_config, tiny_tokenizer):
    ids = _ids(tiny_tokenizer)
    videos = [tiny_video(tiny_config, num_keyframes=1, num_motion=4, seed=1),
              tiny_video(tiny_config, num_keyframes=3, num_motion=12, seed=2)]
    with torch.no_grad():
        encoded = [tiny_model.encode_video(kf, mo) for kf, mo in videos]
        single = [tiny_model(ids, video).logits[0, -1] for video in encoded]
        batch = tiny_model([ids, ids], encoded)
        inp = tiny_model.build_inputs([ids, ids], encoded)
    # Left padding: the shorter video is padded at the front, so -1 is every row's last prompt token.
    assert (inp.token_types[0, : inp.attention_mask[0].eq(0).sum()] == PAD).all()
    assert inp.attention_mask[:, -1].all()
    for row, logits in enumerate(single):
        assert torch.allclose(batch.logits[row, -1], logits, atol=1e-5, rtol=0)


def test_generate_returns_new_tokens_and_streams(tiny_model, tiny_config, tiny_tokenizer):
    ids = torch.tensor(prompts.tokenize_prompt(prompts.question_prompt("Is it blurry?", 2, 8), tiny_tokenizer))
    keyframes, motion = tiny_video(tiny_config)
    pieces = []

    class Collect:
        def put(self, value):
            pieces.append(value.clone())

        def end(self):
            pieces.append(None)

    video = tiny_model.encode_video(keyframes, motion)
    out = tiny_model.generate(ids, video, max_new_tokens=6, eos_token_id=-1, pad_token_id=0,
                              streamer=Collect())
    assert out.shape == (1, 6)
    with torch.no_grad():
        logits = tiny_model(ids, video).logits[0, -1]
    assert out[0, 0] == logits.argmax()  # greedy, and only new tokens come back
    assert pieces[-1] is None and torch.equal(torch.cat([p.flatten() for p in pieces[1:-1]]), out[0])


def test_long_sequence_warns(tiny_model, tiny_config, tiny_tokenizer):
    config = dataclasses.replace(tiny_config, max_training_length=50)
    model = make_tiny_model(config)
    keyframes, motion = tiny_video(config)
    with pytest.warns(LongSequenceWarning):
        model.build_inputs(_ids(tiny_tokenizer), model.encode_video(keyframes, motion))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tiny_model.build_inputs(_ids(tiny_tokenizer), tiny_model.encode_video(keyframes, motion))


# ---- released size ----------------------------------------------------------------------------------

def test_released_architecture_on_meta():
    config = VQA2Config.from_llava_qwen(RELEASED_CONFIG)
    with torch.device("meta"):
        model = VQA2Model(config)
    total = sum(p.numel() for p in model.parameters())
    assert 7.9e9 < total < 8.2e9, total
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["mm_projector.0.weight"] == (3584, 1152)
    assert shapes["mm_projector.2.weight"] == (3584, 3584)
    assert shapes["image_newline"] == (3584,)
    assert shapes["motion_encoder.position_embedding.weight"] == (2000, 256)
    assert shapes["motion_projector.0.weight"] == (3584, 256)
    assert shapes["motion_projector.2.weight"] == (3584, 3584)
    assert shapes["language_model.model.embed_tokens.weight"] == (152064, 3584)
    assert shapes["language_model.lm_head.weight"] == (152064, 3584)
    assert shapes["vision_tower.embeddings.patch_embedding.weight"] == (1152, 3, 14, 14)
    assert len(model.vision_tower.encoder.layers) == 26
    assert "vision_tower.post_layernorm.weight" in shapes
    assert not any(k.startswith("vision_tower.head") for k in shapes)
    # SlowFast-R50 blocks 0..4: 660 tensors, 110 of them BatchNorm counters.
    slowfast = [k for k in shapes if k.startswith("motion_encoder.blocks.")]
    assert len(slowfast) == 660
    assert sum(k.endswith("num_batches_tracked") for k in slowfast) == 110
    qwen = model.language_model.config
    assert qwen.rope_parameters["rope_theta"] == 1e6 and qwen.tie_word_embeddings is False
    assert (qwen.num_key_value_heads, qwen.rms_norm_eps) == (4, 1e-6)


def test_next_token_logits_is_the_last_row(tiny_model, tiny_config, tiny_tokenizer):
    ids = _ids(tiny_tokenizer)
    keyframes, motion = tiny_video(tiny_config)
    with torch.no_grad():
        video = tiny_model.encode_video(keyframes, motion)
        row = tiny_model.next_token_logits(ids, video)
        full = tiny_model(ids, video).logits
    assert row.shape == (1, tiny_config.text.vocab_size)
    assert torch.allclose(row, full[:, -1], atol=1e-6, rtol=0)


def test_batched_generation_matches_single(tiny_model, tiny_config, tiny_tokenizer):
    ids = torch.tensor(prompts.tokenize_prompt(prompts.question_prompt("Is it blurry?", 2, 8), tiny_tokenizer))
    videos = [tiny_video(tiny_config, 1, 4, seed=1), tiny_video(tiny_config, 3, 12, seed=2)]
    with torch.no_grad():
        encoded = [tiny_model.encode_video(kf, mo) for kf, mo in videos]
    single = [tiny_model.generate(ids, video, max_new_tokens=5, pad_token_id=0) for video in encoded]
    batch = tiny_model.generate([ids, ids], encoded, max_new_tokens=5, pad_token_id=0)
    assert torch.equal(batch, torch.cat(single))


# ---- config -----------------------------------------------------------------------------------------


def test_config_json_round_trip(tmp_path):
    config = make_tiny_config(token_layout="per_second", prompt="streaming")
    path = tmp_path / "config.json"
    config.save(path)
    assert '"format": "vqa2"' in path.read_text()
    assert VQA2Config.load(path) == config
    released = VQA2Config.from_llava_qwen(RELEASED_CONFIG)
    assert VQA2Config.from_dict(released.to_dict()) == released
    with pytest.raises(ValueError, match="format"):
        VQA2Config.from_dict({k: v for k, v in config.to_dict().items() if k != "format"})
    with pytest.raises(ValueError, match="unknown vqa2 config fields: bogus"):
        VQA2Config.from_dict({**config.to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match="token_layout"):
        make_tiny_config(token_layout="interleaved")
    with pytest.raises(ValueError, match="unknown motion config fields: depth"):
        VQA2Config.from_dict({**config.to_dict(), "motion": {"depth": 50}})
    with pytest.raises(ValueError, match="keyframe_size"):
        make_tiny_config(keyframe_size=64)


def test_keyframe_fragments_are_part_of_the_config_and_its_sampling():
    fragmented = make_tiny_config(keyframe_fragments=4)  # 56 px keyframes: 4 x 4 crops of 14 px
    assert VQA2Config.from_dict(fragmented.to_dict()) == fragmented
    assert fragmented.sampling().keyframe_fragments == 4 and make_tiny_config().sampling().keyframe_fragments == 0
    with pytest.raises(ValueError, match="keyframe_fragments 3 must divide keyframe_size 56"):
        make_tiny_config(keyframe_fragments=3)
    with pytest.raises(ValueError, match="whole keyframes"):
        make_tiny_config(keyframe_fragments=4, images=True)
    shifted = make_tiny_config(keyframe_fragments=4, fragment_shifts=3)
    assert VQA2Config.from_dict(shifted.to_dict()) == shifted and shifted.sampling().fragment_shifts == 3
    for bad in ({"keyframe_fragments": 4, "fragment_shifts": 2}, {"fragment_shifts": 3}):
        with pytest.raises(ValueError, match="fragment_shifts must be odd, and 1 without keyframe_fragments"):
            make_tiny_config(**bad)


def test_config_from_llava_qwen():
    config = VQA2Config.from_llava_qwen(RELEASED_CONFIG, prompt="streaming")
    assert config.vision.num_hidden_layers == 26 and config.vision.grid == 27
    assert (config.vision.hidden_size, config.vision.num_attention_heads, config.vision.intermediate_size) == (1152, 16, 4304)
    assert config.pooled_grid == 14 and config.tokens_per_keyframe == 196
    assert (config.motion.model_depth, config.motion.feature_size, config.motion.max_frames) == (50, 256, 2000)
    assert config.text.hidden_size == 3584 and config.text.rope_theta == 1e6
    assert (config.keyframe_size, config.motion_size, config.token_layout, config.prompt) == (384, 384, "official", "streaming")
    assert make_tiny_config().motion.feature_size == 64
    for bad, match in (
        ({"model_type": "qwen2"}, "llava_qwen"),
        ({"mm_vision_tower": "openai/clip-vit-large-patch14"}, "unknown vision tower"),
        ({"mm_projector_type": "linear"}, "mm_projector_type"),
        ({"mm_vision_select_layer": -30}, "out of range"),
    ):
        with pytest.raises(ValueError, match=match):
            VQA2Config.from_llava_qwen({**RELEASED_CONFIG, **bad})
