"""`visiontune.fit` in a process of its own, for the DDP tests (test_distributed.py).

The one argument is JSON: {"data", "options"} for a new run or {"resume", "options"} (launch
options only) to continue one; "stop_after": N stops every rank after epoch N's checkpoint,
as an interrupted run would stop. With devices > 1 Fabric starts the other processes by running
this script again.
"""

from __future__ import annotations

import json
import sys

import visiontune

STOPPED = 3  # the exit status of a run stopped on purpose


class StopAfter:
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_end(self, trainer, record: dict) -> None:
        if record["epoch"] == self.epoch:
            raise SystemExit(STOPPED)


def main() -> None:
    spec = json.loads(sys.argv[1])
    callbacks = [StopAfter(spec["stop_after"])] if spec.get("stop_after") else []
    if spec.get("resume"):
        visiontune.fit(resume=spec["resume"], callbacks=callbacks, progress=False, **spec["options"])
    else:
        visiontune.fit(spec["data"], callbacks=callbacks, **spec["options"])


if __name__ == "__main__":
    main()
