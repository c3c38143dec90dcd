"""`visiontune serve`: an HTTP API and upload page over classifier runs and anomaly models."""
