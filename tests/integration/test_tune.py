"""`tune` end to end on tiny data: outputs, pruning, resuming, and the test split kept out of trials."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

import visiontune.training.reuse
import visiontune.tune.search
import visiontune.tune.space
from tests.conftest import TINY_OPTIONS, write_class_folders
from visiontune.config import TrainConfig
from visiontune.errors import UserError
from visiontune.tune.search import tune

# batch_size, freeze_epochs and augment are left to the search.
FIXED = {k: v for k, v in TINY_OPTIONS.items() if k not in ("progress", "batch_size", "freeze_epochs", "augment", "lr")}
LR_ONLY = {"lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}


class ReadLog:
    """Every file the process opens (Python's "open" audit event), tagged with the tuning phase."""

    def __init__(self) -> None:
        self.phase: str | None = "setup"
        self.opened: dict[str, set[str]] = {"setup": set(), "trial": set(), "final": set()}

    def hook(self, event: str, args: tuple) -> None:
        if self.phase is not None and event == "open" and isinstance(args[0], (str, os.PathLike)):
            self.opened[self.phase].add(os.path.realpath(os.fspath(args[0])))


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """8 trials with pruning on 2 x 12 tiny images, every file read recorded by phase."""
    root = tmp_path_factory.mktemp("tune")
    data = write_class_folders(root / "data", {"blue": 12, "red": 12})
    reads = ReadLog()
    sys.addaudithook(reads.hook)  # hooks cannot be removed; phase None turns this one off
    callers = (visiontune.tune.search, visiontune.training.reuse)  # trials; the final run
    real_fit = visiontune.tune.search.fit

    def spy_fit(*args, **kwargs):
        out = kwargs.get("out") or kwargs["config"].out
        reads.phase = "final" if Path(out).name.startswith("final") else "trial"
        try:
            return real_fit(*args, **kwargs)
        finally:
            reads.phase = "setup"

    for module in callers:
        module.fit = spy_fit
    try:
        result = tune(data, trials=8, out=root / "out", progress=False, **FIXED)
    finally:
        for module in callers:
            module.fit = real_fit
        reads.phase = None
    return result, reads


def _split_paths(splits_csv: Path) -> dict[str, set[str]]:
    paths: dict[str, set[str]] = {"train": set(), "val": set(), "test": set()}
    with splits_csv.open() as handle:
        for row in csv.DictReader(handle):
            paths[row["split"]].add(os.path.realpath(row["path"]))
    return paths


def test_eight_trials_with_pruning_write_every_output(tuned):
    result, _ = tuned
    out = result.out
    for name in ("trials.csv", "importances.json", "optimization_history.png", "param_importances.png",
                 "best_config.yaml", "space.yaml", "summary.json", "study.db", "splits.csv"):
        assert (out / name).is_file(), name
    with (out / "trials.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["number"]) for r in rows] == list(range(8)) and result.ran == list(range(8))
    states = [r["state"] for r in rows]
    assert states.count("PRUNED") >= 1 and states.count("COMPLETE") >= 2
    assert set(states) <= {"COMPLETE", "PRUNED"}
    assert len({(r["lr"], r["weight_decay"]) for r in rows}) == 8  # every trial drew its own values
    for row in rows:  # a pruned trial stopped early, skipping fit's end-of-run work; no weights kept
        trial_dir = out / "trials" / f"{int(row['number']):04d}"
        with (trial_dir / "metrics.csv").open() as handle:
            assert len(list(csv.DictReader(handle))) == int(row["epochs"])
        assert (trial_dir / "summary.json").is_file() == (row["state"] == "COMPLETE")
        assert not (trial_dir / "checkpoints").exists()
    importances = json.loads((out / "importances.json").read_text())["importances"]
    assert set(importances) == set(visiontune.tune.space.DEFAULT_SPACE) and sum(importances.values()) == pytest.approx(1)


def test_best_config_is_retrained_and_scored_on_test(tuned):
    result, _ = tuned
    best = result.study.best_trial
    assert result.best == {"number": best.number, "value": best.value, "params": best.params, "seed": best.number}
    config = TrainConfig.from_yaml(result.best_config)
    assert {k: getattr(config, k) for k in best.params} == best.params
    assert config.seed == best.number and Path(config.data) == (result.out / "splits.csv").resolve()
    summary = result.final.summary
    assert result.final.dir == result.out / f"final-{best.number:04d}"
    assert sum(summary["counts"]["test"].values()) > 0 and "accuracy" in summary["test"]
    # same data order, seed and params as the best trial: its validation score is reproduced
    assert summary["val"]["accuracy"] == pytest.approx(best.value)
    written = json.loads((result.out / "summary.json").read_text())
    assert written["final"]["test"] == summary["test"] and written["best"]["number"] == best.number


def test_no_trial_reads_a_test_image_and_the_final_run_does(tuned):
    result, reads = tuned
    paths = _split_paths(result.out / "splits.csv")
    assert paths["test"] and reads.opened["trial"] >= paths["train"] | paths["val"]  # the log sees reads
    assert not paths["test"] & (reads.opened["setup"] | reads.opened["trial"])
    assert paths["test"] <= reads.opened["final"]


def test_a_study_resumes_from_its_folder_and_trials_0_only_retrains(tmp_path):
    data = write_class_folders(tmp_path / "data", {"blue": 8, "red": 8})
    first = tune(data, trials=2, out=tmp_path / "out", space=LR_ONLY, final=False, progress=False, **FIXED)
    second = tune(data, trials=2, out=tmp_path / "out", space=LR_ONLY, final=False, progress=False, **FIXED)
    assert first.ran == [0, 1] and second.ran == [2, 3] and len(second.trials) == 4
    assert len({row["lr"] for row in second.trials}) == 4  # the resumed sampler does not replay trials 0-1
    assert first.final is None and not list(tmp_path.glob("out/final-*"))
    last = tune(data, trials=0, out=tmp_path / "out", space=LR_ONLY, progress=False, **FIXED)
    assert last.ran == [] and last.final is not None and "test" in last.final.summary


def test_workers_on_a_different_split_are_refused(tmp_path):
    data = write_class_folders(tmp_path / "data", {"blue": 8, "red": 8})
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    tune(data, trials=0, storage=storage, out=tmp_path / "a", space=LR_ONLY, progress=False, **FIXED)
    with pytest.raises(UserError, match="different train/val/test split"):
        tune(data, trials=0, storage=storage, out=tmp_path / "b", space=LR_ONLY, progress=False, seed=1,
             **{k: v for k, v in FIXED.items() if k != "seed"})


def test_a_study_cannot_switch_objective(tmp_path):
    data = write_class_folders(tmp_path / "data", {"blue": 8, "red": 8})
    tune(data, trials=0, out=tmp_path / "out", space=LR_ONLY, progress=False, **FIXED)
    with pytest.raises(UserError, match="cannot continue with monitor val_loss"):
        tune(data, trials=0, out=tmp_path / "out", space=LR_ONLY, progress=False, monitor="val_loss", **FIXED)


def test_unreachable_storage_is_one_message(tmp_path):
    data = write_class_folders(tmp_path / "data", {"blue": 8, "red": 8})
    with pytest.raises(UserError, match="cannot open storage postgresql\\+psycopg2://u:\\*\\*\\*@127.0.0.1:9/x"):
        tune(data, trials=1, storage="postgresql+psycopg2://u:secret@127.0.0.1:9/x", out=tmp_path / "out",
             progress=False, **FIXED)
    with pytest.raises(UserError, match="cannot use storage"):
        tune(data, trials=1, storage="nosuchdb://x", out=tmp_path / "out", progress=False, **FIXED)


def test_load_study_sees_the_trials(tuned):
    result, _ = tuned
    study = optuna.load_study(study_name="visiontune", storage=f"sqlite:///{result.out / 'study.db'}")
    assert len(study.trials) == 8 and study.user_attrs["monitor"] == "val_accuracy"


def test_cli_bad_space_is_one_line_and_exit_2(tmp_path):
    data = write_class_folders(tmp_path / "data", {"blue": 8, "red": 8})
    (tmp_path / "space.yaml").write_text("lr: {type: float, low: 1e-4, high: 1e-2, log: true}\nweight_decy: {type: float, low: 0, high: 0.1}\n")
    result = subprocess.run(
        [sys.executable, "-m", "visiontune.cli.main", "tune", str(data), "--space", str(tmp_path / "space.yaml"),
         "--out", str(tmp_path / "out"), "--model", "test_resnet", "--no-pretrained"],
        check=False, capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"},
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "unknown option 'weight_decy'" in result.stderr and "did you mean 'weight_decay'?" in result.stderr
    assert not (tmp_path / "out" / "study.db").exists()  # stopped before any study or trial
