"""Fail fast, with directions, when the dataset a config reads is not usable.

Without this check a Runner builds the model, the hooks and the dataloaders
before the dataset raises a bare ``FileNotFoundError`` from deep inside
``pycocotools``, or an error that names neither the file nor the problem for
an annotation file that is not COCO (``annotation file format <class 'list'>
not supported``) or lists no image (``need at least one array to
concatenate``). The check names every missing file up front and says how to
point the config elsewhere, then reads the annotation files of COCO-style
datasets once and names the first one that cannot work.
"""
import json
import os
import os.path as osp
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

from mmdet.datasets import CocoDataset
from mmdet.registry import DATASETS
from mmengine.config import Config, ConfigDict


# Annotation files above this size are left to the dataset's own loading: parsing
# COCO train2017's 448 MB twice would cost seconds and gigabytes on every rank.
MAX_CHECKED_ANN_BYTES = 64 * 2**20


class DatasetError(Exception):
    """The dataset of a config cannot be used."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """The annotation files or image folders of a config do not exist."""


class AnnotationFileError(DatasetError, ValueError):
    """An annotation file of a config is not a usable COCO annotation file."""


def _leaf_datasets(dataset: ConfigDict) -> Iterator[ConfigDict]:
    """``dataset`` and the datasets it wraps: ``dataset`` (``RepeatDataset``,
    ``ClassBalancedDataset``, ...) and ``datasets`` (``ConcatDataset``)."""
    if isinstance(dataset.get('dataset'), dict):
        yield from _leaf_datasets(dataset['dataset'])
    for sub_dataset in dataset.get('datasets') or []:
        yield from _leaf_datasets(sub_dataset)
    yield dataset


def _ann_file(dataset: ConfigDict) -> Optional[str]:
    """The annotation file of one dataset config, joined with ``data_root``
    as mmengine's ``BaseDataset`` joins it."""
    if not dataset.get('ann_file'):
        return None
    return osp.join(dataset.get('data_root') or '', dataset['ann_file'])


def _dataset_paths(dataset: ConfigDict) -> List[str]:
    """Annotation files and image folders that a dataset config reads, wrapped
    datasets included."""
    paths = []
    for leaf in _leaf_datasets(dataset):
        data_root = leaf.get('data_root') or ''
        ann_file = _ann_file(leaf)
        if ann_file:
            paths.append(ann_file)
        for prefix in (leaf.get('data_prefix') or {}).values():
            if prefix:
                paths.append(osp.join(data_root, prefix))
    return paths


def _evaluator_paths(evaluator: Union[dict, list]) -> List[str]:
    """Ground-truth files that an evaluator config (e.g. ``CocoMetric``) reads."""
    metrics = evaluator if isinstance(evaluator, (list, tuple)) else [evaluator]
    return [metric['ann_file'] for metric in metrics if metric.get('ann_file')]


def missing_dataset_files(cfg: Config, keys: Sequence[str]) -> List[Tuple[str, str]]:
    """List the dataset files of ``cfg`` that do not exist.

    Args:
        cfg (Config): A full mmengine config (after ``--cfg-options``).
        keys (Sequence[str]): Top-level keys to look at: dataloaders such as
            ``'train_dataloader'`` (their ``dataset``) and evaluators such as
            ``'val_evaluator'`` (their ``ann_file``). Absent or ``None``
            entries are skipped.

    Returns:
        list[tuple[str, str]]: ``(key, path)`` for each missing local path.
        Remote paths (``s3://...`` and other URIs) are not checked.
    """
    missing = []
    for key in keys:
        section = cfg.get(key)
        if not section:
            continue
        paths = (_dataset_paths(section['dataset']) if key.endswith('_dataloader') else
                 _evaluator_paths(section))
        missing += [(key, path) for path in paths
                    if '://' not in path and not osp.exists(path)]
    return missing


def coco_annotation_problem(path: str) -> Optional[str]:
    """What makes ``path`` unusable as the COCO annotation file of a dataset.

    Args:
        path (str): A local annotation file.

    Returns:
        str, optional: The problem in words (not JSON, not a JSON object, no
        ``images`` or ``categories`` list, no image at all), or None when
        the file has the layout that mmdet's ``CocoDataset`` reads.
    """
    try:
        with open(path, encoding='utf-8') as f:
            content = json.load(f)
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError
        return f'not valid JSON ({err})'
    layout = ('a COCO annotation file is a JSON object with "images", "annotations" and '
              '"categories" lists')
    if not isinstance(content, dict):
        return f'the top level is a JSON {type(content).__name__}; {layout}'
    for key in ('images', 'categories'):
        if not isinstance(content.get(key), list):
            return f'no "{key}" list; {layout}'
    if not content['images']:
        return '"images" is empty: the dataset has no image'
    return None


def _is_coco_dataset(dataset: ConfigDict) -> bool:
    """Whether a dataset config builds a ``CocoDataset`` (or a subclass: LVIS, ...)."""
    dataset_type = dataset.get('type')
    if isinstance(dataset_type, str):
        dataset_type = DATASETS.get(dataset_type)
    return isinstance(dataset_type, type) and issubclass(dataset_type, CocoDataset)


def _coco_annotation_files(cfg: Config, keys: Sequence[str]) -> Dict[str, str]:
    """``{path: key}`` for the local annotation files of the COCO-style datasets
    of the dataloaders among ``keys``."""
    files: Dict[str, str] = {}
    for key in keys:
        section = cfg.get(key)
        if not section or not key.endswith('_dataloader'):
            continue
        for dataset in _leaf_datasets(section['dataset']):
            path = _ann_file(dataset)
            if path and '://' not in path and _is_coco_dataset(dataset):
                files.setdefault(path, key)
    return files


def _missing_message(missing: List[Tuple[str, str]]) -> str:
    """The missing files and the ways out."""
    lines = ['The dataset of this config is not on disk. Missing (relative to '
             f'{os.getcwd()}):']
    lines += [f'  {path}  ({key})' for key, path in missing]
    overrides = {}  # one override per config key, in order
    for key, path in missing:
        overrides.setdefault(key, f'{key}.dataset.data_root=/path/to/data/'
                             if key.endswith('_dataloader') else
                             f'{key}.ann_file=/path/to/data/annotations/{osp.basename(path)}')
    lines += [
        'To fix it, either',
        '  - put the dataset at the paths above (for COCO 2017: annotations/, train2017/ and '
        'val2017/ under the data root), or',
        '  - point the config at your copy: set `data_root` in the config (where its '
        'dataloaders and evaluators use it), or add',
        '      --cfg-options ' + ' '.join(overrides.values()),
        '  - or try the pipeline on generated data instead: `make demo` (synthetic COCO, '
        'a few minutes on a CPU).',
    ]
    return '\n'.join(lines)


def check_dataset(cfg: Config, keys: Sequence[str]) -> None:
    """Raise a :class:`DatasetError` if the dataset of ``cfg`` cannot be used.

    Raises :class:`DatasetNotFoundError` when dataset files are missing: the
    message lists them and the ways out (put the data there, point the
    config at it with ``data_root`` or ``--cfg-options``, or run the
    synthetic demo). Then reads the annotation file of each COCO-style
    dataset up to ``MAX_CHECKED_ANN_BYTES`` (one JSON parse each) and raises
    :class:`AnnotationFileError` naming the first one that cannot work and
    why (see :func:`coco_annotation_problem`).

    Args:
        cfg (Config): A full mmengine config (after ``--cfg-options``).
        keys (Sequence[str]): See :func:`missing_dataset_files`.

    Example:
        >>> cfg = Config.fromfile('configs/faster_rcnn_r50_sbp.py')  # doctest: +SKIP
        >>> check_dataset(cfg, ['train_dataloader', 'val_evaluator'])  # doctest: +SKIP
    """
    missing = missing_dataset_files(cfg, keys)
    if missing:
        raise DatasetNotFoundError(_missing_message(missing))
    for path, key in _coco_annotation_files(cfg, keys).items():
        if osp.getsize(path) > MAX_CHECKED_ANN_BYTES:
            continue
        problem = coco_annotation_problem(path)
        if problem is not None:
            raise AnnotationFileError(f'Annotation file {path} ({key}): {problem}')
