"""Datasets in memory, their partition across clients, and reports on the label spread."""

from fedslim.data.datasets import load_dataset, resolve_root
from fedslim.data.formats import DataError
from fedslim.data.partition import make_partition, split_local_test
from fedslim.data.report import format_label_report, label_counts, plot_label_counts
from fedslim.data.types import DatasetBundle, TensorData

__all__ = [
    "DataError",
    "DatasetBundle",
    "TensorData",
    "format_label_report",
    "label_counts",
    "load_dataset",
    "make_partition",
    "plot_label_counts",
    "resolve_root",
    "split_local_test",
]
