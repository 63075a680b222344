"""Scoring many videos with one loaded model: path expansion, sharding, decoding ahead, one record per file.

    >>> from vqa2cli import load_model
    >>> from vqa2cli.batch import expand_paths, score_videos
    >>> model = load_model("vqa2-tiny")
    >>> for record in score_videos(model, expand_paths(["videos/"], recursive=True), workers=2):
    ...     print(record.path, record.score, record.warnings, record.error)

Decoding runs ahead of the model (`vqa2cli.prefetch.Prefetcher`): in a background thread, or with
`workers` in that many processes, a bounded number of videos ahead, so the next videos are being
decoded while the model computes. Every input yields exactly one `ScoreRecord`, in input order: a file
that cannot be decoded or scored (or whose decoder process crashes) is a record with `error` set, never
an exception, so one bad file never stops a batch. A damaged file that still decodes is scored, with
what was lost in `warnings`; with `strict` it is an error instead. Stopping early (Ctrl-C, a closed
pipe) stops the decoders and loses nothing already yielded.
"""

import hashlib
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Iterator, Optional

from vqa2cli.errors import InputError, SetupError
from vqa2cli.prefetch import DEFAULT_PREFETCH, Prefetcher, error_message  # noqa: F401 (the public names)
from vqa2cli.video import VIDEO_EXTENSIONS  # files named on the command line or stdin are tried whatever their name

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


def _walk(directory: str, recursive: bool, warn: Callable[[str], None], images: bool = False) -> Iterator[str]:
    wanted, kinds, extensions = is_video_name, "video", VIDEO_EXTENSIONS
    if images:
        from vqa2cli.images import IMAGE_EXTENSIONS, is_image_name

        wanted = lambda name: is_video_name(name) or is_image_name(name)  # noqa: E731
        kinds, extensions = "video or image", VIDEO_EXTENSIONS | IMAGE_EXTENSIONS
    found = 0
    skipped_dirs = 0
    for root, dirs, files in os.walk(directory, onerror=lambda error: warn(f"{error.filename}: {error.strerror}")):
        # hidden files and folders (.git, .DS_Store, editor droppings) are never videos to score
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if not recursive:
            skipped_dirs += len(dirs)
            dirs[:] = []
        for name in sorted(files):
            if not name.startswith(".") and wanted(name):
                found += 1
                yield os.path.join(root, name)
    skipped = f"{skipped_dirs} subdirector{'y' if skipped_dirs == 1 else 'ies'} skipped (use --recursive)"
    if not found:
        looked = f"no {kinds} files found (looked for {', '.join(sorted(extensions))})"
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
    shard: Optional[tuple] = None,
    images: bool = False,
) -> Iterator[str]:
    """Video paths from command-line inputs, lazily, in order.

    A directory gives the files with a video extension (VIDEO_EXTENSIONS) directly inside it, or in
    its whole tree with `recursive`, sorted by name; any other path is yielded as is, to be tried
    (a missing file becomes an error record later). `-` reads paths from `stdin` (an iterable of
    lines: a text file, or `fd_lines(0)`), one per line, as
    they arrive, so `find ... | vqa2 score -` starts before `find` ends; a directory read there is
    expanded the same way; one without videos is yielded as an `EmptyFolder`, to fail as an input. `warn`
    gets one-line notes (skipped subdirectories). `shard` (k, n) keeps only the paths of share k of n (see
    `in_shard`). `images`: directories give still images too (`vqa2cli.images.IMAGE_EXTENSIONS`), for
    models that take them.
    """
    warn = warn or (lambda message: None)
    for item in inputs:
        sources = _stdin_paths(stdin) if item == "-" else [item]
        for path in sources:
            if os.path.isdir(path):
                for found in _walk(path, recursive, warn, images):
                    if shard is None or in_shard(os.path.relpath(found, path), shard):
                        yield found
            elif shard is None or in_shard(path, shard):
                yield path


def parse_shard(text: str) -> tuple:
    """`"K/N"` -> (K, N), 0 <= K < N; ValueError with a one-line reason otherwise."""
    k, sep, n = text.partition("/")
    try:
        k, n = int(k), int(n)
    except ValueError:
        raise ValueError(f"'{text}' is not K/N (e.g. 0/4: the first of four shares)") from None
    if not sep or n < 1 or not 0 <= k < n:
        raise ValueError(f"'{text}': K/N needs N >= 1 and 0 <= K < N")
    return k, n


def in_shard(key: str, shard: tuple) -> bool:
    """Whether a path belongs to share k of n (`shard` = (k, n)).

    The share is a hash (BLAKE2b, the same on every machine and Python) of the path's bytes, so shares
    are disjoint, together they are the whole listing, and a file keeps its share when others are added
    or removed. The key: for a file found in a directory, its path below that directory (so machines
    that mount the catalogue at different places agree); for a path given on the command line or on
    stdin, the path as given, normalised (`./a//b.mp4` is `a/b.mp4`).
    """
    k, n = shard
    digest = hashlib.blake2b(os.fsencode(os.path.normpath(key)), digest_size=8).digest()
    return int.from_bytes(digest, "big") % n == k


def default_workers(count: Optional[int] = None, device=None) -> int:
    """Decode worker processes for `count` videos (None: not known yet, e.g. paths on stdin) scored on
    `device`. The model on a GPU: one per usable CPU but one, which this process keeps to feed the GPU.
    The model on the CPU: one, because the model's threads use every core already and more decoders
    only take cores from it (BENCHMARKS.md). None for a single video: starting a process would cost
    more than it saves."""
    from vqa2cli.synth import usable_cpus

    if count is not None and count <= 1:
        return 0
    workers = max(1, usable_cpus() - 1) if getattr(device, "type", device) == "cuda" else 1
    return workers if count is None else min(workers, count)


@dataclass
class ScoreRecord:
    """The result for one video: (score, level, probs), or `error` when it could not be scored. The two
    come together only when the score is there and the extra work asked for (`explanation`) failed.

    The fields, in order, are the output's columns (JSON keys, CSV header). `segments` and `explanation`
    are None unless asked for (`timeline`, an `after` hook such as `vqa2cli.explain.Explainer`); they come
    last so the others keep their places."""

    path: str
    score: Optional[float] = None  # 0 (worst) .. 1 (best)
    level: Optional[str] = None  # the most likely level word
    probs: Optional[dict] = None  # level word -> probability
    model: Optional[str] = None
    duration_s: Optional[float] = None
    keyframes: Optional[int] = None  # keyframes the model saw (one per second)
    motion_frames: Optional[int] = None  # frames in the motion stream
    seconds: float = 0.0  # time spent on this video: decoding + scoring
    warnings: list = field(default_factory=list)  # damage the decoder got past (truncation, corrupt packets)
    error: Optional[str] = None  # one-line message, or None
    segments: Optional[list] = None  # [{start, end, score, level}] per window (vqa2cli.timeline)
    explanation: Optional[str] = None  # what the assistant model says is wrong (vqa2cli.explain)

    def to_dict(self) -> dict:
        return asdict(self)


def score_videos(
    model,
    paths: Iterable[str],
    prompt: Optional[str] = None,
    max_motion_frames: int = 2000,
    max_keyframes: int = 40,
    batch_size: int = 1,
    prefetch: int = DEFAULT_PREFETCH,
    workers: int = 0,
    strict: bool = False,
    timeline: Optional[float] = None,
    after: Optional[Callable] = None,
) -> Iterator[ScoreRecord]:
    """One ScoreRecord per path, in input order, scoring with the loaded `model` (a pipeline.VQA2).

    Decoding runs ahead (`prefetch` videos ahead, at least `batch_size`), in a thread or, with
    `workers` > 0, in that many processes (see `vqa2cli.prefetch`: scripts need the
    `if __name__ == "__main__":` guard then). With `batch_size` > 1, decoded videos are scored
    `batch_size` at a time in one forward pass; a record's `seconds` is then its decoding time plus its
    share of the batch's compute. Input errors (bad files, videos the model cannot take) become records
    with `error`; with `strict`, so do damaged files (a sample with warnings). A SetupError (the model
    or device failing as a whole) ends the batch with that exception after the records already yielded.

    `timeline` (seconds): records also get `segments`, the scores of consecutive windows of that length
    from the same decoding pass (`vqa2cli.timeline.timeline_records`). Each file is then decoded in this
    thread, window by window between the model's passes, so `prefetch` and `workers` do not apply.
    `after(record, sample)` runs for each scored record while its decoded sample is alive (e.g.
    `vqa2cli.explain.Explainer`); what it raises becomes the record's `error`, the score stays.
    """
    if timeline is not None:
        from vqa2cli.timeline import timeline_records

        yield from timeline_records(model, paths, timeline, prompt=prompt, max_motion_frames=max_motion_frames,
                                    max_keyframes=max_keyframes, batch_size=batch_size, strict=strict, after=after)
        return
    decode = Loader(model.sampling(max_motion_frames, max_keyframes))
    pending = []  # (record, sample or None, decode seconds), in input order

    def flush():
        records = _score_pending(model, pending, prompt, after)
        pending.clear()  # drop the frames before yielding
        return records

    with Prefetcher(paths, decode, depth=max(prefetch, batch_size), workers=workers) as prefetcher:
        for path, sample, error, decode_seconds in prefetcher:
            pending.append(_pending(model, path, sample, error, decode_seconds, strict))
            del sample  # only `pending` keeps the frames
            decoded = sum(1 for _, waiting, _ in pending if waiting is not None)
            # a full batch goes to the model; failures with no video ahead of them go out at once
            if decoded in (0, batch_size):
                yield from flush()
        yield from flush()


@dataclass(frozen=True)
class Loader:
    """Decoding for one model, picklable for decode worker processes; an `EmptyFolder` input fails here.
    `tap`: another sampler on the same decoding pass (`vqa2cli.video`; `vqa2cli.timeline`'s windows)."""

    sampling: object

    def __call__(self, path, tap=None):
        if isinstance(path, EmptyFolder):
            raise InputError(f"{path}: {path.reason}")
        return self.sampling.load(path, tap=tap)


def score_one(model, video, prompt: Optional[str] = None, strict: bool = False,
              max_motion_frames: Optional[int] = None, max_keyframes: Optional[int] = None) -> ScoreRecord:
    """The ScoreRecord of one video: a path (decoded here, for this model) or a decoded `VideoSample`.
    Like `score_videos` for one input: failures are the record's `error`, never an exception."""
    start = time.perf_counter()
    sample = error = None
    if isinstance(video, (str, os.PathLike)):
        path = os.fspath(video)
        try:
            sample = Loader(model.sampling(max_motion_frames, max_keyframes))(path)
        except Exception as failure:
            error = error_message(path, failure)
    else:
        sample, path = video, video.path
    [record] = score_decoded(model, [(path, sample, error, time.perf_counter() - start)], prompt, strict)
    return record


def score_decoded(model, decoded, prompt: Optional[str] = None, strict: bool = False,
                  after: Optional[Callable] = None) -> list[ScoreRecord]:
    """Records for videos decoded elsewhere (a Ray decode stage, a service): `decoded` holds
    `(path, sample or None, error or None, decode seconds)` as `Prefetcher` yields them. The samples are
    scored in one forward pass when there are several (one by one if that pass fails); `after`: as in
    `score_videos`."""
    pending = [_pending(model, path, sample, error, seconds, strict) for path, sample, error, seconds in decoded]
    return _score_pending(model, pending, prompt, after)


def _pending(model, path, sample, error, seconds, strict) -> tuple:
    """(record, the sample to score or None, decode seconds) of a decoded (or failed) video."""
    record = _decoded(model, path, sample, error, strict)
    return record, sample if record.error is None else None, seconds


def _decoded(model, path, sample, error, strict) -> ScoreRecord:
    """The record of a decoded (or failed) video, before scoring."""
    record = ScoreRecord(path=path, model=model.name, error=error)
    if sample is not None:
        record.duration_s = round(float(sample.duration), 3)
        record.keyframes = int(sample.keyframes.shape[0])
        record.motion_frames = int(sample.motion.shape[0])
        record.warnings = warnings_of(sample)
        if strict and record.warnings:
            record.error = damage_error(path, record.warnings)
    return record


def warnings_of(sample) -> list:
    """The damage a decoded sample reports, one line each ([] for none, or for no sample)."""
    return [" ".join(str(warning).split()) for warning in sample.warnings] if sample is not None else []


def damage_error(path, warnings: list) -> str:
    """The error of a damaged video in strict mode: one line naming the file and what was lost."""
    return f"{path}: refused as damaged (strict): {'; '.join(warnings)}"


def run_after(after: Optional[Callable], record: ScoreRecord, sample) -> None:
    """`after(record, sample)` for a scored record; a failure becomes its `error` (the score stays) and its
    time counts in `seconds`."""
    if after is None or record.error is not None:
        return
    start = time.perf_counter()
    try:
        after(record, sample)
    except SetupError:
        raise
    except Exception as failure:  # this video's extra work failed; the batch goes on
        record.error = error_message(record.path, failure)
    record.seconds += time.perf_counter() - start


def _score_pending(model, pending, prompt, after=None) -> list:
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
    for record, sample in zip(done, samples):
        run_after(after, record, sample)
    for record, _, decode_seconds in pending:
        record.seconds = round(record.seconds + decode_seconds, 3)
    return [record for record, _, _ in pending]


def _fill(record: ScoreRecord, result):
    record.score = float(result.score)
    record.level = result.level.strip()
    record.probs = {level.strip(): float(p) for level, p in result.probs.items()}
