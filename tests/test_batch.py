import io
import os
import threading
import time

import pytest

from vqa2cli.batch import EmptyFolder, Prefetcher, ScoreRecord, error_message, expand_paths, fd_lines
from vqa2cli.errors import InputError


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


def test_prefetcher_keeps_order_and_turns_errors_into_items():
    def decode(path):
        if path == "bad":
            raise InputError("bad: broken")
        if path == "bug":
            raise ZeroDivisionError("division by zero")
        return path.upper()

    with Prefetcher(["a", "bad", "b", "bug", "c"], decode) as prefetcher:
        items = [(path, sample, error) for path, sample, error, _ in prefetcher]
    assert items == [
        ("a", "A", None),
        ("bad", None, "bad: broken"),
        ("b", "B", None),
        ("bug", None, "bug: ZeroDivisionError: division by zero"),
        ("c", "C", None),
    ]


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


def test_prefetcher_reraises_errors_reading_paths():
    def paths():
        yield "a"
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")

    with Prefetcher(paths(), lambda path: path) as prefetcher:
        iterator = iter(prefetcher)
        assert next(iterator)[0] == "a"
        with pytest.raises(UnicodeDecodeError):
            next(iterator)


def test_score_record_fields():
    assert list(ScoreRecord(path="a").to_dict()) == [
        "path", "score", "level", "probs", "model", "duration_s", "keyframes", "motion_frames", "seconds", "error",
    ]


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

    def sampling(self, max_motion_frames=None, max_keyframes=None):
        return self.config.sampling(max_motion_frames, max_keyframes)

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
