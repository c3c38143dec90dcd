"""The search space: defaults, YAML overrides and the messages for spaces that cannot work."""

from __future__ import annotations

import optuna
import pytest

from visiontune.config import build_config
from visiontune.errors import UserError
from visiontune.tune.space import DEFAULT_SPACE, load_space, space_yaml


def test_default_space_covers_the_recipe_and_fixed_options_leave_it():
    names = {p.name for p in load_space(None, {})}
    assert names == set(DEFAULT_SPACE)
    assert {"lr", "weight_decay", "batch_size", "freeze_epochs", "lr_mult", "schedule", "pct_start",
            "augment", "loss", "balance"} <= names
    fixed = {p.name for p in load_space(None, {"batch_size": 8, "augment": "none"})}
    assert fixed == set(DEFAULT_SPACE) - {"batch_size", "augment"}


def test_default_freeze_epochs_never_exceeds_the_fixed_epochs():
    (freeze,) = [p for p in load_space(None, {"epochs": 1}) if p.name == "freeze_epochs"]
    assert (freeze.low, freeze.high) == (0, 1)


def test_yaml_space_replaces_the_default_and_samples_valid_configs(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("lr: {type: float, low: 1e-4, high: 1e-2, log: true}\n"  # 1e-4: a YAML string
                    "augment: {type: categorical, choices: [none, light]}\n"
                    "epochs: {type: int, low: 2, high: 6, step: 2}\n")
    params = load_space(path, {"freeze_epochs": 1})
    assert [p.name for p in params] == ["lr", "augment", "epochs"]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        trial = study.ask()
        values = {p.name: p.suggest(trial) for p in params}
        assert 1e-4 <= values["lr"] <= 1e-2 and values["augment"] in ("none", "light")
        assert values["epochs"] in (2, 4, 6)
        build_config({"freeze_epochs": 1, **values})
        study.tell(trial, 0.0)
    assert load_space({p.name: p.to_dict() for p in params}, {}) == params  # round trip
    assert "log: true" in space_yaml(params)


@pytest.mark.parametrize(
    "space, message",
    [
        ({"lrr": {"type": "float", "low": 0.1, "high": 0.2}}, "unknown option 'lrr' in the search space (did you mean 'lr'?)"),
        ({"seed": {"type": "int", "low": 0, "high": 3}}, "'seed' in the search space cannot be searched"),
        ({"lr": {"type": "uniform", "low": 0.1, "high": 0.2}}, "needs a mapping with type: float, int or categorical"),
        ({"lr": {"type": "float", "low": 0.1, "high": 0.2, "choices": [1]}}, "unknown key(s) choices for type float"),
        ({"lr": {"type": "float", "low": 0.2, "high": 0.1}}, "low (0.2) must be below high (0.1)"),
        ({"lr": {"type": "float", "low": "small", "high": 0.1}}, "needs numeric low and high"),
        ({"lr": {"type": "float", "low": 0.0, "high": 0.1, "log": True}}, "log needs low > 0"),
        ({"lr": {"type": "float", "low": 0.0, "high": 0.1}}, "'lr' in the search space allows 0.0, which is not a valid run"),
        ({"augment": {"type": "categorical", "choices": ["none", "extreme"]}}, "allows 'extreme', which is not a valid run"),
        ({"augment": {"type": "categorical", "choices": []}}, "non-empty list of choices"),
        ({"freeze_epochs": {"type": "int", "low": 0, "high": 9}}, "freeze_epochs (9) exceeds epochs (6)"),
    ],
)
def test_bad_spaces_fail_before_any_trial_with_one_message(space, message):
    with pytest.raises(UserError) as info:
        load_space(space, {})
    assert message in str(info.value)


def test_space_files_are_checked(tmp_path):
    with pytest.raises(UserError, match="search space file not found"):
        load_space(tmp_path / "missing.yaml", {})
    (tmp_path / "list.yaml").write_text("- lr\n")
    with pytest.raises(UserError, match="must map option names to distributions"):
        load_space(tmp_path / "list.yaml", {})
    with pytest.raises(UserError, match="nothing to search"):
        load_space({"lr": {"type": "float", "low": 0.1, "high": 0.2}}, {"lr": 0.01})
