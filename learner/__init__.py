"""Online learner: river models over telemetry windows, the recommendation policy, drift detection and checkpoints."""
