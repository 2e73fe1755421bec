"""pmetal.callbacks: Lightning callbacks (rollouts, checkpoints, throughput, plots, guards).

    from pmetal.callbacks import RolloutCallback, ThroughputMonitor

Classes are imported on first use (Lightning costs seconds to import), as in `pmetal.modules`.
"""

from __future__ import annotations

from pmetal.lazy import lazy_exports

_EXPORTS = {
    "RolloutCallback": "pmetal.callbacks.rollout",
    "NanGuard": "pmetal.callbacks.guards",
    "AtomicCheckpointIO": "pmetal.callbacks.checkpoint",
    "ExportOnTrainEnd": "pmetal.callbacks.checkpoint",
    "LossHistory": "pmetal.callbacks.plots",
    "ThroughputMonitor": "pmetal.callbacks.throughput",
}

__all__ = list(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
