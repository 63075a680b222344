"""Training examples: a record and its decoded video as token ids, labels and frames; the loss on the
answers; and `FeatureCache`, which encodes each video once when the encoders are frozen."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from vqa2cli.data import Record
from vqa2cli.errors import InputError
from vqa2cli.finetune.parts import ENCODER_PARTS, under
from vqa2cli.finetune.schedule import MicroBatch


@dataclass
class Example:
    video: Path
    sample: object  # VideoSample; from FeatureCache, `keyframes` holds the EncodedVideo and `motion` None
    ids: torch.Tensor
    labels: torch.Tensor  # IGNORE_INDEX where no loss is taken
    splits: list[int] | None  # motion frames of each keyframe's second (the per_second token layout)


@dataclass
class LoadedBatch:
    """A micro-batch made ready in the background: its examples, and a one-line message for each record
    that could not be used."""

    micro: MicroBatch
    examples: list[Example] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    error: BaseException | None = None  # anything else went wrong: raised again in the training thread


def ask_user_turn(question: str, num_keyframes: int, num_frames: int) -> str:
    """The user turn `vqa2 ask` sends, so a bare question trains on the prompt the model will see."""
    from vqa2cli.prompts import ASSISTANT_PREAMBLE, MEDIA_LINES

    return ASSISTANT_PREAMBLE.format(num_keyframes=num_keyframes, num_frames=num_frames) + "\n" + MEDIA_LINES + \
        question.strip()


def build_example(record: Record, sample, tokenizer) -> Example:
    """The example of one record with its decoded video."""
    from vqa2cli.modeling import motion_splits
    from vqa2cli.prompts import training_example

    turns = list(record.turns)
    if record.wrapped:
        turns[0] = ("human", ask_user_turn(turns[0][1], len(sample.keyframe_indices), len(sample.motion_indices)))
    ids, labels = training_example([{"from": role, "value": text} for role, text in turns], tokenizer)
    splits = motion_splits(sample.keyframe_indices, sample.motion_indices)
    return Example(record.video, sample, torch.tensor(ids), torch.tensor(labels), splits)


class ExampleLoader:
    """Makes a micro-batch's examples (decoding, or the cached encoding, and tokenising); run in the
    background by `vqa2cli.batch.Prefetcher`, so it never raises: failures come back in the batch.

    With `places_seed`, a fragment model's clips are cut at random places in their cells (`load_video`'s
    `fragment_places`), drawn from the seed, the step and the record: the same places whether the run went
    straight through or resumed, and new ones each time a clip comes up again."""

    def __init__(self, records: list[Record], sampling, tokenizer, cache: FeatureCache | None,
                 places_seed: int | None = None):
        self.records, self.sampling, self.tokenizer, self.cache = records, sampling, tokenizer, cache
        self.places_seed = places_seed

    def __call__(self, micro: MicroBatch) -> LoadedBatch:
        batch = LoadedBatch(micro)
        try:
            for index in micro.records:
                record = self.records[index]
                try:
                    sample = self.cache.get(record.video) if self.cache else None
                    if sample is None:
                        sample = self.sampling.load(record.video, fragment_places=self.places(micro, index))
                    batch.examples.append(build_example(record, sample, self.tokenizer))
                except InputError as error:
                    batch.failures.append(f"{record.where}: {error}")
        except Exception as error:  # a bug, not a bad video: the training thread re-raises it as it is
            batch.error = error
        return batch

    def places(self, micro: MicroBatch, record: int) -> np.ndarray | None:
        if self.places_seed is None:
            return None
        grid = self.sampling.keyframe_fragments
        return np.random.default_rng([self.places_seed, micro.step, micro.index, record]).random((grid, grid, 2))


def answer_span(labels) -> int:
    """How many positions at the end of the (left-padded) sequences the loss needs: from the one before the
    first supervised token to the last. Everything supervised is text after the video blocks, so this
    counts the same in token ids as in the expanded embeddings."""
    from vqa2cli.prompts import IGNORE_INDEX

    span = 0
    for row in labels:
        supervised = (row != IGNORE_INDEX).nonzero()
        if len(supervised):
            span = max(span, len(row) - int(supervised[0]) + 1)
    return max(span, 2)


def answer_loss(logits: torch.Tensor, labels, keep: int) -> torch.Tensor:
    """Mean next-token cross-entropy over the answer tokens, from the last `keep` logits of each row.

    Same value as the language model's own loss on the full sequence, without materialising logits for
    the thousands of video positions (at 152k vocabulary words each)."""
    from vqa2cli.prompts import IGNORE_INDEX

    tail = torch.full((len(labels), keep), IGNORE_INDEX, dtype=torch.long)
    for b, row in enumerate(labels):
        piece = row[-keep:]
        tail[b, keep - len(piece):] = piece
    tail = tail.to(logits.device)
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].float().flatten(0, 1), tail[:, 1:].flatten(), ignore_index=IGNORE_INDEX
    )


class FeatureCache:
    """Each video's encoders-and-projectors output (`EncodedVideo`), made the first time one of its records
    comes up and reused for its other records and later epochs, in CPU memory up to `limit_bytes` (videos
    beyond that are decoded and encoded every time, as without the cache).

    Only when nothing before the language model trains and none of it has dropout (`applies`): then a
    video's encoding is the same every time, so training gives the same weights with or without the cache
    (tests/test_finetune.py). With the encoders frozen, decoding and encoding were most of a step: vqa2-tiny's
    yes/no pass (batch 8, LLM only) takes 0.25 s a step with the cache, 0.51 without."""

    def __init__(self, model, limit_bytes: int, autocast):
        self.model, self.limit, self.autocast = model, limit_bytes, autocast
        self.used = 0
        self.videos: dict[Path, object] = {}  # video -> its VideoSample, frames replaced by the encoding

    @staticmethod
    def applies(model, trainable: list[str]) -> bool:
        if any(under(name, part) for name in trainable for part in ENCODER_PARTS):
            return False
        encoders = [getattr(model, part) for part in ENCODER_PARTS]
        return not any(isinstance(m, torch.nn.Dropout) and m.p > 0
                       for part in encoders if isinstance(part, torch.nn.Module) for m in part.modules())

    def get(self, video: Path):
        """The cached sample of `video` (its `keyframes` an EncodedVideo), or None."""
        return self.videos.get(video)

    def encoded(self, example: Example) -> Example:
        """`example` with its video's encoding in place of the frames; the encoding is kept if there is room."""
        from vqa2cli.modeling import EncodedVideo

        sample = example.sample
        if isinstance(sample.keyframes, EncodedVideo):
            return example
        with torch.no_grad(), self.autocast():
            encoding = self.model.encode_video(sample.keyframes, sample.motion)
        encoding = EncodedVideo(*(None if b is None else b.to("cpu") for b in (encoding.keyframe_block,
                                                                                encoding.motion_block)))
        sample = replace(sample, keyframes=encoding, motion=None)
        if self.used + encoding.nbytes <= self.limit:
            self.videos[example.video] = sample
            self.used += encoding.nbytes
        return replace(example, sample=sample)
