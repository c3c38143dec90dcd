"""Damaged run files are one message naming the file and what is wrong, never a traceback."""

from __future__ import annotations

import json
import pickle

import pytest

import visiontune
from tests.conftest import TINY_OPTIONS
from tests.integration.test_cli import Exploit, cli
from visiontune.errors import UserError


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from tests.conftest import write_class_folders

    root = tmp_path_factory.mktemp("damaged")
    data = write_class_folders(root / "data", {"blue": 12, "red": 12})
    visiontune.fit(data, out=str(root / "run"), **{**TINY_OPTIONS, "epochs": 1, "freeze_epochs": 0})
    return root / "run"


@pytest.fixture
def copy(run_dir, tmp_path):
    import shutil

    target = tmp_path / "run"
    shutil.copytree(run_dir, target)
    return target


def _unfinished(run):
    """Mark the run unfinished, so that --resume reads state.pt."""
    from visiontune.training.checkpoint import load_state, save_state

    path = run / "checkpoints" / "state.pt"
    save_state(path, {**load_state(path), "finished": False, "epoch": 0})


def test_state_pt_with_a_code_carrying_pickle_is_refused_in_one_line(copy, tmp_path):
    marker = tmp_path / "pwned"
    (copy / "checkpoints" / "state.pt").write_bytes(pickle.dumps({"model": Exploit(marker)}))
    with pytest.raises(UserError, match=r"state\.pt was refused: it is damaged or holds pickled objects"):
        visiontune.fit(resume=copy, progress=False)
    assert not marker.exists()


def test_truncated_state_pt_is_named(copy):
    state = copy / "checkpoints" / "state.pt"
    state.write_bytes(state.read_bytes()[:500])
    with pytest.raises(UserError, match=r"state\.pt is damaged or truncated"):
        visiontune.fit(resume=copy, progress=False)


@pytest.mark.parametrize("damage", ["truncate", "labels", "not_json"])
def test_damaged_model_json_is_named(copy, damage):
    path = copy / "model.json"
    text = path.read_text()
    if damage == "truncate":
        path.write_text(text[: len(text) // 2])
    elif damage == "labels":  # one label more than the checkpoint's head has
        meta = json.loads(text)
        path.write_text(json.dumps({**meta, "labels": meta["labels"] + ["green"]}))
    else:
        path.write_text("[1, 2]")
    with pytest.raises(UserError, match=r"model\.json") as caught:
        visiontune.load_run(copy).load_model()
    assert "\n" not in str(caught.value)


def test_truncated_checkpoint_and_mismatched_state_are_named(copy):
    best = copy / "checkpoints" / "best.safetensors"
    best.write_bytes(best.read_bytes()[:1000])
    with pytest.raises(UserError, match=r"best\.safetensors is damaged or truncated"):
        visiontune.load_run(copy).load_model()
    _unfinished(copy)
    from visiontune.training.checkpoint import load_state, save_state

    path = copy / "checkpoints" / "state.pt"
    state = load_state(path)
    state["model"] = {k: v[:1] if v.ndim else v for k, v in state["model"].items()}
    save_state(path, state)
    with pytest.raises(UserError, match=r"state\.pt does not fit this run"):
        visiontune.fit(resume=copy, progress=False)


@pytest.mark.slow
def test_cli_predict_on_a_damaged_model_json_exits_2_without_traceback(copy, tmp_path):
    (copy / "model.json").write_text('{"model": "test_resnet", "labels": [')
    result = cli("predict", copy, copy.parent, "--out", tmp_path / "p.csv")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "model.json is damaged" in result.stderr
