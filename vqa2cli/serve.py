"""`vqa2 serve`: the model kept loaded behind a local HTTP API, for pipelines that gate uploads on quality.

    >>> from vqa2cli import load_model
    >>> from vqa2cli.serve import ServeSettings, create_app, run
    >>> app = create_app(load_model("vqa2-tiny"), ServeSettings())   # an ASGI app (FastAPI)
    >>> run(load_model("vqa2-tiny"), ServeSettings(port=8000))        # what `vqa2 serve` does

Endpoints (examples in docs/serve.md, OpenAPI at /docs):

    POST /score   a video -> the record `vqa2 score --json` gives for it (same fields, same code)
    POST /ask     a video and a question -> the record `vqa2 ask --json` gives
    GET  /health  liveness and load;  GET /models  the loaded model

A video comes either as an upload (multipart/form-data: the part `file`, options as further form fields)
or as a path on the server, only under --allow-dir (a JSON body `{"path": ...}`, or form fields). One
pydantic model per endpoint (`ScoreOptions`, `AskOptions`) validates the options whatever the encoding,
so a new option (`timeline`, `explain`) is one new field there.

Under load and bad input:
- admission: at most `queue + 1` /score and /ask requests at once (uploading, decoding, waiting or on the
  model); beyond that 503 with Retry-After, decided before the body is read.
- an upload streams into a file of the server's own temporary folder, counted against --max-upload-mb
  (413), and is removed when its request ends, however it ends; the folder goes at shutdown.
- decoding and the model run in threads, never on the event loop, so /health answers while a long video
  decodes; one model call at a time, and at most SAMPLES_IN_FLIGHT decoded videos alive, which bounds
  memory whatever the queue length.
- every error is a one-line JSON body `{"error": ...}` without a traceback: 4xx where the request is at
  fault (422 for an unusable video, exactly where `vqa2 score` gives the record an `error`), 500 for ours.
- SIGTERM/SIGINT: no new work starts (waiting requests get 503), the request on the model finishes and is
  answered, then the temporary folder is removed.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hmac
import json
import math
import os
import re
import shutil
import signal
import socket
import stat
import sys
import tempfile
import time
import urllib.parse
from dataclasses import dataclass
from typing import Callable, Literal, Optional

import anyio
import av
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from vqa2cli import __version__
from vqa2cli.batch import ScoreRecord, error_message, score_decoded
from vqa2cli.config import PROMPT_KINDS
from vqa2cli.errors import SetupError, Vqa2Error
from vqa2cli.output import to_json

# Decoded videos alive at once: one on the model, one decoded ahead so the model never waits for the
# decoder. A 2000-frame motion stream at 384 px is 0.9 GB, so this (not --queue) bounds memory.
SAMPLES_IN_FLIGHT = 2
MAX_FIELD_BYTES = 64 * 1024  # one form field, or a whole JSON body
MAX_FIELDS = 32
MAX_NAME_CHARS = 255
# Frames larger than 8192x8192 are refused before decoding: FFmpeg itself allows 16384x16384, and a
# 1 MB PNG of that size decodes into a 1 GB frame.
MAX_PIXELS = 8192 * 8192
SHUTDOWN_GRACE_S = 30  # for uploads still arriving at shutdown; a model call in progress always finishes
_PUBLIC_PATHS = ("/health", "/docs", "/openapi.json")  # open even with a token: they reveal nothing


@dataclass
class ServeSettings:
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port
    token: Optional[str] = None  # required as `Authorization: Bearer TOKEN` when set
    allow_dir: Optional[str] = None  # clients may name files under it; None: uploads only
    max_upload_mb: float = 512
    queue: int = 8  # requests that may wait behind the one being worked on
    tmp_dir: Optional[str] = None  # parent of the uploads folder [default: the system's]
    max_motion_frames: int = 2000  # defaults and upper limits of the per-request options
    max_keyframes: int = 40
    access_log: bool = True


# ---- requests and answers ----------------------------------------------------------------------------


class VideoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: Optional[str] = Field(None, description="A video file on the server, relative to its --allow-dir, "
                                "instead of an upload.")
    max_motion_frames: Optional[int] = Field(None, ge=4, description="Longest motion stream [default and "
                                             "upper limit: the server's --max-motion-frames].")
    max_keyframes: Optional[int] = Field(None, ge=1, description="Most keyframes [default and upper limit: "
                                         "the server's --max-keyframes].")


class ScoreOptions(VideoOptions):
    """POST /score: fields of a JSON body, or form fields beside the uploaded `file`.

    `vqa2 score`'s --timeline and --explain are not fields here yet (records carry `segments` and
    `explanation` as null): as fields, they would reach `Service.score` (`timeline.score_windows` to decode,
    an `explain.Explainer` as `score_decoded`'s `after`); both encodings and the OpenAPI schema follow.
    """

    prompt: Optional[Literal[PROMPT_KINDS]] = Field(None, description="Scoring prompt [default: the one the "
                                                    "model was trained with].")
    strict: bool = Field(False, description="Refuse a damaged video (one that decodes only in part) with 422, as "
                                            "`vqa2 score --strict` does, instead of scoring it with `warnings`.")


class AskOptions(VideoOptions):
    """POST /ask: fields of a JSON body, or form fields beside the uploaded `file`."""

    question: str = Field(min_length=1, max_length=4000)
    max_new_tokens: int = Field(512, ge=1, le=4096, description="Longest answer, in tokens.")


class ErrorBody(BaseModel):
    error: str = Field(description="One line naming what is wrong (the file, the field) and why.")


class HTTPError(Exception):
    def __init__(self, status: int, message: str, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


class _ClientGone(Exception):
    """The client hung up: nobody reads the answer, so no work is done for it."""


def error_response(status: int, message: str, headers: Optional[dict] = None) -> JSONResponse:
    return JSONResponse({"error": " ".join(str(message).split())}, status_code=status, headers=headers)


def _json(record: dict) -> Response:
    # output.to_json, as `vqa2 score --json` writes it: the same text for the same record
    return Response(to_json(record), media_type="application/json")


@dataclass
class Video:
    path: str  # what the decoder opens: a temporary file, or the resolved file under --allow-dir
    name: str  # what the record and errors call it: the upload's file name, or the path as sent

    def rename(self, message: str) -> str:
        """`message` naming the video as the client knows it (no temporary or server paths)."""
        return message.replace(self.path, self.name)


# ---- reading a request -------------------------------------------------------------------------------


class _TooLarge(Exception):
    pass


class Upload:
    """One multipart body, streamed: the part `file` into a new file of `folder`, the others as fields."""

    def __init__(self, folder: str, limit: int):
        self.folder, self.limit = folder, limit
        self.path: Optional[str] = None  # the temporary file, once the `file` part starts
        self.name = "upload"
        self.fields: dict[str, str] = {}
        self._file = None
        self._field: Optional[bytearray] = None
        self._field_name = ""
        self._headers: dict[bytes, bytes] = {}
        self._header = [b"", b""]
        self._size = 0
        self._ended = False

    async def receive(self, request: Request, boundary: Optional[bytes]) -> dict:
        if not boundary:
            raise HTTPError(400, "multipart body without a boundary")
        parser = MultipartParser(boundary, {
            "on_part_begin": self._headers.clear, "on_header_field": self._on_header_field,
            "on_header_value": self._on_header_value, "on_header_end": self._on_header_end,
            "on_headers_finished": self._on_headers_finished, "on_part_data": self._on_part_data,
            "on_part_end": self._on_part_end, "on_end": self._on_end,
        })
        try:
            async for chunk in request.stream():
                parser.write(chunk)
        except _TooLarge:
            # answered before the body ends: uvicorn reads and drops the rest, so the client, still
            # sending (httpx sends the whole body before it reads), gets this 413 rather than a reset
            raise HTTPError(413, f"{self.name}: upload larger than this server's limit of "
                            f"{_megabytes(self.limit)} (--max-upload-mb)") from None
        except FormParserError as error:
            raise HTTPError(400, f"malformed multipart body ({error})") from None
        if not self._ended:
            raise HTTPError(400, "incomplete multipart body (it ends before its closing boundary)")
        return self.fields

    def discard(self):
        """Close and remove the temporary file, if any (idempotent)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            self.path = None

    def _on_header_field(self, data, start, end):
        self._header[0] += data[start:end]

    def _on_header_value(self, data, start, end):
        self._header[1] += data[start:end]

    def _on_header_end(self):
        self._headers[self._header[0].lower()] = self._header[1]
        self._header = [b"", b""]

    def _on_headers_finished(self):
        _, params = parse_options_header(self._headers.get(b"content-disposition", b""))
        name = params.get(b"name")
        if name is None:
            raise HTTPError(400, "a multipart part without a name (Content-Disposition: form-data; name=...)")
        if name == b"file":
            if self.path is not None:
                raise HTTPError(400, "one video per request: more than one part named `file`")
            self.name = _display_name(params.get(b"filename"))
            fd, self.path = tempfile.mkstemp(prefix="upload-", suffix=_safe_suffix(self.name), dir=self.folder)
            self._file = os.fdopen(fd, "wb")
            self._size = 0
            return
        if len(self.fields) >= MAX_FIELDS:
            raise HTTPError(400, f"more than {MAX_FIELDS} form fields")
        self._field_name = name.decode("utf-8", "replace")
        self._field = bytearray()

    def _on_part_data(self, data, start, end):
        if self._file is not None:
            self._size += end - start
            if self._size > self.limit:
                raise _TooLarge()
            self._file.write(data[start:end])
        elif self._field is not None:
            self._field += data[start:end]
            if len(self._field) > MAX_FIELD_BYTES:
                raise HTTPError(413, f"form field {self._field_name!r} larger than {MAX_FIELD_BYTES // 1024} kB")

    def _on_part_end(self):
        if self._file is not None:
            self._file.close()
            self._file = None
        elif self._field is not None:
            try:
                self.fields[self._field_name] = self._field.decode("utf-8")
            except UnicodeDecodeError:
                raise HTTPError(400, f"form field {self._field_name!r} is not UTF-8 text") from None
            self._field = None

    def _on_end(self):
        self._ended = True


def _display_name(filename: Optional[bytes]) -> str:
    name = (filename or b"").decode("utf-8", "replace")
    name = "".join(ch if ch.isprintable() else "?" for ch in name)[:MAX_NAME_CHARS].strip()
    return name or "upload"


def _safe_suffix(name: str) -> str:
    # the extension helps FFmpeg probe some formats (raw streams); anything odd is left out
    suffix = os.path.splitext(name)[1].lower()
    return suffix if re.fullmatch(r"\.[a-z0-9]{1,8}", suffix) else ""


def _megabytes(size: int) -> str:
    return f"{size / 2**20:g} MB"


async def _small_body(request: Request) -> bytes:
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FIELD_BYTES:
            raise HTTPError(413, f"body larger than {MAX_FIELD_BYTES // 1024} kB (videos go in multipart uploads)")
    return bytes(body)


def _json_fields(body: bytes) -> dict:
    try:
        fields = json.loads(body)
    except ValueError as error:  # also bytes that are not UTF-8
        raise HTTPError(400, f"body is not valid JSON ({error})") from None
    if not isinstance(fields, dict):
        raise HTTPError(400, "JSON body must be an object, e.g. {\"path\": \"clip.mp4\"}")
    return fields


def _form_fields(body: bytes) -> dict:
    try:
        return dict(urllib.parse.parse_qsl(body.decode("utf-8"), keep_blank_values=True, max_num_fields=MAX_FIELDS))
    except (UnicodeDecodeError, ValueError) as error:
        raise HTTPError(400, f"malformed form body ({error})") from None


def _validated(options_class, fields: dict):
    try:
        return options_class.model_validate(fields)
    except ValidationError as error:
        problems = [f"{'.'.join(map(str, item['loc'])) or 'body'}: {item['msg']}" for item in error.errors()]
        raise HTTPError(400, "; ".join(problems)) from None


def resolve_allowed(root: Optional[str], requested: str) -> str:
    """The real path of `requested` (relative to `root`, or absolute inside it), or an HTTPError.

    Refused: any `..` component, anything whose real path (symlinks resolved) is outside `root`, files
    that are not regular (a FIFO would block the decoder). Containment is checked before existence, so
    nothing is told about files outside `root`. `root` must be a real path.
    """
    if root is None:
        raise HTTPError(403, "paths on the server are off: upload the video, or start the server with --allow-dir")
    if not requested or "\0" in requested:
        raise HTTPError(400, "path: empty, or holds a NUL character")
    if ".." in requested.split(os.sep) or (os.altsep and ".." in requested.split(os.altsep)):
        raise HTTPError(403, f"{requested}: '..' is not allowed in paths")
    real = os.path.realpath(os.path.join(root, requested))
    if os.path.commonpath([real, root]) != root:
        raise HTTPError(403, f"{requested}: outside the folder this server may read (--allow-dir)")
    try:
        mode = os.stat(real).st_mode
    except FileNotFoundError:
        raise HTTPError(404, f"{requested}: no such file") from None
    except OSError as error:
        raise HTTPError(403, f"{requested}: cannot access file ({error.strerror})") from None
    if not stat.S_ISREG(mode):
        raise HTTPError(422, f"{requested}: not a regular file")
    return real


def check_frame_size(path: str) -> None:
    """Refuse, before decoding, a video whose frames exceed MAX_PIXELS (or whose size FFmpeg cannot read
    within that limit); files FFmpeg cannot open at all are left for the decoder to explain."""
    try:
        container = av.open(path, metadata_errors="ignore", options={"max_pixels": str(MAX_PIXELS)})
    except (av.FFmpegError, OSError):
        return
    try:
        for stream in container.streams.video:
            context = stream.codec_context
            if stream.disposition & av.stream.Disposition.attached_pic or context is None:
                continue
            if not 0 < context.width * context.height <= MAX_PIXELS:
                side = math.isqrt(MAX_PIXELS)
                size = f"{context.width}x{context.height}" if context.width else "unreadable"
                raise HTTPError(422, f"{path}: frame size {size}: this server takes frames up to {side}x{side}")
    finally:
        container.close()


# ---- the service ---------------------------------------------------------------------------------------


class Service:
    """What the routes share: the model, the limits, the uploads folder, the admission and model locks."""

    def __init__(self, model, settings: ServeSettings):
        self.model = model
        self.settings = settings
        self.folder = tempfile.mkdtemp(prefix="vqa2-serve-", dir=settings.tmp_dir)
        self.allow_root = os.path.realpath(settings.allow_dir) if settings.allow_dir else None
        self.max_upload = int(settings.max_upload_mb * 2**20)
        self.active = 0  # admitted /score and /ask requests
        self.decoding = 0
        self.stopping = False
        self._seconds = 1.0  # running mean of a request's decode + model time, for Retry-After
        self._samples = anyio.Semaphore(SAMPLES_IN_FLIGHT)
        self._model_lock = anyio.Lock()

    def close(self):
        """Remove the uploads folder (idempotent)."""
        shutil.rmtree(self.folder, ignore_errors=True)

    def _busy(self, reason: str) -> HTTPError:
        wait = min(3600, max(1, math.ceil(self._seconds * max(self.active, 1))))
        return HTTPError(503, reason, {"Retry-After": str(wait)})

    @contextlib.asynccontextmanager
    async def admitted(self):
        if self.stopping:
            raise self._busy("the server is shutting down")
        if self.active > self.settings.queue:
            raise self._busy(f"busy: {self.active} requests in progress or waiting (--queue {self.settings.queue})")
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1

    @contextlib.asynccontextmanager
    async def received(self, request: Request, options_class):
        """(options, Video) of a request; an uploaded file is removed on leaving, however that happens."""
        content_type, params = parse_options_header(request.headers.get("content-type", ""))
        upload = None
        try:
            if content_type == b"multipart/form-data":
                declared = request.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > self.max_upload + MAX_FIELDS * MAX_FIELD_BYTES:
                    raise HTTPError(413, f"body of {declared} bytes: this server takes uploads up to "
                                    f"{_megabytes(self.max_upload)} (--max-upload-mb)")
                upload = Upload(self.folder, self.max_upload)
                fields = await upload.receive(request, params.get(b"boundary"))
            elif content_type == b"application/json":
                fields = _json_fields(await _small_body(request))
            elif content_type == b"application/x-www-form-urlencoded":  # `curl -d path=clip.mp4`
                fields = _form_fields(await _small_body(request))
            else:
                raise HTTPError(415, "send the video as multipart/form-data (part `file`), or its `path` under "
                                "the server's --allow-dir as JSON or form fields")
            options = _validated(options_class, fields)
            yield options, self._video(options, upload)
        finally:
            if upload is not None:
                upload.discard()

    def _video(self, options: VideoOptions, upload: Optional[Upload]) -> Video:
        for field, limit in (("max_motion_frames", self.settings.max_motion_frames),
                             ("max_keyframes", self.settings.max_keyframes)):
            value = getattr(options, field)
            if value is not None and value > limit:
                raise HTTPError(400, f"{field}: {value} is above this server's limit of {limit}")
        uploaded = upload is not None and upload.path is not None
        if uploaded and options.path is not None:
            raise HTTPError(400, "give the video as an upload or as a path, not both")
        if uploaded:
            return Video(upload.path, upload.name)
        if options.path is not None:
            return Video(resolve_allowed(self.allow_root, options.path), options.path)
        raise HTTPError(400, "no video: upload one as the multipart part `file`, or send {\"path\": ...}")

    async def _wanted(self, request: Request, starting: bool):
        # a request that started decoding finishes at shutdown; one that did not is answered 503 now
        if starting and self.stopping:
            raise self._busy("the server is shutting down")
        if await request.is_disconnected():
            raise _ClientGone()

    def _decode(self, video: Video, options: VideoOptions, views: bool):
        """In a worker thread: (sample, seconds), or HTTPError 422 with the message `vqa2 score` gives."""
        settings = self.settings
        sampling = self.model.sampling(options.max_motion_frames or settings.max_motion_frames,
                                       options.max_keyframes or settings.max_keyframes, views)
        start = time.perf_counter()
        try:
            check_frame_size(video.path)
            sample = sampling.load(video.path)
        except HTTPError as error:
            error.message = video.rename(error.message)
            raise
        except SetupError:
            raise
        except Exception as error:  # as in a batch: whatever goes wrong with one file is that file's error
            raise HTTPError(422, video.rename(error_message(video.path, error))) from None
        return sample, time.perf_counter() - start

    async def _run(self, request: Request, video: Video, options: VideoOptions, work: Callable, views: bool = True):
        """Decode `video` off the event loop (`views`: see `VQA2Config.sampling`), then
        `work(sample, decode_seconds)` alone on the model."""
        async with self._samples:
            await self._wanted(request, starting=True)
            start = time.perf_counter()
            self.decoding += 1
            try:
                sample, decode_seconds = await anyio.to_thread.run_sync(self._decode, video, options, views)
            finally:
                self.decoding -= 1
            async with self._model_lock:
                await self._wanted(request, starting=False)
                result = await anyio.to_thread.run_sync(work, sample, decode_seconds)
            del sample
        self._seconds = 0.8 * self._seconds + 0.2 * (time.perf_counter() - start)
        return result

    async def score(self, request: Request, options: ScoreOptions, video: Video) -> dict:
        def work(sample, decode_seconds):
            [record] = score_decoded(self.model, [(video.name, sample, None, decode_seconds)], options.prompt,
                                     options.strict)
            return record

        record = await self._run(request, video, options, work)
        if record.error:
            raise HTTPError(422, video.rename(record.error))
        return record.to_dict()

    async def ask(self, request: Request, options: AskOptions, video: Video) -> dict:
        def work(sample, decode_seconds):
            try:
                return self.model.ask(sample, options.question, max_new_tokens=options.max_new_tokens)
            except Vqa2Error as error:
                if isinstance(error, SetupError):
                    raise
                raise HTTPError(422, video.rename(error_message(video.path, error))) from None

        answer = await self._run(request, video, options, work, views=False)
        # the record `vqa2 ask --json` prints
        return {"path": video.name, "question": options.question, "answer": answer, "model": self.model.name}

    def describe_model(self) -> dict:
        model = self.model
        sampling = model.sampling(self.settings.max_motion_frames, self.settings.max_keyframes)
        return {"name": model.name, "device": str(model.device), "precision": model.precision.describe(),
                "prompt": model.config.prompt, "levels": [word.strip() for word in model.config.level_words],
                **dataclasses.asdict(sampling)}


# ---- the app -------------------------------------------------------------------------------------------


class TokenGuard:
    """ASGI middleware: every path but _PUBLIC_PATHS needs `Authorization: Bearer TOKEN` (constant-time check)."""

    def __init__(self, app, token: str):
        self.app = app
        self.token = token.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in _PUBLIC_PATHS:
            header = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, given = header.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self.token):
                response = error_response(401, "missing or wrong bearer token (Authorization: Bearer TOKEN)",
                                          {"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)


_ERRORS = {status: {"model": ErrorBody, "description": text} for status, text in (
    (400, "Bad request: malformed body, unknown or invalid option, no video"),
    (401, "Missing or wrong bearer token (when the server has one)"),
    (403, "Path outside --allow-dir, or paths off"),
    (404, "No such file under --allow-dir"),
    (413, "Upload larger than --max-upload-mb"),
    (415, "Neither multipart/form-data nor JSON"),
    (422, "The video cannot be used (not a video, damaged, too large frames...)"),
    (503, "Queue full, or shutting down; see Retry-After"),
)}


def _request_body(options_class) -> dict:
    """OpenAPI for a body read by hand: the same options as JSON, or as form fields beside `file`."""
    schema = options_class.model_json_schema()
    form = {"type": "object", "properties": {
        "file": {"type": "string", "format": "binary", "description": "The video."},
        **{key: value for key, value in schema["properties"].items() if key != "path"}}}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": form},
                                                          "application/json": {"schema": schema},
                                                          "application/x-www-form-urlencoded": {"schema": schema}}}}


def _answers(schema: dict, description: str) -> dict:
    return {200: {"description": description, "content": {"application/json": {"schema": schema}}}, **_ERRORS}


def create_app(model, settings: ServeSettings, on_ready: Optional[Callable[[], None]] = None) -> FastAPI:
    """The FastAPI app serving `model` (a `pipeline.VQA2`); `app.state.service` is its `Service`."""
    service = Service(model, settings)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if on_ready is not None:
            on_ready()
        try:
            yield
        finally:
            service.close()

    app = FastAPI(title="vqa2", version=__version__, lifespan=lifespan,
                  description="Video quality scores and answers from a VQA² model kept loaded. Errors are "
                  "`{\"error\": \"one line\"}`.")
    app.state.service = service
    if settings.token:
        app.add_middleware(TokenGuard, token=settings.token)
    _add_error_handlers(app)

    @app.post("/score", summary="Score a video (the record of `vqa2 score --json`)",
              openapi_extra=_request_body(ScoreOptions),
              responses=_answers(TypeAdapter(ScoreRecord).json_schema(), "The video's record; `error` is null."))
    async def score(request: Request):
        async with service.admitted(), service.received(request, ScoreOptions) as (options, video):
            return _json(await service.score(request, options, video))

    @app.post("/ask", summary="Ask a question about a video (the record of `vqa2 ask --json`)",
              openapi_extra=_request_body(AskOptions),
              responses=_answers({"type": "object", "properties": {key: {"type": "string"} for key in
                                  ("path", "question", "answer", "model")}}, "The answer."))
    async def ask(request: Request):
        async with service.admitted(), service.received(request, AskOptions) as (options, video):
            return _json(await service.ask(request, options, video))

    @app.get("/health", summary="Liveness and load (open without the token)")
    async def health():
        return {"status": "stopping" if service.stopping else "ok", "model": model.name,
                "active": service.active, "decoding": service.decoding, "limit": settings.queue + 1}

    @app.get("/models", summary="The model this server runs")
    async def models():
        return {"models": [service.describe_model()]}

    return app


def _add_error_handlers(app: FastAPI):
    async def http_error(request, error: HTTPError):
        return error_response(error.status, error.message, error.headers)

    async def framework_error(request, error: StarletteHTTPException):  # unknown route, wrong method
        return error_response(error.status_code, error.detail, getattr(error, "headers", None))

    async def validation_error(request, error: RequestValidationError):
        return error_response(400, "; ".join(str(item.get("msg")) for item in error.errors()) or "invalid request")

    async def client_gone(request, error):
        return Response(status_code=400)  # never delivered: there is nobody to read it

    async def unexpected(request, error: Exception):
        # one line for the client; uvicorn logs the traceback on the server's stderr
        text = str(error) if isinstance(error, Vqa2Error) else f"internal error ({type(error).__name__}: {error})"
        return error_response(500, text)

    app.add_exception_handler(HTTPError, http_error)
    app.add_exception_handler(StarletteHTTPException, framework_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(ClientDisconnect, client_gone)
    app.add_exception_handler(_ClientGone, client_gone)
    app.add_exception_handler(Exception, unexpected)


# ---- running -------------------------------------------------------------------------------------------


class _Server(uvicorn.Server):
    def __init__(self, config, service: Service):
        super().__init__(config)
        self.service = service
        self.stopped_by = None  # the first signal

    def handle_exit(self, sig, frame):
        # waiting requests answer 503 at once instead of holding the shutdown for their turn on the model
        self.service.stopping = True
        self.stopped_by = self.stopped_by or sig
        super().handle_exit(sig, frame)


def listen(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: any free one), or SetupError saying why not."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except (OSError, UnicodeError) as error:
        raise SetupError(f"cannot listen on {host}:{port}: {getattr(error, 'strerror', None) or error}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as error:
        sock.close()
        raise SetupError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    return sock


def run(model, settings: ServeSettings, say: Callable[[str], None] = lambda text: print(text, file=sys.stderr)):
    """Serve `model` until SIGTERM or SIGINT; the uploads folder is gone when this returns or raises.

    After SIGINT this raises KeyboardInterrupt (asyncio's runner would swallow the one uvicorn re-raises);
    after SIGTERM uvicorn re-raises it once the server has shut down, which ends the process (143)."""
    sock = listen(settings.host, settings.port)
    host, port = sock.getsockname()[:2]
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    app = create_app(model, settings, on_ready=lambda: say(
        f"vqa2 serve: {model.name} on {model.device}, listening on {url} (API docs: {url}/docs)"))
    log_config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    log_config["handlers"]["access"]["stream"] = "ext://sys.stderr"  # stdout is for data, and serve has none
    config = uvicorn.Config(app, log_level="info", log_config=log_config, access_log=settings.access_log,
                            server_header=False, timeout_graceful_shutdown=SHUTDOWN_GRACE_S)
    server = _Server(config, app.state.service)
    try:
        server.run(sockets=[sock])
        if server.stopped_by == signal.SIGINT:
            raise KeyboardInterrupt
    finally:
        app.state.service.close()
        sock.close()
