"""Utilities shared by the tools and the tests."""
from .dataset_check import (AnnotationFileError, DatasetError, DatasetNotFoundError, check_dataset,
                            coco_annotation_problem, missing_dataset_files)
from .pretrained_check import (PretrainedDigestError, PretrainedNotFoundError,
                               PretrainedWeightsError, check_pretrained_weights, file_sha256,
                               missing_pretrained_weights)
from .quiet_logs import mmengine_logs_to_file
from .resume import ResumeError, prepare_resume
from .tool_config import build_runner, load_tool_config

__all__ = ['AnnotationFileError', 'DatasetError', 'DatasetNotFoundError', 'check_dataset',
           'coco_annotation_problem', 'missing_dataset_files', 'load_tool_config', 'build_runner',
           'ResumeError', 'prepare_resume', 'mmengine_logs_to_file', 'PretrainedNotFoundError',
           'PretrainedDigestError', 'PretrainedWeightsError', 'check_pretrained_weights',
           'file_sha256', 'missing_pretrained_weights']
