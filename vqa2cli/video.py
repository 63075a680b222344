"""Turning a video file into what VQA² sees: keyframes and the motion stream.

`load_video` decodes a file once with PyAV and returns a `VideoSample`:

* **Keyframes**: frame index ``i * round(fps)`` for i = 0, 1, ... while the index is inside the clip,
  i.e. one per whole second plus one for the frames left over after the last whole second (the
  release's rule). Any clip with a decodable frame gets at least one keyframe (index 0), so clips under
  a second and one-frame clips work. Clips longer than ``max_keyframes`` seconds keep that many of
  these keyframes, spread uniformly over the clip (the j-th candidate for j = ``k * K // M``): 40
  keyframes of 196 tokens plus a full motion stream of 2000 stay within the 10,000 embeddings the
  checkpoints were trained on, and 600 keyframes of a 10-minute clip would overflow the LLM's context
  (and 1 GB of memory). Keyframes are resized exactly like the release does it: the
  full-resolution RGB frame goes through PIL's bicubic resize to ``keyframe_size`` squared (aspect
  ratio not kept), then is scaled to [0, 1] and normalised with mean = std = 0.5 (float32). A model
  with ``keyframe_fragments`` N (vqa2-tiny) takes instead an N x N mosaic of crops at the frame's own
  resolution, one from the centre of each cell of the frame cut N x N, so that codec damage and noise
  are not averaged away by the shrinking (FAST-VQA's fragments; training may take them from random
  places in their cells, ``fragment_places``); frames smaller than the keyframe are resized whole.
* **Motion stream**: all decoded frames, truncated to a multiple of 4, kept as uint8 RGB (the model
  normalises them with `normalize`). Clips with more than ``max_motion_frames`` frames are subsampled
  uniformly in time: the k-th motion frame is source frame ``k * N // T`` with T the cap rounded
  down to a multiple of 4. Clips with 1-3 frames repeat their last frame up to 4 (SlowFast's motion
  stream needs a multiple of 4). Motion frames are resized by libswscale's bicubic filter straight
  from the decoder's YUV to planar RGB (many frames, so speed matters); keyframes that are also
  motion frames are shared when both sizes agree. Both resizes run on one background thread, in
  decode order, while the main thread keeps the decoder fed (swscale and PIL release the GIL).

Keyframes are bitwise what the release's path gives; motion frames differ from it by about one grey
level on average (chroma siting: swscale resamples the half-size chroma planes, the release replicates
them to full size first) at a seventh of its cost. docs/sampling.md has the measurements and the
alternatives they ruled out.

Timing comes from presentation timestamps. Before decoding, one cheap pass over the packets (no
decoding) counts the frames and reads their timestamps; indexed formats (mp4/mov, mkv/webm) then
seek back rather than open the file again, which would decode a frame to probe it. The pass gives
the frame count that the motion subsampling needs up front (containers such as webm/mkv declare
none) and the frame rate:
``fps = frames / duration`` with ``duration = last pts - first pts + the last frame's duration``
(the mean interval when that is unknown), which is the nominal rate for constant-rate video and the
average rate for variable-rate video. The container's nominal rate replaces it when the two agree
within 1% (timestamps rounded to milliseconds, as in mkv, would blur 30000/1001) or when timestamps
are missing.
Keyframe indices are counted in decoded (presentation) order. If the decoder yields more frames
than packets were counted, the motion stream stays within the cap by dropping every other stored
frame and halving the sampling rate, so memory is bounded by the output in every case.

Rotation from the display matrix is applied (multiples of 90°; mirroring is not), so frames come out
upright and `width`/`height` are the displayed size (in stored pixels: a non-square sample aspect
ratio is not applied, the resize to a square ignores aspect ratio anyway). Any pixel format swscale reads works (10-bit,
grayscale, palette).

Damage: decoding goes on past packets the decoder rejects and past a read error (a truncated or
damaged file ends the stream there). A sample is returned as long as at least one frame decodes; what
was lost is reported in `VideoSample.warnings`. A video with no decodable frame raises `VideoError`.
A still image (png, jpg, a one-frame gif, ...) is rejected as not a video (`StillImageError`) rather
than taken as a one-frame clip: scoring a photo as video would be meaningless. `Sampling.load` hands it
to `vqa2cli.images` for models trained on still images. Animated gif and apng are videos (animated WebP
is not: FFmpeg's WebP decoder reads still pictures only).

`load_video(..., tap=...)` lets another sampler see the same decoding pass (`vqa2cli.timeline` samples
consecutive windows from it): `tap.start(expected_frames, fps)` once, then `tap.frame(index, frame,
quarter_turns, keyframe, motion, submit, finish)` for every decoded frame, after this pass's own resize jobs
for it were queued. `keyframe` / `motion` are the slots this pass fills from the frame (numpy views, or
None), `submit(job, *args)` queues `job(*args)` on the resize thread (in order, after those fills) and
`finish(n)` waits until at most n jobs are pending (0 before moving anything a queued job writes).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import math
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import av
import numpy as np
from av.video.reformatter import Interpolation, VideoReformatter
from PIL import Image

from vqa2cli.errors import InputError

# torch (1.5 s to import) is imported where the output buffers are made: the extension list and
# check_video serve processes that never decode into tensors (synth's workers, path listing, validation).
if TYPE_CHECKING:
    import torch

# What counts as a video when walking a folder (case-insensitive). A file named explicitly is always tried.
VIDEO_EXTENSIONS = frozenset(
    ".3g2 .3gp .asf .avi .divx .f4v .flv .m2ts .m2v .m4v .mkv .mov .mp4 .mpeg .mpg .mts .mxf .ogv .qt"
    " .ts .vob .webm .wmv .y4m".split()
)

MEAN = 0.5
STD = 0.5

_MOTION_INTERPOLATION = Interpolation.BICUBIC
# Frames handed to the resize thread and not yet done: bounds the decoded frames held (12 MB each at 4K).
_IN_FLIGHT = 4
# Demuxers (FFmpeg names) that seek back to the first packet exactly, from their index.
_REWINDABLE = ("mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm")
# FFmpeg demuxers for pictures (plus every "*_pipe" one; "yuv4mpegpipe" is video and does not match),
# and animation formats that may hold a single picture.
_PICTURE_FORMATS = ("image2", "image2pipe", "gif", "apng")


class VideoError(InputError):
    """A file that cannot be used as a video; `str()` is one line: ``<file>: <reason>``."""

    def __init__(self, path, reason: str):
        self.path = os.fspath(path)
        self.reason = _one_line(reason)
        super().__init__(f"{_one_line(self.path)}: {self.reason}")


class StillImageError(VideoError):
    """A still picture, not a video. `picture` names it: "a still image (png)"."""

    def __init__(self, path, picture: str):
        self.picture = picture
        super().__init__(path, f"{picture}, not a video")


@dataclass
class VideoSample:
    path: str
    keyframes: torch.Tensor  # [N, 3, S, S] float32, normalised (mean = std = 0.5)
    motion: torch.Tensor  # [T, 3, S', S'] uint8 RGB, T % 4 == 0; `normalize()` for the model
    keyframe_indices: list[int]  # source frame indices in decode order
    motion_indices: list[int]
    fps: float
    duration: float  # seconds
    num_frames: int  # frames decoded
    width: int  # displayed size (after rotation)
    height: int
    warnings: list[str] = field(default_factory=list)  # damage that was tolerated
    keyframe_fragments: int = 0  # how the keyframes were taken (`Sampling.keyframe_fragments`)
    # [V, N, 3, S, S]: the keyframes cut at each of `Sampling.fragment_shifts`² shifted places, the centres
    # first (`keyframes` is view 0); scoring averages them. None: one view (or frames too small to cut).
    keyframe_views: torch.Tensor | None = None

    def __getstate__(self):
        # `keyframes` is a view of `keyframe_views`, and pickling a view writes its whole storage: ship the
        # views once (decode workers, Ray) and take view 0 again on arrival.
        state = dict(self.__dict__)
        if self.keyframe_views is not None:
            state["keyframes"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if self.keyframe_views is not None:
            self.keyframes = self.keyframe_views[0]


@dataclass(frozen=True)
class Sampling:
    """What to decode for one model: frame sizes from the model, frame caps within the model's limits.

    Get one from the model (`VQA2.sampling()`, `VQA2Config.sampling()`) rather than building it by hand,
    so the sizes and caps always match what the model takes. Picklable: decode worker processes get it.
    """

    keyframe_size: int = 384
    motion_size: int = 384
    max_motion_frames: int = 2000
    max_keyframes: int = 40
    images: bool = False  # the model takes still images too (`vqa2cli.images.load_image`)
    keyframe_fragments: int = 0  # 0: whole frames resized; N: N x N crops at full resolution (`load_video`)
    fragment_shifts: int = 1  # fragments cut at k x k places in their cells (`load_video`)

    def load(self, path, tap=None, fragment_places=None) -> VideoSample:
        """`path` decoded for the model; a still image too when the model takes them (an `ImageSample`).
        `tap`: see the module docstring; `fragment_places` (one view: needs `fragment_shifts` 1): see `load_video`."""
        try:
            return load_video(path, keyframe_size=self.keyframe_size, motion_size=self.motion_size,
                              max_motion_frames=self.max_motion_frames, max_keyframes=self.max_keyframes, tap=tap,
                              keyframe_fragments=self.keyframe_fragments, fragment_places=fragment_places,
                              fragment_shifts=self.fragment_shifts)
        except StillImageError as still:
            if not self.images:
                raise VideoError(still.path, f"{still.picture}: this model scores videos only "
                                             "(vqa2-assistant-enhanced scores images too)") from None
        from vqa2cli.images import load_image

        return load_image(path, self.keyframe_size, self.motion_size)


def normalize(frames: torch.Tensor) -> torch.Tensor:
    """uint8 RGB frames -> float32 scaled to [0, 1] and normalised with mean = std = 0.5."""
    return frames.float().div(255.0).sub_(MEAN).div_(STD)


def _normalize_into(out: np.ndarray, rgb: np.ndarray) -> None:
    # numpy, not torch: torch's worker threads would compete with the decoder's for the cores.
    # Same float32 operations as `normalize`, so the results are identical.
    np.divide(rgb.transpose(2, 0, 1), np.float32(255.0), out=out, dtype=np.float32)
    out -= np.float32(MEAN)
    out /= np.float32(STD)


def load_video(path, keyframe_size: int = 384, motion_size: int = 384,
               max_motion_frames: int = 2000, max_keyframes: int = 40, tap=None,
               keyframe_fragments: int = 0, fragment_places: np.ndarray | None = None,
               fragment_shifts: int = 1) -> VideoSample:
    """Decode `path` once into keyframes and the motion stream (see the module docstring).

    `fragment_places` (training only: FAST-VQA's random fragments): where each fragment lies in its cell,
    [N, N, 2] (row, column) in [0, 1], 0 at the cell's top or left edge, 1 at its bottom or right, the same
    for every keyframe; None takes the centres (0.5), as scoring does.
    `fragment_shifts` k > 1 (odd): the keyframes are also cut with every fragment at each of k x k places
    ((2a + 1) / 2k for a < k, along each axis), the centres first: `VideoSample.keyframe_views`.

    Raises `VideoError` (one line naming the file and the reason) for anything that is not a usable
    video; never a raw PyAV or OS error.
    """
    for name, value in (("keyframe_size", keyframe_size), ("motion_size", motion_size)):
        if int(value) < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if int(max_motion_frames) < 4:
        raise ValueError(f"max_motion_frames must be at least 4, got {max_motion_frames}")
    if int(max_keyframes) < 1:
        raise ValueError(f"max_keyframes must be at least 1, got {max_keyframes}")
    if int(keyframe_fragments) < 0 or (keyframe_fragments and int(keyframe_size) % int(keyframe_fragments)):
        raise ValueError(f"keyframe_fragments must be 0 or divide keyframe_size {keyframe_size}, got {keyframe_fragments}")
    views = _view_places(fragment_places, int(fragment_shifts), int(keyframe_fragments))
    path = os.fspath(path)
    _check_file(path)
    with _reported(path):
        container = _open(path)
        try:
            probe = _probe(path, container)
            container = _rewound(path, container, probe)
            return _decode(path, container, probe, int(keyframe_size), int(motion_size),
                           int(max_motion_frames), int(max_keyframes), tap, int(keyframe_fragments), views)
        finally:
            container.close()


def _view_places(places, shifts: int, grid: int) -> np.ndarray | None:
    """[V, N, N, 2]: where the fragments of each keyframe view lie (`load_video`); None: one view, the centres."""
    if shifts < 1 or shifts % 2 == 0:
        raise ValueError(f"fragment_shifts must be an odd number from 1, got {shifts}")
    if places is not None:
        if shifts > 1:
            raise ValueError("fragment_places gives one view: it takes no fragment_shifts")
        return _checked_places(places, grid)[None]
    if shifts == 1:
        return None
    if not grid:
        raise ValueError("fragment_shifts needs keyframe_fragments")
    along = (2 * np.arange(shifts) + 1) / (2 * shifts)
    offsets = [(row, column) for row in along for column in along]
    offsets.sort(key=lambda offset: offset != (0.5, 0.5))  # the centres first: they are `keyframes`
    return np.broadcast_to(np.array(offsets)[:, None, None, :], (len(offsets), grid, grid, 2)).copy()


def _checked_places(places, grid: int) -> np.ndarray:
    """`load_video`'s `fragment_places` as float64, or a ValueError."""
    if not grid:
        raise ValueError("fragment_places needs keyframe_fragments")
    places = np.asarray(places, dtype=np.float64)
    if places.shape != (grid, grid, 2):
        raise ValueError(f"fragment_places must have shape ({grid}, {grid}, 2), got {places.shape}")
    if not ((places >= 0) & (places <= 1)).all():
        raise ValueError("fragment_places must lie in [0, 1]")
    return places


def check_video(path) -> None:
    """Raise `VideoError`, with `load_video`'s reasons, unless `path` opens as a video whose first frame
    decodes. Cheap (a frame or two, not the whole file): for validating many files up front."""
    path = os.fspath(path)
    _check_file(path)
    with _reported(path):
        container = _open(path)
        try:
            stream = _video_stream(path, container)
            fmt = container.format.name
            # A picture format with one frame is a still image, which load_video refuses.
            needed = 2 if fmt in _PICTURE_FORMATS or fmt.endswith("_pipe") else 1
            decoded = 0
            for packet in _packets(container, stream, []):
                try:
                    decoded += len(packet.decode())
                except (av.error.DecoderNotFoundError, av.error.PatchWelcomeError) as e:
                    raise VideoError(path, f"unsupported video codec or feature: {_ffmpeg_reason(e)}") from None
                except av.FFmpegError:
                    continue
                if decoded >= needed:
                    return
        finally:
            container.close()
    if decoded:
        raise StillImageError(path, f"a still image ({fmt.removesuffix('_pipe')})")
    raise VideoError(path, "no decodable video frames")


@contextlib.contextmanager
def _reported(path: str):
    """Turn PyAV and OS errors into one-line `VideoError`s naming the file."""
    try:
        yield
    except VideoError:
        raise
    except av.FFmpegError as e:
        raise VideoError(path, _ffmpeg_reason(e)) from None
    except PermissionError:
        raise VideoError(path, "permission denied") from None
    except OSError as e:
        raise VideoError(path, f"cannot read file: {e.strerror or e}") from None


def _check_file(path: str) -> None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise VideoError(path, "no such file") from None
    except PermissionError:
        raise VideoError(path, "permission denied") from None
    except OSError as e:
        raise VideoError(path, f"cannot access file: {e.strerror or e}") from None
    if stat.S_ISDIR(st.st_mode):
        raise VideoError(path, "is a directory, not a video file")
    if not stat.S_ISREG(st.st_mode):
        raise VideoError(path, "not a regular file")
    try:
        with open(path, "rb"):
            pass
    except PermissionError:
        raise VideoError(path, "permission denied") from None
    except OSError as e:
        raise VideoError(path, f"cannot read file: {e.strerror or e}") from None
    if st.st_size == 0:
        raise VideoError(path, "empty file (0 bytes)")


def _open(path: str):
    try:
        return av.open(path, mode="r", metadata_errors="ignore")
    except av.error.InvalidDataError:
        raise VideoError(path, "not a video file (unrecognised format or corrupt data)") from None
    except av.error.EOFError:
        raise VideoError(path, "not a video file, or cut short (it ends before any video data)") from None


def _video_stream(path: str, container):
    streams = [s for s in container.streams.video
               if not s.disposition & av.stream.Disposition.attached_pic]
    fmt = container.format.name
    if not streams:
        if container.streams.audio:
            raise VideoError(path, "no video stream (audio only)")
        raise VideoError(path, f"no video stream (format {fmt})")
    if fmt == "tty":
        raise VideoError(path, "a text file, not a video")
    stream = streams[0]
    if stream.codec_context is None:
        raise VideoError(path, "unsupported video codec (no decoder available)")
    return stream


@dataclass
class _Probe:
    packets: int  # video packets found by demuxing alone
    declared: int  # frame count the container declares (0: none, as in webm/mkv)
    declared_seconds: float  # duration the container declares (0: none)
    fps: float
    read_error: str | None
    start: tuple | None  # (pos, pts, dts) of the stream's first packet


def _packets(container, stream, read_errors: list[str]):
    """The stream's packets up to the end or the first read error, which lands in `read_errors`: a
    truncated or damaged file ends there rather than raising."""
    demux = container.demux(stream)
    while True:
        try:
            packet = next(demux)
        except StopIteration:
            return
        except av.FFmpegError as e:
            read_errors.append(_ffmpeg_reason(e))
            return
        yield packet


def _probe(path: str, container) -> _Probe:
    """Count the video packets and derive the frame rate from their timestamps, without decoding."""
    stream = _video_stream(path, container)
    rate = stream.average_rate or stream.guessed_rate
    tb = stream.time_base
    declared = max(int(stream.frames or 0), 0)
    if stream.duration and tb:
        declared_seconds = float(stream.duration * tb)
    else:
        declared_seconds = (container.duration or 0) / av.time_base
    count = discarded = 0
    first = last = None
    last_duration = 0
    read_errors: list[str] = []
    start = None
    for packet in _packets(container, stream, read_errors):
        if start is None:
            start = (packet.pos, packet.pts, packet.dts)
        if packet.size == 0:
            continue
        if packet.is_discard:  # cut by an edit list: decoded for reference, never shown
            discarded += 1
            continue
        count += 1
        ts = packet.pts if packet.pts is not None else packet.dts
        if ts is None:
            continue
        if first is None or ts < first:
            first = ts
        if last is None or ts >= last:
            last, last_duration = ts, packet.duration or 0
    fps = 0.0
    if count >= 2 and tb and first is not None and last > first:
        span = float((last - first) * tb)
        tail = float(last_duration * tb) if last_duration else span / (count - 1)
        fps = count / (span + tail)
    if rate and (not 0.1 < fps < 1000.0 or abs(float(rate) - fps) < 0.01 * fps):
        # The nominal rate is exact where timestamps are rounded (mkv keeps milliseconds).
        fps = float(rate)
    if not 0.1 < fps < 1000.0:
        fps = 25.0  # FFmpeg's own assumption for streams without any timing
    read_error = read_errors[0] if read_errors else None
    return _Probe(count, max(declared - discarded, 0), declared_seconds, fps, read_error, start)


def _rewound(path: str, container, probe: _Probe):
    """`container` back at its first packet for decoding, else the file opened anew.

    Opening again costs a decoded frame (FFmpeg's stream probing: ~30 ms at 1080p); seeking back costs
    nothing. Only for indexed formats, and only if the packet read after seeking is the probe's first.
    """
    if container.format.name in _REWINDABLE and probe.start is not None:
        stream = _video_stream(path, container)
        try:
            container.seek(0, stream=stream)
            packet = next(container.demux(stream), None)
            if packet is not None and (packet.pos, packet.pts, packet.dts) == probe.start:
                container.seek(0, stream=stream)
                return container
        except av.FFmpegError:
            pass
    container.close()
    return _open(path)


class _MotionBuffer:
    """Stores the motion frames; picks source frame ``k * num // den`` as the k-th one.

    ``num / den`` starts at N / T (or 1 when all frames fit). If more frames arrive than were
    counted and the buffer is full, every other stored frame is dropped and ``num`` doubles: the
    kept frames are then exactly the picks of the doubled step, so sampling stays uniform.
    """

    def __init__(self, expected: int, limit: int, size: int):
        import torch

        self.limit = limit
        self.num, self.den = (expected, limit) if expected > limit else (1, 1)
        self.frames = torch.empty((max(min(expected, limit), 4), 3, size, size), dtype=torch.uint8)
        self.indices: list[int] = []

    def wants(self, index: int) -> bool:
        return index == len(self.indices) * self.num // self.den

    @property
    def full(self) -> bool:
        """Whether the next `slot` call moves stored frames (growing or halving the storage)."""
        return len(self.indices) == self.frames.shape[0]

    def slot(self, index: int) -> np.ndarray | None:
        """Where wanted frame `index` goes ([3, S, S], to be filled), or None once halving dropped it."""
        n = len(self.indices)
        if n == self.frames.shape[0]:
            if n >= self.limit:
                self._halve()
                if not self.wants(index):
                    return None
                n = len(self.indices)
            else:
                grown = self.frames.new_empty((min(2 * n, self.limit), *self.frames.shape[1:]))
                grown[:n] = self.frames[:n]
                self.frames = grown
        self.indices.append(index)
        return self.frames[n].numpy()

    def _halve(self) -> None:
        kept = self.indices[::2]
        for j in range(1, len(kept)):
            self.frames[j] = self.frames[2 * j]
        self.indices = kept
        self.num *= 2

    def result(self) -> tuple[torch.Tensor, list[int]]:
        n = len(self.indices)
        if n < 4:
            # SlowFast's fast pathway takes T % 4 == 0 frames: repeat the last one.
            for j in range(n, 4):
                self.frames[j] = self.frames[n - 1]
            return self.frames[:4], self.indices + [self.indices[-1]] * (4 - n)
        t = n - n % 4
        return _trimmed(self.frames, t), self.indices[:t]


def _trimmed(buffer: torch.Tensor, n: int, dim: int = 0) -> torch.Tensor:
    # A view keeps the whole buffer alive; copy when much of it went unused (a damaged file).
    kept = buffer.narrow(dim, 0, n)
    return kept.clone() if n < 0.75 * buffer.shape[dim] else kept


def _keyframe_rule(expected: int, step: int, max_keyframes: int):
    """Whether decoded frame `index` is a keyframe: every `step`-th frame, or, past the cap, the
    cap's worth of those candidates spread uniformly."""
    candidates = math.ceil(expected / step)
    if candidates <= max_keyframes:
        return lambda index: index % step == 0
    chosen = {k * candidates // max_keyframes * step for k in range(max_keyframes)}
    return chosen.__contains__


class _KeyframeBuffer:
    """Stores the keyframes (float32, normalised); grows if the decoder yields more than were counted."""

    def __init__(self, count: int, size: int, views: int = 1):
        import torch

        self.size = size
        self.frames = torch.empty((views, count, 3, size, size), dtype=torch.float32)  # each view contiguous
        self.indices: list[int] = []

    @property
    def full(self) -> bool:
        """Whether the next `slot` call moves stored frames (growing the storage)."""
        return len(self.indices) == self.frames.shape[1]

    def slot(self, index: int) -> np.ndarray:
        """Where keyframe `index` goes ([V, 3, S, S] float32, its views, to be filled)."""
        n = len(self.indices)
        if n == self.frames.shape[1]:
            grown = self.frames.new_empty((self.frames.shape[0], 2 * n, *self.frames.shape[2:]))
            grown[:, :n] = self.frames
            self.frames = grown
        self.indices.append(index)
        return self.frames[:, n].numpy()

    def result(self) -> tuple[torch.Tensor, torch.Tensor | None, list[int]]:
        """(keyframes [N, 3, S, S], all views [V, N, 3, S, S] or None: one view, or all alike (frames too
        small to cut, resized whole), indices)."""
        import torch

        views = _trimmed(self.frames, len(self.indices), dim=1)
        alike = all(torch.equal(view, views[0]) for view in views[1:])
        return views[0], (None if alike else views), self.indices


def _keyframe_is_motion_frame(keyframe_size: int, motion_size: int, keyframe_fragments: int) -> bool:
    """Whether a keyframe's pixels can serve as its motion frame: the same size, and the whole frame."""
    return keyframe_size == motion_size and not keyframe_fragments


class _Buffers:
    """A sample's keyframe and motion buffers, and which decoded frames go into them: `expected` frames
    (counted before decoding) sampled with a keyframe every `step`; a `VideoError` if they cannot be had."""

    def __init__(self, path: str, expected: int, step: int, keyframe_size: int, motion_size: int,
                 max_motion_frames: int, max_keyframes: int, keyframe_fragments: int,
                 views: np.ndarray | None = None):
        count = min(math.ceil(expected / step), max_keyframes)
        cuts = 1 if views is None else len(views)
        try:
            self.keyframes = _KeyframeBuffer(count, keyframe_size, cuts)
            self.motion = _MotionBuffer(expected, max_motion_frames - max_motion_frames % 4, motion_size)
        except RuntimeError:  # torch's allocator: the output itself does not fit in memory
            gb = (min(expected, max_motion_frames) * 3 * motion_size**2 + count * cuts * 12 * keyframe_size**2) / 1e9
            raise VideoError(path, f"too long to hold in memory: its {expected} frames need {gb:.1f} GB "
                                   f"of keyframes and motion frames") from None
        self.is_keyframe = _keyframe_rule(expected, step, max_keyframes)
        self.max_keyframes = max_keyframes
        self.keyframe_fragments = keyframe_fragments
        self.views = views  # `_view_places`
        self.shared = _keyframe_is_motion_frame(keyframe_size, motion_size, keyframe_fragments)

    def slots(self, index: int, finish) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Where decoded frame `index` goes: (keyframe slot, motion slot), None where it is not wanted.
        `finish(0)` is called before stored frames move, as pending resize jobs may still write them."""
        keyframe = motion = None
        # The count check holds the cap when the decoder yields more frames than were counted.
        if self.is_keyframe(index) and len(self.keyframes.indices) < self.max_keyframes:
            if self.keyframes.full:
                finish(0)
            keyframe = self.keyframes.slot(index)
        if self.motion.wants(index):
            if self.motion.full:
                finish(0)
            motion = self.motion.slot(index)
        return keyframe, motion


def _keyframe_step(fps: float) -> int:
    return max(1, round(fps))


@dataclass
class _Counts:
    """What one decoding pass saw, for the sample's timing and its damage report."""

    frames: int = 0  # decoded
    rejected: int = 0  # packets the decoder refused
    corrupt: int = 0  # frames the decoder flagged as decoded with errors
    times: list[float] = field(default_factory=list)  # presentation times, decode order
    last_duration: float = 0.0  # of the last decoded frame with a timestamp (0: unknown)
    read_error: str | None = None  # why demuxing stopped early
    quarter_turns: int = 0  # display rotation, counter-clockwise
    width: int = 0  # displayed size
    height: int = 0


class _Decoder:
    """One decoding pass that fills the keyframe and motion buffers.

    Resizing runs on its own thread (swscale and PIL release the GIL), so the main thread keeps feeding
    the decoder meanwhile; the jobs go in decode order to one thread, never two at once, and at most
    `_IN_FLIGHT` are pending. A job writes into a buffer slot, so a buffer's frames move (growing, or
    halving the motion stream) only once every pending job is done.
    """

    def __init__(self, path: str, buffers: _Buffers, tap=None):
        self.path = path
        self.buffers = buffers
        self.tap = tap  # see the module docstring
        self.counts = _Counts()
        self.reformatter = VideoReformatter()  # used by the resize thread only
        self.resizer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vqa2-resize")
        self.pending: collections.deque = collections.deque()

    def run(self, container) -> _Counts:
        try:
            stream = _video_stream(self.path, container)
            stream.thread_type = "AUTO"
            codec = stream.codec_context
            read_errors: list[str] = []
            for packet in _packets(container, stream, read_errors):
                try:
                    frames = codec.decode(packet)
                except (av.error.DecoderNotFoundError, av.error.PatchWelcomeError) as e:
                    raise VideoError(self.path, f"unsupported video codec or feature: {_ffmpeg_reason(e)}") from None
                except av.FFmpegError:
                    self.counts.rejected += 1
                    continue
                for frame in frames:
                    self._take(frame)
            if read_errors:  # demuxing stopped before the flush packet: drain the decoder here
                self.counts.read_error = read_errors[0]
                try:
                    for frame in codec.decode(None):
                        self._take(frame)
                except av.FFmpegError:
                    pass
            self._finish(0)
        finally:
            self.resizer.shutdown(wait=True, cancel_futures=True)
        return self.counts

    def _take(self, frame) -> None:
        counts = self.counts
        if counts.frames == 0:
            counts.quarter_turns = round((frame.rotation or 0) / 90) % 4
            counts.width, counts.height = frame.width, frame.height
            if counts.quarter_turns % 2:
                counts.width, counts.height = counts.height, counts.width
        if frame.is_corrupt:
            counts.corrupt += 1
        if frame.pts is not None and frame.time_base:
            counts.times.append(float(frame.pts * frame.time_base))
            counts.last_duration = float(frame.duration * frame.time_base) if frame.duration else 0.0
        self._queue(frame, counts.frames)
        counts.frames += 1

    def _queue(self, frame, index: int) -> None:
        """Hand `frame` to the resize thread for each buffer that wants it."""
        keyframe, motion = self.buffers.slots(index, self._finish)
        turns = self.counts.quarter_turns
        slot = motion
        if keyframe is not None:
            shared = slot if self.buffers.shared else None
            self._submit(frame, _keyframe_into, keyframe, shared, frame, self.buffers.keyframes.size,
                         self.buffers.keyframe_fragments, turns, self.buffers.views)
            if shared is not None:
                slot = None
        if slot is not None:
            self._submit(frame, _fast_resize_into, slot, self.reformatter, frame, turns)
        if self.tap is not None:
            self.tap.frame(index, frame, turns, keyframe, motion, functools.partial(self._submit, frame), self._finish)
        self._finish(_IN_FLIGHT)

    def _submit(self, frame, job, *args) -> None:
        self.pending.append(self.resizer.submit(self._resize, frame, job, *args))

    def _resize(self, frame, job, *args) -> None:
        try:
            job(*args)
        except av.FFmpegError as e:
            raise VideoError(self.path, f"cannot convert {frame.format.name} pixels to RGB "
                                        f"({_ffmpeg_reason(e)})") from None

    def _finish(self, limit: int) -> None:
        """Wait until at most `limit` resize jobs are pending, raising the first one's error."""
        while len(self.pending) > limit:
            self.pending.popleft().result()


def _decode(path: str, container, probe: _Probe, keyframe_size: int, motion_size: int,
            max_motion_frames: int, max_keyframes: int, tap, keyframe_fragments: int,
            views: np.ndarray | None) -> VideoSample:
    expected = max(probe.packets, 1)
    buffers = _Buffers(path, expected, _keyframe_step(probe.fps), keyframe_size, motion_size, max_motion_frames,
                       max_keyframes, keyframe_fragments, views)
    if tap is not None:
        tap.start(expected, probe.fps)
    counts = _Decoder(path, buffers, tap).run(container)
    refusal = _refusal(path, container.format.name, counts.frames, probe.packets)
    if refusal:
        raise refusal
    times = sorted(counts.times)  # damaged streams can yield frames out of order
    duration = stream_duration(times, counts.last_duration, counts.frames, probe.fps)
    warnings = damage_warnings(
        frames=counts.frames, packets=probe.packets, declared_frames=probe.declared,
        declared_seconds=probe.declared_seconds, duration=duration, times=times,
        read_error=counts.read_error or probe.read_error, rejected=counts.rejected, corrupt=counts.corrupt,
    )
    keyframe_frames, keyframe_views, keyframe_indices = buffers.keyframes.result()
    motion_frames, motion_indices = buffers.motion.result()
    return VideoSample(
        path=path,
        keyframes=keyframe_frames,
        motion=motion_frames,
        keyframe_indices=keyframe_indices,
        motion_indices=motion_indices,
        fps=probe.fps,
        duration=duration,
        num_frames=counts.frames,
        width=counts.width,
        height=counts.height,
        warnings=warnings,
        keyframe_fragments=keyframe_fragments,
        keyframe_views=keyframe_views,
    )


def _refusal(path: str, fmt: str, frames: int, packets: int) -> VideoError | None:
    """Why a decoded stream is not a usable video, or None."""
    if (fmt in _PICTURE_FORMATS or fmt.endswith("_pipe")) and frames <= 1:
        # Deliberate: one picture is not a video (animated gif/apng are).
        kind = "a still image" if frames else "an image FFmpeg cannot decode"
        return StillImageError(path, f"{kind} ({fmt.removesuffix('_pipe')})")
    if frames == 0:
        if packets == 0:
            return VideoError(path, "no decodable video frames (the video stream holds no data)")
        return VideoError(path, f"no decodable video frames ({_count(packets, 'packet')}, none decodable "
                                "(corrupt or truncated))")
    return None


def stream_duration(times: list[float], last_duration: float, frames: int, fps: float) -> float:
    """Seconds from the first frame's start to the last one's end, from sorted presentation `times`;
    the last frame lasts `last_duration`, else the mean interval. Without timestamps: frames / fps."""
    if len(times) >= 2 and times[-1] > times[0]:
        span = times[-1] - times[0]
        return span + (last_duration or span / (len(times) - 1))
    return last_duration or frames / fps


def damage_warnings(*, frames: int, packets: int, declared_frames: int, declared_seconds: float,
                    duration: float, times: list[float], read_error: str | None, rejected: int,
                    corrupt: int) -> list[str]:
    """The damage a decoding pass tolerated, as one line each for `VideoSample.warnings`.

    `frames` decoded out of `packets` demuxed; `declared_frames` / `declared_seconds` are what the
    container claims (0: nothing); `times` are the decoded frames' presentation times, sorted;
    `read_error` says why reading stopped early (None: it did not); `rejected` packets the decoder
    refused, `corrupt` frames it flagged. Pure: no I/O, same lines for the same numbers.
    """
    warnings = []
    if read_error:
        warnings.append(f"stopped reading at damaged or truncated data after {_count(frames, 'frame')} "
                        f"({read_error})")
    if frames < 0.9 * declared_frames:
        warnings.append(f"decoded {frames} of the {declared_frames} frames the container declares "
                        f"(file truncated or damaged)")
    elif not declared_frames and duration < 0.9 * declared_seconds:
        warnings.append(f"decoded {duration:.2f} s of the {declared_seconds:.2f} s the container "
                        f"declares (file truncated or damaged)")
    elif frames < packets and not rejected:
        warnings.append(f"decoded {frames} frames from {_count(packets, 'packet')}")
    gap = _widest_gap(times)
    if gap:
        count, start, end = gap
        warnings.append(f"{_count(count, 'gap')} in the timestamps, widest between {start:.2f} s and {end:.2f} s "
                        f"(missing or damaged data, or a long pause in variable-rate video)")
    if rejected:
        warnings.append(f"skipped {_count(rejected, 'corrupt packet')}")
    if corrupt:
        warnings.append(f"{_count(corrupt, 'frame')} decoded with errors")
    return warnings


def _widest_gap(times: list[float]) -> tuple[int, float, float] | None:
    """(number of gaps, start and end of the widest, in seconds from the first frame), or None.

    A gap is an interval over 0.5 s and over 10 times the median one: a hole the demuxer skipped
    silently (matroska resyncs past damage) shows as such a jump."""
    if len(times) < 2:
        return None
    intervals = np.diff(times)
    gaps = np.flatnonzero(intervals > max(0.5, 10 * float(np.median(intervals))))
    if not len(gaps):
        return None
    widest = gaps[np.argmax(intervals[gaps])]
    return len(gaps), times[widest] - times[0], times[widest + 1] - times[0]


def _keyframe_into(out: np.ndarray, motion_slot: np.ndarray | None, frame, size: int, fragments: int,
                   quarter_turns: int, views: np.ndarray | None = None) -> None:
    """Keyframe `frame`, normalised into `out` ([V, 3, S, S] float32, a view per `views` place set) and,
    uint8, into `motion_slot`."""
    rgb = frame.to_ndarray(format="rgb24")
    if quarter_turns:  # rotated first, so PIL's passes match the release's
        rgb = np.rot90(rgb, quarter_turns)
    if fragments and min(rgb.shape[:2]) >= size:
        cuts = [_fragments(rgb, size, fragments, places) for places in ([None] if views is None else views)]
    else:
        cuts = [_exact_resize(rgb, size)]
    for view, cut in zip(out, cuts):
        _normalize_into(view, cut)
    out[len(cuts):] = out[0]  # a frame too small to cut: every view is the whole frame
    rgb = cuts[0]
    if motion_slot is not None:
        np.copyto(motion_slot, rgb.transpose(2, 0, 1))


def _exact_resize(rgb: np.ndarray, size: int) -> np.ndarray:
    """The release's path: the full-size RGB frame through PIL bicubic to size x size."""
    image = Image.fromarray(np.ascontiguousarray(rgb))
    if image.size != (size, size):
        image = image.resize((size, size), Image.BICUBIC)
    return np.array(image)


def _fragments(rgb: np.ndarray, size: int, grid: int, places: np.ndarray | None = None) -> np.ndarray:
    """[size, size, 3]: a grid x grid mosaic of (size / grid)-pixel crops of the frame at its own resolution,
    one in each cell of the frame divided grid x grid, the same places in every frame: the cells' centres,
    or `places` (`load_video`'s `fragment_places`)."""
    height, width = rgb.shape[:2]
    cell = size // grid
    mosaic = np.empty((size, size, 3), np.uint8)
    for i in range(grid):
        for j in range(grid):
            row, column = (0.5, 0.5) if places is None else places[i, j]
            top = _crop_start(i, height, grid, cell, row)
            left = _crop_start(j, width, grid, cell, column)
            mosaic[i * cell:(i + 1) * cell, j * cell:(j + 1) * cell] = rgb[top:top + cell, left:left + cell]
    return mosaic


def _crop_start(k: int, length: int, grid: int, cell: int, place: float) -> int:
    """Where the crop of the k-th of `grid` cells along `length` pixels starts: centred, then moved by
    (place - 0.5) of the room the cell has around it; 0 and 1 reach the cell's edges, 0.5 is exactly the centre."""
    centred = int((k + 0.5) * length / grid) - cell // 2
    start = centred + math.floor((place - 0.5) * (length / grid - cell))
    return min(max(start, 0), length - cell)


def _fast_resize_into(out: np.ndarray, reformatter: VideoReformatter, frame, quarter_turns: int) -> None:
    """swscale bicubic from the decoder's pixel format straight to planar RGB in `out` ([3, S, S]).

    Planar output (gbrp) is both faster and closer to the release than packed rgb24, whose output
    stage subsamples chroma horizontally. One thread: the decoder's threads already fill the cores.
    """
    size = out.shape[-1]
    planar = reformatter.reformat(frame, width=size, height=size, format="gbrp",
                                  interpolation=_MOTION_INTERPOLATION, threads=1)
    for channel, plane in zip((1, 2, 0), planar.planes):  # planes are G, B, R
        rows = np.frombuffer(plane, np.uint8).reshape(size, plane.line_size)[:, :size]
        # Square output: rotating after the resize equals resizing the rotated frame.
        out[channel] = np.rot90(rows, quarter_turns) if quarter_turns else rows


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _ffmpeg_reason(error: av.FFmpegError) -> str:
    reason = error.strerror or str(error)
    return _one_line(reason[:1].lower() + reason[1:])


def _one_line(text: str) -> str:
    return " ".join(str(text).split()) if any(c in str(text) for c in "\r\n\t\v\f") else str(text)
