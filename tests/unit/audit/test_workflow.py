"""The audit's refusals: one clear message before any backbone is loaded or file written."""

from __future__ import annotations

import pytest

from tests.conftest import write_class_folders
from visiontune.audit.workflow import audit
from visiontune.errors import UserError


def test_an_out_folder_inside_the_data_or_not_empty_is_refused(tmp_path):
    data = write_class_folders(tmp_path / "data", {"blue": 3, "red": 3})
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="inside the data folder"):
        audit(str(data), out=data / "audit", model="test_resnet", pretrained=False)
    with pytest.raises(UserError, match="not an empty folder"):
        audit(str(data), out=tmp_path / "used", model="test_resnet", pretrained=False)
    assert not (data / "audit").exists() and (tmp_path / "used" / "keep.txt").read_text() == "mine"


def test_one_class_only_is_refused_with_the_reason(tmp_path):
    data = write_class_folders(tmp_path / "data", {"blue": 6})
    with pytest.raises(UserError, match="at least 2 classes"):
        audit(str(data), out=tmp_path / "out", model="test_resnet", pretrained=False, image_size=32, workers=0)
    assert not (tmp_path / "out").exists()
