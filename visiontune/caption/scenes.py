"""Synthetic captioned scenes: 1-3 coloured shapes and captions from a small grammar with spatial
relations ("a small red circle left of a large blue square"). Each caption is true of its image,
so a captioner's relation words can be checked against the scene itself (`relation_correct`).
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 80, 230), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.09, "large": 0.17}  # radius as a share of the image side
INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
SCENES_FILE, CAPTIONS_FILE = "scenes.json", "captions.csv"


@dataclass(frozen=True)
class Shape:
    shape: str
    colour: str
    size: str
    x: float  # centre, as a share of the width / height
    y: float

    @property
    def words(self) -> str:
        return f"{self.size} {self.colour} {self.shape}"


def relation(a: Shape, b: Shape) -> str:
    """Where `a` is from `b`, along the axis on which they are further apart."""
    dx, dy = a.x - b.x, a.y - b.y
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def captions_for(shapes: list[Shape], rng: np.random.Generator) -> list[str]:
    """Three true captions of one scene (word order and phrasing vary, the facts do not)."""
    if len(shapes) == 1:
        (a,) = shapes
        where = "on the left" if a.x < 1 / 3 else "on the right" if a.x > 2 / 3 else "in the middle"
        return [f"a {a.words} {where}", f"there is a {a.words} {where}", f"a {a.words}"]
    if len(shapes) == 2:
        a, b = shapes if rng.random() < 0.5 else shapes[::-1]
        rel = relation(a, b)
        return [f"a {a.words} {rel} a {b.words}", f"a {b.words} {INVERSE[rel]} a {a.words}",
                f"a {a.words} is {rel} a {b.words}"]
    a, b, c = sorted(shapes, key=lambda s: s.x)
    return [f"a {a.words} , a {b.words} and a {c.words} from left to right",
            f"from left to right a {a.words} , a {b.words} and a {c.words}",
            f"a {a.words} left of a {b.words} left of a {c.words}"]


def random_scene(rng: np.random.Generator, max_tries: int = 200) -> list[Shape]:
    """1-3 shapes that do not overlap; two shapes are clearly apart along one axis and three stand
    in separate columns, so every relation word of the grammar is unambiguous."""
    count = int(rng.integers(1, 4))
    for _ in range(max_tries):
        shapes = [Shape(str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS))), str(rng.choice(list(SIZES))),
                      float(rng.uniform(0.2, 0.8)), float(rng.uniform(0.2, 0.8))) for _ in range(count)]
        if len({s.words for s in shapes}) < count or not _apart(shapes):
            continue
        if count == 2:
            dx, dy = abs(shapes[0].x - shapes[1].x), abs(shapes[0].y - shapes[1].y)
            if max(dx, dy) < 1.6 * min(dx, dy) + 0.05:
                continue
        if count == 3 and min(np.diff(sorted(s.x for s in shapes))) < 0.2:
            continue
        return shapes
    return shapes[:1]


def _apart(shapes: list[Shape]) -> bool:
    for i, a in enumerate(shapes):
        for b in shapes[i + 1:]:
            if np.hypot(a.x - b.x, a.y - b.y) < SIZES[a.size] + SIZES[b.size] + 0.04:
                return False
    return True


def draw(shapes: list[Shape], size: int, rng: np.random.Generator) -> Image.Image:
    background = rng.normal(40, 12, (size, size, 3)).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(background)
    pen = ImageDraw.Draw(image)
    for s in shapes:
        cx, cy, r = s.x * size, s.y * size, SIZES[s.size] * size
        fill = COLOURS[s.colour]
        if s.shape == "circle":
            pen.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif s.shape == "square":
            pen.rectangle([cx - 0.85 * r, cy - 0.85 * r, cx + 0.85 * r, cy + 0.85 * r], fill=fill)
        else:
            pen.polygon([(cx, cy - r), (cx - r, cy + 0.8 * r), (cx + r, cy + 0.8 * r)], fill=fill)
    return image


def make_scenes(out: str | Path, counts: dict[str, int], image_size: int = 128, seed: int = 0) -> Path:
    """`out/images/*.png`, `out/captions.csv` (image,caption,split; three captions per image) and
    `out/scenes.json` (every shape of every image, for `relation_correct`). Returns the CSV."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows, scenes = [], {}
    for split, count in counts.items():
        for i in range(count):
            shapes = random_scene(rng)
            name = f"images/{split}_{i:05d}.png"
            draw(shapes, image_size, rng).save(out / name)
            scenes[name] = [asdict(s) for s in shapes]
            rows += [(name, caption, split) for caption in captions_for(shapes, rng)]
    with open(out / CAPTIONS_FILE, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "caption", "split"])
        writer.writerows(rows)
    (out / SCENES_FILE).write_text(json.dumps(scenes), encoding="utf-8")
    return out / CAPTIONS_FILE


def load_scenes(folder: str | Path) -> dict[str, list[Shape]]:
    raw = json.loads((Path(folder) / SCENES_FILE).read_text(encoding="utf-8"))
    return {name: [Shape(**s) for s in shapes] for name, shapes in raw.items()}


_PAIR = re.compile(r"^(?:there is )?a (\w+ \w+ \w+) (?:is )?(left of|right of|above|below) a (\w+ \w+ \w+)$")


def relation_correct(caption: str, shapes: list[Shape], axis_only: bool = False) -> bool:
    """True when a two-shape caption names both shapes of the scene and the relation that holds
    between them; anything else (a missing or wrong relation, a shape that is not there) is False.
    `axis_only`: the relation only has to be on the right axis ("right of" for "left of" counts)."""
    match = _PAIR.match(" ".join(caption.lower().split()))
    if not match:
        return False
    by_words = {s.words: s for s in shapes}
    a, b = by_words.get(match.group(1)), by_words.get(match.group(3))
    if a is None or b is None or a is b:
        return False
    said, true = match.group(2), relation(a, b)
    return said in (true, INVERSE[true]) if axis_only else said == true
