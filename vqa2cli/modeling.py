"""The VQA² model: the whole forward pass in one place.

    keyframes [N, 3, S, S]                      motion frames [T, 3, S', S'] (uint8 from load_video)
        |  SigLIP, 26 of 27 layers, no post-LN       |  SlowFast blocks 0..4, FAST pathway only
    [N, 729, 1152]                               [1, C, T, h, w]  (C = 256 for R50)
        |  mm_projector (Linear-GELU-Linear)         |  spatial average pool
    [N, 729, H]                                  [T, C]  + position_embedding[:T]
        |  bilinear 27x27 -> 14x14 per frame         |  fp16 round-trip (parity with the release)
    [N, 196, H] -> [N*196, H] ++ image_newline   |  motion_projector (Linear-GELU-Linear)
    keyframe block [N*196 + 1, H]                motion block [T, H]
                         \\                        /
          each `<image>` placeholder of the prompt takes one block, in order (token layout "official"):
          [text][N*196 keyframe tokens][image_newline][text][T motion tokens][text]
                                     |
                               Qwen2ForCausalLM -> logits [B, L, vocab]

Still images (`config.images`, `vqa2cli.images`): the keyframe is not pooled (G*G tokens, 729 as released)
and the image prompt's single placeholder takes that block only, as in the release's image path.

Layout "per_second" (config.token_layout; only for models trained that way, never the released ones):
[text][kf 0 (196)][motion of second 0][kf 1][motion of second 1]...[image_newline][text], all at the
first placeholder; a second placeholder stays empty, so the same prompts work for both layouts.

Length: the release truncated training sequences at 10,000 embeddings. We never truncate (at inference
that would cut off the question and the prefill whose logits are the score); past 10,000 we warn
(`LongSequenceWarning`), past the LLM's position limit we refuse. The motion position table (2000) is
a hard limit: more motion frames raise ValueError.

Batches: one entry per video, left-padded, explicit position ids; batched results equal single ones up
to float rounding (tests). Single videos are bitwise repeatable.

Names of the submodules are a contract (checkpoint mapping, freezing in fine-tuning): `vision_tower`,
`mm_projector`, `image_newline`, `motion_encoder` (`.blocks`, `.position_embedding`), `motion_projector`,
`language_model`.
"""

from __future__ import annotations

import bisect
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Qwen2ForCausalLM, SiglipVisionModel

from .config import MotionConfig, VQA2Config
from .prompts import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from .video import normalize

# What sits at each position of the LLM input (`MultimodalInputs.token_types`).
TEXT, KEYFRAME, NEWLINE, MOTION, PAD = 0, 1, 2, 3, 4


def motion_splits(keyframe_indices: list[int], motion_indices: list[int]) -> list[int]:
    """For the `per_second` layout: how many motion frames follow each keyframe. A motion frame belongs
    to the last keyframe at or before it in the source video (the keyframe of its second); frames before
    the first keyframe go with it. Both lists are source frame indices, ascending (`VideoSample`)."""
    if not keyframe_indices:
        raise ValueError("no keyframes")
    counts = [0] * len(keyframe_indices)
    for frame in motion_indices:
        counts[max(bisect.bisect_right(keyframe_indices, frame) - 1, 0)] += 1
    return counts


class LongSequenceWarning(UserWarning):
    """The input is longer than anything the released checkpoints saw in training (10,000 embeddings)."""


def _mlp2x_gelu(in_features: int, hidden: int) -> nn.Sequential:
    # Indices 0 and 2 are the checkpoint's `*.0.*` / `*.2.*` keys; GELU is the exact (erf) one.
    return nn.Sequential(nn.Linear(in_features, hidden), nn.GELU(), nn.Linear(hidden, hidden))


class MotionEncoder(nn.Module):
    """pytorchvideo SlowFast blocks 0..4 plus a learned per-frame position table.

    All five blocks are kept whole (slow pathway and fast->slow fusions included) so the release's
    weights load strictly and a fine-tune can use them; forward runs only the fast pathway, which is
    exact because lateral connections go fast -> slow only.
    """

    def __init__(self, config: MotionConfig):
        super().__init__()
        from ._pytorchvideo import create_slowfast

        slowfast = create_slowfast(**config.slowfast_kwargs())
        self.blocks = nn.ModuleList(slowfast.blocks[:5])  # stem, res2..res5; the head is not used
        self.position_embedding = nn.Embedding(config.max_frames, config.feature_size)
        self.chunk_frames = config.chunk_frames
        self.halo = self._temporal_radius()

    def _temporal_radius(self) -> int:
        """How many frames on each side one output frame of the fast pathway sees. Every temporal
        kernel there has stride 1 and 'same' padding, so the radius is the sum of kernel half-widths
        (over all layers, residual branches included: an upper bound, which is all chunking needs)."""
        radius = 0
        for block in self.blocks:
            for layer in block.multipathway_blocks[1].modules():
                if isinstance(layer, (nn.Conv3d, nn.MaxPool3d, nn.AvgPool3d)):
                    k, st, pad, dil = (_triple(getattr(layer, n, 1))[0] for n in ("kernel_size", "stride", "padding", "dilation"))
                    if st != 1 or pad != (k - 1) // 2 * dil:
                        raise ValueError(f"fast pathway layer {layer} is not temporally stride-1 'same'")
                    radius += (k - 1) // 2 * dil
        return radius

    def _fast_pathway(self, frames: torch.Tensor) -> torch.Tensor:
        """[t, 3, S, S] -> [t, C]: fast pathway of blocks 0..4, then spatial average pooling."""
        weight = self.blocks[0].multipathway_blocks[1].conv.weight
        if frames.dtype == torch.uint8:
            # mean=std=0.5 like the keyframes (not Kinetics statistics), one chunk at a time
            frames = normalize(frames.to(weight.device))
        x = frames.to(device=weight.device, dtype=weight.dtype).transpose(0, 1).unsqueeze(0)  # [1, 3, t, S, S]
        for block in self.blocks:
            x = block.multipathway_blocks[1](x)  # temporal stride 1: t kept
        # [1, C, t, h, w] -> [1, C, t, 1, 1] -> [t, C]. A 2D adaptive pool over the last two dims is the
        # release's op; a 3D pool (t, 1, 1) sums in another order and differs by ~1e-7.
        return F.adaptive_avg_pool2d(x, 1).flatten(2).squeeze(0).transpose(0, 1)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """frames: [T, 3, S, S], uint8 RGB (normalised here, chunk by chunk) or normalised float -> [T, C].

        In eval mode long inputs run in chunks of `chunk_frames` output frames, each with `halo` extra
        frames of context per side that are computed and dropped: the result equals the one-pass result
        (up to float summation order) while activation memory stays bounded; uint8 frames are only
        turned into floats one chunk at a time. In training (BatchNorm on batch statistics) it is one pass.
        """
        num_frames = frames.shape[0]
        if num_frames > self.position_embedding.num_embeddings:
            raise ValueError(
                f"{num_frames} motion frames exceed the model's position table "
                f"({self.position_embedding.num_embeddings}); sample fewer motion frames"
            )
        chunk = self.chunk_frames
        if self.training or not chunk or num_frames <= chunk:
            feats = self._fast_pathway(frames)
        else:
            pieces = []
            for start in range(0, num_frames, chunk):
                stop = min(start + chunk, num_frames)
                lo, hi = max(start - self.halo, 0), min(stop + self.halo, num_frames)
                pieces.append(self._fast_pathway(frames[lo:hi])[start - lo : stop - lo])
            feats = torch.cat(pieces)
        return feats + self.position_embedding.weight[:num_frames]


def _token_types(count: int, kind: int) -> torch.Tensor:
    return torch.full((count,), kind, dtype=torch.long)


def _slots(input_ids: torch.Tensor) -> list[int]:
    """Positions of the `<image>` placeholders."""
    return (input_ids == IMAGE_TOKEN_INDEX).nonzero().flatten().tolist()


def _triple(value):
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * 3


@dataclass
class MultimodalInputs:
    """What the LLM receives. B sequences, left-padded to the longest (L)."""

    inputs_embeds: torch.Tensor  # [B, L, H]
    attention_mask: torch.Tensor  # [B, L] 1 = real, 0 = padding
    position_ids: torch.Tensor  # [B, L] 0.. over real positions (padding: 0)
    token_types: torch.Tensor  # [B, L] TEXT / KEYFRAME / NEWLINE / MOTION / PAD
    labels: torch.Tensor | None = None  # [B, L], IGNORE_INDEX on multimodal and padding positions


@dataclass
class EncodedVideo:
    """A video after the encoders and projectors (`VQA2Model.encode_video`): the blocks `build_inputs` places
    at a prompt's placeholders. Training whose encoders are frozen encodes each video once and reuses this
    (`vqa2cli.finetune.examples.FeatureCache`)."""

    keyframe_block: torch.Tensor  # [N*P*P + 1, H], image_newline included
    motion_block: torch.Tensor | None  # [T, H]; None: encoded without motion frames (see `places_motion`)

    @property
    def nbytes(self) -> int:
        blocks = [b for b in (self.keyframe_block, self.motion_block) if b is not None]
        return sum(b.numel() * b.element_size() for b in blocks)


class VQA2Model(nn.Module):
    def __init__(self, config: VQA2Config):
        super().__init__()
        self.config = config
        hidden = config.text.hidden_size
        self.vision_tower = SiglipVisionModel(config.vision.siglip_config())
        self.mm_projector = _mlp2x_gelu(config.vision.hidden_size, hidden)
        self.image_newline = nn.Parameter(torch.zeros(hidden))
        self.motion_encoder = MotionEncoder(config.motion)
        self.motion_projector = _mlp2x_gelu(config.motion.feature_size, hidden)
        self.language_model = Qwen2ForCausalLM(config.text.qwen2_config())
        # LLaVA initialises the newline like this before training; checkpoints overwrite it.
        with torch.no_grad():
            self.image_newline.normal_(std=hidden**-0.5)

    # ---- branches ------------------------------------------------------------------------------------

    def encode_keyframes(self, keyframes: torch.Tensor, pool: bool = True) -> torch.Tensor:
        """keyframes: [N, 3, S, S] normalised float -> keyframe block [N*P*P + 1, H] (P = pooled grid).

        `pool=False` is the release's still-image path (`vqa2cli.images`): the whole G x G grid, [N*G*G + 1, H]."""
        tower = self.vision_tower
        pixels = keyframes.to(device=self.image_newline.device, dtype=tower.embeddings.patch_embedding.weight.dtype)
        # Hidden state after the last KEPT layer, before post_layernorm (= LLaVA's select_layer -2).
        feats = tower.encoder(inputs_embeds=tower.embeddings(pixels)).last_hidden_state  # [N, G*G, Cv]
        feats = self.mm_projector(feats.to(self.mm_projector[0].weight.dtype))  # [N, G*G, H]
        n, _, hidden = feats.shape
        if pool:
            grid = self.config.vision.grid
            pooled = self.config.pooled_grid
            feats = feats.view(n, grid, grid, hidden).permute(0, 3, 1, 2)  # [N, H, G, G]
            feats = F.interpolate(feats, size=(pooled, pooled), mode="bilinear")  # [N, H, P, P]
            feats = feats.permute(0, 2, 3, 1)  # [N, P, P, H]
        feats = feats.reshape(-1, hidden)  # frame-major, row-major
        return torch.cat([feats, self.image_newline[None].to(feats.dtype)], dim=0)

    def encode_motion(self, frames: torch.Tensor) -> torch.Tensor:
        """frames: [T, 3, S, S] uint8 (normalised here) or float already normalised -> [T, H]."""
        feats = self.motion_encoder(frames)  # [T, C]
        # The release casts the motion features to fp16 before its projector: the round-trip keeps parity
        # with it (dropping it moves the level logits by ~5e-5). A tensor cast, the modules keep their dtype.
        feats = feats.to(torch.float16).to(self.motion_projector[0].weight.dtype)
        return self.motion_projector(feats)  # [T, H]

    def encode_video(self, keyframes: torch.Tensor, motion: torch.Tensor | None = None,
                     pool: bool = True) -> EncodedVideo:
        """Both branches: keyframes [N, 3, S, S] and motion frames [T, 3, S', S'] (uint8 or normalised float;
        None when the prompt places no motion tokens, see `places_motion`) -> their blocks. `pool`: see
        `encode_keyframes`."""
        return EncodedVideo(self.encode_keyframes(keyframes, pool),
                            None if motion is None else self.encode_motion(motion))

    def places_motion(self, input_ids: torch.Tensor) -> bool:
        """Whether a prompt with these ids takes motion tokens. In the `official` layout a single
        placeholder (the streaming scorer's prompt) takes the keyframe block only, as in the release, so
        its videos are encoded without motion; two placeholders, or the `per_second` layout, take both."""
        return self.config.token_layout == "per_second" or len(_slots(input_ids)) == 2

    # ---- token layout --------------------------------------------------------------------------------

    def _blocks(self, kf_block, mo_block, num_slots: int, splits: list[int] | None):
        """The (embeddings, token_types) block each of the `num_slots` placeholders takes, in order.

        official:   [keyframes + newline] [motion]       (one slot: keyframes + newline only)
        per_second: [kf 0, motion of second 0, kf 1, motion of second 1, ..., newline] []
            The newline still closes the whole visual block ("end of video", as in `official`). A second
            placeholder is left empty so the same prompts serve both layouts. `splits[i]` = motion tokens
            after keyframe i (see `motion_splits`); without it the motion frames are cut into N
            near-equal contiguous runs.
        """
        types = _token_types
        # Every row before the newline is a keyframe token, however many a keyframe has (an image: unpooled).
        keyframes = (kf_block, torch.cat([types(kf_block.shape[0] - 1, KEYFRAME), types(1, NEWLINE)]))
        if self.config.token_layout == "official":
            blocks = [keyframes]
            if num_slots == 2:
                blocks.append((mo_block, types(mo_block.shape[0], MOTION)))
            return blocks
        per = self.config.tokens_per_keyframe
        num_kf = (kf_block.shape[0] - 1) // per
        num_motion = mo_block.shape[0]
        if splits is None:
            bounds = [round(i * num_motion / num_kf) for i in range(num_kf + 1)]
        else:
            if len(splits) != num_kf or sum(splits) != num_motion or min(splits) < 0:
                raise ValueError(f"motion splits {splits} do not divide {num_motion} motion frames among {num_kf} keyframes")
            bounds = [sum(splits[:i]) for i in range(num_kf + 1)]
        pieces, kinds = [], []
        for i in range(num_kf):
            pieces += [kf_block[i * per : (i + 1) * per], mo_block[bounds[i] : bounds[i + 1]]]
            kinds += [types(per, KEYFRAME), types(bounds[i + 1] - bounds[i], MOTION)]
        block = (torch.cat(pieces + [kf_block[-1:]]), torch.cat(kinds + [types(1, NEWLINE)]))
        empty = (kf_block[:0], types(0, MOTION))
        return [block, empty][:num_slots]

    def build_inputs(
        self,
        input_ids: list[torch.Tensor] | torch.Tensor,
        videos: list[EncodedVideo] | EncodedVideo,
        labels: list[torch.Tensor] | torch.Tensor | None = None,
        motion_splits: list[list[int] | None] | list[int] | None = None,
    ) -> MultimodalInputs:
        """Token ids with `IMAGE_TOKEN_INDEX` placeholders + each video's encoding -> LLM inputs.

        One entry per video; bare ids with one `EncodedVideo` (and a flat `motion_splits`) mean a batch of
        one. Each prompt has one or two placeholders, filled per the layout (`_blocks`). Sequences are
        left-padded so that position -1 is every row's last prompt token (scoring, generation). `labels`
        (same shape as the ids) come back expanded with IGNORE_INDEX on multimodal and padding positions.
        """
        if isinstance(input_ids, torch.Tensor):
            input_ids, videos = [input_ids.reshape(-1)], [videos]
            labels = None if labels is None else [labels.reshape(-1)]
            motion_splits = [motion_splits]
        count = len(input_ids)
        motion_splits = [None] * count if motion_splits is None else motion_splits
        if not len(videos) == len(motion_splits) == count:
            raise ValueError("input_ids, videos and motion_splits need one entry per video")
        rows = [self._row(ids, video, None if labels is None else labels[b], motion_splits[b])
                for b, (ids, video) in enumerate(zip(input_ids, videos))]
        return self._pad(rows, labels is not None)

    def _row(self, ids: torch.Tensor, video: EncodedVideo, labels: torch.Tensor | None, splits: list[int] | None):
        """One sequence: (embeddings [L, H], token types [L], labels [L] or None)."""
        embed = self.language_model.get_input_embeddings()
        ids = ids.to(embed.weight.device)
        slots = _slots(ids)
        if len(slots) not in (1, 2):
            raise ValueError(f"the prompt has {len(slots)} <image> placeholders; VQA² prompts have 1 or 2")
        if self.places_motion(ids) and video.motion_block is None:
            raise ValueError("this prompt needs motion frames (its layout places motion tokens)")
        blocks = self._blocks(video.keyframe_block, video.motion_block, len(slots), splits)
        labels = None if labels is None else labels.to(ids.device)
        pieces, types, lab = [], [], []
        start = 0
        for slot, (block, block_types) in zip(slots + [len(ids)], blocks + [(None, None)]):
            text = ids[start:slot]
            pieces.append(embed(text))
            types.append(_token_types(len(text), TEXT))
            if labels is not None:
                lab.append(labels[start:slot])
            if block is not None:
                pieces.append(block.to(device=ids.device, dtype=embed.weight.dtype))
                types.append(block_types)
                if labels is not None:
                    lab.append(torch.full((len(block),), IGNORE_INDEX, dtype=torch.long, device=ids.device))
            start = slot + 1
        return torch.cat(pieces), torch.cat(types), torch.cat(lab) if lab else None

    def _pad(self, rows, with_labels: bool) -> MultimodalInputs:
        length = max(r[0].shape[0] for r in rows)
        limit = self.config.text.max_position_embeddings
        if length > limit:
            raise ValueError(f"the input has {length} embeddings; the language model handles at most {limit}")
        if length > self.config.max_training_length:
            # Not truncated (the release cut training sequences at 10,000, which at inference would cut off
            # the question): the model still runs, but this is beyond what it was trained on.
            warnings.warn(
                f"input of {length} embeddings is longer than the {self.config.max_training_length} the model "
                "was trained with; results may be less reliable (use fewer keyframes/motion frames)",
                LongSequenceWarning,
                stacklevel=3,
            )
        device = rows[0][0].device
        batch, hidden = len(rows), rows[0][0].shape[1]
        embeds = rows[0][0].new_zeros(batch, length, hidden)
        mask = torch.zeros(batch, length, dtype=torch.long, device=device)
        positions = torch.zeros(batch, length, dtype=torch.long, device=device)
        types = torch.full((batch, length), PAD, dtype=torch.long)
        labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long, device=device) if with_labels else None
        for b, (emb, typ, lab) in enumerate(rows):
            n = emb.shape[0]
            embeds[b, length - n :] = emb
            mask[b, length - n :] = 1
            positions[b, length - n :] = torch.arange(n, device=device)
            types[b, length - n :] = typ
            if with_labels:
                labels[b, length - n :] = lab
        return MultimodalInputs(embeds, mask, positions, types, labels)

    # ---- LLM -----------------------------------------------------------------------------------------

    def forward(self, input_ids, videos, labels=None, logits_to_keep: int = 0, motion_splits=None):
        """Logits [B, L, vocab] (the last `logits_to_keep` positions only if > 0) and, with labels, the
        shifted next-token loss, for encoded videos (`encode_video`; see `build_inputs` for the arguments).
        Returns the transformers `CausalLMOutputWithPast`."""
        inputs = self.build_inputs(input_ids, videos, labels, motion_splits)
        return self.language_model(
            inputs_embeds=inputs.inputs_embeds,
            attention_mask=inputs.attention_mask,
            position_ids=inputs.position_ids,
            labels=inputs.labels,
            logits_to_keep=logits_to_keep,
            use_cache=False,
        )

    def next_token_logits(self, input_ids, videos, motion_splits=None) -> torch.Tensor:
        """[B, vocab] logits at each prompt's last token (the score's row for prompts ending at the
        prefill). Only that row goes through lm_head: full logits of a long video would take GBs."""
        return self(input_ids, videos, logits_to_keep=1, motion_splits=motion_splits).logits[:, -1]

    @torch.no_grad()
    def generate(
        self,
        input_ids,
        videos,
        *,
        max_new_tokens: int = 512,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        streamer=None,
        motion_splits=None,
    ) -> torch.Tensor:
        """Greedy decoding; returns only the new token ids [B, <= max_new_tokens]. `streamer` is a
        transformers streamer (e.g. `TextIteratorStreamer`/`TextStreamer`) fed each new token."""
        inputs = self.build_inputs(input_ids, videos, motion_splits=motion_splits)
        if pad_token_id is None:
            pad_token_id = eos_token_id[0] if isinstance(eos_token_id, list) else eos_token_id
        return self.language_model.generate(
            inputs_embeds=inputs.inputs_embeds,
            attention_mask=inputs.attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            streamer=streamer,
        )
