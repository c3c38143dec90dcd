"""The HTTP API and upload page over loaded models (FastAPI; uvicorn runs it, see server.py).

    GET  /                         the upload page
    GET  /health                   200 once every model is warmed up, 503 before (readiness probe)
    GET  /models, /models/<name>   model cards
    GET  /metrics                  Prometheus text format
    POST /models/<name>/predict    multipart files (one or several) or raw image bytes

Every refusal is JSON `{"error": kind, "detail": reason}` with its status code: 400 for a
malformed body or option, 401 without the API key, 404 for an unknown model (with "did you
mean"), 408 for a stalled upload, 413 past the size or image-count limit, 415 for bytes that are
not an image, 422 for a damaged one, 500 when the model fails (the server goes on), 503 with
Retry-After when the queue is full, 504 past the request timeout. Upload names are only echoed
back (base name, printable, capped), never used as paths.
"""

from __future__ import annotations

import asyncio
import base64
import difflib
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import PurePosixPath, PureWindowsPath

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response
from python_multipart.multipart import parse_options_header
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from visiontune._version import __version__
from visiontune.data.images import ImageLoadError
from visiontune.reporting.html import render
from visiontune.serve.batching import Batcher, QueueFull
from visiontune.serve.gate import BodyLimits, KeyAndCount, Refused
from visiontune.serve.metrics import ServerMetrics
from visiontune.serve.models import ServedModel

RAW_TYPES = ("image/", "application/octet-stream")
UNREADABLE_FORMAT = "not a readable image"
OPEN_PATHS = frozenset({"/", "/health"})  # no API key: the page holds no data, probes carry no secret


@dataclass(frozen=True)
class ServeSettings:
    max_batch_size: int = 8
    batch_timeout_ms: float = 2.0
    max_queue: int = 256  # images waiting per model before 503
    max_upload_bytes: int = 20 * 2**20
    max_images_per_request: int = 16
    request_timeout_s: float = 30.0
    read_timeout_s: float = 10.0
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()
    warm_up: bool = True
    retry_after_s: int = 1


def create_app(models: list[ServedModel], settings: ServeSettings | None = None) -> FastAPI:
    settings = settings or ServeSettings()
    by_name = {model.name: model for model in models}
    metrics = ServerMetrics()
    state = {"ready": False, "batchers": {}}
    # Decoding and overlays on a pool as small as the machine: Starlette's default pool of 40
    # threads left each its own malloc arena (RSS 1.43 instead of 1.24 GiB under load, same speed).
    pool = ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1)), thread_name_prefix="decode")

    async def in_pool(function, *args):
        return await asyncio.get_running_loop().run_in_executor(pool, function, *args)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # A malformed upload is the client's error, answered 400; the parser's own warning per
        # bad part would fill the server's log during a stream of them.
        logging.getLogger("python_multipart").setLevel(logging.ERROR)
        batchers = {name: Batcher(model, metrics, settings.max_batch_size, settings.batch_timeout_ms / 1000,
                                  settings.max_queue) for name, model in by_name.items()}
        for batcher in batchers.values():
            batcher.start()
        state["batchers"] = batchers
        if settings.warm_up:
            sizes = tuple(sorted({1, settings.max_batch_size}))
            await asyncio.gather(*(b.run_in_inference_thread(b.model.warm_up, sizes) for b in batchers.values()))
        state["ready"] = True
        yield
        state["ready"] = False
        await asyncio.gather(*(batcher.stop() for batcher in batchers.values()))
        pool.shutdown(wait=True, cancel_futures=True)

    app = FastAPI(title="visiontune", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)

    def refuse(status: int, kind: str, detail: str, model: str = "-", headers: dict | None = None) -> JSONResponse:
        metrics.errors.labels(model, kind).inc()
        return JSONResponse({"error": kind, "detail": detail}, status_code=status, headers=headers)

    @app.exception_handler(Refused)
    async def refused(request: Request, exc: Refused) -> JSONResponse:
        return refuse(exc.status, exc.kind, str(exc), _model_of(request.url.path, by_name))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(exc.status_code, "bad_request")
        return refuse(exc.status_code, kind, str(exc.detail), _model_of(request.url.path, by_name))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problem = exc.errors()[0]
        where = ".".join(str(part) for part in problem.get("loc", ()))
        return refuse(422, "bad_request", f"{where}: {problem.get('msg')}", _model_of(request.url.path, by_name))

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        return refuse(500, "internal", f"{type(exc).__name__}: {_first_line(exc)}", _model_of(request.url.path, by_name))

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(render("serve.html", title="visiontune serve", models=list(by_name.values()),
                                   key_required=bool(settings.api_key), max_images=settings.max_images_per_request,
                                   max_bytes=settings.max_upload_bytes))

    @app.get("/health")
    async def health() -> JSONResponse:
        body = {"status": "ok" if state["ready"] else "starting", "models": sorted(by_name)}
        return JSONResponse(body, status_code=200 if state["ready"] else 503)

    @app.get("/models")
    async def list_models() -> dict:
        return {"models": [model.card() for model in by_name.values()]}

    @app.get("/models/{name}")
    async def model_card(name: str):
        model = by_name.get(name)
        return model.card() if model else unknown(name)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    def unknown(name: str) -> JSONResponse:
        close = difflib.get_close_matches(name, list(by_name), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; served: {', '.join(sorted(by_name))}"
        return refuse(404, "not_found", f"no model named {name!r}{hint}")

    @app.post("/models/{name}/predict")
    async def predict(name: str, request: Request, top_k: int = 3, overlay: bool = False):
        started = time.perf_counter()
        model = by_name.get(name)
        if model is None:
            return unknown(name)
        if not state["ready"]:
            return refuse(503, "starting", "the model is still warming up", name, {"Retry-After": "1"})
        uploads = await _uploads(request, settings.max_images_per_request)
        outcomes = await asyncio.gather(*(in_pool(model.decode, data, overlay) for _, data in uploads),
                                        return_exceptions=True)
        decoded, errors = [], []
        for (filename, _), outcome in zip(uploads, outcomes):
            if isinstance(outcome, ImageLoadError):
                errors.append({"file": filename, "error": "unsupported_media" if str(outcome).startswith(UNREADABLE_FORMAT)
                               else "unreadable_image", "detail": str(outcome)})
            elif isinstance(outcome, BaseException):
                raise outcome
            else:
                decoded.append((filename, outcome))
        del uploads, outcomes  # the raw bytes are not kept while the images wait for a batch
        decode_ms = (time.perf_counter() - started) * 1000
        if not decoded:
            status = 415 if all(e["error"] == "unsupported_media" for e in errors) else 422
            metrics.errors.labels(name, errors[0]["error"]).inc()
            return JSONResponse({"error": errors[0]["error"], "detail": errors[0]["detail"], "files": errors},
                                status_code=status)
        batcher = state["batchers"][name]
        jobs = [asyncio.ensure_future(batcher.submit(d, top_k)) for _, d in decoded]
        try:
            predictions = await asyncio.wait_for(asyncio.gather(*jobs), settings.request_timeout_s)
        except QueueFull:
            for job in jobs:
                job.cancel()
            return refuse(503, "queue_full", "the server is at capacity; retry shortly", name,
                          {"Retry-After": str(settings.retry_after_s)})
        except TimeoutError:
            return refuse(504, "timeout", f"no answer within {settings.request_timeout_s:g} s", name)
        except Exception as exc:  # noqa: BLE001 - the model failed on this batch; the server goes on
            return refuse(500, "internal", f"the model failed: {type(exc).__name__}: {_first_line(exc)}", name)
        results = []
        for (filename, item), prediction in zip(decoded, predictions):
            body = {"file": filename, **prediction.body}
            if "top_k" in body:
                body["top_k"] = body["top_k"][:max(1, top_k)]
            if overlay:
                png = await in_pool(model.overlay_png, item, prediction)
                body["overlay_png"] = base64.b64encode(png).decode("ascii")
            results.append(body)
        metrics.images.labels(name).inc(len(results))
        total_ms = (time.perf_counter() - started) * 1000
        metrics.latency.labels(name).observe(total_ms / 1000)
        return {"model": name, "kind": model.kind, "version": model.version, "results": results + errors,
                "timing_ms": {"decode": round(decode_ms, 2), "total": round(total_ms, 2)}}

    def count_error(scope, kind: str) -> None:
        metrics.errors.labels(_model_of(scope["path"], by_name), kind).inc()

    def count_response(scope, status: int) -> None:
        metrics.requests.labels(_model_of(scope["path"], by_name), str(status)).inc()

    # added last = outermost: the key is checked before any of the body is read
    app.add_middleware(BodyLimits, max_bytes=settings.max_upload_bytes, read_timeout_s=settings.read_timeout_s,
                       on_refused=count_error)
    app.add_middleware(KeyAndCount, api_key=settings.api_key, open_paths=OPEN_PATHS, on_response=count_response,
                       on_refused=count_error)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "X-API-Key", "Content-Type"])
    return app


async def _uploads(request: Request, limit: int) -> list[tuple[str, bytes]]:
    """(file name, bytes) of each image in the request: multipart parts, or the raw body."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        # The multipart parser accepts a body cut short and returns the parts it completed, which
        # would answer for fewer images than were sent: the closing boundary must be there.
        boundary = parse_options_header(content_type)[1].get(b"boundary")
        if boundary and (await request.body()).rfind(b"--" + boundary + b"--") == -1:
            raise Refused(400, "bad_request", "malformed multipart body: it ends before its closing boundary")
        try:
            form = await request.form(max_files=limit, max_fields=limit)
        except StarletteHTTPException as exc:
            if "Too many" in str(exc.detail):
                raise Refused(413, "too_many_images", f"at most {limit} images per request") from None
            raise Refused(400, "bad_request", f"malformed multipart body: {exc.detail}") from None
        files = [value for _, value in form.multi_items() if isinstance(value, UploadFile)]
        if not files:
            raise Refused(422, "no_image", "the multipart body holds no file part (send images as files)")
        uploads = [(_safe_name(upload.filename), await upload.read()) for upload in files]
        await form.close()
        return uploads
    if content_type.startswith(RAW_TYPES) or not content_type:
        return [(_safe_name(request.query_params.get("filename")), await request.body())]
    raise Refused(415, "unsupported_media", f"send multipart/form-data or raw image bytes, not {content_type!r}")


def _safe_name(name: str | None) -> str:
    """The upload's base name, printable and at most 128 characters, only ever echoed back."""
    if not name:
        return "upload"
    base = PureWindowsPath(PurePosixPath(name).name).name
    return "".join(ch for ch in base if ch.isprintable())[:128] or "upload"


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""


def _model_of(path: str, served) -> str:
    """The served model a path addresses, for metric labels; '-' for any other path, so hostile
    URLs cannot grow the number of label values."""
    parts = path.strip("/").split("/")
    return parts[1] if len(parts) >= 2 and parts[0] == "models" and parts[1] in served else "-"
