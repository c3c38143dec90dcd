"""`visiontune serve`: a thin layer over `visiontune.serve.server`."""

from __future__ import annotations

import importlib.util
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from visiontune.errors import UserError

stdout = Console(highlight=False, soft_wrap=True)
Opt = typer.Option
SERVE_MODULES = ("fastapi", "uvicorn", "multipart", "prometheus_client")


def serve(
    models: Annotated[list[str], typer.Argument(help="Run, anomaly model or caption run directories; NAME=DIR names one.")],
    host: Annotated[str, Opt(help="Address to bind; other than loopback needs --api-key or --insecure.")] = "127.0.0.1",
    port: Annotated[int, Opt(help="TCP port.")] = 8000,
    workers: Annotated[int, Opt(help="Server processes, each with its own copy of the models.")] = 1,
    max_batch_size: Annotated[int, Opt(help="Images per forward pass at most.")] = 8,
    batch_timeout_ms: Annotated[float, Opt(help="How long a batch waits to fill after its first image.")] = 2.0,
    backend: Annotated[str | None, Opt(help="openvino | onnx | torch (default: as predict chooses for the device).")] = None,
    quantize: Annotated[str | None, Opt(help="int8: ONNX Runtime static quantization.")] = None,
    device: Annotated[str, Opt(help="auto | cpu | cuda")] = "auto",
    threads: Annotated[int | None, Opt(help="Inference threads per process (default: the free cores).")] = None,
    api_key: Annotated[str | None, Opt(envvar="VISIONTUNE_API_KEY", help="Require this key on every API call.")] = None,
    insecure: Annotated[bool, Opt("--insecure", help="Allow a non-loopback bind without an API key.")] = False,
    cors_origin: Annotated[list[str] | None, Opt(help="Allow browser calls from this origin (repeatable); off by default.")] = None,
    max_upload_mb: Annotated[float, Opt(help="Largest request body, in MiB (413 above).")] = 20.0,
    max_images: Annotated[int, Opt(help="Images per request at most (413 above).")] = 16,
    max_queue: Annotated[int, Opt(help="Images waiting per model before 503 + Retry-After.")] = 256,
    request_timeout: Annotated[float, Opt(help="Seconds before a request is answered 504.")] = 30.0,
) -> None:
    """Serve models over HTTP: a JSON API, an upload page at /, /health, /models and /metrics."""
    missing = [name for name in SERVE_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f"serve needs {', '.join(missing)}: pip install 'visiontune[serve]'")
    from visiontune.serve.app import ServeSettings
    from visiontune.serve.server import ModelOptions, ServeSpec
    from visiontune.serve.server import serve as run_server

    if min(max_batch_size, max_images, max_queue) < 1 or max_upload_mb <= 0 or request_timeout <= 0 or batch_timeout_ms < 0:
        raise UserError("--max-batch-size, --max-images, --max-queue, --max-upload-mb and --request-timeout must be "
                        "positive, --batch-timeout-ms at least 0")
    settings = ServeSettings(
        max_batch_size=max_batch_size, batch_timeout_ms=batch_timeout_ms, max_queue=max_queue,
        max_upload_bytes=int(max_upload_mb * 2**20), max_images_per_request=max_images,
        request_timeout_s=request_timeout, api_key=api_key, cors_origins=tuple(cors_origin or ()),
    )
    spec = ServeSpec(models, ModelOptions(device, backend, quantize, max_batch_size, threads), settings)

    def banner(loaded) -> None:
        shown = "localhost" if host in ("127.0.0.1", "::1") else host
        for model in loaded:
            stdout.print(f"{escape(model.name)}: {model.kind} (version {model.version}) "
                         f"POST http://{shown}:{port}/models/{escape(model.name)}/predict")
        stdout.print(f"upload page http://{shown}:{port}/ ; readiness http://{shown}:{port}/health ; Ctrl+C stops")

    run_server(spec, host=host, port=port, workers=workers, insecure=insecure, on_ready=banner)
