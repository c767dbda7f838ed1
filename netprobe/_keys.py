"""Facts about netprobe's logged metrics that both the monitors and the readers of their logs
need (see the keys table in docs/lightning.md). Knows nothing of Lightning."""

__all__ = ["MODEL_LEVEL", "BEST_TRACKED"]

#: metrics of the whole model, logged as ``netprobe/<metric>`` only (no per-layer key)
MODEL_LEVEL = ("probe_accuracy",)
#: metrics with a better direction (higher), whose best value so far over the run's measurements
#: is also logged, as ``netprobe/best/<metric>`` (the HParams tab shows it beside the final value)
BEST_TRACKED = ("reliance_auc", "reliance_area", "noise_auc", "probe_accuracy")
