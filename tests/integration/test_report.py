"""report.html is self-contained and renders every section in a real browser (headless Chromium)."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

import visiontune
from tests.conftest import TINY_OPTIONS, write_class_folders
from visiontune.evaluation.report import SECTIONS

HOSTILE_NAME = "<img src=x onerror=alert(1)>.png"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
# Flags for a closed network and a root user, as documented for this environment.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium(html: Path, *args: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args, html.as_uri()],
                              capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("report")
    data = write_class_folders(root / "data", {"blue": 12, "red": 12})
    (data / "red" / "broken.png").write_bytes(b"broken")
    (data / "red" / HOSTILE_NAME).write_bytes(b"broken")  # a file name is user input: shown, never run
    run = visiontune.fit(data, out=str(root / "run"), **{**TINY_OPTIONS, "report": True})
    return run.dir / "report.html"


def test_report_is_self_contained(report):
    html = report.read_text()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html), "the report must not load anything"
    assert html.count("data:image/png;base64,") >= 5  # curves, confusion, losses, best, reliability, roc
    assert "broken.png" in html and "not a readable image" in html
    assert "&lt;img src=x onerror=alert(1)&gt;.png" in html and "<img src=x" not in html
    for section in SECTIONS:
        assert f'id="{section}"' in html
    explanations = html[html.index('id="explanations"'):html.index('id="timings"')]
    assert "Grad-CAM on the worst predictions" in explanations and "data:image/png;base64," in explanations


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(report, tmp_path):
    dom = chromium(report, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    for section in SECTIONS:
        assert f'id="{section}"' in dom.stdout, f"section {section} missing from the rendered page"
    assert "Evaluation" in dom.stdout and "Most confused" in dom.stdout
    shot = tmp_path / "report.png"
    result = chromium(report, "--window-size=1200,1600", f"--screenshot={shot}")
    assert result.returncode == 0 and shot.stat().st_size > 20_000


def test_a_failing_report_step_does_not_fail_a_finished_run(tmp_path, monkeypatch, caplog):
    import visiontune.run

    def broken(self, *args, **kwargs):
        raise RuntimeError("grad-cam exploded")

    monkeypatch.setattr(visiontune.run.Run, "evaluate", broken)
    data = write_class_folders(tmp_path / "data", {"blue": 12, "red": 12})
    run = visiontune.fit(data, out=str(tmp_path / "run"), **{**TINY_OPTIONS, "report": True})
    assert run.summary["epochs_run"] == 2
    assert "evaluation report failed" in caplog.text and "grad-cam exploded" in caplog.text
