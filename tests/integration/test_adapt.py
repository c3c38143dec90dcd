"""`adapt`: new runs that evaluate like any other, what each method changes, and what it refuses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
from typer.testing import CliRunner

import visiontune
import visiontune.data.dataset
import visiontune.data.validate
from tests.conftest import COLOURS, TINY_OPTIONS, colour_image, write_class_folders
from visiontune.adapt.workflow import adapt
from visiontune.cli.main import app
from visiontune.errors import UserError

SHIFT = (0.5, 60)  # target colour = source colour * 0.5 + 60: lower contrast, still separable


@pytest.fixture(scope="module")
def domains(tmp_path_factory) -> tuple[Path, Path]:
    """A source run trained on colour classes, and a target split folder of the same classes shifted."""
    root = tmp_path_factory.mktemp("adapt")
    source = write_class_folders(root / "source", {"blue": 16, "green": 16, "red": 16})
    scale, offset = SHIFT
    for split, n, seed in (("train", 16, 5), ("val", 6, 6), ("test", 8, 7)):
        for k, name in enumerate(COLOURS):
            folder = root / "target" / split / name
            folder.mkdir(parents=True)
            colour = tuple(int(v * scale + offset) for v in COLOURS[name])
            for i in range(n):
                colour_image(colour, seed * 1000 + k * 100 + i).save(folder / f"{name}_{i}.png")
    visiontune.fit(source, out=str(root / "run"), **{**TINY_OPTIONS, "epochs": 6, "lr": 3e-3, "freeze_epochs": 0})
    return root / "run", root / "target"


def run_adapt(domains, out: Path, method: str, **options) -> Path:
    run, target = domains
    return adapt(run, target, method, out, workers=0, device="cpu", progress=False, **options)


def target_test_accuracy(run_dir: Path, target: Path) -> float:
    return visiontune.load_run(run_dir).evaluate(split="val", data=str(target / "test"), workers=0)["accuracy"]


def test_adabn_changes_only_batchnorm_statistics_and_the_new_run_evaluates(domains, tmp_path):
    run, target = domains
    (run / "threshold.json").write_text("{}")  # fitted for the source model: never copied
    out = run_adapt(domains, tmp_path / "adabn", "adabn")
    before = safetensors.torch.load_file(str(run / "checkpoints/best.safetensors"))
    after = safetensors.torch.load_file(str(out / "checkpoints/best.safetensors"))
    assert before.keys() == after.keys()
    changed = {key for key in before if not (before[key] == after[key]).all()}
    assert changed and all(key.endswith(("running_mean", "running_var", "num_batches_tracked")) for key in changed)
    result = visiontune.load_run(out).evaluate(split="val", workers=0)
    assert result["accuracy"] == pytest.approx(1.0)
    predicted = visiontune.load_run(out).predict(target / "val", workers=0)
    assert len(predicted.rows) == 18
    lineage = json.loads((out / "model.json").read_text())["lineage"]
    assert lineage["adapted_from"] == str(run.resolve()) and lineage["method"] == "adabn"
    assert lineage["target_images"] == 66 and lineage["target_test_images_left_out"] == 24
    assert len(lineage["source_checkpoint_sha256"]) == 64
    assert not (out / "threshold.json").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["adaptation"]["target_labels_used"] is False and "no target labels" in summary["adaptation"]["note"]
    assert "threshold.json" in summary["adaptation"]["not_copied"]
    assert all(Path(line.split(",")[0]).is_absolute() for line in (out / "splits.csv").read_text().splitlines()[1:])
    assert target_test_accuracy(out, target) > target_test_accuracy(run, target)


def test_mcc_improves_target_accuracy_over_the_source_model(domains, tmp_path):
    run, target = domains
    out = run_adapt(domains, tmp_path / "mcc", "mcc", epochs=5, lr=1e-3)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kept"] == "adapted" and len(summary["adaptation"]["epochs"]) == 6
    assert "target_entropy" in summary["adaptation"]["criterion"]
    assert target_test_accuracy(run, target) < 0.7 < target_test_accuracy(out, target)


def test_finetune_on_a_few_labelled_target_images(domains, tmp_path):
    _, target = domains
    out = run_adapt(domains, tmp_path / "finetune", "finetune", target_labels=target, shots=2, epochs=3, lr=1e-3)
    lineage = json.loads((out / "model.json").read_text())["lineage"]
    assert lineage["labelled_target_images"] == 6
    summary = json.loads((out / "summary.json").read_text())
    assert summary["adaptation"]["labelled_target"]["validation_from"] == "the labelled target val split"


def folder_with_unknown_class(tmp_path: Path) -> Path:
    return write_class_folders(tmp_path / "labels", {"red": 3, "purple": 2, "cyan": 2})


@pytest.mark.parametrize("case, expected", [
    ("empty target", "no target images found"),
    ("unreadable target", "none of the 2 target images"),
    ("unknown classes", "never had: cyan, purple"),
    ("no batchnorm", "--method mcc"),
    ("out not empty", "already exists and is not empty"),
    ("no target labels", "pass --target-labels"),
    ("too many shots", "--shots 50 is more than"),
    ("misspelt method", "not 'mmc'; did you mean mcc"),
])
def test_bad_input_is_one_message_and_writes_nothing(domains, tmp_path, monkeypatch, case, expected):
    run, target = domains
    out, method, options = tmp_path / "out" / "new", "adabn", {}
    if case == "empty target":
        target = tmp_path / "empty"
        target.mkdir()
    elif case == "unreadable target":
        target = tmp_path / "bad"
        target.mkdir()
        (target / "a.png").write_bytes(b"not a png")
        (target / "b.jpg").write_bytes(b"")
    elif case == "unknown classes":
        method, options = "finetune", {"target_labels": folder_with_unknown_class(tmp_path)}
    elif case == "no batchnorm":
        monkeypatch.setattr("visiontune.adapt.workflow.batch_norms", lambda model: [])
    elif case == "out not empty":
        out.mkdir(parents=True)
        (out / "keep.txt").write_text("mine")
    elif case == "no target labels":
        method = "mixed"
    elif case == "too many shots":
        method, options = "finetune", {"target_labels": target, "shots": 50}
    elif case == "misspelt method":
        method = "mmc"
    with pytest.raises(UserError, match=expected) as error:
        adapt(run, target, method, out, workers=0, device="cpu", progress=False, **options)
    if case == "too many shots":
        assert "blue (16)" in str(error.value)
    if case == "out not empty":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
    else:
        assert not (tmp_path / "out").exists()


def test_a_failure_while_writing_leaves_no_directory(domains, tmp_path, monkeypatch):
    def crash(*args):
        raise RuntimeError("disk gone")

    monkeypatch.setattr("visiontune.adapt.workflow._write_run", crash)
    with pytest.raises(RuntimeError, match="disk gone"):
        run_adapt(domains, tmp_path / "new", "adabn")
    assert list(tmp_path.iterdir()) == []


def test_no_target_test_file_is_ever_opened(domains, tmp_path, monkeypatch):
    _, target = domains
    opened = []
    for module, name in ((visiontune.data.dataset, "load_rgb"), (visiontune.data.validate, "inspect_image")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda path, *a, real=real, **k: opened.append(str(path)) or real(path, *a, **k))
    run_adapt(domains, tmp_path / "mcc", "mcc", epochs=1)
    run_adapt(domains, tmp_path / "mixed", "mixed", target_labels=target, epochs=1)
    target_opened = [p for p in opened if p.startswith(str(target.resolve()))]
    assert any("/target/train/" in p for p in target_opened) and any("/target/val/" in p for p in target_opened)
    assert not [p for p in target_opened if "/target/test/" in p]


def test_the_adapt_command(domains, tmp_path):
    run, target = domains
    out = tmp_path / "cli"
    args = ["adapt", str(run), "--target", str(target), "--method", "adabn", "--out", str(out), "--workers", "0",
            "--device", "cpu"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert f"written: {out}" in result.output
    again = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert isinstance(again.exception, UserError) and "already exists" in str(again.exception)
