"""Start-up checks of `serve`: safe binds, usable ports, model names, and the spec a worker
process rebuilds the app from."""

from __future__ import annotations

import socket

import pytest

from visiontune.errors import UserError
from visiontune.serve.app import ServeSettings
from visiontune.serve.models import load_served
from visiontune.serve.server import (
    ModelOptions,
    ServeSpec,
    check_bind,
    check_port,
    load_models,
)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.2"])
def test_loopback_binds_need_no_key(host) -> None:
    check_bind(host, api_key=None, insecure=False)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10", "myhost"])
def test_other_binds_need_a_key_or_insecure(host) -> None:
    with pytest.raises(UserError, match="--api-key"):
        check_bind(host, api_key=None, insecure=False)
    check_bind(host, api_key="k", insecure=False)
    check_bind(host, api_key=None, insecure=True)


def test_a_taken_or_impossible_port_is_one_message() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(UserError, match=f"cannot listen on 127.0.0.1:{port}"):
            check_port("127.0.0.1", port)
    with pytest.raises(UserError, match="between 1 and 65535"):
        check_port("127.0.0.1", 70000)


def test_the_spec_survives_the_trip_to_a_worker_process() -> None:
    spec = ServeSpec(["a=/x"], ModelOptions(backend="torch", threads=1),
                     ServeSettings(api_key="k", cors_origins=("http://a",), max_images_per_request=3))
    assert ServeSpec.from_json(spec.to_json()) == spec


def test_directories_that_are_not_models_and_bad_names_are_refused(tmp_path) -> None:
    with pytest.raises(UserError, match="no model.json"):
        load_served(tmp_path)
    (tmp_path / "model.json").write_text('{"kind": "classifier"}')
    with pytest.raises(UserError, match="letters, digits"):
        load_served(tmp_path, name="../etc")
    with pytest.raises(UserError, match="at least one"):
        load_models(ServeSpec([]))
