"""The real server in a subprocess on a free loopback port: every endpoint over HTTP, answers equal
to `predict` and `anomaly predict`, a clean stop on SIGINT, the bind check, and the upload page
driven in headless Chromium."""

from __future__ import annotations

import base64
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

import visiontune
from tests.conftest import TINY_OPTIONS, write_class_folders
from visiontune import anomaly

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cli(*args: str, **options) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "visiontune.cli.main", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **options)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    data = write_class_folders(root / "data", {"blue": 10, "red": 10})
    run = visiontune.fit(data, out=str(root / "run"), **{**TINY_OPTIONS, "epochs": 2, "lr": 1e-2})
    anomaly.fit(data / "blue", method="padim", out=root / "tiles", backbone="test_resnet", pretrained=False,
                image_size=64, workers=0)
    return run, root / "tiles", data


@pytest.fixture(scope="module")
def server(models):
    run, tiles, _ = models
    port = free_port()
    process = cli("serve", str(run.dir), f"tiles={tiles}", "--port", str(port), "--max-images", "4",
                  "--max-upload-mb", "1", "--threads", "1")
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    else:
        process.kill()
        pytest.fail(f"the server did not become ready: {process.communicate()[0]}")
    yield url, process
    if process.poll() is None:
        process.kill()
        process.wait()


def test_predictions_over_http_equal_predict(server, models) -> None:
    url, _ = server
    run, _, data = models
    paths = sorted((data / "red").iterdir())[:2] + sorted((data / "blue").iterdir())[:1]
    files = [("files", (p.name, p.read_bytes(), "image/png")) for p in paths]
    answer = httpx.post(f"{url}/models/run/predict?top_k=2", files=files, timeout=30).json()
    expected = visiontune.load_run(run.dir).predict([str(p) for p in paths], top_k=2, backend="onnx").rows
    assert [r["label"] for r in answer["results"]] == [row["label"] for row in expected]
    np.testing.assert_allclose([r["probability"] for r in answer["results"]],
                               [row["probability"] for row in expected], atol=1e-5)
    np.testing.assert_allclose([r["ood_score"] for r in answer["results"]],
                               [row["ood_score"] for row in expected], atol=1e-4)  # the run's OOD flag too
    assert [r["ood"] for r in answer["results"]] == [row["ood"] for row in expected]
    assert len(answer["version"]) == 12 and answer["kind"] == "classifier"


def test_anomaly_scores_over_http_equal_anomaly_predict(server, models) -> None:
    url, _ = server
    _, tiles, data = models
    path = min((data / "red").iterdir())
    reply = httpx.post(f"{url}/models/tiles/predict?overlay=true", content=path.read_bytes(),
                       headers={"Content-Type": "image/png"}, timeout=30).json()["results"][0]
    expected = anomaly.predict(tiles, [path], workers=0)[0]
    assert reply["decision"] == expected["decision"]
    assert reply["score"] == pytest.approx(expected["score"], rel=1e-4)
    heat = Image.open(io.BytesIO(base64.b64decode(reply["overlay_png"])))
    assert heat.size == Image.open(path).size


def test_every_endpoint_and_refusal_over_http(server) -> None:
    url, _ = server
    assert httpx.get(f"{url}/health").json()["models"] == ["run", "tiles"]
    cards = {card["name"]: card for card in httpx.get(f"{url}/models").json()["models"]}
    assert cards["run"]["classes"] == ["blue", "red"] and cards["tiles"]["method"] == "padim"
    assert "Drop images here" in httpx.get(url).text
    refusals = {
        "text": httpx.post(f"{url}/models/run/predict", files={"files": ("a.txt", b"hello")}),
        "too many": httpx.post(f"{url}/models/run/predict", files=[("files", (f"{i}.png", b"x")) for i in range(5)]),
        "too large": httpx.post(f"{url}/models/run/predict", content=b"\0" * (2 * 2**20)),
        "unknown": httpx.post(f"{url}/models/nope/predict", content=b"x"),
    }
    assert {k: r.status_code for k, r in refusals.items()} == {"text": 415, "too many": 413, "too large": 413,
                                                                "unknown": 404}
    metrics = httpx.get(f"{url}/metrics").text
    assert 'visiontune_errors_total{kind="too_large",model="run"}' in metrics
    assert "visiontune_queue_depth" in metrics and "visiontune_request_latency_seconds_bucket" in metrics


@pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                    reason="Chromium and ChromeDriver are not installed (apt-get install chromium chromium-driver)")
def test_the_upload_page_in_headless_chromium(server, models, tmp_path) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, _ = server
    _, _, data = models
    image = min((data / "red").iterdir())
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1100,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.get(url)
        driver.find_element(By.ID, "files").send_keys(str(image))
        WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".result .label"))
        result = driver.find_element(By.CSS_SELECTOR, ".result")
        expected = visiontune.load_run(models[0].dir).predict([str(image)], backend="onnx").rows[0]
        assert result.find_element(By.CSS_SELECTOR, ".label").text == expected["label"]
        assert result.find_element(By.CSS_SELECTOR, ".probability").text == f"{100 * expected['probability']:.1f}%"
        overlay = result.find_element(By.CSS_SELECTOR, "img.overlay")
        assert driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", overlay) > 0
        driver.save_screenshot(str(tmp_path / "page.png"))
        assert (tmp_path / "page.png").stat().st_size > 1000
    finally:
        driver.quit()


def test_sigint_stops_the_server_cleanly(models) -> None:
    run, _, _ = models
    port = free_port()
    process = cli("serve", str(run.dir), "--port", str(port), "--threads", "1")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.3)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=30)
    assert process.returncode in (0, 130), output
    assert "Traceback" not in output


def test_a_network_bind_needs_an_api_key(models) -> None:
    run, _, _ = models
    process = cli("serve", str(run.dir), "--host", "0.0.0.0")
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 2
    assert "--api-key" in output and "Traceback" not in output
