"""useg library: data, artifacts, models, algorithms and metrics for unsupervised segmentation."""

__version__ = "0.1.0"
