"""Object detection: annotations in the common formats, the R-CNN region pipeline and Faster R-CNN.

`annotations.py` parses COCO / VOC / YOLO / masks and splits by image, `synthetic.py` writes
generated tiles, `faster_rcnn.py` and `rcnn.py` are the two methods (`methods.py` dispatches on a
run's `method`), `evaluation.py` scores boxes, `workflow.py` fits a run and `run.py` reads it back.

    >>> from visiontune import detect
    >>> coco = detect.make_tiles("tiles/", 400)
    >>> run = detect.fit(coco, "tiles/images", "runs/tiles")
    >>> rows, skipped = detect.load("runs/tiles").predict(["new.png"])
"""

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__, submod_attrs={
        "annotations": ["load_annotations", "split_detection_set"], "run": ["DetectorRun", "load"],
        "synthetic": ["make_tiles"], "workflow": ["fit"],
    },
)
