"""Fail fast, with directions, when the dataset a config reads is not usable.

Without this check a Runner builds the model, the hooks and the dataloaders
before the dataset raises a bare ``FileNotFoundError`` from deep inside
``pycocotools``, or an error that names neither the file nor the problem for
an annotation file that is not COCO (``annotation file format <class 'list'>
not supported``) or has no image or no annotation (``need at least one array
to concatenate``); and mmdet drops unusable boxes and annotations of unknown
categories without a word. The check names every missing file up front and
says how to point the config elsewhere, then reads the annotation files of
COCO-style datasets once: it names the first one that cannot work (with the
count of what is wrong) and warns, with counts, about the annotations that
mmdet will drop.
"""
import json
import logging
import os
import os.path as osp
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

from mmdet.datasets import CocoDataset
from mmdet.registry import DATASETS
from mmengine.config import Config, ConfigDict
from mmengine.logging import print_log

# Annotation files above this size are left to the dataset's own loading: parsing
# COCO train2017's 448 MB twice would cost seconds and gigabytes on every rank.
MAX_CHECKED_ANN_BYTES = 64 * 2**20
# How many missing images or unknown category ids a message names.
MAX_NAMED = 5


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


def _load_coco(path: str) -> Tuple[Any, Optional[str]]:
    """The parsed content of ``path`` and what makes it unusable as a COCO
    annotation file (None when it has the layout mmdet's ``CocoDataset`` reads)."""
    try:
        with open(path, encoding='utf-8') as f:
            content = json.load(f)
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError
        return None, f'not valid JSON ({err})'
    layout = ('a COCO annotation file is a JSON object with "images", "annotations" and '
              '"categories" lists')
    if not isinstance(content, dict):
        return content, f'the top level is a JSON {type(content).__name__}; {layout}'
    for key in ('images', 'categories'):
        if not isinstance(content.get(key), list):
            return content, f'no "{key}" list; {layout}'
    if not content['images']:
        return content, '"images" is empty: the dataset has no image'
    return content, None


def coco_annotation_problem(path: str) -> Optional[str]:
    """What makes ``path`` unusable as the COCO annotation file of a dataset.

    Args:
        path (str): A local annotation file.

    Returns:
        str, optional: The problem in words (not JSON, not a JSON object, no
        ``images`` or ``categories`` list, no image at all), or None when
        the file has the layout that mmdet's ``CocoDataset`` reads.
    """
    return _load_coco(path)[1]


def _named(items: Sequence, total: int) -> str:
    """The first ``MAX_NAMED`` of ``items``, and how many more there are."""
    more = f', ... ({total - MAX_NAMED} more)' if total > MAX_NAMED else ''
    return ', '.join(str(item) for item in items[:MAX_NAMED]) + more


def _dropped_by_mmdet(ann: dict, image: Optional[dict]) -> bool:
    """Whether mmdet's ``CocoDataset.parse_data_info`` skips ``ann`` for its box:
    width or height below 1, area not positive, or no overlap with its image."""
    try:
        x1, y1, w, h = (float(v) for v in ann['bbox'])
    except (KeyError, TypeError, ValueError):
        return True
    if image is not None and 'width' in image and 'height' in image:
        inter_w = max(0.0, min(x1 + w, image['width']) - max(x1, 0.0))
        inter_h = max(0.0, min(y1 + h, image['height']) - max(y1, 0.0))
        if inter_w * inter_h == 0:
            return True
    return ann.get('area', w * h) <= 0 or w < 1 or h < 1


def coco_content_findings(content: dict, img_dir: Optional[str],
                          training: bool) -> Tuple[Optional[str], List[str]]:
    """What in a COCO annotation file's content stops training, and what mmdet drops.

    Args:
        content (dict): The parsed file (a COCO layout, see
            :func:`coco_annotation_problem`).
        img_dir (str, optional): The folder the dataset reads ``file_name``
            from, to check that every listed image exists; None (or a remote
            path) skips that check.
        training (bool): Whether a detector trains on it: then an empty or
            wholly unusable ``annotations`` list is an error (a test set may
            have no annotation).

    Returns:
        tuple[str | None, list[str]]: The error (images listed but missing; no
        usable annotation for training), and warnings with counts: annotations
        whose box mmdet drops (width or height < 1, area <= 0, outside the
        image) and annotations whose ``category_id`` is not in
        ``categories``, which mmdet drops too.
    """
    images = content['images']
    if img_dir is not None and '://' not in img_dir:
        missing = [image.get('file_name') for image in images
                   if not osp.isfile(osp.join(img_dir, str(image.get('file_name'))))]
        if missing:
            return (f'{len(missing)} of the {len(images)} images it lists are not in '
                    f'{img_dir}: {_named(missing, len(missing))}'), []
    annotations = content.get('annotations') or []
    by_id = {image.get('id'): image for image in images if isinstance(image, dict)}
    category_ids = {category.get('id') for category in content['categories']
                    if isinstance(category, dict)}
    bad_box = [ann for ann in annotations
               if _dropped_by_mmdet(ann, by_id.get(ann.get('image_id')))]
    unknown = [ann for ann in annotations if ann.get('category_id') not in category_ids]
    unknown_ids = sorted({str(ann.get('category_id')) for ann in unknown})
    warnings = []
    if bad_box:
        warnings.append(f'{len(bad_box)} of the {len(annotations)} annotations have a box that '
                        'mmdet drops (width or height < 1, area <= 0, or outside the image), '
                        f'e.g. annotation id {bad_box[0].get("id")} with bbox '
                        f'{bad_box[0].get("bbox")}')
    if unknown:
        warnings.append(f'{len(unknown)} of the {len(annotations)} annotations have a '
                        f'category_id that is not in "categories" '
                        f'({_named(unknown_ids, len(unknown_ids))}); mmdet drops them')
    if training and not annotations:
        return (f'"annotations" is empty ({len(images)} images, 0 annotations): a detector '
                'cannot train without boxes'), warnings
    if training and len({id(a) for a in bad_box + unknown}) == len(annotations):
        return (f'none of its {len(annotations)} annotations is usable: '
                + '; '.join(warnings)), []
    return None, warnings


def _is_coco_dataset(dataset: ConfigDict) -> bool:
    """Whether a dataset config builds a ``CocoDataset`` (or a subclass: LVIS, ...)."""
    dataset_type = dataset.get('type')
    if isinstance(dataset_type, str):
        dataset_type = DATASETS.get(dataset_type)
    return isinstance(dataset_type, type) and issubclass(dataset_type, CocoDataset)


def _coco_annotation_files(cfg: Config,
                           keys: Sequence[str]) -> Dict[str, Tuple[str, Optional[str]]]:
    """``{path: (key, image folder)}`` for the local annotation files of the
    COCO-style datasets of the dataloaders among ``keys``."""
    files: Dict[str, Tuple[str, Optional[str]]] = {}
    for key in keys:
        section = cfg.get(key)
        if not section or not key.endswith('_dataloader'):
            continue
        for dataset in _leaf_datasets(section['dataset']):
            path = _ann_file(dataset)
            if path and '://' not in path and _is_coco_dataset(dataset):
                img_prefix = (dataset.get('data_prefix') or {}).get('img')
                img_dir = (osp.join(dataset.get('data_root') or '', img_prefix)
                           if img_prefix is not None else None)
                files.setdefault(path, (key, img_dir))
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


def check_dataset(cfg: Config, keys: Sequence[str]) -> List[str]:
    """Raise a :class:`DatasetError` if the dataset of ``cfg`` cannot be used.

    Raises :class:`DatasetNotFoundError` when dataset files are missing: the
    message lists them and the ways out (put the data there, point the
    config at it with ``data_root`` or ``--cfg-options``, or run the
    synthetic demo). Then reads the annotation file of each COCO-style
    dataset up to ``MAX_CHECKED_ANN_BYTES`` (one JSON parse each) and raises
    :class:`AnnotationFileError` naming the first one that cannot work and
    why (see :func:`coco_annotation_problem` and
    :func:`coco_content_findings`), and logs a warning, naming the file, for
    each kind of annotation that mmdet will drop.

    Args:
        cfg (Config): A full mmengine config (after ``--cfg-options``).
        keys (Sequence[str]): See :func:`missing_dataset_files`.
            ``'train_dataloader'`` marks a dataset to train on.

    Returns:
        list[str]: The warnings logged, each naming its file.

    Example:
        >>> cfg = Config.fromfile('configs/faster_rcnn_r50_sbp.py')  # doctest: +SKIP
        >>> check_dataset(cfg, ['train_dataloader', 'val_evaluator'])  # doctest: +SKIP
    """
    missing = missing_dataset_files(cfg, keys)
    if missing:
        raise DatasetNotFoundError(_missing_message(missing))
    warnings = []
    for path, (key, img_dir) in _coco_annotation_files(cfg, keys).items():
        if osp.getsize(path) > MAX_CHECKED_ANN_BYTES:
            continue
        content, problem = _load_coco(path)
        if problem is None:
            problem, found = coco_content_findings(content, img_dir,
                                                   training=key == 'train_dataloader')
            warnings += [f'Annotation file {path} ({key}): {w}' for w in found]
        if problem is not None:
            raise AnnotationFileError(f'Annotation file {path} ({key}): {problem}')
    for warning in warnings:
        print_log(warning, logger='current', level=logging.WARNING)
    return warnings
