"""Quality over time: a video scored in consecutive windows, from the same decoding pass as its whole score.

    >>> from vqa2cli.timeline import score_timeline
    >>> sample, whole, segments = score_timeline(model, "clip.mp4", seconds=2)
    >>> segments[0]                                  # {"start": 0.0, "end": 2.0, "score": 0.81, "level": "good"}

Windows are counted in frames: ``round(seconds * fps)`` frames each, from the first decoded frame; the last
one keeps what is left (it may be shorter). Times are frame counts divided by the frame rate, exact for
constant-rate video. Each window is sampled by the rules of a whole clip (`vqa2cli.video`) as if it were a
clip of its own: keyframes every ``round(fps)`` frames from its first frame (at most the keyframe cap,
spread out beyond it), all its frames as the motion stream (subsampled to the motion cap, cut to a multiple
of 4, at least 4), at the model's sizes. A window's sample is therefore what decoding that stretch alone
would give (tests: bitwise, on a lossless clip cut in two).

One pass: `WindowSampler` rides on the whole clip's decoding (`load_video(..., tap=...)`) and hands each
window to the model as soon as its last frame is in, so memory holds the whole clip's sample (bounded by its
caps, as without --timeline) plus ONE window's frames, whatever the video's length. Frames the whole clip
also keeps are copied from it rather than resized again where both sampling rules give the same pixels.
The cost: decoding and the model alternate for the file (no prefetching of the next video, and no decode
worker processes: the windows go to the model as they come off the decoder, so it decodes where the model
runs; a worker would have to hold every window until its file is done, or `vqa2cli.prefetch` would need a
stream of results per file), and frames the whole clip's sampling skips (a long clip's motion stream is
subsampled, a window's is not) are resized once more; `tests/bench/bench_timeline.py` measures it.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional

import numpy as np

SPARKS = "▁▂▃▄▅▆▇█"
DEFAULT_SECONDS = 2.0


@dataclass
class Window:
    """One window's sample (a `VideoSample`: frame indices count from the window's first frame)."""

    number: int
    start: float  # seconds from the clip's first frame
    end: float
    sample: object


class _WindowBuffers:
    """The keyframes and motion frames of one window, chosen by the whole-clip rules (`vqa2cli.video`)."""

    def __init__(self, path: str, number: int, first: int, expected: int, step: int, sampling, views):
        from vqa2cli.video import _Buffers

        self.number, self.first = number, first
        self.buffers = _Buffers(path, expected, step, sampling.keyframe_size, sampling.motion_size,
                                sampling.max_motion_frames, sampling.max_keyframes, sampling.keyframe_fragments,
                                views)
        self.frames = 0
        self.width = self.height = 0

    def window(self, path: str, fps: float) -> Window:
        from vqa2cli.video import VideoSample

        keyframes, keyframe_views, keyframe_indices = self.buffers.keyframes.result()
        motion, motion_indices = self.buffers.motion.result()
        sample = VideoSample(
            path=path, keyframes=keyframes, motion=motion, keyframe_indices=keyframe_indices,
            motion_indices=motion_indices, fps=fps, duration=self.frames / fps, num_frames=self.frames,
            width=self.width, height=self.height, keyframe_fragments=self.buffers.keyframe_fragments,
            keyframe_views=keyframe_views,
        )
        return Window(self.number, self.first / fps, (self.first + self.frames) / fps, sample)


class WindowSampler:
    """A `load_video` tap (see `vqa2cli.video`) that cuts the decoded frames into windows of `seconds` and
    calls `on_window(Window)` as each one is complete; `close()` after decoding hands over the last one."""

    def __init__(self, path: str, sampling, seconds: float, on_window: Callable[[Window], None]):
        from av.video.reformatter import VideoReformatter

        from vqa2cli.video import _keyframe_is_motion_frame, _view_places

        if not seconds > 0:
            raise ValueError(f"window length must be positive, got {seconds}")
        self.path, self.sampling, self.seconds, self.on_window = path, sampling, seconds, on_window
        self.shared = _keyframe_is_motion_frame(sampling.keyframe_size, sampling.motion_size, sampling.keyframe_fragments)
        self.views = _view_places(None, sampling.fragment_shifts, sampling.keyframe_fragments)  # as `load_video`'s
        self.reformatter = VideoReformatter()  # used on the resize thread only
        self.current: Optional[_WindowBuffers] = None

    def start(self, expected: int, fps: float) -> None:
        from vqa2cli.video import _keyframe_step

        self.expected, self.fps = expected, fps
        self.step = _keyframe_step(fps)
        self.window_frames = max(1, round(self.seconds * fps))

    def frame(self, index, frame, quarter_turns, whole_keyframe, whole_motion, submit, finish) -> None:
        number = index // self.window_frames
        if self.current is None or number != self.current.number:
            if self.current is not None:
                finish(0)  # the window's frames are all in its buffers
                done, self.current = self.current, None  # gone before the next one's buffers are made
                self.on_window(done.window(self.path, self.fps))
                del done
            first = number * self.window_frames
            left = self.expected - first  # frames counted before decoding; more may come (damaged files)
            expected = min(left, self.window_frames) if left > 0 else self.window_frames
            self.current = _WindowBuffers(self.path, number, first, expected, self.step, self.sampling, self.views)
            self.current.width, self.current.height = ((frame.height, frame.width) if quarter_turns % 2
                                                       else (frame.width, frame.height))
        window = self.current
        local = index - window.first
        window.frames += 1
        self._fill(frame, quarter_turns, *window.buffers.slots(local, finish), whole_keyframe, whole_motion, submit)

    def _fill(self, frame, turns, keyframe, motion, whole_keyframe, whole_motion, submit) -> None:
        """Queue what fills the window's slots: a copy of the whole clip's slot where that holds the same
        pixels, else the resize the whole-clip rules use (a keyframe that is also a motion frame at the same
        size is the exact PIL resize for both; other motion frames are swscale's)."""
        from vqa2cli.video import _fast_resize_into, _keyframe_into

        exact = keyframe is not None and self.shared  # this motion frame must be the keyframe's pixels
        if motion is not None and whole_motion is not None and exact == (whole_keyframe is not None and self.shared):
            submit(np.copyto, motion, whole_motion)
            motion = None
        if keyframe is not None:
            if whole_keyframe is not None and not (exact and motion is not None):
                submit(np.copyto, keyframe, whole_keyframe)
            else:
                submit(_keyframe_into, keyframe, motion if exact else None, frame, self.sampling.keyframe_size,
                       self.sampling.keyframe_fragments, turns, self.views)
                motion = None if exact else motion
        if motion is not None:
            submit(_fast_resize_into, motion, self.reformatter, frame, turns)

    def close(self) -> None:
        """After `load_video` returned (its resize jobs are done): the last window."""
        if self.current is not None:
            window, self.current = self.current, None
            self.on_window(window.window(self.path, self.fps))


def score_timeline(model, path, seconds: float = DEFAULT_SECONDS, prompt: Optional[str] = None,
                   max_motion_frames: Optional[int] = None, max_keyframes: Optional[int] = None,
                   batch_size: int = 1):
    """Decode `path` once; score it whole and window by window. Returns (sample, whole-clip ScoreResult,
    segments), segments None for a still image (it has no timeline)."""
    from vqa2cli.batch import Loader

    load = Loader(model.sampling(max_motion_frames, max_keyframes))
    sample, segments = score_windows(model, load, path, seconds, prompt, batch_size)
    return sample, model.score(sample, prompt=prompt), segments


def score_windows(model, load, path, seconds: float, prompt: Optional[str] = None, batch_size: int = 1):
    """Decode `path` once with `load` (a `batch.Loader`), scoring its windows `batch_size` at a time as they
    come off the decoder. Returns (the whole clip's sample, segments); segments None for a still image."""
    from vqa2cli.images import ImageSample

    segments, waiting = [], []

    def score_waiting():
        results = model.score_batch([window.sample for window in waiting], prompt=prompt)
        segments.extend(segment(window, result) for window, result in zip(waiting, results))
        waiting.clear()

    def on_window(window):
        waiting.append(window)
        if len(waiting) >= batch_size:
            score_waiting()

    sampler = WindowSampler(os.fspath(path), load.sampling, seconds, on_window)
    sample = load(path, tap=sampler)
    if isinstance(sample, ImageSample):
        return sample, None
    sampler.close()
    if waiting:
        score_waiting()
    return sample, segments


def segment(window: Window, result) -> dict:
    return {"start": round(window.start, 3), "end": round(window.end, 3), "score": float(result.score),
            "level": result.level.strip()}


def timeline_records(model, paths: Iterable[str], seconds: float, prompt: Optional[str] = None,
                     max_motion_frames: int = 2000, max_keyframes: int = 40, batch_size: int = 1,
                     strict: bool = False, after: Optional[Callable] = None) -> Iterator:
    """`batch.score_videos(..., timeline=seconds)`: one ScoreRecord per path, in order, with `segments`. Each
    file is decoded here, its windows scored as they come (see the module docstring), then the whole clip
    goes through `batch.score_decoded` like any decoded video; errors are records."""
    from vqa2cli.batch import Loader, error_message, score_decoded
    from vqa2cli.errors import SetupError

    load = Loader(model.sampling(max_motion_frames, max_keyframes))
    for path in paths:
        start = time.perf_counter()
        sample = segments = error = None
        try:
            sample, segments = score_windows(model, load, path, seconds, prompt, batch_size)
        except SetupError:
            raise
        except Exception as failure:  # this file fails, the batch goes on
            error = error_message(path, failure)
        [record] = score_decoded(model, [(path, sample, error, time.perf_counter() - start)], prompt, strict, after)
        if record.score is not None:  # not refused (--strict) or failed
            record.segments = segments
        del sample  # the frames go before the next file is decoded
        yield record


def worst(segments: list[dict]) -> dict:
    """The lowest-scoring window (the first of equals)."""
    return min(segments, key=lambda s: s["score"])


def worst_text(segments: list[dict]) -> str:
    w = worst(segments)
    return f"{w['start']:.1f}-{w['end']:.1f} s: {w['score']:.3f}"


def sparkline(segments: list[dict], width: int = 40) -> str:
    """One block character per window, its height the score on the absolute 0..1 scale (so videos compare);
    more windows than `width` are grouped, each group showing its worst window."""
    scores = [s["score"] for s in segments]
    groups = math.ceil(len(scores) / width) if scores else 1
    lows = [min(scores[i : i + groups]) for i in range(0, len(scores), groups)]
    return "".join(SPARKS[min(int(score * len(SPARKS)), len(SPARKS) - 1)] for score in lows)
