"""`vqa2 score --ray` and `vqa2cli.ray_scoring` on a real local Ray cluster (2 CPUs), with the shipped vqa2-tiny.

Ray's old `local_mode` is gone: these start a real cluster (a raylet, workers, the object store) once for the
module, which costs a few seconds; the model actors and decode tasks are separate processes.
"""

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="needs vqa2's ray extra")

from tests.fixtures.clips import make_clip  # noqa: E402
from vqa2cli import ray_scoring  # noqa: E402

pytestmark = pytest.mark.ray
SCORER_TITLE = b"MapBatches(_Scorer)"  # Ray names an actor's process after its class


@pytest.fixture(scope="module")
def cluster():
    ray_scoring.connect()
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Five clips of different content and length, an empty file and a text file posing as a video."""
    folder = tmp_path_factory.mktemp("ray-videos")
    for i in range(5):
        make_clip(folder / f"clip{i}.mp4", seconds=1 + i % 3, fps=12, size=(96, 64), color=(40 * i, 200 - 30 * i, 90))
    (folder / "empty.mp4").write_bytes(b"")
    (folder / "text.mp4").write_text("not a video\n")
    return folder


def without_timing(records):
    return [{k: v for k, v in record.items() if k != "seconds"} for record in records]


def test_cli_gives_the_records_of_a_local_run(cluster, folder, vqa2, tmp_path):
    code, local_out, _ = vqa2("score", folder, "--model", "vqa2-tiny", "--jsonl", "-q")
    assert code == 1
    code, ray_out, err = vqa2("score", folder, "--model", "vqa2-tiny", "--jsonl", "-q", "--ray",
                              "--parquet", tmp_path / "pq")
    assert code == 1  # two bad files
    local = [json.loads(line) for line in local_out.splitlines()]
    remote = [json.loads(line) for line in ray_out.splitlines()]
    assert [r["path"] for r in remote] == [r["path"] for r in local]  # input order kept
    assert len(remote) == 7 and list(remote[0]) == list(local[0])  # same fields, same order
    for mine, theirs in zip(without_timing(remote), without_timing(local)):
        if mine["score"] is not None:
            assert mine.pop("score") == pytest.approx(theirs.pop("score"), abs=1e-6)
            assert mine.pop("probs") == pytest.approx(theirs.pop("probs"), abs=1e-6)
        assert mine == {k: v for k, v in theirs.items() if k in mine}
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: {folder / 'empty.mp4'}: empty file (0 bytes)",
                      f"error: {folder / 'text.mp4'}: not a video file (unrecognised format or corrupt data)"]
    assert all("Traceback" not in line for line in err.splitlines())

    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "pq").to_pylist()
    assert sorted(r["path"] for r in table) == sorted(r["path"] for r in local)
    assert {r["path"]: r["error"] is None for r in table} == {r["path"]: r["error"] is None for r in local}


def _scorer_pids() -> set[int]:
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if SCORER_TITLE in (entry / "cmdline").read_bytes():
                    pids.add(int(entry.name))
            except OSError:
                continue
    return pids


def test_a_killed_model_actor_is_restarted_and_loses_nothing(cluster, tmp_path):
    paths = [str(make_clip(tmp_path / f"v{i:02d}.mp4", seconds=2, fps=12, size=(96, 64),
                           color=(10 * i, 100, 250 - 10 * i))) for i in range(16)]
    seen, killed, finished = [], [], threading.Event()

    def kill_the_first_actor():
        while not finished.is_set():
            for pid in _scorer_pids() - set(seen):
                seen.append(pid)
                if not killed:
                    os.kill(pid, signal.SIGKILL)  # as soon as it exists: before it has scored anything
                    killed.append(pid)
            time.sleep(0.02)

    killer = threading.Thread(target=kill_the_first_actor)
    killer.start()
    try:
        records = list(ray_scoring.score_records(paths, "vqa2-tiny", batch_size=2))
    finally:
        finished.set()
        killer.join()
    assert killed and len(seen) >= 2, f"no actor was killed and restarted (actors seen: {seen})"
    assert [r["path"] for r in records] == paths
    assert all(r["error"] is None for r in records)

    from vqa2cli.pipeline import load_model

    model = load_model("vqa2-tiny", device="cpu")
    for record, path in zip(records, paths):
        assert record["score"] == pytest.approx(model.score(path).score, abs=1e-6)
