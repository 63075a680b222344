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


# Ceilings of the config check: far beyond any real model, low enough that a typo (or a hostile file)
# is refused before anything is built. Layers cost Python objects even on `meta`; frame sides set the
# size of every decoded frame; parameters are checked against the machine at load time as well.
MAX_LAYERS = 1024
MAX_FRAME_SIDE = 4096
MAX_MOTION_FRAMES = 1_000_000  # rows of the motion position table (the release has 2000)
MAX_PARAMETERS = 100e9  # the released model has 8 B
SLOWFAST_DEPTHS = (18, 50, 101, 152)  # pytorchvideo's create_slowfast
# SlowFast blocks 0..4 hold about this many parameters per squared stem width (measured on pytorchvideo).
_SLOWFAST_PARAMETERS_PER_STEM2 = {18: 2750, 50: 8350, 101: 15400, 152: 21100}


def _whole(where: str, value, low: int = 1, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{where} must be a whole number, got {value!r}")
    if value < low:
        raise ValueError(f"{where} must be at least {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{where} = {value} is beyond any real model (at most {high})")


def _positive(where: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"{where} must be a positive number, got {value!r}")


def _divides(where: str, part: str, part_value: int, whole: str, whole_value: int) -> None:
    if whole_value % part_value:
        raise ValueError(f"{where}.{whole} ({whole_value}) must be a multiple of {where}.{part} ({part_value})")


def parse_json(text: str):
    """`json.loads`, with nesting too deep for the parser raised as the ValueError it is (json raises
    RecursionError), so that every reader reports it as bad data in one line."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


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

    def __post_init__(self):
        for name in ("hidden_size", "intermediate_size", "num_attention_heads", "patch_size"):
            _whole(f"vision.{name}", getattr(self, name))
        _whole("vision.num_hidden_layers", self.num_hidden_layers, high=MAX_LAYERS)
        _whole("vision.image_size", self.image_size, low=self.patch_size, high=MAX_FRAME_SIDE)
        _divides("vision", "num_attention_heads", self.num_attention_heads, "hidden_size", self.hidden_size)
        _positive("vision.layer_norm_eps", self.layer_norm_eps)
        if not isinstance(self.hidden_act, str):
            raise ValueError(f"vision.hidden_act must be the name of an activation, got {self.hidden_act!r}")

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
        if self.model_depth not in SLOWFAST_DEPTHS:
            raise ValueError(f"motion.model_depth must be one of {SLOWFAST_DEPTHS}, got {self.model_depth!r}")
        if not isinstance(self.stem_dim_outs, (list, tuple)) or len(self.stem_dim_outs) != 2:
            raise ValueError(f"motion.stem_dim_outs must be two widths (slow, fast), got {self.stem_dim_outs!r}")
        self.stem_dim_outs = tuple(self.stem_dim_outs)
        for width in self.stem_dim_outs:
            _whole("motion.stem_dim_outs", width, high=MAX_FRAME_SIDE)
        _whole("motion.channel_reduction_ratio", self.channel_reduction_ratio, high=self.stem_dim_outs[0])
        _whole("motion.max_frames", self.max_frames, low=4, high=MAX_MOTION_FRAMES)
        _whole("motion.chunk_frames", self.chunk_frames, low=0)

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

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                     "max_position_embeddings"):
            _whole(f"text.{name}", getattr(self, name))
        _whole("text.num_hidden_layers", self.num_hidden_layers, high=MAX_LAYERS)
        _divides("text", "num_attention_heads", self.num_attention_heads, "hidden_size", self.hidden_size)
        _divides("text", "num_key_value_heads", self.num_key_value_heads, "num_attention_heads",
                 self.num_attention_heads)
        if self.head_dim % 2:  # rotary embeddings turn pairs of channels
            raise ValueError(f"text.hidden_size / text.num_attention_heads must be even, got {self.head_dim}")
        _positive("text.rope_theta", self.rope_theta)
        _positive("text.rms_norm_eps", self.rms_norm_eps)
        if not isinstance(self.tie_word_embeddings, bool):
            raise ValueError(f"text.tie_word_embeddings must be true or false, got {self.tie_word_embeddings!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

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
    # 0: each keyframe is the whole frame resized (the release). N: an N x N mosaic of crops at the video's own
    # resolution (FAST-VQA's fragments), for a model whose keyframes are too small to show codec damage and
    # noise once a whole HD frame is shrunk into them (vqa2-tiny). Motion frames are whole frames either way.
    keyframe_fragments: int = 0
    # k (odd): scoring averages the level probabilities of k x k views, each with every fragment at another place in
    # its cell (`vqa2cli.video.load_video`), so a score does not hang on which small part of each cell was cut.
    fragment_shifts: int = 1
    motion_size: int = 384  # side of the square frames fed to SlowFast
    token_layout: str = "official"
    level_words: tuple[str, ...] = LEVEL_WORDS
    prompt: str = "ugc"  # default scoring prompt kind
    max_training_length: int = 10000  # embeddings per sequence the release trained with
    # Trained on still images too (the release's enhanced checkpoint): photos are scored the release's way,
    # one unpooled keyframe (vqa2cli.images). Others refuse photos: they never saw that layout or prompt.
    images: bool = False

    def __post_init__(self):
        """Every number checked before anything is built from it: a config (ours or an official one) with
        a wrong type, a size that is not positive, heads that do not divide the width, or more than
        MAX_PARAMETERS is refused with a ValueError naming the field."""
        for name, cls in (("vision", VisionConfig), ("motion", MotionConfig), ("text", TextConfig)):
            value = getattr(self, name)
            if isinstance(value, dict):
                unknown = sorted(set(value) - {f.name for f in fields(cls)})
                if unknown:
                    raise ValueError(f"unknown {name} config fields: {', '.join(unknown)}")
                setattr(self, name, cls(**value))
            elif not isinstance(value, cls):
                raise ValueError(f"{name} must be an object of {name} config fields, got {value!r}")
        _whole("pooled_grid", self.pooled_grid)
        _whole("keyframe_size", self.keyframe_size, high=MAX_FRAME_SIDE)
        _whole("motion_size", self.motion_size, high=MAX_FRAME_SIDE)
        _whole("keyframe_fragments", self.keyframe_fragments, low=0, high=self.keyframe_size)
        if self.keyframe_fragments and self.keyframe_size % self.keyframe_fragments:
            raise ValueError(f"keyframe_fragments {self.keyframe_fragments} must divide keyframe_size {self.keyframe_size}")
        _whole("fragment_shifts", self.fragment_shifts, high=9)
        if self.fragment_shifts % 2 == 0 or (self.fragment_shifts > 1 and not self.keyframe_fragments):
            raise ValueError(f"fragment_shifts must be odd, and 1 without keyframe_fragments, got {self.fragment_shifts}")
        _whole("max_training_length", self.max_training_length)
        if not isinstance(self.level_words, (list, tuple)) or len(self.level_words) < 2 or not all(
                isinstance(word, str) and word.strip() for word in self.level_words):
            raise ValueError(f"level_words must be at least two words, got {self.level_words!r}")
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
        total = self.parameter_count()
        if total > MAX_PARAMETERS:
            raise ValueError(f"the sizes describe about {total:.1e} parameters, beyond any real model (at most "
                             f"{MAX_PARAMETERS:.0e})")
        if self.images and (self.token_layout != "official" or self.keyframe_fragments):
            raise ValueError("images need the official token layout and whole keyframes (the release's image path)")

    def parameter_count(self, quantizable_only: bool = False) -> int:
        """About how many parameters the model has (within a few percent), from the config alone. With
        `quantizable_only`: the language model's decoder projections, which 4-bit/8-bit loading quantizes."""
        v, m, t = self.vision, self.motion, self.text
        kv = t.num_key_value_heads * t.head_dim
        projections = 2 * t.hidden_size * (t.hidden_size + kv) + 3 * t.hidden_size * t.intermediate_size
        if quantizable_only:
            return t.num_hidden_layers * projections
        llm = (t.vocab_size * t.hidden_size * (1 if t.tie_word_embeddings else 2) + t.hidden_size
               + t.num_hidden_layers * (projections + t.hidden_size + 2 * kv + 2 * t.hidden_size))
        d = v.hidden_size
        vision = (3 * v.patch_size**2 * d + d + v.grid**2 * d + 2 * d
                  + v.num_hidden_layers * (4 * d * d + 8 * d + 2 * d * v.intermediate_size + v.intermediate_size))
        c = m.feature_size
        motion = (_SLOWFAST_PARAMETERS_PER_STEM2[m.model_depth] * (m.stem_dim_outs[0] ** 2 + m.stem_dim_outs[1] ** 2)
                  + m.max_frames * c)
        projectors = (d + c) * t.hidden_size + 2 * t.hidden_size**2 + 4 * t.hidden_size
        return llm + vision + motion + projectors + t.hidden_size  # + image_newline

    @property
    def tokens_per_keyframe(self) -> int:
        return self.pooled_grid**2

    def sampling(self, max_motion_frames: int | None = None, max_keyframes: int | None = None, views: bool = True):
        """How to decode a video for this model (`vqa2cli.video.Sampling`): its frame sizes, and the user's
        frame caps (default 2000 motion frames, 40 keyframes) held within its motion position table.
        `views=False`: the centre cut only (`fragment_shifts` 1), for answering questions and training,
        which take the centres; only scoring averages the shifted views."""
        from vqa2cli.video import Sampling

        motion_cap = self.motion.max_frames if max_motion_frames is None else min(max_motion_frames, self.motion.max_frames)
        return Sampling(self.keyframe_size, self.motion_size, motion_cap,
                        Sampling.max_keyframes if max_keyframes is None else max_keyframes, images=self.images,
                        keyframe_fragments=self.keyframe_fragments, fragment_shifts=self.fragment_shifts if views else 1)

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
        return cls.from_dict(parse_json(Path(path).read_text()))

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
        if isinstance(select, bool) or not isinstance(select, int):
            raise ValueError(f"mm_vision_select_layer must be a whole number, got {select!r}")
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
        _whole("mm_spatial_pool_stride", stride)
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
