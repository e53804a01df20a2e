"""The training engine: feature cache, metrics log, checkpoints and the stage-running loop."""
