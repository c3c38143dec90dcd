"""visiontune: a folder of images in, a fine-tuned vision model with honest numbers out.

    >>> import visiontune
    >>> run = visiontune.fit("data/", model="resnet18", epochs=5)
    >>> run.summary["val"]["accuracy"]

The API is imported on first use, so `import visiontune` (and the CLI's `--help`) loads no torch.
"""

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "_version": ["__version__"],
        "comparison": ["ComparisonResult", "compare"],
        "config": ["TrainConfig"],
        "data.validate": ["check_data"],
        "errors": ["UserError"],
        "run": ["Run", "load_run"],
        "training.finetune": ["fit"],
        "training.lr_find": ["LrFindResult", "lr_find"],
    },
)
