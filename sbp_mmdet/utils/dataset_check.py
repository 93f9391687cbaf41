"""Fail fast, with directions, when the dataset a config reads is not on disk.

Without this check a Runner builds the model, the hooks and the dataloaders
before the dataset raises a bare ``FileNotFoundError`` from deep inside
``pycocotools``; the check names every missing file up front and says how to
point the config elsewhere.
"""
import os
import os.path as osp
from typing import List, Sequence, Tuple, Union

from mmengine.config import Config, ConfigDict


class DatasetNotFoundError(FileNotFoundError):
    """The annotation files or image folders of a config do not exist."""


def _dataset_paths(dataset: ConfigDict) -> List[str]:
    """Annotation files and image folders that a dataset config reads.

    Paths are joined with ``data_root`` as mmengine's ``BaseDataset`` joins
    them. Dataset wrappers are followed: ``dataset`` (``RepeatDataset``,
    ``ClassBalancedDataset``, ...) and ``datasets`` (``ConcatDataset``).
    """
    paths = []
    if isinstance(dataset.get('dataset'), dict):
        paths += _dataset_paths(dataset['dataset'])
    for sub_dataset in dataset.get('datasets') or []:
        paths += _dataset_paths(sub_dataset)
    data_root = dataset.get('data_root') or ''
    if dataset.get('ann_file'):
        paths.append(osp.join(data_root, dataset['ann_file']))
    for prefix in (dataset.get('data_prefix') or {}).values():
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


def check_dataset(cfg: Config, keys: Sequence[str]) -> None:
    """Raise :class:`DatasetNotFoundError` if a dataset file of ``cfg`` is missing.

    The message lists the missing files and the ways out: put the data there,
    point the config at it (``data_root`` or ``--cfg-options``), or run the
    synthetic demo.

    Args:
        cfg (Config): A full mmengine config (after ``--cfg-options``).
        keys (Sequence[str]): See :func:`missing_dataset_files`.

    Example:
        >>> cfg = Config.fromfile('configs/faster_rcnn_r50_sbp.py')  # doctest: +SKIP
        >>> check_dataset(cfg, ['train_dataloader', 'val_evaluator'])  # doctest: +SKIP
    """
    missing = missing_dataset_files(cfg, keys)
    if not missing:
        return
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
    raise DatasetNotFoundError('\n'.join(lines))
