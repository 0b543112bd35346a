"""The generic training substrate: state, optimiser, checkpoints, metrics and the step loop."""
