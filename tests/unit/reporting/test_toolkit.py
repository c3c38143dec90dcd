"""The shared report toolkit: number formatting, inline images, escaping and the atomic page write."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import jinja2
import pytest
from matplotlib.figure import Figure
from PIL import Image

from visiontune.reporting import formatting
from visiontune.reporting.html import environment, render, render_page
from visiontune.reporting.images import data_uri

HOSTILE = '<script>alert("x")</script>&amp;'


def _decoded_png(uri: str) -> Image.Image:
    assert uri.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))


def test_numbers_are_written_one_way_and_missing_values_are_a_dash():
    dash = formatting.MISSING
    assert formatting.fixed(0.87654) == "0.8765" and formatting.fixed(0.87654, 2) == "0.88"
    assert formatting.significant("0.694512") == "0.6945" and formatting.significant(89478485) == "8.948e+07"
    assert formatting.significant([0.0406151, 0.2326621]) == "0.04062, 0.2327"
    assert formatting.significant("frozen") == "frozen"
    assert formatting.percent(0.1234) == "12.3%" and formatting.percent(1.0, 0) == "100%"
    assert formatting.interval([0.81234, 0.93209]) == "0.8123 \u2013 0.9321"
    assert formatting.cell(19) == "19" and formatting.cell(0.5) == "0.5000" and formatting.cell("dent") == "dent"
    for missing in (None, float("nan"), ""):
        assert {formatting.fixed(missing), formatting.significant(missing), formatting.percent(missing),
                formatting.cell(missing)} == {dash}
    assert formatting.interval(None) == formatting.interval([0.1, float("nan")]) == dash


def test_images_of_every_kind_become_data_uris(tmp_path: Path):
    picture = Image.new("RGB", (7, 5), (200, 10, 10))
    assert _decoded_png(data_uri(picture)).size == (7, 5)
    picture.save(tmp_path / "red.png")
    png = (tmp_path / "red.png").read_bytes()
    assert data_uri(tmp_path / "red.png") == data_uri(str(tmp_path / "red.png")) == data_uri(png)
    picture.save(tmp_path / "red.JPG", format="JPEG")
    assert data_uri(tmp_path / "red.JPG").startswith("data:image/jpeg;base64,")
    figure = Figure(figsize=(2, 1))
    figure.subplots().plot([0, 1], [1, 0])
    assert _decoded_png(data_uri(figure)).width > 50
    with pytest.raises(ValueError, match="cannot inline"):
        data_uri(tmp_path / "notes.txt")
    with pytest.raises(TypeError, match="cannot inline a int"):
        data_uri(3)


def test_user_text_is_escaped_and_a_missing_field_fails_loudly():
    assert environment().from_string("<p>{{ name }}</p>").render(name=HOSTILE) == (
        "<p>&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;&amp;amp;</p>")
    with pytest.raises(jinja2.UndefinedError):
        environment().from_string("{{ page.missing }}").render(page={})


def test_the_anomaly_page_escapes_file_names_labels_and_reasons():
    card = {"name": f"{HOSTILE}.png", "defect": HOSTILE, "score": 0.5, "flagged": True,
            "picture": Image.new("RGB", (4, 4))}
    page = render(
        "anomaly.html", title=HOSTILE, threshold=0.25, rule={"rule": HOSTILE}, metrics={
            "recall_at_threshold": 1.0, "false_alarm_rate_at_threshold": 0.0, "recall_at_threshold_ci95": [0.4, 1.0],
            "false_alarm_rate_at_threshold_ci95": [0.0, 0.6], "ci95_method": "Wilson score interval"}, histogram=None,
        summary={"aupro": float("nan")}, columns=["images", "pixel_auroc"],
        per_type={HOSTILE: {"images": 3, "pixel_auroc": None}},
        skipped=[{"path": f"{HOSTILE}.png", "reason": HOSTILE}], misses=[card], alarms=[],
    )
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert page.count("data:image/png;base64,") == 1 and "nan" not in page and formatting.MISSING in page
    assert "visiontune" in page and "generated" in page  # base.html's header


def test_render_page_replaces_a_page_only_with_a_complete_one(tmp_path: Path):
    path = tmp_path / "out" / "report.html"
    assert render_page("base.html", path, title="first", generated="then") == path
    assert "<h1>first</h1>" in path.read_text() and "generated then" in path.read_text()
    with pytest.raises(jinja2.UndefinedError):
        render_page("base.html", path)  # no title: nothing is written
    assert "<h1>first</h1>" in path.read_text()
    assert [p.name for p in path.parent.iterdir()] == ["report.html"]  # no temporary file left
