"""The `vqa2` command end to end: in-process through `main()` (exit codes included), and in
subprocesses where only a real process will do (import cost, SIGINT, pipes)."""

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.fixtures.processes import default_stop_signals, vqa2_process
from vqa2cli.registry import registry


def test_help_and_version_do_not_import_torch():
    # every command's --help too: commands added later must keep heavy imports inside their bodies
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from vqa2cli.cli import cli\n"
        "runner = CliRunner()\n"
        "for args in [['--help'], ['--version'], *[[name, '--help'] for name in cli.commands]]:\n"
        "    result = runner.invoke(cli, args)\n"
        "    assert result.exit_code == 0, (args, result.output)\n"
        "heavy = [m for m in ('torch', 'transformers', 'bitsandbytes', 'peft', 'av') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_version(vqa2):
    code, out, _ = vqa2("--version")
    assert code == 0 and out.startswith("vqa2, version ")


def test_help_lists_commands_with_examples(vqa2):
    code, out, _ = vqa2("--help")
    assert code == 0
    for command in ("score", "ask", "models"):
        assert command in out
    code, out, _ = vqa2("score", "--help")
    assert code == 0 and "Examples:" in out and "--recursive" in out and "--jsonl" in out


def test_conflicting_formats_is_a_usage_error(vqa2, tmp_path):
    code, out, err = vqa2("score", tmp_path, "--json", "--csv")
    assert code == 2 and out == ""
    assert "choose one output format, not --json and --csv" in err


def test_bad_option_value_is_a_usage_error(vqa2, tmp_path):
    code, out, err = vqa2("score", tmp_path, "--device", "tpu")
    assert code == 2 and out == "" and "Traceback" not in err


def test_ask_needs_a_question(vqa2, tmp_path):
    code, out, err = vqa2("ask", tmp_path / "clip.mp4")
    assert code == 2 and "give a QUESTION" in err


def test_models_json(vqa2):
    code, out, err = vqa2("models", "--json")
    assert code == 0
    models = json.loads(out)
    assert [m["name"] for m in models] == [entry.name for entry in registry()]
    for model in models:
        assert set(model) == {"name", "purpose", "repo_id", "prompt", "default_for", "present", "size_bytes", "path"}
        assert isinstance(model["present"], bool) and isinstance(model["size_bytes"], int)
    assert [m["repo_id"] for m in models] == [entry.repo_id for entry in registry()]  # null: shipped


def test_models_csv_and_default_jsonl_when_piped(vqa2):
    code, out, _ = vqa2("models", "--csv")
    lines = out.splitlines()
    assert code == 0 and lines[0] == "name,purpose,repo_id,default_for,present,size_bytes,path"
    assert len(lines) == len(registry()) + 1
    code, out, _ = vqa2("models")
    assert code == 0 and [json.loads(line)["name"] for line in out.splitlines()] == [e.name for e in registry()]



def test_a_bug_is_one_line_unless_debugging(vqa2, monkeypatch):
    import vqa2cli.registry

    def broken():
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(vqa2cli.registry, "list_models", broken)
    code, out, err = vqa2("models")
    assert code == 1 and out == ""
    assert err == "error: internal error (RuntimeError: boom second line); run with VQA2_DEBUG=1 for the traceback\n"
    monkeypatch.setenv("VQA2_DEBUG", "1")
    with pytest.raises(RuntimeError, match="boom"):
        vqa2("models")


# --- end to end with the tiny model ----------------------------------------------------------------

RECORD_FIELDS = ["path", "score", "level", "probs", "model", "duration_s", "keyframes", "motion_frames", "seconds",
                 "warnings", "error", "segments", "explanation"]


@pytest.fixture(scope="session")
def clips_dir(tmp_path_factory):
    """Two good clips in a folder, with a subfolder holding a third (for --recursive)."""
    from tests.fixtures.clips import make_clip

    root = tmp_path_factory.mktemp("clips")
    make_clip(root / "a.mp4", seconds=1, size=(64, 48))
    make_clip(root / "b.mkv", seconds=2, fps=12, size=(48, 64))
    (root / "sub").mkdir()
    make_clip(root / "sub" / "c.mp4", seconds=1, size=(64, 48))
    return root


def _check_success(record, path, model_dir):
    assert list(record) == RECORD_FIELDS
    assert record["path"] == str(path) and record["error"] is None
    assert 0 <= record["score"] <= 1
    assert set(record["probs"]) == {"high", "good", "fair", "poor", "low"}
    assert abs(sum(record["probs"].values()) - 1) < 1e-6
    assert record["level"] == max(record["probs"], key=record["probs"].get)
    assert record["model"] == str(model_dir)
    assert record["duration_s"] > 0 and record["keyframes"] >= 1 and record["motion_frames"] >= 4
    assert record["seconds"] > 0 and record["warnings"] == []


def test_score_json(vqa2, clips_dir, tiny_model_dir):
    code, out, err = vqa2("score", clips_dir, "--model", tiny_model_dir, "--json")
    assert code == 0, err
    records = json.loads(out)
    assert [r["path"] for r in records] == [str(clips_dir / "a.mp4"), str(clips_dir / "b.mkv")]
    for record in records:
        _check_success(record, record["path"], tiny_model_dir)
    assert records[1]["duration_s"] == pytest.approx(2.0, abs=0.1) and records[1]["keyframes"] == 2
    assert "1 subdirectory skipped (use --recursive)" in err
    assert "scored 2 video(s), 0 failed" in err


def test_score_jsonl_recursive_and_batch_size(vqa2, clips_dir, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("VQA2_MODEL", str(tiny_model_dir))
    code, out, err = vqa2("score", clips_dir, "--jsonl", "--quiet")
    assert code == 0 and len(out.splitlines()) == 2
    assert err == ""  # --quiet: no note about the skipped subfolder, no summary

    code, out, _ = vqa2("score", clips_dir, "--recursive", "--jsonl")
    one_by_one = [json.loads(line) for line in out.splitlines()]
    assert [r["path"] for r in one_by_one] == [str(clips_dir / n) for n in ("a.mp4", "b.mkv", "sub/c.mp4")]

    code, out, _ = vqa2("score", clips_dir, "-r", "--jsonl", "--batch-size", "2")
    batched = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [r["path"] for r in batched] == [r["path"] for r in one_by_one]
    for single, together in zip(one_by_one, batched):
        _check_success(together, single["path"], tiny_model_dir)
        assert together["score"] == pytest.approx(single["score"], abs=1e-4)


def test_score_frame_caps_reach_the_record(vqa2, clips_dir, tiny_model_dir):
    code, out, err = vqa2("score", clips_dir / "b.mkv", "-m", tiny_model_dir, "--json",
                          "--max-keyframes", "1", "--max-motion-frames", "8")
    assert code == 0, err
    [record] = json.loads(out)
    assert record["keyframes"] == 1 and record["motion_frames"] == 8


def test_score_csv(vqa2, clips_dir, tiny_model_dir):
    import csv

    code, out, _ = vqa2("score", clips_dir / "a.mp4", clips_dir / "missing.mp4", "-m", tiny_model_dir, "--csv")
    assert code == 1
    rows = list(csv.DictReader(io.StringIO(out)))
    assert list(rows[0]) == [
        "path", "score", "level", "probs.high", "probs.good", "probs.fair", "probs.poor", "probs.low",
        "model", "duration_s", "keyframes", "motion_frames", "seconds", "warnings", "error",
    ]
    assert 0 <= float(rows[0]["score"]) <= 1 and rows[0]["error"] == ""
    assert rows[1]["path"] == str(clips_dir / "missing.mp4") and rows[1]["score"] == ""
    assert rows[1]["error"] == f"{clips_dir / 'missing.mp4'}: no such file"


def test_score_piped_default_is_jsonl(vqa2, clips_dir, tiny_model_dir):
    code, out, _ = vqa2("score", clips_dir / "a.mp4", "--model", tiny_model_dir)
    assert code == 0 and len(out.splitlines()) == 1
    _check_success(json.loads(out), clips_dir / "a.mp4", tiny_model_dir)


def test_score_bad_file_zoo_never_stops_the_batch(vqa2, tmp_path, clips_dir, tiny_model_dir):
    import shutil

    from tests.fixtures.clips import BAD_FILES, build_bad_files, permissions_apply
    from vqa2cli.batch import is_video_name

    zoo = build_bad_files(tmp_path / "zoo")
    folder = tmp_path / "mixed"
    folder.mkdir()
    shutil.copy(clips_dir / "a.mp4", folder / "good.mp4")
    (folder / "a_directory.mp4").mkdir()  # a folder named like a video: skipped without --recursive
    for name in BAD_FILES:
        if name in ("missing", "directory"):
            continue
        target = folder / zoo[name].name
        if os.access(zoo[name], os.R_OK):
            shutil.copy(zoo[name], target)
        else:  # the mode-000 clip, when permissions apply: make our own
            shutil.copy(clips_dir / "a.mp4", target)
            target.chmod(0)
    files = {name: folder / zoo[name].name for name in BAD_FILES if name not in ("missing", "directory")}
    files["missing"] = folder / "missing.mp4"
    # named explicitly: tried although not video-named (notes.txt, picture.png) or absent (missing.mp4)
    explicit = [path for path in files.values() if not is_video_name(path.name) or not path.exists()]
    code, out, err = vqa2("score", folder, *explicit, "--model", tiny_model_dir, "--json")

    assert code == 1
    assert "Traceback" not in err
    records = {Path(r["path"]).name: r for r in json.loads(out)}
    good = {"good.mp4"} | (set() if permissions_apply(files["unreadable"]) else {"unreadable.mp4"})
    failed = {path.name for path in files.values()} - good
    assert set(records) == good | failed
    for name in good:
        _check_success(records[name], folder / name, tiny_model_dir)
    error_lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == len(failed)
    for name in failed:
        record = records[name]
        assert record["score"] is None and record["probs"] is None
        # one line naming the file and the reason, also on stderr
        assert record["error"].startswith(str(record["path"]) + ": ") and "\n" not in record["error"]
        assert f"error: {record['error']}" in error_lines
    assert f"scored {len(good)} video(s), {len(failed)} failed" in err


def test_score_paths_from_stdin(vqa2, clips_dir, tiny_model_dir):
    stdin = f"{clips_dir / 'b.mkv'}\n\n{clips_dir / 'nope.mp4'}\n{clips_dir / 'sub'}\n"
    code, out, err = vqa2("score", "-", "--model", tiny_model_dir, "--jsonl", stdin=stdin)
    records = [json.loads(line) for line in out.splitlines()]
    assert code == 1
    assert [r["path"] for r in records] == [str(clips_dir / n) for n in ("b.mkv", "nope.mp4", "sub/c.mp4")]
    assert records[1]["error"] == f"{clips_dir / 'nope.mp4'}: no such file"
    _check_success(records[2], clips_dir / "sub" / "c.mp4", tiny_model_dir)


def _by_path(records):
    return {r["path"]: (r["score"], r["error"]) for r in records}


def test_score_with_workers_keeps_input_order_around_a_bad_file(vqa2, clips_dir, tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00" * 5000)
    paths = [clips_dir / "a.mp4", clips_dir / "b.mkv", bad, clips_dir / "sub" / "c.mp4", clips_dir / "a.mp4"]
    code, out, err = vqa2("score", *paths, "-m", tiny_model_dir, "--jsonl", "--workers", "2")
    assert code == 1, err
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["path"] for r in records] == [str(p) for p in paths]
    assert records[2]["error"].startswith(f"{bad}: ") and records[2]["score"] is None
    code, out, _ = vqa2("score", *paths, "-m", tiny_model_dir, "--jsonl", "--workers", "0")
    in_thread = [json.loads(line) for line in out.splitlines()]
    assert _by_path(in_thread) == _by_path(records)


def test_score_damaged_file_warns_and_fails_under_strict(vqa2, clips_dir, tiny_model_dir, tmp_path):
    import csv

    from tests.fixtures.clips import make_damaged_clip

    damaged = make_damaged_clip(tmp_path / "cut.mp4")
    code, out, err = vqa2("score", damaged, clips_dir / "a.mp4", "-m", tiny_model_dir, "--jsonl")
    assert code == 0, err
    cut, fine = [json.loads(line) for line in out.splitlines()]
    assert cut["error"] is None and cut["score"] is not None and fine["warnings"] == []
    [warning] = cut["warnings"]
    assert "of the 100 frames the container declares (file truncated or damaged)" in warning
    assert f"warning: {damaged}: {warning}\n" in err and "(1 with warnings)" in err

    code, out, _ = vqa2("score", damaged, clips_dir / "a.mp4", "-m", tiny_model_dir, "--csv")
    assert code == 0 and next(csv.DictReader(io.StringIO(out)))["warnings"] == warning

    code, out, err = vqa2("score", damaged, clips_dir / "a.mp4", "-m", tiny_model_dir, "--jsonl", "--strict")
    assert code == 1
    cut, fine = [json.loads(line) for line in out.splitlines()]
    assert cut["error"] == f"{damaged}: refused as damaged (strict): {warning}" and cut["score"] is None
    assert cut["warnings"] == [warning] and fine["error"] is None
    assert [line for line in err.splitlines() if str(damaged) in line] == [f"error: {cut['error']}"]


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    """Twelve short clips (and one broken file) in two folders."""
    from tests.fixtures.clips import make_clip

    root = tmp_path_factory.mktemp("catalogue")
    for part in ("part0", "part1"):
        (root / part).mkdir()
    for i in range(12):
        make_clip(root / f"part{i % 2}" / f"clip{i:02d}.mp4", seconds=1, fps=8, size=(48, 32),
                  color=(20 * i, 100, 200 - 10 * i))
    (root / "part1" / "broken.mp4").write_bytes(b"\x00" * 3000)
    return root


def test_score_shards_together_are_the_whole_run(vqa2, catalogue, tiny_model_dir):
    args = ("score", catalogue, "-r", "-m", tiny_model_dir, "--jsonl", "--workers", "1")
    code, out, _ = vqa2(*args)
    whole = [json.loads(line) for line in out.splitlines()]
    assert code == 1 and len(whole) == 13
    halves = []
    for k in (0, 1):
        code, out, err = vqa2(*args, "--shard", f"{k}/2")
        halves.append([json.loads(line) for line in out.splitlines()])
        assert "Traceback" not in err
    first, second = ({r["path"] for r in half} for half in halves)
    assert first and second and not first & second  # disjoint, neither empty
    assert _by_path(halves[0] + halves[1]) == _by_path(whole)  # together: the whole run, same results
    code, _, err = vqa2(*args, "--shard", "2/2")
    assert code == 2 and "'2/2': K/N needs N >= 1 and 0 <= K < N" in err


def test_score_output_usage_errors(vqa2, tmp_path):
    code, _, err = vqa2("score", tmp_path, "--resume")
    assert code == 2 and "--resume continues an --output FILE" in err
    code, _, err = vqa2("score", tmp_path, "--output", tmp_path / "out.json")
    assert code == 2 and "name a .jsonl or .csv file" in err
    code, _, err = vqa2("score", tmp_path, "--output", tmp_path / "out.csv", "--jsonl")
    assert code == 2 and "--output takes its format from the file's extension" in err


def _descendants(pid):
    """Every process below `pid` (children, their children...), from /proc."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            found += children
            todo += children
    return found


def _wait_gone(pids, seconds=20):
    import time

    deadline = time.monotonic() + seconds
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in alive if Path(f"/proc/{pid}").exists()
                 and "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()]
        time.sleep(0.1)
    return alive


def test_sigkilled_run_resumes_to_the_records_of_an_uninterrupted_run(vqa2, catalogue, tiny_model_dir, tmp_path):
    import signal
    import time

    paths = sorted(str(p) for p in catalogue.rglob("*.mp4"))
    code, out, _ = vqa2("score", *paths, "-m", tiny_model_dir, "--jsonl")
    uninterrupted = [json.loads(line) for line in out.splitlines()]

    output = tmp_path / "scores.jsonl"
    # paths on stdin, which stays open: the run cannot be over before the kill
    process = vqa2_process("score", "-", "-m", tiny_model_dir, "--output", output, "--workers", "2",
                           stdin=subprocess.PIPE)
    process.stdin.write("".join(f"{path}\n" for path in paths[:8]).encode())
    process.stdin.flush()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not output.exists() or output.read_text().count("\n") < 3):
        time.sleep(0.02)
    helpers = _descendants(process.pid)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    process.stdin.close()
    assert helpers and _wait_gone(helpers) == []  # the decode workers and their server go too
    kept = output.read_text()
    assert 3 <= kept.count("\n") < 8
    with open(output, "a") as handle:  # as if the kill had landed in the middle of a write
        handle.write('{"path": "' + paths[9] + '", "score": 0.')

    code, out, err = vqa2("score", *paths, "-m", tiny_model_dir, "--output", output, "--resume", "--workers", "2")
    assert code == 1 and out == ""  # the broken file failed again (retried: failed ones are not skipped)
    assert "cut off an incomplete last record" in err and "already scored are skipped" in err
    resumed = [json.loads(line) for line in output.read_text().splitlines()]
    assert output.read_text().startswith(kept)  # nothing written before the kill was lost or rewritten
    assert _by_path(resumed) == _by_path(uninterrupted)
    scored_twice = [path for path in paths if sum(r["path"] == path and r["error"] is None for r in resumed) > 1]
    assert scored_twice == []


def test_score_model_not_found_is_one_line_exit_2(vqa2, clips_dir, tmp_path):
    code, out, err = vqa2("score", clips_dir, "--model", tmp_path / "no-such-model", "--json")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: model ") and "not found" in err


def test_score_unusable_device_is_exit_2(vqa2, clips_dir, tiny_model_dir):
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    code, out, err = vqa2("score", clips_dir, "--model", tiny_model_dir, "--device", "cuda")
    assert code == 2 and out == "" and err.startswith("error: ") and err.count("\n") == 1


def test_ask_streams_and_json_agrees(vqa2, clips_dir, tiny_model_dir):
    question = "Is there any stuttering?"
    code, out, err = vqa2("ask", clips_dir / "a.mp4", question, "-m", tiny_model_dir, "--max-new-tokens", "6")
    assert code == 0, err
    code, json_out, _ = vqa2("ask", clips_dir / "a.mp4", question, "-m", tiny_model_dir, "--max-new-tokens", "6", "--json")
    answer = json.loads(json_out)
    assert answer == {"path": str(clips_dir / "a.mp4"), "question": question, "answer": answer["answer"],
                      "model": str(tiny_model_dir)}
    assert answer["answer"] and out.strip() == answer["answer"]


def test_ask_questions_file_decodes_once(vqa2, clips_dir, tiny_model_dir, tmp_path, monkeypatch):
    import vqa2cli.video

    calls = []
    real_load_video = vqa2cli.video.load_video

    def counting_load_video(*args, **kwargs):
        calls.append(args[0])
        return real_load_video(*args, **kwargs)

    monkeypatch.setattr(vqa2cli.video, "load_video", counting_load_video)
    questions = tmp_path / "questions.txt"
    questions.write_text("Is it sharp?\n\nIs it noisy?\n")
    args = ("ask", clips_dir / "a.mp4", "--questions", questions, "-m", tiny_model_dir, "--max-new-tokens", "4")
    code, out, _ = vqa2(*args, "--json")
    assert code == 0 and calls == [str(clips_dir / "a.mp4")]
    answers = json.loads(out)
    assert [a["question"] for a in answers] == ["Is it sharp?", "Is it noisy?"]

    code, out, _ = vqa2(*args)
    assert code == 0 and out.startswith("Q: Is it sharp?\nA: ") and "\n\nQ: Is it noisy?\nA: " in out


def test_ask_bad_video_is_one_line_exit_1(vqa2, tmp_path, tiny_model_dir):
    video = tmp_path / "empty.mp4"
    video.write_bytes(b"")
    code, out, err = vqa2("ask", video, "Sharp?", "-m", tiny_model_dir)
    assert code == 1 and out == ""
    assert err == f"error: {video}: empty file (0 bytes)\n"


# --- real processes: Ctrl-C and closed pipes -------------------------------------------------------


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)],
                         ids=["SIGINT", "SIGTERM", "SIGHUP"])
def test_stop_signal_mid_batch_leaves_valid_json(clips_dir, tiny_model_dir, signum, code):
    # Ctrl-C, `kill`/`timeout`/`docker stop` and a closed terminal: the same ending.
    # Paths stream in on stdin, which stays open: the batch is never over before the signal,
    # whether it lands while the model computes or while the command waits for more paths
    process = vqa2_process("score", "-", "--model", tiny_model_dir, "--json", stdin=subprocess.PIPE)
    process.stdin.write(f"{clips_dir / 'a.mp4'}\n".encode() * 20)
    process.stdin.flush()
    received = bytearray()

    def read_stdout():
        while chunk := process.stdout.read1(4096):
            received.extend(chunk)

    reader = threading.Thread(target=read_stdout)
    reader.start()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and b"}" not in received:  # the first record is out
        time.sleep(0.05)
    helpers = _descendants(process.pid)  # the decode workers and the process they are forked from
    process.send_signal(signum)
    try:
        process.wait(timeout=60)
    finally:
        process.kill()
    reader.join()
    err = process.stderr.read().decode()
    assert process.returncode == code, err
    assert len(helpers) >= 2 and _wait_gone(helpers) == []  # no process left behind
    records = json.loads(received)
    assert 1 <= len(records) <= 20
    for record in records:
        _check_success(record, clips_dir / "a.mp4", tiny_model_dir)
    name = signal.Signals(signum).name
    assert err == f"interrupted by {name}: {len(records)} video(s) done, results so far written\n"


# A command that works until a signal comes; with "cleanup" its cleanup after the signal never ends,
# without, it lets the KeyboardInterrupt go (it has nothing to keep).
_STUCK_COMMAND = """
import sys, time
from vqa2cli import cli

cleanup = sys.argv[1] == "cleanup"

@cli.cli.command("stuck")
def stuck():
    try:
        print("working", flush=True)
        time.sleep(60)
    except KeyboardInterrupt:
        if not cleanup:
            raise
        print("cleaning up", flush=True)
        time.sleep(60)
    return cli.EXIT_INTERRUPTED

sys.argv = ["vqa2", "stuck"]
cli.main()
"""


def _stuck_process(cleanup=True, ignored=()):
    return subprocess.Popen([sys.executable, "-c", _STUCK_COMMAND, "cleanup" if cleanup else "none"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=default_stop_signals(ignored))


def test_a_second_signal_ends_the_process_at_once():
    process = _stuck_process()
    try:
        assert process.stdout.readline() == b"working\n"
        process.send_signal(signal.SIGTERM)
        process.send_signal(signal.SIGTERM)  # as `timeout` does: to its child, then to the process group
        assert process.stdout.readline() == b"cleaning up\n"
        time.sleep(1)
        assert process.poll() is None  # one stop, delivered twice
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=10) == -signal.SIGINT
    finally:
        process.kill()


def test_an_ignored_signal_stays_ignored():
    # `nohup vqa2 ...`: a hangup must not stop the run; SIGTERM still does
    process = _stuck_process(ignored=(signal.SIGHUP,))
    try:
        assert process.stdout.readline() == b"working\n"
        process.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        assert process.poll() is None
        process.send_signal(signal.SIGTERM)
        assert process.stdout.readline() == b"cleaning up\n"
        time.sleep(1)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == -signal.SIGTERM
    finally:
        process.kill()


def test_a_command_with_nothing_to_keep_stops_in_one_line():
    # the exit code and the note still name the signal
    process = _stuck_process(cleanup=False)
    try:
        assert process.stdout.readline() == b"working\n"
        process.send_signal(signal.SIGHUP)
        assert process.wait(timeout=10) == 129
    finally:
        process.kill()
    assert process.stderr.read() == b"interrupted by SIGHUP\n"


def test_closed_stdout_pipe_stops_quietly(clips_dir, tiny_model_dir):
    process = vqa2_process("score", *[clips_dir / "a.mp4"] * 20, "--model", tiny_model_dir, "--jsonl")
    first = process.stdout.readline()  # like `| head -1`
    process.stdout.close()
    process.wait(timeout=300)
    err = process.stderr.read().decode()
    assert json.loads(first)["error"] is None
    # click's own handling of EPIPE: exit 1, nothing on stderr
    assert process.returncode == 1 and err == ""


def test_terminal_gets_a_table_and_a_progress_bar(clips_dir, tiny_model_dir):
    import fcntl
    import pty
    import re
    import struct
    import termios

    # stdout and stderr on one pseudo-terminal, as in an interactive shell
    leader, follower = pty.openpty()
    # 200 columns, so that long temporary paths stay on one line of the table
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
    env = {**os.environ, "COLUMNS": "200"}  # rich prefers COLUMNS, when set, to the terminal size
    process = subprocess.Popen(
        [sys.executable, "-m", "vqa2cli", "score", clips_dir, "--model", tiny_model_dir],
        stdin=subprocess.DEVNULL, stdout=follower, stderr=follower, close_fds=True, env=env,
    )
    os.close(follower)
    screen = bytearray()
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal closed with the process
            break
        if not chunk:
            break
        screen.extend(chunk)
    process.wait(timeout=60)
    os.close(leader)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.decode("utf-8", "replace"))  # colours, cursor moves
    assert process.returncode == 0, text
    assert "Scoring" in text and "2/2" in text  # the progress bar was drawn
    assert "Path" in text and "Score" in text and "a.mp4" in text and "b.mkv" in text  # the table
    assert "scored 2 video(s), 0 failed" in text and "Traceback" not in text and '{"path"' not in text


def test_ray_options_need_ray_and_ray_needs_its_extra(vqa2, clip, monkeypatch):
    code, _, err = vqa2("score", clip, "--model", "vqa2-tiny", "--parquet", "out")
    assert code == 2 and "--parquet needs --ray" in err
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the extra were not installed
    code, out, err = vqa2("score", clip, "--model", "vqa2-tiny", "--ray", "--jsonl")
    assert code == 2 and out == ""
    assert err.strip() == "error: --ray needs Ray Data: install vqa2's ray extra (pip install '.[ray]' in its source folder)"
