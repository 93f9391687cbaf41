"""Utilities shared by the tools and the tests."""
from .dataset_check import DatasetNotFoundError, check_dataset, missing_dataset_files

__all__ = ['DatasetNotFoundError', 'check_dataset', 'missing_dataset_files']
