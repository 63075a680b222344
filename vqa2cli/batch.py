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


class EmptyFolder(str):
    """A folder given as an input that holds no video file: `expand_paths` yields it, and it becomes a
    failed record saying why (`reason`), since nothing could be scored from that input."""

    def __new__(cls, path: str, reason: str):
        folder = super().__new__(cls, path)
        folder.reason = reason
        return folder

    def __getnewargs__(self):  # copies (dataclasses.asdict) and pickles keep the reason
        return str(self), self.reason


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
    skipped = f"{skipped_dirs} subdirector{'y' if skipped_dirs == 1 else 'ies'} skipped (use --recursive)"
    if not found:
        looked = f"no video files found (looked for {', '.join(sorted(VIDEO_EXTENSIONS))})"
        yield EmptyFolder(directory, f"{looked}; {skipped}" if skipped_dirs else looked)
    elif skipped_dirs:
        warn(f"{directory}: {skipped}")


def _stdin_paths(stdin) -> Iterator[str]:
    for line in stdin:
        path = line.rstrip("\r\n")
        if path.strip():
            yield path


def fd_lines(fd: int) -> Iterator[str]:
    """Lines of a file descriptor (stdin: 0), read with os.read and decoded as file names are.

    For reading stdin in the prefetch thread: sys.stdin's buffered reader holds a lock while it
    waits for input, and a daemon thread holding it makes the interpreter abort at exit
    ("could not acquire lock for <stdin> at interpreter shutdown") after Ctrl-C. Decoding with
    os.fsdecode also keeps paths that are not valid UTF-8 usable.
    """
    pending = b""
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            yield os.fsdecode(line)
    if pending:
        yield os.fsdecode(pending)


def expand_paths(
    inputs: Iterable[str],
    recursive: bool = False,
    stdin=None,
    warn: Optional[Callable[[str], None]] = None,
) -> Iterator[str]:
    """Video paths from command-line inputs, lazily, in order.

    A directory gives the files with a video extension (VIDEO_EXTENSIONS) directly inside it, or in
    its whole tree with `recursive`, sorted by name; any other path is yielded as is, to be tried
    (a missing file becomes an error record later). `-` reads paths from `stdin` (an iterable of
    lines: a text file, or `fd_lines(0)`), one per line, as
    they arrive, so `find ... | vqa2 score -` starts before `find` ends; a directory read there is
    expanded the same way; one without videos is yielded as an `EmptyFolder`, to fail as an input. `warn`
    gets one-line notes (skipped subdirectories).
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
    # a VideoError names its file (on one line even when the name holds a line break)
    names_file = getattr(error, "path", None) == path or path in message
    return message if names_file else f"{path}: {message}"


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
    max_keyframes: int = 40,
    batch_size: int = 1,
    prefetch: int = DEFAULT_PREFETCH,
) -> Iterator[ScoreRecord]:
    """One ScoreRecord per path, in input order, scoring with the loaded `model` (a pipeline.VQA2).

    Decoding is prefetched in the background (`prefetch` videos ahead, at least `batch_size`).
    With `batch_size` > 1, decoded videos are scored `batch_size` at a time in one forward pass;
    a record's `seconds` is then its decoding time plus its share of the batch's compute. Input
    errors (bad files, videos the model cannot take) become records with `error`; a SetupError
    (the model or device failing as a whole) ends the batch with that exception after the records
    already yielded.
    """
    load = model.sampling(max_motion_frames, max_keyframes).load

    def decode(path):
        if isinstance(path, EmptyFolder):
            raise InputError(f"{path}: {path.reason}")
        return load(path)

    pending = []  # (record, sample or None, decode seconds), in input order

    def flush():
        records = _score_pending(model, pending, prompt)
        pending.clear()  # drop the frames before yielding
        return records

    with Prefetcher(paths, decode, depth=max(prefetch, batch_size)) as prefetcher:
        for path, sample, error, decode_seconds in prefetcher:
            record = ScoreRecord(path=path, model=model.name, error=error)
            if sample is not None:
                record.duration_s = round(float(sample.duration), 3)
                record.keyframes = int(sample.keyframes.shape[0])
                record.motion_frames = int(sample.motion.shape[0])
            pending.append((record, sample, decode_seconds))
            del sample  # only `pending` keeps the frames
            decoded = sum(1 for _, waiting, _ in pending if waiting is not None)
            # a full batch goes to the model; failures with no video ahead of them go out at once
            if decoded in (0, batch_size):
                yield from flush()
        yield from flush()


def _score_pending(model, pending, prompt) -> list:
    """Score the decoded samples of `pending` (in one batch when several), fill in their records."""
    samples = [sample for _, sample, _ in pending if sample is not None]
    done = [record for record, sample, _ in pending if sample is not None]
    start = time.perf_counter()
    results = None
    if len(samples) > 1:
        try:
            results = model.score_batch(samples, prompt=prompt)
        except SetupError:
            raise
        except Exception:  # e.g. out of memory for the batch: score them one by one to find the culprit
            results = None
    if results is not None:
        share = (time.perf_counter() - start) / len(samples)
        for record, result in zip(done, results):
            _fill(record, result)
            record.seconds = share
    else:
        for record, sample in zip(done, samples):
            one_start = time.perf_counter()
            try:
                _fill(record, model.score(sample, prompt=prompt))
            except SetupError:
                raise
            except Exception as failure:  # this video cannot be scored; the batch goes on
                record.error = error_message(record.path, failure)
            record.seconds = time.perf_counter() - one_start
    for record, _, decode_seconds in pending:
        record.seconds = round(record.seconds + decode_seconds, 3)
    return [record for record, _, _ in pending]


def _fill(record: ScoreRecord, result):
    record.score = float(result.score)
    record.level = result.level.strip()
    record.probs = {level.strip(): float(p) for level, p in result.probs.items()}
