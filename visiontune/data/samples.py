"""The labelled image records every data source produces and every split and loader consumes."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Sample:
    path: str  # absolute path
    label: str
    split: str  # "train", "val" or "test"


@dataclass
class SampleSet:
    """The samples of a data source, with what was noticed while listing them."""

    samples: list[Sample]
    source: str  # "folders", "split_folders", "csv" or "regex"
    root: str
    empty_classes: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def labels(self) -> list[str]:
        return sorted({s.label for s in self.samples})
