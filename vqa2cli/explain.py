"""`vqa2 score --explain`: the score and, in the same run, what the assistant model says is wrong.

The scorer gives the score; an assistant model answers "What quality problems does this video have?"
(stage 3's open question, which `vqa2 synth` trains and vqa2-tiny learned; "this image" for a photo) about
the same decoded video, and its answer becomes the record's `explanation`. Which model explains
(`assistant_for`):

* `--explain-model NAME|DIR|REPO` when given (the scorer itself when it names the same model);
* otherwise the scorer itself when its registry entry says it also answers questions (`tasks`: the enhanced
  checkpoint, vqa2-tiny);
* otherwise the registry's default for `vqa2 ask` (the Assistant checkpoint).

The video is decoded once for both when the two models decode alike (same frame sizes and caps: any two
released checkpoints, or one model doing both). Otherwise the assistant decodes the file again at its own
sizes, which costs a second decoding pass, nothing else.
"""

from __future__ import annotations

import os

MAX_NEW_TOKENS = 128


def question(sample) -> str:
    """Stage 3's open question; about "this image" for a still image."""
    from vqa2cli.images import ImageSample
    from vqa2cli.synth import PROBLEMS_QUESTION

    return PROBLEMS_QUESTION.replace("video", "image") if isinstance(sample, ImageSample) else PROBLEMS_QUESTION


def assistant_for(scorer, explain_model: str | None, load) -> object:
    """The model that explains `scorer`'s scores (see the module docstring). `load(name_or_None)` loads
    another model for the `ask` task (None: its default)."""
    from vqa2cli import registry

    if explain_model is not None:
        same = explain_model == scorer.name or _same_dir(explain_model, scorer.name)
        return scorer if same else load(explain_model)
    entry = registry.get_entry(scorer.name)
    if entry is not None and "ask" in entry.tasks:
        return scorer
    return load(None)


def _same_dir(a: str, b: str) -> bool:
    return os.path.isdir(a) and os.path.isdir(b) and os.path.samefile(a, b)


class Explainer:
    """`after` hook for `batch.score_videos`: fills `record.explanation` from the decoded sample."""

    def __init__(self, scorer, assistant, max_motion_frames=None, max_keyframes=None,
                 max_new_tokens: int = MAX_NEW_TOKENS):
        self.assistant = assistant
        self.max_new_tokens = max_new_tokens
        self.caps = (max_motion_frames, max_keyframes)
        # One decoding pass serves both when the assistant would decode the file exactly as the scorer did
        # (a still image it does not take is refused by `ask` either way).
        self.reuse = assistant is scorer or _decodes(assistant, self.caps) == _decodes(scorer, self.caps)

    def __call__(self, record, sample) -> None:
        if not self.reuse:
            sample = self.assistant.load_video(record.path, *self.caps, views=False)
        record.explanation = self.assistant.ask(sample, question(sample), max_new_tokens=self.max_new_tokens)


def _decodes(model, caps) -> tuple:
    sampling = model.sampling(*caps)
    return (sampling.keyframe_size, sampling.motion_size, sampling.max_motion_frames, sampling.max_keyframes,
            sampling.keyframe_fragments)
