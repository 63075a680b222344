"""`load_model()` -> `VQA2`: a loaded model that scores videos and answers questions about them.

    >>> model = load_model("vqa2-ugc-scorer")          # registry name, model directory or HF repo id
    >>> model.score("clip.mp4")                          # ScoreResult(score=0.71, level='good', probs={...})
    >>> model.ask("clip.mp4", "Is there any stutter?", on_text=print)

Scoring is one forward pass without generation: the next-token logits at the last token of the
assistant prefill ("The quality of the video is"), restricted to the five level words, give the level
probabilities and the score (`vqa2cli.scoring`). Everything runs under `torch.inference_mode` with
dtypes fixed at load time, so the same input on the same device gives bitwise the same result.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch

from vqa2cli import checkpoint
from vqa2cli.config import PROMPT_KINDS, VQA2Config
from vqa2cli.errors import CheckpointError, InputError, SetupError
from vqa2cli.quantization import Precision, choose_precision


@dataclass
class ScoreResult:
    score: float  # 0 (worst) .. 1 (best)
    level: str  # most probable level word, without its leading space ("good")
    probs: dict[str, float]  # level word -> probability, in the config's level order


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """"auto" = cuda when available, else cpu; cuda without a GPU is a setup error."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError as error:
        raise SetupError(f"unknown device {str(device)!r}: use auto, cpu or cuda") from error
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SetupError("device cuda was asked for but no CUDA GPU is available (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SetupError(f"device {device} does not exist ({torch.cuda.device_count()} CUDA GPU(s) present)")
    elif device.type != "cpu":
        raise SetupError(f"device {device} is not supported: use auto, cpu or cuda")
    return device


def load_model(
    name_or_path: str | os.PathLike | None = None,
    device: str | torch.device = "auto",
    quant: str = "auto",
    task: str = "score",
    dtype: str | torch.dtype | None = None,
) -> "VQA2":
    """Load a model for `task` ("score" or "ask"; picks the default model when `name_or_path` is None).

    `name_or_path`: a model directory (ours or official llava_qwen), a registry name (`vqa2 models`) or a
    Hugging Face repo id. `quant`: "auto" (4-bit NF4 on CUDA, none on CPU), "4bit", "8bit" or "none".
    `dtype` of the unquantized weights: default bf16 on CUDA, float32 on CPU.
    """
    device = resolve_device(device)  # before resolving: a bad option must not wait for a download
    precision = choose_precision(device, quant, dtype)
    loaded = checkpoint.load_any(name_or_path, task, device=device, precision=precision)
    loaded.model.requires_grad_(False)
    return VQA2(loaded.name, loaded.model, loaded.tokenizer, device, precision)


class VQA2:
    """A loaded model. `load_video(path)` / `sampling()` decode videos the way this model takes them."""

    def __init__(self, name: str, model, tokenizer, device: torch.device, precision: Precision):
        self.name = name
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.precision = precision
        self.config: VQA2Config = model.config
        from vqa2cli.scoring import level_token_ids

        try:
            self.level_ids = torch.tensor(level_token_ids(tokenizer, self.config.level_words), device=device)
        except ValueError as error:
            raise CheckpointError(f"model {name}: {error}") from error
        vocab = self.config.text.vocab_size
        if int(self.level_ids.max()) >= vocab:
            raise CheckpointError(f"model {name}: the tokenizer's level word ids exceed the vocabulary ({vocab})")

    def __repr__(self):
        return f"VQA2(name={self.name!r}, device={self.device}, precision={self.precision.describe()!r})"

    # ---- inputs --------------------------------------------------------------------------------------

    def sampling(self, max_motion_frames: int | None = None, max_keyframes: int | None = None, views: bool = True):
        """How to decode videos for this model (`vqa2cli.video.Sampling`): its frame sizes; the caps are
        the user's, held within the model's motion position table. `views=False`: the centre cut only
        (enough for `ask`; `VQA2Config.sampling`)."""
        return self.config.sampling(max_motion_frames, max_keyframes, views)

    def load_video(self, path, max_motion_frames: int | None = None, max_keyframes: int | None = None,
                   views: bool = True):
        """Decode `path` for this model (a `VideoSample` that `score`/`ask` take as it is)."""
        return self.sampling(max_motion_frames, max_keyframes, views).load(path)

    def _sample(self, video, max_motion_frames: int | None, max_keyframes: int | None, views: bool = True):
        if isinstance(video, (str, os.PathLike)):
            return self.load_video(video, max_motion_frames, max_keyframes, views)
        if not (hasattr(video, "keyframes") and hasattr(video, "motion")):
            raise TypeError(f"video must be a path or a VideoSample, not {type(video).__name__}")
        from vqa2cli.images import ImageSample

        expected = self.sampling()
        if isinstance(video, ImageSample) and not expected.images:
            raise InputError(f"{video.path}: a still image, and model {self.name} takes videos only")
        sizes = (video.keyframes.shape[-1], video.motion.shape[-1])
        if sizes != (expected.keyframe_size, expected.motion_size):
            raise InputError(
                f"{video.path}: decoded at {sizes[0]} px keyframes and {sizes[1]} px motion frames, but model "
                f"{self.name} takes {expected.keyframe_size} and {expected.motion_size}; decode it with "
                f"model.load_video(path)"
            )
        fragments = getattr(video, "keyframe_fragments", 0)
        if fragments != expected.keyframe_fragments:
            raise InputError(f"{video.path}: decoded with {_keyframe_view(fragments)}, but model {self.name} takes "
                             f"{_keyframe_view(expected.keyframe_fragments)}; decode it with model.load_video(path)")
        if video.motion.shape[0] > expected.max_motion_frames:
            raise InputError(
                f"{video.path}: {video.motion.shape[0]} motion frames, more than model {self.name}'s "
                f"{expected.max_motion_frames}; decode it with model.load_video(path)"
            )
        return video

    def _splits(self, sample) -> list[int] | None:
        """per_second layout: the motion frames of each keyframe's second, from the sample's frame
        indices (a sample without them gets the model's even split). The official layout needs none."""
        if self.config.token_layout != "per_second" or not hasattr(sample, "motion_indices"):
            return None
        from vqa2cli.modeling import motion_splits

        return motion_splits(sample.keyframe_indices, sample.motion_indices)

    def _encode(self, ids: torch.Tensor, sample):
        """The sample through the encoders, its motion frames only where the prompt places them; a still
        image's keyframe unpooled (`vqa2cli.images`: its prompt has one placeholder, so no motion either)."""
        from vqa2cli.images import ImageSample

        motion = sample.motion if self.model.places_motion(ids) else None
        return self.model.encode_video(sample.keyframes, motion, pool=not isinstance(sample, ImageSample))

    def _encode_views(self, ids: torch.Tensor, sample) -> list:
        """`_encode` once per keyframe view (`VideoSample.keyframe_views`; view 0 is `keyframes`), the motion
        block shared."""
        first = self._encode(ids, sample)
        views = getattr(sample, "keyframe_views", None)
        if views is None:
            return [first]
        return [first] + [replace(first, keyframe_block=self.model.encode_keyframes(view)) for view in views[1:]]

    def _ids(self, text: str) -> torch.Tensor:
        from vqa2cli.prompts import tokenize_prompt

        return torch.tensor(tokenize_prompt(text, self.tokenizer), dtype=torch.long)

    def _score_text(self, prompt: str | None, sample=None) -> str:
        from vqa2cli.images import ImageSample
        from vqa2cli.prompts import image_scoring_prompt, scoring_prompt

        if isinstance(sample, ImageSample):
            return image_scoring_prompt()  # whatever the video prompt kind: images have their own
        kind = prompt or self.config.prompt
        if kind not in PROMPT_KINDS:
            raise SetupError(f"unknown scoring prompt {kind!r}: expected one of {', '.join(PROMPT_KINDS)}")
        return scoring_prompt(kind)

    # ---- scoring -------------------------------------------------------------------------------------

    def score(self, video, prompt: str | None = None, max_motion_frames: int | None = None,
              max_keyframes: int | None = None) -> ScoreResult:
        """Quality of one video (a path or a `VideoSample`). `prompt`: the scoring prompt kind (ugc,
        streaming, enhanced); default: the one the model was trained with. The frame caps apply when
        `video` is a path (see `load_video`; default: the model's own limits)."""
        return self.score_batch([video], prompt=prompt, max_motion_frames=max_motion_frames,
                                max_keyframes=max_keyframes)[0]

    def score_batch(self, videos, prompt: str | None = None, max_motion_frames: int | None = None,
                    max_keyframes: int | None = None) -> list[ScoreResult]:
        """Several videos in one forward pass (left-padded). Results equal one-by-one scoring up to
        float rounding of the padded batch; use `score` where bitwise repeatability across batch
        compositions matters. A video decoded with several keyframe views (a model with `fragment_shifts`)
        goes through once per view, and its level probabilities are their mean."""
        from vqa2cli.scoring import score_from_logits

        samples = [self._sample(v, max_motion_frames, max_keyframes) for v in videos]
        if not samples:
            return []
        ids = [self._ids(self._score_text(prompt, s)) for s in samples]
        with torch.inference_mode():
            views = [self._encode_views(i, s) for i, s in zip(ids, samples)]
            rows = [(i, view, self._splits(s)) for i, s, encoded in zip(ids, samples, views) for view in encoded]
            row_ids, videos, splits = (list(column) for column in zip(*rows))
            logits = self.model.next_token_logits(row_ids, videos, motion_splits=splits)
            level_logits = logits.index_select(-1, self.level_ids).float().cpu()
        results = []
        for per_view in level_logits.split([len(encoded) for encoded in views]):
            score, level, probs = score_from_logits(per_view, self.config.level_words)
            results.append(ScoreResult(score, level, probs))
        return results

    # ---- questions -----------------------------------------------------------------------------------

    def ask(self, video, question: str, max_new_tokens: int = 512, on_text=None) -> str:
        """Greedy answer to a free-form question about the video; `on_text(str)` receives the answer in
        pieces as it is generated. Returns the whole answer."""
        from vqa2cli.images import ImageSample
        from vqa2cli.prompts import image_question_prompt, question_prompt

        sample = self._sample(video, max_motion_frames=None, max_keyframes=None, views=False)
        if isinstance(sample, ImageSample):
            text = image_question_prompt(question)
        else:
            text = question_prompt(question, num_keyframes=sample.keyframes.shape[0],
                                   num_frames=sample.motion.shape[0])
        streamer = _callback_streamer(self.tokenizer, on_text) if on_text is not None else None
        ids = self._ids(text)
        with torch.inference_mode():
            new_ids = self.model.generate(
                ids,
                self._encode(ids, sample),
                max_new_tokens=max_new_tokens,
                eos_token_id=self._stop_ids(),
                streamer=streamer,
                motion_splits=self._splits(sample),
            )
        return self.tokenizer.decode(new_ids[0], skip_special_tokens=True).strip()

    def _stop_ids(self) -> list[int]:
        """End of the assistant turn (`<|im_end|>`) and end of text, whichever the tokenizer has."""
        ids = []
        for token in ("<|im_end|>", "<|endoftext|>", self.tokenizer.eos_token):
            if token is None:
                continue
            token_id = self.tokenizer.convert_tokens_to_ids(token)
            if token_id is not None and token_id != self.tokenizer.unk_token_id and token_id not in ids:
                ids.append(token_id)
        return ids


def _callback_streamer(tokenizer, on_text):
    from transformers import TextStreamer

    class CallbackStreamer(TextStreamer):
        # TextStreamer decodes incrementally and holds back partial words; we only redirect its output.
        def on_finalized_text(self, text: str, stream_end: bool = False):
            if text:
                on_text(text)

    # skip_prompt: generate() first "streams" the (empty, embeddings-only) prompt ids.
    return CallbackStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def _keyframe_view(fragments: int) -> str:
    return f"{fragments}x{fragments} keyframe fragments" if fragments else "whole-frame keyframes"
