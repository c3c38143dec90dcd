"""Frozen features of any backbone layer (`extraction.extract`) and quick classifiers on them
(`probes.probe`), stored as .npz / .parquet (`store`)."""
