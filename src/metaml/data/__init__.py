"""Datasets: each is a :class:`ClassDataset` (labelled images) or a ``TaskFamily`` (e.g. sinusoid).

Example:
    >>> from metaml.data import load, list_datasets
    >>> load("sinusoid").task_type
    'regression'
"""

from metaml.data.class_dataset import ClassDataset
from metaml.data.glyphs import glyphs_manifest, load_glyphs
from metaml.data.omniglot import load_omniglot
from metaml.data.readers import (
    Preprocess,
    cache_dir,
    read_folder,
    read_idx,
    read_images,
    read_npz,
    read_zip,
)
from metaml.data.registry import list_datasets, load, register_dataset
from metaml.data.sinusoid import Sinusoid, SinusoidParams

__all__ = [
    "ClassDataset",
    "Preprocess",
    "Sinusoid",
    "SinusoidParams",
    "cache_dir",
    "glyphs_manifest",
    "list_datasets",
    "load",
    "load_glyphs",
    "load_omniglot",
    "read_folder",
    "read_idx",
    "read_images",
    "read_npz",
    "read_zip",
    "register_dataset",
]
