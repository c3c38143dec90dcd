"""`visiontune serve`: load the models, check the bind is safe, hand the app to uvicorn.

Models are loaded before the port opens, so a wrong path is one message at start-up rather than
a server that answers 500. With `--workers N`, uvicorn starts N processes that each load the
models from the same spec (passed through the environment) and share the port; their metrics
are summed through prometheus_client's multiprocess directory.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import tempfile
from dataclasses import asdict, dataclass, field, replace

import uvicorn

from visiontune.errors import UserError
from visiontune.serve.app import ServeSettings, create_app
from visiontune.serve.models import ServedModel, load_served

SPEC_ENV = "VISIONTUNE_SERVE_SPEC"


@dataclass
class ModelOptions:
    device: str = "auto"
    backend: str | None = None
    quantize: str | None = None
    max_batch_size: int = 8
    threads: int | None = None


@dataclass
class ServeSpec:
    """Everything a worker process needs to build the same app."""

    models: list[str]  # DIR or NAME=DIR
    options: ModelOptions = field(default_factory=ModelOptions)
    settings: ServeSettings = field(default_factory=ServeSettings)

    def to_json(self) -> str:
        return json.dumps({"models": self.models, "options": asdict(self.options), "settings": asdict(self.settings)})

    @classmethod
    def from_json(cls, text: str) -> ServeSpec:
        raw = json.loads(text)
        settings = raw["settings"] | {"cors_origins": tuple(raw["settings"]["cors_origins"])}
        return cls(raw["models"], ModelOptions(**raw["options"]), ServeSettings(**settings))


def load_models(spec: ServeSpec) -> list[ServedModel]:
    if not spec.models:
        raise UserError("give at least one run or anomaly model directory to serve")
    models: list[ServedModel] = []
    for entry in spec.models:
        name, _, directory = entry.rpartition("=") if "=" in entry else (None, "", entry)
        model = load_served(directory, name or None, **asdict(spec.options))
        if any(m.name == model.name for m in models):
            raise UserError(f"two models are named {model.name!r}; name them with NAME=DIR")
        models.append(model)
    return models


def check_bind(host: str, api_key: str | None, insecure: bool) -> None:
    """A non-loopback address exposes the models to the network: only with a key or --insecure."""
    if _is_loopback(host) or api_key or insecure:
        return
    raise UserError(f"--host {host} would accept connections from other machines without authentication; "
                    f"give --api-key KEY (or set VISIONTUNE_API_KEY), or --insecure if the network is trusted")


def check_port(host: str, port: int) -> None:
    """A port out of range or taken is one message before the models are loaded, not uvicorn's log."""
    if not 1 <= port <= 65535:
        raise UserError(f"--port must be between 1 and 65535, not {port}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise UserError(f"cannot listen on {host}:{port}: {exc.strerror}; choose another --port or --host") from None


def serve(spec: ServeSpec, host: str = "127.0.0.1", port: int = 8000, workers: int = 1, insecure: bool = False,
          on_ready=None) -> None:
    """Run until interrupted; `on_ready(models)` is called once the models are loaded."""
    check_bind(host, spec.settings.api_key, insecure)
    check_port(host, port)
    if workers < 1:
        raise UserError(f"--workers must be at least 1, not {workers}")
    models = load_models(spec)  # in this process too: errors before the port opens, and for the banner
    if on_ready is not None:
        on_ready(models)
    limits = {"limit_concurrency": spec.settings.max_queue + 64, "timeout_keep_alive": 5,
              "timeout_graceful_shutdown": 10, "access_log": False, "log_level": "warning"}
    if workers == 1:
        uvicorn.run(create_app(models, spec.settings), host=host, port=port, **limits)
        return
    del models
    if spec.options.threads is None:  # the cores shared out, not each worker planning for all of them
        spec = replace(spec, options=replace(spec.options, threads=max(1, (os.cpu_count() or 1) // workers)))
    with tempfile.TemporaryDirectory(prefix="visiontune-metrics-") as metrics_dir:
        os.environ[SPEC_ENV] = spec.to_json()
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
        uvicorn.run("visiontune.serve.server:app_from_environment", factory=True, host=host, port=port,
                    workers=workers, **limits)


def app_from_environment():
    """The app of one worker process of a multi-worker server (uvicorn's factory)."""
    spec = ServeSpec.from_json(os.environ[SPEC_ENV])
    return create_app(load_models(spec), spec.settings)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False

