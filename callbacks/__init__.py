"""pmetal.callbacks: Lightning callbacks (rollouts, checkpoints, throughput, plots, guards)."""
