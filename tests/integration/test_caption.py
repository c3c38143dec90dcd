"""`visiontune caption` end to end on tiny generated scenes: the run directory, predict, evaluate,
the report, resume, and the messages users meet."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.integration.test_cli import cli
from visiontune import caption
from visiontune.caption import workflow
from visiontune.errors import UserError
from visiontune.serve.app import ServeSettings, create_app
from visiontune.serve.models import load_served

TINY = dict(model="test_resnet", pretrained=False, image_size=64, width=32, heads=2, workers=0, batch_size=16)
HOSTILE = "<script>alert(1)</script> shapes"


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("scenes")
    path = caption.make_scenes(folder, {"train": 24, "val": 6, "test": 6}, image_size=64)
    with open(path, "a", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerow(["images/test_00000.png", HOSTILE, "test"])
    return path


@pytest.fixture(scope="module")
def trained(scenes: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "cap"
    flags = ["--model", "test_resnet", "--no-pretrained", "--image-size", "64", "--width", "32", "--heads", "2",
             "--workers", "0", "--epochs", "2", "--beam", "2"]
    result = cli("caption", "train", scenes, *flags, "--out", out)
    assert result.returncode == 0, result.stderr
    assert "kept epoch" in result.stdout and "bleu4" in result.stdout
    return out


def test_the_run_directory_holds_everything_to_caption_again(trained: Path) -> None:
    meta = json.loads((trained / "model.json").read_text())
    assert meta["kind"] == "caption" and meta["encoder"]["grid"] == [2, 2] and meta["encoder"]["channels"] == 96
    for name in ("tokenizer.json", "config.yaml", "captions.csv", "checkpoints/best.safetensors",
                 "checkpoints/encoder.safetensors", "checkpoints/state.pt", "eval/test/report.html"):
        assert (trained / name).is_file(), name
    rows = list(csv.DictReader((trained / "captions.csv").open()))
    split_of = {}
    for row in rows:
        assert split_of.setdefault(row["image"], row["split"]) == row["split"]  # no image in two splits
    assert len(list(csv.DictReader((trained / "metrics.csv").open()))) == 2
    summary = json.loads((trained / "summary.json").read_text())
    assert summary["images"] == {"train": 24, "val": 6, "test": 6}
    assert set(summary["test"]) >= {"bleu1", "bleu4", "rouge_l", "cider"}


def test_report_escapes_captions_and_shows_attention(trained: Path) -> None:
    page = (trained / "eval" / "test" / "report.html").read_text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<script>alert" not in page
    assert "Attention over the image for each generated word" in page and "Worst captions" in page


def test_predict_lists_unreadable_files_and_writes_one_row_per_image(trained: Path, scenes: Path,
                                                                     tmp_path: Path) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    images = sorted((scenes.parent / "images").glob("test_*.png"))[:3]
    out = tmp_path / "captions.csv"
    result = cli("caption", "predict", trained, *images, broken, "--out", out, "--beam", "2")
    assert result.returncode == 0, result.stderr
    assert "broken.png" in result.stderr and "Traceback" not in result.stderr
    rows = list(csv.DictReader(out.open()))
    assert [Path(r["image"]).name for r in rows] == [p.name for p in images]


def test_user_mistakes_are_one_message(trained: Path, tmp_path: Path) -> None:
    missing = cli("caption", "train", tmp_path / "nope.csv", "--model", "test_resnet", "--no-pretrained")
    assert missing.returncode == 2 and "captions file not found" in missing.stderr
    wrong_kind = cli("evaluate", trained)
    assert wrong_kind.returncode == 2 and "visiontune caption predict / evaluate" in wrong_kind.stderr
    odd = cli("caption", "train", "x.csv", "--decoder", "gru")
    assert odd.returncode == 2 and "decoder" in odd.stderr
    for result in (missing, wrong_kind, odd):
        assert "Traceback" not in result.stderr


def test_resume_continues_exactly(scenes: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    options = dict(TINY, epochs=3, patience=3, report=False)
    straight = caption.fit(scenes, out=str(tmp_path / "straight"), **options)
    append = workflow._append_metrics

    def stop_after_two(path, row):
        append(path, row)
        if row["epoch"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(workflow, "_append_metrics", stop_after_two)
    with pytest.raises(KeyboardInterrupt):
        caption.fit(scenes, out=str(tmp_path / "stopped"), **options)
    monkeypatch.setattr(workflow, "_append_metrics", append)
    resumed = caption.fit(resume=tmp_path / "stopped")
    read = lambda run: [(r["epoch"], r["train_loss"], r["val_cider"]) for r in  # noqa: E731
                        csv.DictReader((run.dir / "metrics.csv").open())]
    assert read(resumed) == read(straight) and len(read(straight)) == 3


def test_a_caption_run_is_served(trained: Path, scenes: Path) -> None:
    served = load_served(trained, device="cpu")
    image = (scenes.parent / "images" / "test_00001.png").read_bytes()
    expected, _ = caption.load(trained).predict([scenes.parent / "images" / "test_00001.png"], beam=3, device="cpu")
    with TestClient(create_app([served], ServeSettings(warm_up=False))) as client:
        answer = client.post("/models/cap/predict?overlay=true", files={"file": ("x.png", image, "image/png")})
        card = client.get("/models/cap").json()
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["kind"] == "caption" and body["results"][0]["caption"] == expected[0].caption
    assert body["results"][0]["overlay_png"] and card["encoder"]["grid"] == [2, 2]


def test_resume_refuses_a_damaged_or_unfinished_run(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("data: [unclosed")
    with pytest.raises(UserError, match="config.yaml is damaged"):
        caption.fit(resume=tmp_path)
    (tmp_path / "config.yaml").write_text("data: captions.csv\n")  # stopped before the encoder was saved
    with pytest.raises(UserError, match="stopped before its files were written"):
        caption.fit(resume=tmp_path)
    with pytest.raises(UserError, match="not a caption run to resume"):
        caption.fit(resume=tmp_path / "nothing")
