"""Utilities shared by the tools and the tests."""
from .dataset_check import DatasetNotFoundError, check_dataset, missing_dataset_files
from .tool_config import load_tool_config

__all__ = ['DatasetNotFoundError', 'check_dataset', 'missing_dataset_files',
           'load_tool_config']
