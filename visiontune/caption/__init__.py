"""Image captioning on frozen backbone features: `visiontune caption train | predict | evaluate`.

`decoders.py` and `search.py` are pure torch (a Transformer decoder with cross-attention over the
spatial grid, a Show-Attend-and-Tell LSTM, beam search); `data.py`, `vocab.py`, `encoder.py` and
`metrics.py` are the glue, `scenes.py` the demo data; `workflow.py` trains, `run.py` loads a
caption run back, predicts and evaluates, `report.py` writes its HTML page.

    >>> from visiontune import caption
    >>> caption.make_scenes("scenes/", {"train": 2000, "val": 300, "test": 300})
    >>> run = caption.fit("scenes/captions.csv", model="tf_efficientnet_lite0", weights="lite0.safetensors")
    >>> captions, skipped = caption.load(run.dir).predict(["new.png"], beam=3)
"""

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__, submod_attrs={
        "run": ["CaptionRun", "load"], "workflow": ["fit"], "scenes": ["make_scenes", "relation_correct"],
    },
)
