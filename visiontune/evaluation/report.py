"""RUN/report.html: one self-contained page (images inlined, no network) a person can read.

Built only from files already in the run directory (summary, metrics, eval/*/metrics.json and
figures), so it can be regenerated at any time with `visiontune report RUN`.
"""

from __future__ import annotations

import base64
import csv
import json
from pathlib import Path

import jinja2

from visiontune._version import __version__
from visiontune.evaluation.evaluate import HONESTY_NOTE
from visiontune.io import write_text_atomic
from visiontune.models.classifier_run import ClassifierRun

SECTIONS = ("config", "data", "training", "evaluation", "explanations", "timings")

TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>visiontune report: {{ title }}</title>
<style>
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1em}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{max-width:100%;border:1px solid #eee}
.note{background:#f6f8fa;border-left:4px solid #888;padding:.5em 1em}.warn{color:#a15c00}.err{color:#b00020}
section{margin-bottom:2.5em}code{background:#f3f3f3;padding:0 .2em}
</style></head><body>
<h1>visiontune report: {{ title }}</h1>
<p>{{ model }} on {{ labels|length }} classes ({{ labels|join(", ") }}); visiontune {{ version }}, device {{ device }}.</p>
<section id="config"><h2>Configuration</h2><table>
{% for k, v in config.items() %}<tr><td>{{ k }}</td><td>{{ v }}</td></tr>{% endfor %}</table></section>
<section id="data"><h2>Data</h2><table><tr><th>class</th>{% for s in splits %}<th>{{ s }}</th>{% endfor %}</tr>
{% for label in labels %}<tr><td>{{ label }}</td>{% for s in splits %}<td>{{ counts[s][label] }}</td>{% endfor %}</tr>{% endfor %}</table>
{% for e in checks.errors %}<p class="err">data check: {{ e }}</p>{% endfor %}
{% for w in checks.warnings %}<p class="warn">data check: {{ w }}</p>{% endfor %}
<h3>Skipped files ({{ skipped|length }})</h3>{% if skipped %}<table><tr><th>file</th><th>reason</th></tr>
{% for s in skipped %}<tr><td>{{ s.path }}</td><td>{{ s.reason }}</td></tr>{% endfor %}</table>{% else %}<p>none</p>{% endif %}</section>
<section id="training"><h2>Training</h2><p>Best epoch {{ best_epoch }} of {{ epochs_run }} on {{ monitor }}.</p>
{% if kept == "probe" %}<p class="warn">Kept: the linear probe (epoch 0), the fitted head on the frozen pretrained backbone: no fine-tuned epoch beat it on validation {{ monitor }}.</p>
{% elif probe %}<p>Linear probe (epoch 0): validation accuracy {{ "%.4f"|format(probe.val_accuracy) }}, macro-F1 {{ "%.4f"|format(probe.val_f1_macro) }}; fine-tuning beat it.</p>{% endif %}
{% if history_png %}<img alt="training curves" src="data:image/png;base64,{{ history_png }}">{% endif %}
<table><tr>{% for c in history_columns %}<th>{{ c }}</th>{% endfor %}</tr>
{% for row in history %}<tr>{% for c in history_columns %}<td>{{ row[c] }}</td>{% endfor %}</tr>{% endfor %}</table></section>
<section id="evaluation"><h2>Evaluation</h2><p class="note">{{ honesty }}</p>
{% if not evals %}<p>Not evaluated yet: run <code>visiontune evaluate {{ run_dir }}</code>.</p>{% endif %}
{% for ev in evals %}<h3 id="eval-{{ ev.name }}">{{ ev.name }} ({{ ev.n }} images)</h3>
{% for note in ev.notes if note != honesty %}<p class="warn">{{ note }}</p>{% endfor %}
<table><tr><th>metric</th><th>value</th><th>95% CI</th></tr>
<tr><td>accuracy</td><td>{{ "%.4f"|format(ev.accuracy) }}</td><td>{{ ci(ev.bootstrap_95ci.accuracy) }}</td></tr>
<tr><td>macro-F1</td><td>{{ "%.4f"|format(ev.f1_macro) }}</td><td>{{ ci(ev.bootstrap_95ci.f1_macro) }}</td></tr>
<tr><td>weighted-F1</td><td>{{ "%.4f"|format(ev.f1_weighted) }}</td><td></td></tr>
<tr><td>ECE</td><td>{{ "%.4f"|format(ev.calibration.uncalibrated.ece) }}</td><td></td></tr>
{% if ev.binary and ev.binary.roc_auc is not none %}<tr><td>ROC AUC ({{ ev.binary.positive }})</td><td>{{ "%.4f"|format(ev.binary.roc_auc) }}</td><td></td></tr>{% endif %}
</table>
{% if ev.in_domain %}<table><tr><th>compared with</th><th>accuracy</th><th>macro-F1</th></tr>
<tr><td>in-domain {{ ev.in_domain.split }}</td><td>{{ "%.4f"|format(ev.in_domain.accuracy) }}</td><td>{{ "%.4f"|format(ev.in_domain.f1_macro) }}</td></tr>
<tr><td>{{ ev.name }}</td><td>{{ "%.4f"|format(ev.accuracy) }}</td><td>{{ "%.4f"|format(ev.f1_macro) }}</td></tr></table>{% endif %}
{% if ev.binary and ev.binary.threshold %}<p>Decision threshold {{ "%.4f"|format(ev.binary.threshold.threshold) }} for {{ ev.binary.positive }}, chosen on validation for recall &ge; {{ ev.binary.threshold.target_recall }}: precision {{ "%.3f"|format(ev.binary.threshold.here.precision) }}, recall {{ "%.3f"|format(ev.binary.threshold.here.recall) }} here.</p>{% endif %}
<table><tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>support</th></tr>
{% for label, r in ev.per_class.items() %}<tr><td>{{ label }}</td><td>{{ "%.3f"|format(r.precision) }}</td><td>{{ "%.3f"|format(r.recall) }}</td><td>{{ "%.3f"|format(r.f1) }}</td><td>{{ r.support }}</td></tr>{% endfor %}</table>
<h4>Most confused</h4>{% if ev.most_confused %}<table><tr><th>actual</th><th>predicted</th><th>count</th></tr>
{% for p in ev.most_confused %}<tr><td>{{ p.actual }}</td><td>{{ p.predicted }}</td><td>{{ p.count }}</td></tr>{% endfor %}</table>{% else %}<p>no confusions</p>{% endif %}
{% for key, img in ev.images.items() %}<figure><img alt="{{ key }}" src="data:image/png;base64,{{ img }}"><figcaption>{{ key|replace("_", " ") }}</figcaption></figure>{% endfor %}
{% endfor %}</section>
<section id="explanations"><h2>Explanations</h2>{% if explanations %}<p>Grad-CAM on the worst predictions: where the model looked.</p>
{% for ex in explanations %}<figure><img alt="explanation" src="data:image/png;base64,{{ ex.image }}"><figcaption>{{ ex.caption }}</figcaption></figure>{% endfor %}
{% else %}<p>No explanation images yet: run <code>visiontune evaluate {{ run_dir }}</code>.</p>{% endif %}</section>
<section id="timings"><h2>Timings</h2><table>{% for k, v in timings.items() %}<tr><td>{{ k }}</td><td>{{ v }}</td></tr>{% endfor %}</table></section>
</body></html>
"""


def write_report(run: ClassifierRun) -> Path:
    summary = run.summary
    evals = [_load_eval(path) for path in sorted((run.dir / "eval").glob("*/metrics.json"))]
    history = _read_csv(run.dir / "metrics.csv")
    page = jinja2.Environment(autoescape=True).from_string(TEMPLATE).render(
        title=run.dir.name, model=run.metadata["model"], labels=run.labels, version=__version__,
        device=summary.get("device", "?"), run_dir=str(run.dir),
        config={k: v for k, v in run.config.model_dump().items() if v is not None},
        splits=[s for s in ("train", "val", "test") if sum(summary["counts"][s].values())],
        counts=summary["counts"], checks=summary.get("data_checks", {"errors": [], "warnings": []}),
        skipped=summary["skipped"], best_epoch=summary["best_epoch"], epochs_run=summary["epochs_run"],
        monitor=summary["monitor"], history_png=_b64(run.dir / "history.png"),
        kept=summary.get("kept"), probe=summary.get("probe"),
        history=[{k: _short(v) for k, v in row.items()} for row in history],
        history_columns=list(history[0]) if history else [],
        honesty=HONESTY_NOTE, evals=evals, explanations=_explanations(run.dir / "eval"),
        timings={k: _short(v) for k, v in summary["timings"].items()},
        ci=lambda pair: f"{pair[0]:.4f} - {pair[1]:.4f}",
    )
    path = run.dir / "report.html"
    write_text_atomic(path, page)
    return path


def _load_eval(path: Path) -> dict:
    result = json.loads(path.read_text())
    result["images"] = {key: _b64(path.parent / name) for key, name in result.get("figures", {}).items()}
    return result


def _explanations(eval_dir: Path) -> list[dict]:
    found = []
    for png in sorted(eval_dir.glob("*/explanations/*.png")):
        found.append({"image": _b64(png), "caption": f"{png.parent.parent.name}: {png.stem}"})
    return found


def _b64(path: Path) -> str | None:
    return base64.b64encode(path.read_bytes()).decode("ascii") if path.is_file() else None


def _read_csv(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open() as handle:
        return list(csv.DictReader(handle))


def _short(value) -> str:
    """Numbers to 4 significant digits, lists (per-epoch times) summarised."""
    if isinstance(value, list):
        return ", ".join(_short(v) for v in value)
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    return f"{number:.4g}"
