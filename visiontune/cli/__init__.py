"""The `visiontune` command: typer apps that parse arguments and hand them to the Python API.

Modules here import only what parsing and help texts need (typer, rich, the pydantic TrainConfig,
the lazily loaded `visiontune` API). Whatever loads torch, lightning, timm, optuna or scikit-learn
is imported inside the command function that uses it, once its arguments are parsed. Startup time
is the only reason for such a function-level import: `visiontune --help` and a mistyped option
answer at once, not after seconds of importing torch.
"""
