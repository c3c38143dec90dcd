"""`visiontune tune`: Optuna search over training options on one fixed split (`search.tune`)."""
