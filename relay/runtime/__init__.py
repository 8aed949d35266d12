"""The running relay: the service built from a config, workers, metrics, logs."""
