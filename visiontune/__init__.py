"""visiontune: a folder of images in, a fine-tuned vision model with honest numbers out.

    >>> import visiontune
    >>> run = visiontune.fit("data/", model="resnet18", epochs=5)
    >>> run.summary["val"]["accuracy"]
"""

from visiontune._version import __version__
from visiontune.comparison import ComparisonResult, compare
from visiontune.config import TrainConfig
from visiontune.data.validate import check_data
from visiontune.errors import UserError
from visiontune.run import Run, load_run
from visiontune.training.finetune import fit
from visiontune.training.lr_find import LrFindResult, lr_find

__all__ = [
    "ComparisonResult", "LrFindResult", "Run", "TrainConfig", "UserError", "__version__", "check_data",
    "compare", "fit", "load_run", "lr_find",
]
