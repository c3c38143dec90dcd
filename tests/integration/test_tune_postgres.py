"""Two `visiontune tune` workers sharing one study on a real local PostgreSQL server.

The server is started by the test (initdb + pg_ctl on a free port, unix socket in a temporary
folder, as an unprivileged user when the tests run as root) and stopped afterwards. Without the
server binaries, or when it cannot start, the test skips and says why.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import optuna
import pytest

from tests.conftest import write_class_folders

WORKER_FLAGS = ["--model", "test_resnet", "--no-pretrained", "--image-size", "32", "--epochs", "2",
                "--workers", "0", "--no-final"]


def _server_binaries() -> Path | None:
    candidates = [Path(p).parent for p in (shutil.which("pg_ctl"),) if p]
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    return next((d for d in candidates if (d / "initdb").is_file() and (d / "pg_ctl").is_file()), None)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def postgres_server() -> Iterator[str]:
    """A throw-away PostgreSQL server; yields an SQLAlchemy URL to its `postgres` database."""
    bindir = _server_binaries()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found; install postgresql to run this test")
    root = Path(tempfile.mkdtemp(prefix="vt-pg-"))  # short: unix socket paths are limited to ~100 bytes
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        user = next((u for u in ("postgres", "nobody") if _user_exists(u)), None)
        if user is None or not shutil.which("runuser"):
            pytest.skip("running as root without a 'postgres' or 'nobody' user and runuser to start PostgreSQL as")
        record = pwd.getpwnam(user)
        os.chown(root, record.pw_uid, record.pw_gid)
        as_user = ["runuser", "-u", user, "--"]
    data, port = root / "data", _free_port()

    def run(*args: str, timeout: int = 60) -> subprocess.CompletedProcess:
        return subprocess.run([*as_user, *args], check=False, capture_output=True, text=True, timeout=timeout, cwd=root)

    init = run(str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync")
    if init.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"initdb failed: {_last_line(init.stderr or init.stdout)}")
    options = f"-p {port} -k {root} -c listen_addresses='' -c fsync=off -c max_connections=50"
    start = run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-o", options, "-w", "-t", "60", "start", timeout=90)
    if start.returncode != 0:
        log = (root / "server.log").read_text() if (root / "server.log").is_file() else start.stderr
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"the PostgreSQL server did not start: {_last_line(log)}")
    try:
        yield f"postgresql+psycopg2://postgres@/postgres?host={root}&port={port}"
    finally:
        run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(root, ignore_errors=True)


def _last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else "(no output)"


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def test_two_workers_share_one_postgres_study(tmp_path):
    data = write_class_folders(tmp_path / "data", {"blue": 10, "red": 10})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    with postgres_server() as url:
        workers = [
            subprocess.Popen(
                [sys.executable, "-m", "visiontune.cli.main", "tune", str(data), "--trials", "3", "--storage", url,
                 "--study", "shared", "--out", str(tmp_path / f"worker{i}"), *WORKER_FLAGS],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
            )
            for i in range(2)
        ]
        outputs = [w.communicate(timeout=300)[0] for w in workers]
        for worker, output in zip(workers, outputs):
            assert worker.returncode == 0, output
        study = optuna.load_study(study_name="shared", storage=url)
        trials = study.trials
    ran = [json.loads((tmp_path / f"worker{i}" / "summary.json").read_text())["ran_here"] for i in range(2)]
    assert len(ran[0]) == len(ran[1]) == 3 and not set(ran[0]) & set(ran[1])  # each worker did its own share
    assert sorted(ran[0] + ran[1]) == sorted(t.number for t in trials) == list(range(6))
    assert {t.state.name for t in trials} <= {"COMPLETE", "PRUNED"}
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 6  # no two trials drew the same values
    assert not list(tmp_path.glob("worker*/final-*"))  # --no-final: workers leave the retraining out
