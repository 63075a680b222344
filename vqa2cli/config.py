"""`VQA2Config`: every number that shapes a VQA² model, in one serialisable object.

Three sub-configs (vision tower, motion encoder, Qwen2 LLM) plus the pieces that glue them together
(pooled keyframe grid, frame sizes, token layout, level words). Two ways in:

* our own ``config.json`` (``"format": "vqa2"``), written by ``to_dict`` / ``save``;
* an official LLaVA-NeXT ``llava_qwen`` ``config.json`` via ``VQA2Config.from_llava_qwen``, which has no
  motion fields: the motion branch of the release is fixed in code (SlowFast-R50, 2000 positions).

Only the standard library here, so ``vqa2 --help`` does not pay for torch/transformers.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

FORMAT = "vqa2"
TOKEN_LAYOUTS = ("official", "per_second")
PROMPT_KINDS = ("ugc", "streaming", "enhanced")
LEVEL_WORDS = (" high", " good", " fair", " poor", " low")

# Towers named by `mm_vision_tower` in official configs. The checkpoint config carries only the name,
# so the tower's shape is data we must know. `num_hidden_layers` is the FULL tower (27); the kept count
# follows from `mm_vision_select_layer`.
KNOWN_VISION_TOWERS = {
    "google/siglip-so400m-patch14-384": dict(
        hidden_size=1152,
        intermediate_size=4304,
        num_hidden_layers=27,
        num_attention_heads=16,
        image_size=384,
        patch_size=14,
        layer_norm_eps=1e-6,
        hidden_act="gelu_pytorch_tanh",
    ),
}


@dataclass
class VisionConfig:
    """SigLIP tower as built: `num_hidden_layers` is the number of layers KEPT (released: 26 of 27)."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 26
    num_attention_heads: int = 16
    image_size: int = 384
    patch_size: int = 14
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"

    @property
    def grid(self) -> int:
        """Patch tokens per side (27 for 384/14)."""
        return self.image_size // self.patch_size

    def siglip_config(self):
        from transformers import SiglipVisionConfig

        return SiglipVisionConfig(**asdict(self), vision_use_head=False)


@dataclass
class MotionConfig:
    """pytorchvideo `create_slowfast` blocks 0..4; only the fast pathway's res5 output is used."""

    model_depth: int = 50
    stem_dim_outs: tuple[int, int] = (64, 8)
    channel_reduction_ratio: int = 8  # slow/fast channel ratio (beta); pytorchvideo default
    max_frames: int = 2000  # rows of the learned position table = most motion frames one video may use
    chunk_frames: int = 256  # inference runs the fast pathway this many frames at a time (0: one pass)

    def __post_init__(self):
        self.stem_dim_outs = tuple(self.stem_dim_outs)

    @property
    def feature_size(self) -> int:
        """Channels of the fast pathway after res5 (256 for R50): the stem width of the slow pathway times
        32 (x4 bottleneck expansion, x2 at each of the three later stages), reduced by beta."""
        return self.stem_dim_outs[0] * 32 // self.channel_reduction_ratio

    def slowfast_kwargs(self) -> dict:
        return dict(
            model_depth=self.model_depth,
            stem_dim_outs=self.stem_dim_outs,
            slowfast_channel_reduction_ratio=(self.channel_reduction_ratio,),
        )


@dataclass
class TextConfig:
    """The Qwen2 decoder. Defaults are Qwen2-7B's as they appear in the released checkpoints' config."""

    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    max_position_embeddings: int = 32768
    rope_theta: float = 1000000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False

    def qwen2_config(self):
        from transformers import Qwen2Config

        kwargs = asdict(self)
        # transformers 5 keeps rope_theta inside rope_parameters.
        rope = {"rope_type": "default", "rope_theta": kwargs.pop("rope_theta")}
        return Qwen2Config(**kwargs, rope_parameters=rope, use_sliding_window=False)


@dataclass
class VQA2Config:
    """A whole VQA² model. Defaults = the released architecture (see `from_llava_qwen`); `tiny_config`
    gives a small one. `prompt` is the checkpoint's own scoring prompt kind: ugc, streaming, enhanced."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    motion: MotionConfig = field(default_factory=MotionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    pooled_grid: int = 14  # keyframe tokens per side after bilinear pooling: ceil(27 / 2)
    keyframe_size: int = 384  # side of the square keyframes fed to the vision tower
    motion_size: int = 384  # side of the square frames fed to SlowFast
    token_layout: str = "official"
    level_words: tuple[str, ...] = LEVEL_WORDS
    prompt: str = "ugc"  # default scoring prompt kind
    max_training_length: int = 10000  # embeddings per sequence the release trained with
    # Trained on still images too (the release's enhanced checkpoint): photos are scored the release's way,
    # one unpooled keyframe (vqa2cli.images). Others refuse photos: they never saw that layout or prompt.
    images: bool = False

    def __post_init__(self):
        for name, cls in (("vision", VisionConfig), ("motion", MotionConfig), ("text", TextConfig)):
            value = getattr(self, name)
            if isinstance(value, dict):
                unknown = sorted(set(value) - {f.name for f in fields(cls)})
                if unknown:
                    raise ValueError(f"unknown {name} config fields: {', '.join(unknown)}")
                setattr(self, name, cls(**value))
        if self.keyframe_size != self.vision.image_size:
            # SigLIP's position table is fixed to its image size; keyframes must match it.
            raise ValueError(f"keyframe_size {self.keyframe_size} differs from the vision tower's {self.vision.image_size}")
        self.level_words = tuple(self.level_words)
        if self.token_layout not in TOKEN_LAYOUTS:
            raise ValueError(f"token_layout must be one of {TOKEN_LAYOUTS}, got {self.token_layout!r}")
        if self.prompt not in PROMPT_KINDS:
            raise ValueError(f"prompt must be one of {PROMPT_KINDS}, got {self.prompt!r}")
        if not 0 < self.pooled_grid <= self.vision.grid:
            raise ValueError(f"pooled_grid {self.pooled_grid} must be in 1..{self.vision.grid}")
        if self.images and self.token_layout != "official":
            raise ValueError("images need the official token layout (the release's image path)")

    @property
    def tokens_per_keyframe(self) -> int:
        return self.pooled_grid**2

    def sampling(self, max_motion_frames: int | None = None, max_keyframes: int | None = None):
        """How to decode a video for this model (`vqa2cli.video.Sampling`): its frame sizes, and the user's
        frame caps (default 2000 motion frames, 40 keyframes) held within its motion position table."""
        from vqa2cli.video import Sampling

        motion_cap = self.motion.max_frames if max_motion_frames is None else min(max_motion_frames, self.motion.max_frames)
        return Sampling(self.keyframe_size, self.motion_size, motion_cap,
                        Sampling.max_keyframes if max_keyframes is None else max_keyframes, images=self.images)

    # ---- our JSON -------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        d = {"format": FORMAT}
        d.update(asdict(self))
        d["motion"]["stem_dim_outs"] = list(self.motion.stem_dim_outs)
        d["level_words"] = list(self.level_words)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "VQA2Config":
        d = dict(d)
        fmt = d.pop("format", None)
        if fmt != FORMAT:
            raise ValueError(f'not a vqa2 config (expected "format": "{FORMAT}", got {fmt!r})')
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown vqa2 config fields: {', '.join(unknown)}")
        return cls(**d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "VQA2Config":
        return cls.from_dict(json.loads(Path(path).read_text()))

    # ---- official llava_qwen config.json -------------------------------------------------------------

    @classmethod
    def from_llava_qwen(cls, cfg: dict, **overrides) -> "VQA2Config":
        """The released architecture from an official `llava_qwen` config.json (already parsed).

        The Qwen2 part is read from the same dict (LLaVA subclasses Qwen2Config); the tower's shape comes
        from `KNOWN_VISION_TOWERS`; motion is the release's fixed SlowFast-R50 (no config fields exist).
        `overrides` set top-level VQA2Config fields (e.g. ``prompt="streaming"``).
        """
        if cfg.get("model_type") != "llava_qwen":
            raise ValueError(f"not a llava_qwen config (model_type={cfg.get('model_type')!r})")
        for key, want in (("mm_projector_type", "mlp2x_gelu"), ("mm_spatial_pool_mode", "bilinear")):
            if cfg.get(key, want) != want:
                raise ValueError(f"unsupported {key}={cfg[key]!r} (VQA² uses {want!r})")
        tower_name = cfg.get("mm_vision_tower")
        tower = KNOWN_VISION_TOWERS.get(tower_name)
        if tower is None:
            raise ValueError(f"unknown vision tower {tower_name!r}; known: {', '.join(KNOWN_VISION_TOWERS)}")
        tower = dict(tower)
        if cfg.get("mm_hidden_size", tower["hidden_size"]) != tower["hidden_size"]:
            raise ValueError(f"mm_hidden_size {cfg['mm_hidden_size']} does not match {tower_name}")
        # select_layer -2 = hidden state after layer 26 of 27: the layers after it are never run.
        select = cfg.get("mm_vision_select_layer", -2)
        kept = tower["num_hidden_layers"] + 1 + select if select < 0 else select
        if not 0 < kept <= tower["num_hidden_layers"]:
            raise ValueError(f"mm_vision_select_layer={select} is out of range for {tower_name}")
        tower["num_hidden_layers"] = kept
        vision = VisionConfig(**tower)

        rope_theta = cfg.get("rope_theta")
        if rope_theta is None:
            rope_theta = (cfg.get("rope_parameters") or {}).get("rope_theta", TextConfig.rope_theta)
        if cfg.get("rope_scaling"):
            raise ValueError(f"rope_scaling={cfg['rope_scaling']!r} is not supported")
        text = TextConfig(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=cfg["num_attention_heads"],
            num_key_value_heads=cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
            max_position_embeddings=cfg.get("max_position_embeddings", TextConfig.max_position_embeddings),
            rope_theta=float(rope_theta),
            rms_norm_eps=cfg.get("rms_norm_eps", TextConfig.rms_norm_eps),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
        )
        stride = cfg.get("mm_spatial_pool_stride", 2)
        kwargs = dict(
            vision=vision,
            motion=MotionConfig(),
            text=text,
            pooled_grid=math.ceil(vision.grid / stride),
            keyframe_size=vision.image_size,
            motion_size=vision.image_size,
        )
        kwargs.update(overrides)
        return cls(**kwargs)


def tiny_config(
    *,
    hidden_size: int = 64,
    vocab_size: int = 512,
    token_layout: str = "official",
    **overrides,
) -> VQA2Config:
    """A random-weight-sized model that runs in milliseconds on CPU (tests, vqa2-tiny).

    Vision: 2 layers of width 32 on 56 px frames with 8 px patches -> 7x7 grid pooled to 4x4 = 16 tokens.
    Motion: SlowFast depth 18 with stem widths (16, 2) -> fast res5 of 64 channels, 64 positions.
    LLM: 2 Qwen2 layers of `hidden_size`, 4 heads, 2 kv heads. `vocab_size` must cover the tokenizer.
    """
    kwargs = dict(
        vision=VisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            image_size=56, patch_size=8,
        ),
        motion=MotionConfig(model_depth=18, stem_dim_outs=(16, 2), max_frames=64),
        text=TextConfig(
            vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=4096, rope_theta=10000.0,
        ),
        pooled_grid=4,
        keyframe_size=56,
        motion_size=32,
        token_layout=token_layout,
    )
    kwargs.update(overrides)
    return VQA2Config(**kwargs)
