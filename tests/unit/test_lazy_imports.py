"""`import visiontune` and the CLI's parsing load no torch; the API still resolves to the same objects."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import visiontune
from visiontune.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "lightning", "timm", "optuna", "sklearn", "matplotlib", "scipy", "onnx", "numpy", "PIL")
API = {"ComparisonResult", "LrFindResult", "Run", "TrainConfig", "UserError", "__version__", "check_data",
       "compare", "fit", "load_run", "lr_find"}

INVOKE = """
import json, sys
from typer.testing import CliRunner
from visiontune.cli.main import app
result = CliRunner().invoke(app, sys.argv[1:], env={"COLUMNS": "200"}, prog_name="visiontune")
print(json.dumps({"exit_code": result.exit_code, "output": result.output, "modules": sorted(sys.modules)}))
"""


def python(*args: str) -> subprocess.CompletedProcess:
    """A fresh interpreter in the repository root, so that nothing this test process imported counts."""
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=300,
                          check=False)


def test_importing_the_package_and_the_cli_loads_no_heavy_library():
    result = python("-c", "import visiontune, visiontune.cli.main, sys; "
                          f"bad = [m for m in {HEAVY!r} if m in sys.modules]; assert not bad, bad")
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    "args, exit_code, expected",
    [(["--help"], 0, "Turn a folder of images into a working vision model."),
     (["train", "--help"], 0, "--lr-mult"),
     (["anomaly", "fit", "--help"], 0, "89478485"),  # the max-pixels default, read from TrainConfig
     (["train", "DATA", "--epoch", "3"], 2, "No such option: --epoch (Possible options: --epochs"),
     (["trian"], 2, "No such command 'trian'. Did you mean 'train'?"),
     (["compare", "DATA", "--modles", "resnet18"], 2, "No such option: --modles")],
)
def test_help_and_mistyped_arguments_answer_without_loading_torch(args, exit_code, expected):
    result = python("-c", INVOKE, *args)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["exit_code"] == exit_code, answer["output"]
    assert expected in answer["output"]
    assert not set(HEAVY) & set(answer["modules"])


def test_the_api_is_the_same_objects_as_before():
    from visiontune import load_run
    from visiontune.comparison import compare
    from visiontune.run import Run
    from visiontune.training.finetune import fit

    assert visiontune.compare is compare  # the function, not the module of the same name
    assert visiontune.fit is fit and visiontune.Run is Run and visiontune.load_run is load_run
    assert API <= set(dir(visiontune)) and API == set(visiontune.__all__)


def test_load_run_refuses_a_folder_that_is_no_run(tmp_path):
    with pytest.raises(UserError, match="is not a visiontune run directory"):
        visiontune.load_run(tmp_path)
