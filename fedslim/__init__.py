"""fedslim: model-heterogeneous federated learning with model compression."""

__version__ = "0.1.0"
