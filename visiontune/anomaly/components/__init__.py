"""Parts shared by the anomaly detectors: feature extraction, coreset selection, per-position
Gaussians, anomaly maps and thresholds. Each works on tensors and knows nothing of files."""
