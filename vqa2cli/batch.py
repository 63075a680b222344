"""Scoring many videos with one loaded model: path expansion, background prefetch, one record per file.

    >>> from vqa2cli import load_model
    >>> from vqa2cli.batch import expand_paths, score_videos
    >>> model = load_model("vqa2-tiny")
    >>> for record in score_videos(model, expand_paths(["videos/"], recursive=True)):
    ...     print(record.path, record.score, record.error)

Decoding runs in one background thread, a bounded queue ahead of the model, so the next videos are
being decoded while the model computes (PyAV and torch release the GIL while they work). Every input
yields exactly one `ScoreRecord`, in input order: a file that cannot be decoded or scored is a record
with `error` set, never an exception, so one bad file never stops a batch. Stopping early (Ctrl-C,
a closed pipe) stops the decoder thread and loses nothing already yielded.
"""

import os
import queue
import threading
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Iterator, Optional

from vqa2cli.errors import InputError, SetupError

# What counts as a video when walking a directory (case-insensitive). Files named explicitly on the
# command line or on stdin are always tried whatever their name.
VIDEO_EXTENSIONS = frozenset(
    ".3g2 .3gp .asf .avi .divx .f4v .flv .m2ts .m2v .m4v .mkv .mov .mp4 .mpeg .mpg .mts .mxf .ogv .qt"
    " .ts .vob .webm .wmv .y4m".split()
)

# Decoded videos waiting for the model. Two keep the model fed when decode times vary from video to
# video; each can hold up to max_motion_frames uint8 frames (0.9 GB at 2000 x 384 px), so memory
# bounds the depth: at most depth + 2 decoded videos are alive (queued, being decoded, being scored).
DEFAULT_PREFETCH = 2


def is_video_name(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in VIDEO_EXTENSIONS


def _walk(directory: str, recursive: bool, warn: Callable[[str], None]) -> Iterator[str]:
    found = 0
    skipped_dirs = 0
    for root, dirs, files in os.walk(directory, onerror=lambda error: warn(f"{error.filename}: {error.strerror}")):
        # hidden files and folders (.git, .DS_Store, editor droppings) are never videos to score
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if not recursive:
            skipped_dirs += len(dirs)
            dirs[:] = []
        for name in sorted(files):
            if not name.startswith(".") and is_video_name(name):
                found += 1
                yield os.path.join(root, name)
    if not found:
        warn(f"{directory}: no video files found (looked for {', '.join(sorted(VIDEO_EXTENSIONS))})")
    if skipped_dirs:
        warn(f"{directory}: {skipped_dirs} subdirector{'y' if skipped_dirs == 1 else 'ies'} skipped (use --recursive)")


def _stdin_paths(stdin) -> Iterator[str]:
    for line in stdin:
        path = line.rstrip("\r\n")
        if path.strip():
            yield path


def expand_paths(
    inputs: Iterable[str],
    recursive: bool = False,
    stdin=None,
    warn: Optional[Callable[[str], None]] = None,
) -> Iterator[str]:
    """Video paths from command-line inputs, lazily, in order.

    A directory gives the files with a video extension (VIDEO_EXTENSIONS) directly inside it, or in
    its whole tree with `recursive`, sorted by name; any other path is yielded as is, to be tried
    (a missing file becomes an error record later). `-` reads paths from `stdin`, one per line, as
    they arrive, so `find ... | vqa2 score -` starts before `find` ends; a directory read there is
    expanded the same way. `warn` gets one-line notes (empty directories, skipped subdirectories).
    """
    warn = warn or (lambda message: None)
    for item in inputs:
        sources = _stdin_paths(stdin) if item == "-" else [item]
        for path in sources:
            if os.path.isdir(path):
                yield from _walk(path, recursive, warn)
            else:
                yield path


@dataclass
class ScoreRecord:
    """The result for one video; exactly one of (score, level, probs) and `error` is set."""

    path: str
    score: Optional[float] = None  # 0 (worst) .. 1 (best)
    level: Optional[str] = None  # the most likely level word
    probs: Optional[dict] = None  # level word -> probability
    model: Optional[str] = None
    duration_s: Optional[float] = None
    keyframes: Optional[int] = None  # keyframes the model saw (one per second)
    motion_frames: Optional[int] = None  # frames in the motion stream
    seconds: float = 0.0  # time spent on this video: decoding + scoring
    error: Optional[str] = None  # one-line message, or None

    def to_dict(self) -> dict:
        return asdict(self)


def error_message(path: str, error: BaseException) -> str:
    """One line naming the file and the reason, for any exception raised while handling `path`."""
    message = str(error) if isinstance(error, InputError) else f"{type(error).__name__}: {error}".rstrip(": ")
    message = " ".join(message.splitlines())
    return message if path in message else f"{path}: {message}"


_DONE = object()


class Prefetcher:
    """Runs `decode(path)` for each path in a background thread, at most `depth` results ahead.

    Iterating yields `(path, sample, error, seconds)` in input order: `sample` is decode's result or
    None, `error` the one-line message when decoding failed. Exceptions raised while producing the
    paths themselves (reading stdin) are re-raised in the consuming thread. `close()` (also on
    leaving a `with` block) stops the thread.
    """

    def __init__(self, paths: Iterable[str], decode: Callable, depth: int = DEFAULT_PREFETCH):
        if depth < 1:
            raise ValueError("prefetch depth must be at least 1")
        self._paths = paths
        self._decode = decode
        self._queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vqa2-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        # a timed put, so that close() can stop a thread waiting on a full queue
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self):
        try:
            for path in self._paths:
                if self._stop.is_set():
                    return
                start = time.perf_counter()
                try:
                    item = (path, self._decode(path), None)
                except Exception as error:  # any decode failure is this file's record, not the batch's end
                    item = (path, None, error_message(path, error))
                if not self._put((*item, time.perf_counter() - start)):
                    return
        except BaseException as error:  # e.g. undecodable stdin: hand it to the consumer
            self._put(error)
            return
        self._put(_DONE)

    def __iter__(self):
        while True:
            item = self._queue.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self):
        self._stop.set()
        # a decode in progress cannot be interrupted; the daemon thread ends after it, unwaited
        self._thread.join(timeout=0.5)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()
        return False


def score_videos(
    model,
    paths: Iterable[str],
    prompt: Optional[str] = None,
    max_motion_frames: int = 2000,
    prefetch: int = DEFAULT_PREFETCH,
) -> Iterator[ScoreRecord]:
    """One ScoreRecord per path, in order, scoring with the loaded `model` (a pipeline.VQA2).

    Decoding is prefetched in the background (`prefetch` videos ahead). Input errors (bad files,
    videos the model cannot take) become records with `error`; a SetupError (the model or device
    failing as a whole) ends the batch with that exception after the records already yielded.
    """
    from vqa2cli.video import load_video

    config = model.config

    def decode(path):
        return load_video(
            path,
            keyframe_size=config.keyframe_size,
            motion_size=config.motion_size,
            max_motion_frames=max_motion_frames,
        )

    with Prefetcher(paths, decode, depth=prefetch) as prefetcher:
        for path, sample, error, decode_seconds in prefetcher:
            if error is not None:
                yield ScoreRecord(path=path, model=model.name, seconds=round(decode_seconds, 3), error=error)
                continue
            start = time.perf_counter()
            record = ScoreRecord(
                path=path,
                model=model.name,
                duration_s=round(float(sample.duration), 3),
                keyframes=int(sample.keyframes.shape[0]),
                motion_frames=int(sample.motion.shape[0]),
            )
            try:
                result = model.score(sample, prompt=prompt, max_motion_frames=max_motion_frames)
            except SetupError:
                raise
            except Exception as failure:  # this video cannot be scored (e.g. out of memory); the batch goes on
                record.error = error_message(path, failure)
            else:
                record.score = float(result.score)
                record.level = result.level
                record.probs = {level: float(p) for level, p in result.probs.items()}
            del sample  # free the frames before waiting for the next video
            record.seconds = round(decode_seconds + time.perf_counter() - start, 3)
            yield record
