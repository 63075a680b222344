import io
import os
import signal
import threading
import time

import pytest

from vqa2cli.batch import EmptyFolder, Prefetcher, ScoreRecord, error_message, expand_paths, fd_lines
from vqa2cli.errors import InputError, SetupError


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return str(path)


def test_expand_directory_filters_by_extension_and_sorts(tmp_path):
    b = _touch(tmp_path / "b.MP4")
    a = _touch(tmp_path / "a.webm")
    _touch(tmp_path / "notes.txt")
    _touch(tmp_path / ".hidden.mp4")
    _touch(tmp_path / "sub" / "c.mkv")
    notes = []
    assert list(expand_paths([str(tmp_path)], warn=notes.append)) == [a, b]
    assert notes == [f"{tmp_path}: 1 subdirectory skipped (use --recursive)"]


def test_expand_recursive_skips_hidden_dirs(tmp_path):
    a = _touch(tmp_path / "a.mp4")
    c = _touch(tmp_path / "sub" / "deeper" / "c.mov")
    _touch(tmp_path / ".git" / "x.mp4")
    assert list(expand_paths([str(tmp_path)], recursive=True)) == [a, c]


def test_expand_explicit_files_always_tried_and_order_kept(tmp_path):
    txt = _touch(tmp_path / "notes.txt")
    missing = str(tmp_path / "missing.mp4")
    assert list(expand_paths([missing, txt])) == [missing, txt]


def test_expand_empty_directory_is_an_input_that_fails(tmp_path):
    (tmp_path / "notes.txt").write_text("")
    (tmp_path / "sub").mkdir()
    notes = []
    assert list(expand_paths([str(tmp_path)], warn=notes.append)) == [str(tmp_path)]
    folder, = expand_paths([str(tmp_path)])
    assert isinstance(folder, EmptyFolder) and notes == []
    assert folder.reason.startswith("no video files found (looked for .3g2, .3gp,")
    assert folder.reason.endswith("; 1 subdirectory skipped (use --recursive)")


def test_expand_stdin_lines_including_directories(tmp_path):
    a = _touch(tmp_path / "d" / "a.mp4")
    stdin = io.StringIO(f"x y.mp4\n\n{tmp_path / 'd'}\r\n")
    assert list(expand_paths(["first.mp4", "-"], stdin=stdin)) == ["first.mp4", "x y.mp4", a]


def test_expand_stdin_is_lazy():
    consumed = []

    def lines():
        for line in ("a.mp4\n", "b.mp4\n"):
            consumed.append(line)
            yield line

    paths = expand_paths(["-"], stdin=lines())
    assert next(paths) == "a.mp4" and consumed == ["a.mp4\n"]


def test_error_message_is_one_line_naming_the_file():
    assert error_message("a.mp4", InputError("a.mp4: not a video")) == "a.mp4: not a video"
    assert error_message("a.mp4", RuntimeError("out of\nmemory")) == "a.mp4: RuntimeError: out of memory"
    assert error_message("a.mp4", MemoryError()) == "a.mp4: MemoryError"


def _decode_letters(item):
    """A decoder for the tests, module-level so worker processes can load it."""
    if item == "bad":
        raise InputError("bad: broken")
    if item == "bug":
        raise ZeroDivisionError("division by zero")
    if item == "segfault":  # what a crashing decoder library does
        os.kill(os.getpid(), signal.SIGSEGV)
    if item == "oom":  # what the OOM killer does
        os.kill(os.getpid(), signal.SIGKILL)
    return item.upper()


@pytest.mark.parametrize("workers", [0, 2])
def test_prefetcher_keeps_order_and_turns_errors_into_items(workers):
    with Prefetcher(["a", "bad", "b", "bug", "c"] * 2, _decode_letters, workers=workers) as prefetcher:
        items = [(path, sample, error) for path, sample, error, _ in prefetcher]
    assert items == [
        ("a", "A", None),
        ("bad", None, "bad: broken"),
        ("b", "B", None),
        ("bug", None, "bug: ZeroDivisionError: division by zero"),
        ("c", "C", None),
    ] * 2


def test_a_crashed_or_killed_worker_is_an_error_for_its_item_and_the_pool_goes_on():
    items = ["a", "segfault", "b", "oom", "c", "d", "segfault", "e"]
    with Prefetcher(items, _decode_letters, workers=2) as prefetcher:
        results = [(path, sample, error) for path, sample, error, _ in prefetcher]
        alive = [worker.process for worker in prefetcher._pool.workers]
    assert [path for path, _, _ in results] == items
    assert [sample for _, sample, _ in results] == ["A", None, "B", None, "C", "D", None, "E"]
    assert results[1][2] == "segfault: the decoder process crashed (SIGSEGV) while decoding this file"
    assert results[3][2] == "oom: the decoder process was killed (SIGKILL; out of memory?) while decoding this file"
    assert len(alive) == 2 and not any(process.is_alive() for process in alive)  # close() ended the replacements


def test_prefetcher_decodes_while_consumer_works():
    second_started = threading.Event()

    def decode(path):
        if path == 2:
            second_started.set()
        return path

    with Prefetcher([1, 2, 3], decode, depth=1) as prefetcher:
        for path, *_ in prefetcher:
            if path == 1:
                # the consumer is busy with video 1: video 2 must be decoding meanwhile
                assert second_started.wait(timeout=5)


def test_prefetcher_is_bounded_and_close_stops_it():
    started = []
    with Prefetcher(range(100), lambda path: started.append(path) or path, depth=2) as prefetcher:
        iterator = iter(prefetcher)
        next(iterator)
        time.sleep(0.3)
        # one consumed + two queued + one finished, waiting for room
        assert len(started) == 4
    thread = prefetcher._thread
    thread.join(timeout=2)
    assert not thread.is_alive() and len(started) == 4


def _decode_marking(item):
    folder, index = item
    open(os.path.join(folder, str(index)), "w").close()
    return index


def test_worker_pool_is_bounded_and_close_ends_the_workers(tmp_path):
    with Prefetcher([(str(tmp_path), i) for i in range(100)], _decode_marking, depth=2, workers=2) as prefetcher:
        iterator = iter(prefetcher)
        assert next(iterator)[1] == 0
        deadline = time.monotonic() + 60  # the first workers may take seconds to start on a busy machine
        while len(os.listdir(tmp_path)) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        # the one taken, then depth + workers = 4 slots: decoded and waiting, never more
        assert sorted(int(name) for name in os.listdir(tmp_path)) == [0, 1, 2, 3, 4]
        processes = [worker.process for worker in prefetcher._pool.workers]
    assert len(processes) == 2 and not any(process.is_alive() for process in processes)


def _decode_tensors(item):
    import torch

    n = int(item)
    return {"frames": torch.arange(n * 24, dtype=torch.uint8).reshape(n, 2, 3, 4),
            "normalised": torch.full((2, n), n / 4, dtype=torch.float32),
            "half": torch.full((3,), n, dtype=torch.bfloat16),
            "strided": torch.arange(12, dtype=torch.int64)[::3],
            "empty": torch.zeros(0, 5),
            "name": f"clip {n}"}


def test_worker_results_with_tensors_arrive_intact():
    import torch

    with Prefetcher(["1", "3", "7"], _decode_tensors, workers=2) as prefetcher:
        results = [result for _, result, _, _ in prefetcher]
    for n, result in zip((1, 3, 7), results):
        assert result["name"] == f"clip {n}"
        assert result["frames"].shape == (n, 2, 3, 4) and result["frames"].dtype == torch.uint8
        assert result["frames"].flatten().tolist() == [i % 256 for i in range(n * 24)]
        assert result["normalised"].tolist() == [[n / 4] * n] * 2
        assert result["half"].dtype == torch.bfloat16 and result["half"].tolist() == [n] * 3
        assert result["strided"].tolist() == [0, 3, 6, 9]
        assert result["empty"].shape == (0, 5)
        result["frames"] += 1  # usable like any tensor, writable included


def test_a_worker_decodes_a_clip_exactly_as_this_process_does(three_clips):
    import torch

    from vqa2cli.config import tiny_config

    sampling = tiny_config().sampling()
    with Prefetcher(three_clips, sampling.load, workers=1) as prefetcher:
        samples = [sample for _, sample, _, _ in prefetcher]
    for path, sample in zip(three_clips, samples):
        here = sampling.load(path)
        assert torch.equal(sample.keyframes, here.keyframes) and torch.equal(sample.motion, here.motion)
        assert (sample.path, sample.motion_indices, sample.keyframe_indices, sample.duration, sample.warnings) == (
            here.path, here.motion_indices, here.keyframe_indices, here.duration, here.warnings)


class _Unloadable:
    """A decoder that pickles here but cannot be loaded in a worker (as when its module is missing there)."""

    def __call__(self, item):
        return item

    def __reduce__(self):
        return _fail_loading, ()


def _fail_loading():
    raise ImportError("No module named 'decoder_plugin'")


def test_workers_that_cannot_start_are_a_setup_error():
    with Prefetcher(["a", "b"], _Unloadable(), workers=2) as prefetcher:
        with pytest.raises(SetupError, match="decode worker cannot start: ImportError: No module named"):
            list(prefetcher)


def test_an_unpicklable_decoder_fails_at_once_with_workers():
    with pytest.raises(Exception, match="pickle"):
        Prefetcher(["a"], lambda item: item, workers=1)


@pytest.mark.parametrize("workers", [0, 2])
def test_prefetcher_reraises_errors_reading_paths(workers):
    def paths():
        yield "a"
        yield "b"
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")

    with Prefetcher(paths(), _decode_letters, workers=workers) as prefetcher:
        iterator = iter(prefetcher)
        assert [next(iterator)[1], next(iterator)[1]] == ["A", "B"]  # the items before it come first
        with pytest.raises(UnicodeDecodeError):
            next(iterator)


def test_score_record_fields():
    # segments and explanation (--timeline, --explain) come last, null unless asked for: the others keep their places
    record = ScoreRecord(path="a").to_dict()
    assert list(record) == [
        "path", "score", "level", "probs", "model", "duration_s", "keyframes", "motion_frames", "seconds", "warnings",
        "error", "segments", "explanation",
    ]
    assert record["segments"] is None and record["explanation"] is None


def test_fd_lines_reads_a_pipe_without_buffering(tmp_path):
    read_fd, write_fd = os.pipe()
    os.write(write_fd, b"a.mp4\nb\xff.mp4\r\n")
    lines = fd_lines(read_fd)
    # the first lines are available before the writer closes: stdin paths stream in
    assert next(lines) == "a.mp4"
    assert next(lines) == os.fsdecode(b"b\xff.mp4\r")
    os.write(write_fd, b"last.mp4")
    os.close(write_fd)
    assert list(lines) == ["last.mp4"]
    os.close(read_fd)


class _FakeModel:
    """The VQA2 surface score_videos uses; scores from the clip's duration so results are checkable."""

    name = "fake"

    def __init__(self, fail_batches=False, unscorable=()):
        from vqa2cli.config import tiny_config

        self.config = tiny_config()
        self.fail_batches = fail_batches
        self.unscorable = set(unscorable)
        self.batches = []

    def _result(self, sample):
        from vqa2cli.pipeline import ScoreResult

        if sample.path in self.unscorable:
            raise RuntimeError("out of memory")
        return ScoreResult(sample.duration / 10, " good", {" good": 1.0})

    def sampling(self, max_motion_frames=None, max_keyframes=None, views=True):
        return self.config.sampling(max_motion_frames, max_keyframes, views)

    def score(self, sample, prompt=None):
        return self._result(sample)

    def score_batch(self, samples, prompt=None):
        self.batches.append([sample.path for sample in samples])
        if self.fail_batches:
            raise RuntimeError("out of memory")
        return [self._result(sample) for sample in samples]


@pytest.fixture(scope="module")
def three_clips(tmp_path_factory):
    from tests.fixtures.clips import make_clip

    root = tmp_path_factory.mktemp("batch_clips")
    return [str(make_clip(root / f"{seconds}s.mp4", seconds=seconds, fps=8, size=(32, 32))) for seconds in (1, 2, 3)]


def test_score_videos_batches_in_order_around_failures(three_clips, tmp_path):
    from vqa2cli.batch import score_videos

    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"")
    one, two, three = three_clips
    model = _FakeModel()
    records = list(score_videos(model, [one, str(bad), two, three], batch_size=2))
    assert [r.path for r in records] == [one, str(bad), two, three]
    assert model.batches == [[one, two]]  # the last one alone is scored by model.score
    assert [r.score for r in records] == [pytest.approx(0.1), None, pytest.approx(0.2), pytest.approx(0.3)]
    assert records[1].error == f"{bad}: empty file (0 bytes)"
    assert records[0].level == "good" and records[0].probs == {"good": 1.0} and records[0].model == "fake"
    assert records[2].keyframes == 2 and records[2].motion_frames > 0 and records[2].duration_s == pytest.approx(2)
    assert all(r.seconds > 0 for r in records if r.error is None) and records[1].seconds >= 0


def test_score_videos_failed_batch_falls_back_to_one_by_one(three_clips):
    from vqa2cli.batch import score_videos

    one, two, three = three_clips
    model = _FakeModel(fail_batches=True, unscorable={two})
    records = list(score_videos(model, three_clips, batch_size=3))
    assert model.batches == [[one, two, three]]
    assert [r.error for r in records] == [None, f"{two}: RuntimeError: out of memory", None]
    assert records[2].score == pytest.approx(0.3)


def test_score_videos_with_workers_keeps_order_around_a_bad_file(three_clips, tmp_path):
    from vqa2cli.batch import score_videos

    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video" * 100)
    one, two, three = three_clips
    records = list(score_videos(_FakeModel(), [one, str(bad), two, three], workers=2))
    assert [r.path for r in records] == [one, str(bad), two, three]
    assert [r.score for r in records] == [pytest.approx(0.1), None, pytest.approx(0.2), pytest.approx(0.3)]
    assert records[1].error.startswith(f"{bad}: not a video file")


def test_damage_is_a_warning_or_with_strict_an_error(three_clips, tmp_path):
    from tests.fixtures.clips import make_damaged_clip
    from vqa2cli.batch import score_one, score_videos

    damaged = str(make_damaged_clip(tmp_path / "cut.mp4"))
    one = three_clips[0]
    relaxed = list(score_videos(_FakeModel(), [damaged, one]))
    assert relaxed[0].error is None and relaxed[0].score is not None
    assert len(relaxed[0].warnings) == 1 and "frames the container declares (file truncated" in relaxed[0].warnings[0]
    assert relaxed[1].warnings == []
    strict = list(score_videos(_FakeModel(), [damaged, one], strict=True))
    assert strict[0].score is None and strict[0].warnings == relaxed[0].warnings
    assert strict[0].error == f"{damaged}: refused as damaged (strict): {relaxed[0].warnings[0]}"
    assert strict[1].error is None and strict[1].score == pytest.approx(0.1)
    # --timeline: the same warnings and the same refusal; a refused video keeps no segments
    relaxed_timeline = list(score_videos(_FakeModel(), [damaged, one], timeline=1.0))
    assert relaxed_timeline[0].warnings == relaxed[0].warnings and relaxed_timeline[0].segments
    refused = list(score_videos(_FakeModel(), [damaged, one], timeline=1.0, strict=True))
    assert refused[0].error == strict[0].error and refused[0].score is None and refused[0].segments is None
    assert refused[1].segments == [{"start": 0.0, "end": 1.0, "score": pytest.approx(0.1), "level": "good"}]
    # one video at a time (what a server scoring uploads uses): the same records
    assert score_one(_FakeModel(), damaged).warnings == relaxed[0].warnings
    assert score_one(_FakeModel(), damaged, strict=True).error == strict[0].error


def test_score_one_takes_a_path_or_a_sample_and_never_raises(three_clips, tmp_path):
    from vqa2cli.batch import score_one

    model = _FakeModel()
    by_path = score_one(model, three_clips[1])
    by_sample = score_one(model, model.sampling().load(three_clips[1]))
    assert by_path.score == by_sample.score == pytest.approx(0.2) and by_path.path == by_sample.path
    assert by_path.keyframes == 2 and by_path.seconds > 0
    missing = score_one(model, tmp_path / "missing.mp4")
    assert missing.error == f"{tmp_path / 'missing.mp4'}: no such file" and missing.score is None


# --- sharding ------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, message", [("1/1", "0 <= K < N"), ("2/2", "0 <= K < N"), ("-1/3", "0 <= K < N"),
                                           ("0/0", "N >= 1"), ("a/2", "not K/N"), ("3", "not K/N")])
def test_parse_shard_refuses_what_is_not_a_share(text, message):
    from vqa2cli.batch import parse_shard

    with pytest.raises(ValueError, match=message):
        parse_shard(text)


def test_shards_split_a_listing_into_disjoint_stable_shares(tmp_path):
    from vqa2cli.batch import parse_shard

    names = [f"d{i % 7}/clip{i:03d}.mp4" for i in range(210)]
    for name in names:
        _touch(tmp_path / "here" / name)
    whole = list(expand_paths([str(tmp_path / "here")], recursive=True))
    shares = [list(expand_paths([str(tmp_path / "here")], recursive=True, shard=parse_shard(f"{k}/3")))
              for k in range(3)]
    assert sorted(sum(shares, [])) == sorted(whole)  # together: the whole listing, each path once
    assert all(50 < len(share) < 90 for share in shares)  # a hash spreads them evenly (70 each)
    for share in shares:
        assert share == [path for path in whole if path in share]  # in listing order

    # the same catalogue mounted elsewhere, with files added: every old file keeps its share
    for name in names + ["d0/new1.mp4", "d3/new2.mp4", "new3.mp4"]:
        _touch(tmp_path / "mnt" / "elsewhere" / name)
    for k, share in enumerate(shares):
        moved = expand_paths([str(tmp_path / "mnt" / "elsewhere")], recursive=True, shard=(k, 3))
        old = [os.path.relpath(path, tmp_path / "mnt" / "elsewhere") for path in moved if "new" not in path]
        assert old == [os.path.relpath(path, tmp_path / "here") for path in share]


def test_shards_of_paths_given_one_by_one_use_the_path_as_given():
    paths = [f"videos/clip{i}.mp4" for i in range(40)]
    first = list(expand_paths(paths, shard=(0, 2)))
    second = list(expand_paths(paths, shard=(1, 2)))
    assert sorted(first + second) == sorted(paths) and not set(first) & set(second)
    # spelled differently, the same file: the same share
    assert list(expand_paths([f"./{p}".replace("/", "//") for p in first], shard=(0, 2))) == [
        f"./{p}".replace("/", "//") for p in first]


def test_default_workers_follow_the_device_and_the_count(monkeypatch):
    import vqa2cli.synth
    from vqa2cli.batch import default_workers

    monkeypatch.setattr(vqa2cli.synth, "usable_cpus", lambda: 16)
    assert [default_workers(count, "cuda") for count in (None, 0, 1, 2, 40)] == [15, 0, 0, 2, 15]
    assert [default_workers(count, "cpu") for count in (None, 1, 2, 40)] == [1, 0, 1, 1]
    monkeypatch.setattr(vqa2cli.synth, "usable_cpus", lambda: 1)
    assert default_workers(None, "cuda") == 1
