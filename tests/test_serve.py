"""`vqa2 serve` against a real server process on localhost, with the shipped vqa2-tiny.

One server runs for the whole module (starting one costs seconds): uploads limited to 1 MB, a queue
of 2, a bearer token, --allow-dir on the clips folder and its own --tmp-dir, so every test can check
that nothing is left behind there; the last test stops it with Ctrl-C. A second server, with the
default queue, is there to be stopped with SIGTERM while it has work.
"""

import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("python_multipart")
httpx = pytest.importorskip("httpx")

from tests.fixtures.clips import build_bad_files, make_clip  # noqa: E402

TOKEN = "test-token-1234"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
QUESTION = "Is the video blurry?"
REPO = Path(__file__).resolve().parents[1]


class Server:
    def __init__(self, root: Path, *options: str):
        self.root = root
        self.uploads = root / "uploads"  # --tmp-dir
        self.uploads.mkdir()
        self.log_path = root / "server.log"
        command = [sys.executable, "-m", "vqa2cli", "serve", "--model", "vqa2-tiny", "--port", "0",
                   "--tmp-dir", str(self.uploads), *options]
        env = {**os.environ, "VQA2_SERVE_TOKEN": TOKEN, "PYTHONPATH": str(REPO)}
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, env=env, cwd=root)
        self.client = None

    def wait_until_ready(self):
        self.url = self._wait_for_url(timeout=120)
        self.host, self.port = self.url.removeprefix("http://").split(":")
        self.client = httpx.Client(base_url=self.url, headers=AUTH, timeout=60)

    def _wait_for_url(self, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.log().splitlines():
                if "listening on " in line:
                    return line.split("listening on ")[1].split()[0]
            if self.process.poll() is not None:
                pytest.fail(f"vqa2 serve exited with {self.process.returncode}:\n{self.log()}")
            time.sleep(0.1)
        pytest.fail(f"vqa2 serve did not start in {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def leftovers(self) -> list:
        """Files in the server's uploads folder (it keeps its own folder inside --tmp-dir until it stops)."""
        return [path for path in self.uploads.rglob("*") if path.is_file()]

    def wait_for(self, condition, timeout=20.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return True
            time.sleep(0.01)
        return False

    def health(self) -> dict:
        response = httpx.get(self.url + "/health", timeout=10)
        assert response.status_code == 200
        return response.json()

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.client is not None:
            self.client.close()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    clips = root / "clips"
    clips.mkdir()
    make_clip(clips / "a.mp4", seconds=1, size=(64, 48))
    make_clip(clips / "b.mp4", seconds=2, fps=12, size=(96, 64), pattern=_noise)
    # long enough to decode for a while (every frame is decoded), small enough to upload under 1 MB
    make_clip(clips / "long.mp4", seconds=24, fps=25, size=(320, 240), options={"crf": "40"})
    (root / "outside").mkdir()
    make_clip(root / "outside" / "secret.mp4", seconds=1)
    (clips / "escape.mp4").symlink_to(root / "outside" / "secret.mp4")
    (clips / "sub").mkdir()
    os.mkfifo(clips / "fifo.mp4")
    return root


def _noise(index, width, height):
    import numpy as np

    return np.random.default_rng(index).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def servers(root):
    """The module's server, and a plain one for the SIGTERM test; both load while the reference runs."""
    (root / "plain").mkdir()
    started = [Server(root, "--allow-dir", str(root / "clips"), "--max-upload-mb", "1", "--queue", "2"),
               Server(root / "plain")]
    try:
        started[0].reference = _reference(root)
        for server in started:
            server.wait_until_ready()
        yield started
    finally:
        for server in started:
            server.stop()


@pytest.fixture(scope="module")
def server(servers):
    return servers[0]


@pytest.fixture(scope="module")
def reference(server):
    return server.reference


def _reference(root):
    """What `vqa2 score --json` and `vqa2 ask --json` print for the clips (run here, from the clips folder,
    so the records' paths are the names the uploads carry)."""
    from vqa2cli.cli import main

    def run(*args):
        out = io.StringIO()
        with pytest.MonkeyPatch.context() as patch:
            patch.chdir(root / "clips")
            patch.setattr(sys, "argv", ["vqa2", *args, "--model", "vqa2-tiny", "--json"])
            patch.setattr(sys, "stdout", out)
            with pytest.raises(SystemExit) as exit_info:
                main()
        assert exit_info.value.code == 0
        return json.loads(out.getvalue())

    records = {record["path"]: record for record in run("score", "a.mp4", "b.mp4")}
    return {"score": records, "ask": run("ask", "a.mp4", QUESTION)}


def _upload(server, path, name=None, data=None, **fields):
    files = {"file": (name or Path(path).name, data if data is not None else Path(path).read_bytes())}
    return server.client.post("/score", files=files, data=fields)


def _same_record(got: dict, expected: dict):
    assert list(got) == list(expected)  # same fields, same order
    assert got["seconds"] > 0
    assert {**got, "seconds": None} == {**expected, "seconds": None}


def _assert_error(response, status, *words):
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert "\n" not in response.text and "Traceback" not in response.text
    body = response.json()
    assert list(body) == ["error"] and body["error"]
    for word in words:
        assert word in body["error"]
    return body["error"]


# ---- answers -------------------------------------------------------------------------------------------


def test_score_upload_gives_the_record_of_vqa2_score(server, root, reference):
    for name in ("a.mp4", "b.mp4"):
        response = _upload(server, root / "clips" / name)
        assert response.status_code == 200, response.text
        _same_record(response.json(), reference["score"][name])
    assert reference["score"]["a.mp4"]["score"] != reference["score"]["b.mp4"]["score"]
    assert server.leftovers() == []


def test_a_damaged_upload_is_scored_with_warnings_or_refused_when_strict(server, tmp_path):
    from tests.fixtures.clips import make_damaged_clip

    clip = make_damaged_clip(tmp_path / "cut.mp4")
    response = _upload(server, clip)
    assert response.status_code == 200, response.text
    assert response.json()["warnings"] and response.json()["score"] is not None
    error = _assert_error(_upload(server, clip, strict="true"), 422, "cut.mp4", "refused as damaged (strict)")
    assert str(tmp_path) not in error  # the upload's name, not the server's temporary file
    assert server.leftovers() == []


def test_score_path_under_allow_dir_gives_the_same_record(server, reference):
    response = server.client.post("/score", json={"path": "b.mp4"})
    assert response.status_code == 200, response.text
    _same_record(response.json(), reference["score"]["b.mp4"])


def test_score_options_reach_the_model(server, root, reference):
    fewer = _upload(server, root / "clips" / "b.mp4", max_motion_frames="8", max_keyframes="1")
    assert fewer.status_code == 200, fewer.text
    record = fewer.json()
    assert (record["keyframes"], record["motion_frames"]) == (1, 8)
    assert record["score"] != reference["score"]["b.mp4"]["score"]


def test_ask_gives_the_record_of_vqa2_ask(server, root, reference):
    response = server.client.post("/ask", files={"file": ("a.mp4", (root / "clips" / "a.mp4").read_bytes())},
                                  data={"question": QUESTION})
    assert response.status_code == 200, response.text
    assert response.json() == reference["ask"]
    by_path = server.client.post("/ask", json={"path": "a.mp4", "question": QUESTION})
    assert by_path.json() == reference["ask"]


def test_health_and_models(server):
    assert server.health() == {"status": "ok", "model": "vqa2-tiny", "active": 0, "decoding": 0, "limit": 3}
    models = server.client.get("/models").json()["models"]
    assert [model["name"] for model in models] == ["vqa2-tiny"]
    assert models[0]["levels"] == ["high", "good", "fair", "poor", "low"]
    docs = httpx.get(server.url + "/openapi.json").json()
    assert {"/score", "/ask", "/health", "/models"} <= set(docs["paths"])
    assert "multipart/form-data" in docs["paths"]["/score"]["post"]["requestBody"]["content"]


# ---- bad input -----------------------------------------------------------------------------------------


def _png_header(width, height):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b"")


def test_hostile_files_get_a_one_line_422(server, tmp_path):
    files = build_bad_files(tmp_path)
    zoo = {name: (path.name, path.read_bytes()) for name, path in files.items()
           if name not in ("missing", "directory", "unreadable")}  # not uploads: see the --allow-dir test
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("clip.mp4", (tmp_path / "whole.mp4").read_bytes())
    zoo["zip"] = ("clips.zip", archive.getvalue())
    zoo["zip_named_mp4"] = ("clips.mp4", archive.getvalue())
    zoo["huge_png"] = ("huge.png", _png_header(60000, 60000))
    zoo["big_png_named_mp4"] = ("big.mp4", _png_header(16000, 16000))
    zoo["huge_y4m"] = ("huge.y4m", b"YUV4MPEG2 W16000 H16000 F25:1 C420jpeg\nFRAME\n" + b"\0" * 4096)
    for kind, (name, data) in zoo.items():
        response = server.client.post("/score", files={"file": (name, data)})
        assert name in _assert_error(response, 422), kind
    assert server.leftovers() == []
    assert server.health()["active"] == 0


def test_odd_upload_names_are_labels_only(server, root):
    data = (root / "clips" / "a.mp4").read_bytes()
    for name, shown in (("../../etc/passwd.mp4", "../../etc/passwd.mp4"), ("видео 🎬.mp4", "видео 🎬.mp4"),
                        ("a\x00b.mp4", "a?b.mp4"), ("x" * 400 + ".mp4", "x" * 255), ("", "upload")):
        response = _raw_multipart(server, "/score", [("file", name, data)])
        assert response.status_code == 200, (name, response.text)
        assert response.json()["path"] == shown
    bad = _raw_multipart(server, "/score", [("file", "../x\x01y\t.mp4", b"not a video")])
    assert _assert_error(bad, 422).startswith("../x?y?.mp4: ")
    assert server.leftovers() == []
    assert not (Path("/etc") / "passwd.mp4").exists()


def _raw_multipart(server, endpoint, parts, boundary="b0undary"):
    """A multipart body built byte by byte (clients escape odd file names; a hostile one does not)."""
    body = b""
    for field, filename, data in parts:
        disposition = f'form-data; name="{field}"'.encode()
        if filename is not None:
            disposition += b'; filename="' + filename.encode() + b'"'
        body += b"--" + boundary.encode() + b"\r\nContent-Disposition: " + disposition + b"\r\n\r\n" + data + b"\r\n"
    body += b"--" + boundary.encode() + b"--\r\n"
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    return server.client.post(endpoint, content=body, headers=headers)


def test_bad_requests_get_a_one_line_4xx(server, root):
    clip = (root / "clips" / "a.mp4").read_bytes()
    client = server.client
    _assert_error(client.post("/score", data={"prompt": "ugc"}), 400, "no video")
    _assert_error(_upload(server, root / "clips" / "a.mp4", colour="red"), 400, "colour")
    _assert_error(_upload(server, root / "clips" / "a.mp4", max_keyframes="0"), 400, "max_keyframes")
    _assert_error(_upload(server, root / "clips" / "a.mp4", max_motion_frames="5000"), 400, "limit of 2000")
    _assert_error(_upload(server, root / "clips" / "a.mp4", prompt="nice"), 400, "prompt")
    _assert_error(client.post("/ask", files={"file": ("a.mp4", clip)}), 400, "question")
    _assert_error(client.post("/score", content=b"a.mp4", headers={"Content-Type": "text/plain"}), 415)
    _assert_error(client.post("/score", content=b"{nope", headers={"Content-Type": "application/json"}), 400, "JSON")
    _assert_error(client.post("/score", json=["a.mp4"]), 400, "object")
    _assert_error(client.post("/score", data={"path": "a.mp4"}, files={"file": ("a.mp4", clip)}), 400, "not both")
    _assert_error(_raw_multipart(server, "/score", [("file", "a.mp4", clip), ("file", "b.mp4", clip)]), 400, "one video")
    cut = b'--xx\r\nContent-Disposition: form-data; name="file"; filename="a.mp4"\r\n\r\n' + clip[:500]
    _assert_error(client.post("/score", content=cut, headers={"Content-Type": "multipart/form-data; boundary=xx"}),
                  400, "incomplete")
    _assert_error(client.get("/nowhere"), 404)
    _assert_error(client.get("/score"), 405)
    assert server.leftovers() == []


def test_oversized_upload_gets_413(server):
    response = server.client.post("/score", files={"file": ("big.mp4", os.urandom(1_300_000))})
    _assert_error(response, 413, "big.mp4", "1 MB")
    declared = server.client.post("/score", content=os.urandom(5_000_000),
                                  headers={"Content-Type": "multipart/form-data; boundary=xx"})
    _assert_error(declared, 413, "--max-upload-mb")
    assert server.leftovers() == []
    assert server.health()["active"] == 0


def test_allow_dir_escapes_are_refused(server, root):
    def post(path):
        return server.client.post("/score", json={"path": path})

    _assert_error(post("../outside/secret.mp4"), 403, "'..'")
    _assert_error(post("sub/../../outside/secret.mp4"), 403, "'..'")
    _assert_error(post(str(root / "outside" / "secret.mp4")), 403, "outside")
    _assert_error(post("/etc/passwd"), 403, "outside")
    _assert_error(post("escape.mp4"), 403, "outside")  # a symlink inside pointing outside
    _assert_error(post("missing.mp4"), 404, "missing.mp4: no such file")
    _assert_error(post("sub"), 422, "not a regular file")
    _assert_error(post("fifo.mp4"), 422, "not a regular file")
    _assert_error(post(""), 400)
    inside = post(str(root / "clips" / "a.mp4"))  # absolute, but inside
    assert inside.status_code == 200 and inside.json()["path"] == str(root / "clips" / "a.mp4")


def test_token_is_required(server, root):
    clip = {"file": ("a.mp4", (root / "clips" / "a.mp4").read_bytes())}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}, {"Authorization": "Basic x"}):
        response = httpx.post(server.url + "/score", files=clip, headers=headers)
        _assert_error(response, 401, "token")
        assert response.headers["www-authenticate"] == "Bearer"
    _assert_error(httpx.get(server.url + "/models"), 401)
    assert httpx.get(server.url + "/health").status_code == 200
    assert server.leftovers() == []


# ---- load and failures ---------------------------------------------------------------------------------


def test_32_concurrent_requests_are_answered_or_refused(server, root, reference):
    data = (root / "clips" / "a.mp4").read_bytes()
    start = threading.Barrier(32)

    def one(_):
        with httpx.Client(base_url=server.url, headers=AUTH, timeout=120) as client:
            start.wait()
            return client.post("/score", files={"file": ("a.mp4", data)})

    with ThreadPoolExecutor(32) as pool:
        responses = list(pool.map(one, range(32)))
    statuses = [response.status_code for response in responses]
    assert set(statuses) <= {200, 503}, statuses
    assert 200 in statuses and 503 in statuses, statuses  # a queue of 2 cannot take 32 at once
    for response in responses:
        if response.status_code == 200:
            _same_record(response.json(), reference["score"]["a.mp4"])
        else:
            _assert_error(response, 503, "busy")
            assert int(response.headers["retry-after"]) >= 1
    assert server.health()["active"] == 0
    assert _upload(server, root / "clips" / "a.mp4").status_code == 200
    assert server.leftovers() == []


def test_client_gone_mid_upload_leaves_nothing(server):
    head = (b'--xx\r\nContent-Disposition: form-data; name="file"; filename="half.mp4"\r\n'
            b"Content-Type: video/mp4\r\n\r\n")
    request = (f"POST /score HTTP/1.1\r\nHost: {server.host}\r\nAuthorization: Bearer {TOKEN}\r\n"
               f"Content-Type: multipart/form-data; boundary=xx\r\nContent-Length: {len(head) + 800_000 + 8}\r\n"
               "\r\n").encode()
    with socket.create_connection((server.host, int(server.port))) as sock:
        sock.sendall(request + head + os.urandom(400_000))
        assert server.wait_for(lambda: any(path.stat().st_size > 0 for path in server.leftovers()))
    assert server.wait_for(lambda: server.leftovers() == [] and server.health()["active"] == 0)


def test_health_answers_while_a_long_video_decodes(server, root):
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(server.client.post, "/score", json={"path": "long.mp4"})
        assert server.wait_for(lambda: server.health()["decoding"] == 1 or pending.done())
        assert not pending.done()  # /health answered during the decode
        assert pending.result().status_code == 200


def test_sigterm_finishes_requests_in_flight_refuses_waiting_ones_then_cleans_up(servers, root):
    server = servers[1]  # --queue 8
    clip = root / "clips" / "long.mp4"
    with ThreadPoolExecutor(8) as pool:
        pending = [pool.submit(_upload, server, clip) for _ in range(8)]
        # all admitted (each answered or in progress), one decoding, most still waiting their turn
        assert server.wait_for(lambda: server.health()["active"] + sum(f.done() for f in pending) == 8
                               and server.health()["decoding"] >= 1)
        server.process.send_signal(signal.SIGTERM)
        responses = [future.result() for future in pending]
    statuses = [response.status_code for response in responses]
    assert set(statuses) == {200, 503}, statuses
    for response in responses:
        if response.status_code == 200:
            assert response.json()["path"] == "long.mp4" and response.json()["error"] is None
        else:
            _assert_error(response, 503, "shutting down")
    assert server.process.wait(timeout=60) == 143
    assert list(server.uploads.iterdir()) == []  # the server's own folder is gone too


def test_ctrl_c_exits_130_and_cleans_up(server):
    assert len(list(server.uploads.iterdir())) == 1  # its uploads folder, empty (see leftovers())
    server.process.send_signal(signal.SIGINT)
    assert server.process.wait(timeout=60) == 130
    assert list(server.uploads.iterdir()) == []
