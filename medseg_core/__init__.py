"""medseg_core: the Ray-free library (models, losses, metrics, transforms, layouts, io,
checkpoints, inference, plots). Nothing in this package imports Ray."""

__version__ = "0.1.0"
