"""The HTTP layer on a stand-in model: status codes and JSON reasons for every refusal, the API
key, the page's escaping, metrics, and that a request never kills the server."""

from __future__ import annotations

import io

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from visiontune.data.images import load_rgb_bytes
from visiontune.serve.app import ServeSettings, create_app
from visiontune.serve.models import Decoded, Prediction

LABEL = "<b>bee</b>"  # a label with markup: the page must show it as text


class FakeModel:
    kind, version, input_size = "classifier", "0123456789ab", 8

    def __init__(self, name: str = "parts", fail: bool = False) -> None:
        self.name, self.fail, self.warmed = name, fail, []

    def decode(self, data: bytes, keep_image: bool = False) -> Decoded:
        image = load_rgb_bytes(data, max_pixels=10_000)
        return Decoded(torch.zeros(3, 8, 8), image if keep_image else None)

    def collate(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(tensors)

    def predict(self, batch: torch.Tensor, top_k: int = 3) -> list[Prediction]:
        if self.fail:
            raise RuntimeError("the model broke")
        top = [{"label": LABEL, "probability": 0.75}, {"label": "ant", "probability": 0.25}]
        return [Prediction({"label": LABEL, "probability": 0.75, "top_k": top}) for _ in batch]

    def overlay_png(self, decoded: Decoded, prediction: Prediction) -> bytes:
        buffer = io.BytesIO()
        decoded.image.save(buffer, format="PNG")
        return buffer.getvalue()

    def warm_up(self, sizes) -> None:
        self.warmed.append(sizes)

    def card(self) -> dict:
        return {"name": self.name, "kind": self.kind, "classes": [LABEL, "ant"]}


def png(size=(20, 10), mode="RGB", noise: bool = False) -> bytes:
    buffer = io.BytesIO()
    image = Image.effect_noise(size, 64).convert(mode) if noise else Image.new(mode, size)
    image.save(buffer, format="PNG")
    return buffer.getvalue()


NOISY = png((64, 64), noise=True)


@pytest.fixture
def client():
    model = FakeModel()
    settings = ServeSettings(max_upload_bytes=50_000, max_images_per_request=3, batch_timeout_ms=1)
    with TestClient(create_app([model, FakeModel("broken", fail=True)], settings)) as test_client:
        test_client.model = model
        yield test_client


def test_health_is_ready_after_warm_up_and_models_lists_the_cards(client) -> None:
    assert client.get("/health").json() == {"status": "ok", "models": ["broken", "parts"]}
    assert client.model.warmed == [(1, 8)]
    assert [card["name"] for card in client.get("/models").json()["models"]] == ["parts", "broken"]
    assert client.get("/models/parts").json()["classes"] == [LABEL, "ant"]


def test_predict_takes_several_files_or_raw_bytes(client) -> None:
    files = [("files", ("../../etc/a.png", png(), "image/png")), ("files", ("b.png", png(), "image/png"))]
    answer = client.post("/models/parts/predict?top_k=1", files=files).json()
    assert [r["file"] for r in answer["results"]] == ["a.png", "b.png"]  # base names only, never paths
    assert answer["results"][0]["top_k"] == [{"label": LABEL, "probability": 0.75}]
    assert answer["version"] == "0123456789ab" and answer["timing_ms"]["total"] > 0
    raw = client.post("/models/parts/predict?overlay=true", content=png(), headers={"Content-Type": "image/png"})
    assert Image.open(io.BytesIO(__import__("base64").b64decode(raw.json()["results"][0]["overlay_png"]))).size == (20, 10)


@pytest.mark.parametrize("body, status, kind", [
    (b"just text", 415, "unsupported_media"),
    (b"", 422, "unreadable_image"),
    (NOISY[: len(NOISY) // 2], 422, "unreadable_image"),  # truncated
    (png((200, 200), "1"), 422, "unreadable_image"),  # 40,000 px over the 10,000 limit: refused from the header
])
def test_bad_images_get_the_reason_in_json(client, body, status, kind) -> None:
    reply = client.post("/models/parts/predict", files=[("files", ("x.png", body, "image/png"))])
    assert reply.status_code == status
    assert reply.json()["error"] == kind and reply.json()["detail"]


def test_one_bad_file_among_good_ones_is_reported_beside_the_answers(client) -> None:
    files = [("files", ("good.png", png(), "image/png")), ("files", ("bad.png", b"nope", "image/png"))]
    results = client.post("/models/parts/predict", files=files).json()["results"]
    assert [("error" in r, r["file"]) for r in results] == [(False, "good.png"), (True, "bad.png")]


def test_limits_refuse_with_their_status_codes(client) -> None:
    too_many = [("files", (f"{i}.png", png(), "image/png")) for i in range(4)]
    assert client.post("/models/parts/predict", files=too_many).json()["error"] == "too_many_images"
    huge = client.post("/models/parts/predict", content=b"\0" * 60_000, headers={"Content-Type": "image/png"})
    assert (huge.status_code, huge.json()["error"]) == (413, "too_large")
    chunked = client.post("/models/parts/predict", content=iter([b"\0" * 30_000] * 3), headers={"Content-Type": "image/png"})
    assert chunked.status_code == 413
    wrong_type = client.post("/models/parts/predict", json={"image": "x"})
    assert (wrong_type.status_code, wrong_type.json()["error"]) == (415, "unsupported_media")
    broken_form = client.post("/models/parts/predict", content=b"--x\r\nnonsense",
                              headers={"Content-Type": "multipart/form-data; boundary=x"})
    assert broken_form.status_code in (400, 422)
    bad_option = client.post("/models/parts/predict?top_k=many", content=png())
    assert (bad_option.status_code, bad_option.json()["error"]) == (422, "bad_request")
    assert bad_option.json()["detail"].startswith("query.top_k: ")
    complete = client.build_request("POST", "/models/parts/predict", files=[
        ("files", ("a.png", png(), "image/png")), ("files", ("b.png", png(), "image/png"))])
    body = complete.read()
    cut = client.post("/models/parts/predict", content=body[: len(body) - 80],  # inside the second part
                      headers={"Content-Type": complete.headers["Content-Type"]})
    assert (cut.status_code, cut.json()["error"]) == (400, "bad_request") and "closing boundary" in cut.json()["detail"]
    unknown = client.post("/models/prats/predict", content=png())
    assert unknown.status_code == 404 and "did you mean parts" in unknown.json()["detail"]


def test_a_model_that_raises_answers_500_and_the_server_keeps_serving(client) -> None:
    reply = client.post("/models/broken/predict", content=png(), headers={"Content-Type": "image/png"})
    assert (reply.status_code, reply.json()["error"]) == (500, "internal")
    assert client.post("/models/parts/predict", content=png()).status_code == 200


def test_metrics_count_requests_errors_and_batches(client) -> None:
    client.post("/models/parts/predict", content=png())
    client.post("/models/parts/predict", content=b"text")
    client.post(f"/models/{'x' * 50}/predict", content=png())  # hostile names do not become label values
    text = client.get("/metrics").text
    assert 'visiontune_requests_total{model="parts",status="200"} 1.0' in text
    assert 'visiontune_errors_total{kind="unsupported_media",model="parts"} 1.0' in text
    assert 'visiontune_batch_size_count{model="parts"}' in text
    assert "x" * 50 not in text


def test_the_page_escapes_names_and_loads_nothing_from_the_network() -> None:
    model = FakeModel('<script>alert(1)</script>')
    model.name = "a<b"
    with TestClient(create_app([model], ServeSettings(warm_up=False))) as client:
        page = client.get("/").text
    assert "a&lt;b" in page and "a<b" not in page
    assert "http://" not in page and "https://" not in page and "src=\"//" not in page


def test_the_api_key_guards_everything_but_the_page_and_health() -> None:
    with TestClient(create_app([FakeModel()], ServeSettings(api_key="s3cret"))) as client:
        assert client.get("/health").status_code == 200
        assert client.get("/").status_code == 200
        assert client.get("/models").status_code == 401
        assert client.post("/models/parts/predict", content=png()).status_code == 401
        assert client.post("/models/parts/predict", content=png(), headers={"X-API-Key": "wrong"}).status_code == 401
        assert client.post("/models/parts/predict", content=png(), headers={"X-API-Key": "s3cret"}).status_code == 200
        assert client.get("/metrics", headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_cors_is_off_unless_asked() -> None:
    preflight = {"Origin": "http://elsewhere.example", "Access-Control-Request-Method": "POST"}
    with TestClient(create_app([FakeModel()], ServeSettings(warm_up=False))) as client:
        assert "access-control-allow-origin" not in client.options("/models/parts/predict", headers=preflight).headers
    with TestClient(create_app([FakeModel()], ServeSettings(warm_up=False, cors_origins=("http://elsewhere.example",)))) as client:
        allowed = client.options("/models/parts/predict", headers=preflight).headers
        assert allowed["access-control-allow-origin"] == "http://elsewhere.example"
