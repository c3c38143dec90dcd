"""`train --exclude / --relabel`: reviewed audit decisions applied to the samples, and recorded."""

from __future__ import annotations

import pytest

from visiontune.data.curation import curate
from visiontune.data.samples import Sample
from visiontune.errors import UserError


@pytest.fixture
def samples(tmp_path):
    return [Sample(str(tmp_path / f"{label}{i}.png"), label, "train") for label in ("ant", "bee") for i in range(3)]


def test_excluded_and_relabelled_samples_are_changed_and_recorded(tmp_path, samples):
    (tmp_path / "ex.csv").write_text("kind,path\nleakage,ant0.png\nleakage,gone.png\n")
    (tmp_path / "fix.csv").write_text(f"path,label\n{tmp_path / 'bee2.png'},ant\nant1.png,ant\n")
    kept, record = curate(samples, str(tmp_path / "ex.csv"), str(tmp_path / "fix.csv"))
    assert [(s.path[len(str(tmp_path)) + 1:], s.label) for s in kept] == [
        ("ant1.png", "ant"), ("ant2.png", "ant"), ("bee0.png", "bee"), ("bee1.png", "bee"), ("bee2.png", "ant")]
    assert record["excluded"] == [str(tmp_path / "ant0.png")]
    assert record["relabelled"] == [{"path": str(tmp_path / "bee2.png"), "from": "bee", "to": "ant"}]
    assert record["not_found"] == [str(tmp_path / "gone.png")]


def test_a_relabel_to_an_unknown_class_or_a_file_without_paths_is_refused(tmp_path, samples):
    (tmp_path / "fix.csv").write_text("path,label\nant0.png,wasp\n")
    with pytest.raises(UserError, match="'wasp' .* is not a class of the data"):
        curate(samples, None, str(tmp_path / "fix.csv"))
    (tmp_path / "bad.csv").write_text("file\nant0.png\n")
    with pytest.raises(UserError, match="needs a header with 'path'"):
        curate(samples, str(tmp_path / "bad.csv"), None)
    with pytest.raises(UserError, match="does not exist"):
        curate(samples, str(tmp_path / "missing.csv"), None)
