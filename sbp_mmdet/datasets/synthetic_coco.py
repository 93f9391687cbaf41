"""A deterministic synthetic detection dataset in COCO layout.

Images show filled shapes (rectangles, ellipses, triangles, crosses) of random
size, aspect and tilt on a cluttered background: smooth colour blotches,
distractor strokes in any colour and pixel noise. Later shapes may partly
occlude earlier ones (each shape keeps at least ``1 - max_occlusion`` of its
pixels visible). Each class is coloured within its own hue band
(:data:`CLASS_HUES`, with varied saturation and brightness): a cue, besides the
shape, that lets a detector trained from scratch on a CPU converge in minutes.

The output mirrors COCO 2017, so mmdet's ``CocoDataset`` and pycocotools'
``COCO``/``COCOeval`` read it unchanged::

    <out_dir>/train2017/000000000001.png ...
    <out_dir>/val2017/000000000001.png ...
    <out_dir>/annotations/instances_train2017.json
    <out_dir>/annotations/instances_val2017.json

Each annotation has ``bbox = [x, y, w, h]``: the tight box, in pixels, around
the *visible* pixels of the shape, and ``area``: the number of visible pixels
(as COCO's ``area`` is the area of the instance mask, not of its box). So
``area <= w * h`` and every box lies inside its image.

Generation is deterministic: the same arguments give byte-identical files.
Each image draws from its own random stream, seeded by ``(seed, split,
index)``, so image ``i`` of a split does not depend on how many images the
split has, and the validation split never repeats a training image.
"""
import colorsys
import json
import os
import os.path as osp
import shutil
from typing import Dict, List, Tuple

import cv2
import numpy as np
from mmengine.utils import ProgressBar, mkdir_or_exist

CLASSES: Tuple[str, ...] = ('rectangle', 'ellipse', 'triangle', 'cross')
"""Category names, in category-id order (ids start at 1, as in COCO)."""

CLASS_HUES: Tuple[int, ...] = (0, 90, 180, 270)
"""Hue (degrees) around which each class is coloured: red, lime, cyan, violet."""

PALETTE: List[Tuple[int, int, int]] = [(230, 40, 40), (120, 230, 40), (40, 230, 230),
                                       (120, 40, 230)]
"""One RGB colour per class, in its hue, used by mmdet's visualizer."""

SPLITS: Tuple[str, ...] = ('train2017', 'val2017')

IMAGE_FORMATS: Dict[str, List[int]] = {
    # Fixed encoder parameters keep the bytes reproducible.
    'png': [cv2.IMWRITE_PNG_COMPRESSION, 3],
    'jpg': [cv2.IMWRITE_JPEG_QUALITY, 95],
}


def annotation_file(out_dir: str, split: str) -> str:
    """Path of the COCO annotation json of ``split`` (e.g. ``'val2017'``)."""
    return osp.join(out_dir, 'annotations', f'instances_{split}.json')


def _check_args(num_train: int, num_val: int, img_size: int, max_objects: int,
                max_occlusion: float, seed: int, image_format: str) -> None:
    """Raise ``ValueError`` naming the first argument that is out of range."""
    for name, value, low in (('num_train', num_train, 1), ('num_val', num_val, 1),
                             ('img_size', img_size, 64), ('max_objects', max_objects, 1),
                             ('seed', seed, 0)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
            raise ValueError(f'{name} must be an integer, got {value!r}')
        if value < low:
            raise ValueError(f'{name} must be >= {low}, got {value}')
    if img_size > 4096:
        raise ValueError(f'img_size must be <= 4096, got {img_size}')
    if max_objects > 20:
        raise ValueError(f'max_objects must be <= 20 (shapes must fit in the image), '
                         f'got {max_objects}')
    if not 0.0 <= max_occlusion < 1.0:
        raise ValueError(f'max_occlusion must be in [0, 1), got {max_occlusion}')
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f'image_format must be one of {sorted(IMAGE_FORMATS)}, '
                         f'got {image_format!r}')


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth colour blotches plus distractor strokes, as float32 HxWx3."""
    base = rng.uniform(40, 215, size=3)
    blotches = rng.uniform(-45, 45, size=(4, 4, 3)).astype(np.float32)
    img = base + cv2.resize(blotches, (size, size), interpolation=cv2.INTER_CUBIC)
    for _ in range(rng.integers(1, 5)):
        color = rng.uniform(0, 255, size=3).tolist()
        thickness = int(rng.integers(1, 4))
        if rng.random() < 0.5:
            pts = rng.integers(0, size, size=(int(rng.integers(2, 5)), 2)).astype(np.int32)
            cv2.polylines(img, [pts], False, color, thickness)
        else:
            center = tuple(int(v) for v in rng.integers(0, size, size=2))
            axes = tuple(int(v) for v in rng.integers(size // 16, size // 3, size=2))
            start = float(rng.uniform(0, 360))
            cv2.ellipse(img, center, axes, float(rng.uniform(0, 180)), start,
                        start + float(rng.uniform(60, 200)), color, thickness)
    return img


def _shape_mask(rng: np.random.Generator, label: int, size: int, min_extent: int,
                max_extent: int) -> np.ndarray:
    """Draw one shape of class ``label`` at a random place; return its uint8 mask.

    The shape's extent is log-uniform in ``[min_extent, max_extent]`` pixels and
    it lies entirely inside the image.
    """
    extent = float(np.exp(rng.uniform(np.log(min_extent), np.log(max_extent))))
    half = extent / 2
    cx, cy = rng.uniform(half, size - half, size=2)
    angle = float(rng.uniform(-20, 20))
    mask = np.zeros((size, size), np.uint8)
    name = CLASSES[label]
    if name == 'ellipse':
        axes = (half, half * float(rng.uniform(0.5, 1.0)))
        cv2.ellipse(mask, ((float(cx), float(cy)), (2 * axes[0], 2 * axes[1]),
                           float(rng.uniform(0, 180))), 1, -1)
        return mask
    if name == 'rectangle':
        aspect = float(rng.uniform(0.45, 1.0))
        unit = np.array([[-1, -aspect], [1, -aspect], [1, aspect], [-1, aspect]])
        if rng.random() < 0.5:  # tall instead of wide
            unit = unit[:, ::-1]
    elif name == 'triangle':
        apex = float(rng.uniform(-0.6, 0.6))
        unit = np.array([[apex, -1], [1, 1], [-1, 1]])
    else:  # cross: a plus sign whose arms are 25-40% of its extent wide
        t = float(rng.uniform(0.25, 0.4))
        unit = np.array([[-t, -1], [t, -1], [t, -t], [1, -t], [1, t], [t, t], [t, 1],
                         [-t, 1], [-t, t], [-1, t], [-1, -t], [-t, -t]])
    theta = np.deg2rad(angle)
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    rotated = unit @ rot.T
    # Scale so that the rotated shape spans at most `extent` in x and y: it stays inside.
    pts = rotated * half / np.abs(rotated).max() + (cx, cy)
    cv2.fillPoly(mask, [np.round(pts).astype(np.int32)], 1)
    return mask


def _class_color(rng: np.random.Generator, label: int, behind: np.ndarray) -> np.ndarray:
    """A BGR colour in the hue band of class ``label``, contrasting with ``behind``.

    Of a few candidates (hue within 25 degrees of the class hue, random
    saturation and brightness), the one farthest from the mean background
    colour ``behind`` wins.
    """
    candidates = []
    for _ in range(8):
        hue = (CLASS_HUES[label] + rng.uniform(-25, 25)) % 360 / 360
        rgb = colorsys.hsv_to_rgb(hue, rng.uniform(0.55, 1.0), rng.uniform(0.45, 1.0))
        candidates.append(255 * np.array(rgb[::-1]))
    return max(candidates, key=lambda color: np.abs(color - behind).sum())


def render_image(rng: np.random.Generator, size: int, max_objects: int,
                 max_occlusion: float) -> Tuple[np.ndarray, List[Tuple[int, np.ndarray]]]:
    """Render one image and the visible mask of each of its shapes.

    Args:
        rng (np.random.Generator): Source of all randomness for this image.
        size (int): Image width and height in pixels.
        max_objects (int): The image holds between 1 and this many shapes.
        max_occlusion (float): Largest fraction of a shape that later shapes
            may cover.

    Returns:
        tuple: The BGR uint8 image and a list of ``(label, visible_mask)``,
        where ``label`` indexes :data:`CLASSES` and ``visible_mask`` is a bool
        HxW array.
    """
    img = _background(rng, size)
    min_extent, max_extent = max(12, round(0.12 * size)), round(0.45 * size)
    # (label, visible mask, full pixel count) of each shape drawn so far
    shapes: List[Tuple[int, np.ndarray, int]] = []
    for _ in range(rng.integers(1, max_objects + 1)):
        for _attempt in range(20):
            label = int(rng.integers(len(CLASSES)))
            mask = _shape_mask(rng, label, size, min_extent, max_extent).astype(bool)
            if all((vis & ~mask).sum() >= (1 - max_occlusion) * full
                   for _, vis, full in shapes):
                break
        else:
            continue  # no place found where this shape leaves the others visible enough
        shapes = [(lbl, vis & ~mask, full) for lbl, vis, full in shapes]
        shapes.append((label, mask, int(mask.sum())))
        color = _class_color(rng, label, img[mask].mean(axis=0))
        gradient = np.linspace(-1, 1, size)[:, None, None] * rng.uniform(-20, 20, size=3)
        img[mask] = color + np.broadcast_to(gradient, img.shape)[mask]
    img += rng.normal(0, 8, size=img.shape)
    img = np.clip(img, 0, 255).round().astype(np.uint8)
    return img, [(label, vis) for label, vis, _ in shapes]


def coco_annotations(masks: List[Tuple[int, np.ndarray]], image_id: int,
                     first_ann_id: int) -> List[dict]:
    """COCO annotations of one image's shapes.

    Args:
        masks (list[tuple[int, np.ndarray]]): ``(label, visible_mask)`` of each
            shape, as :func:`render_image` returns them.
        image_id (int): COCO id of the image.
        first_ann_id (int): Id of the first annotation; the others follow.

    Returns:
        list[dict]: One annotation per shape: ``bbox`` is the tight
        ``[x, y, w, h]`` box of its visible pixels, ``area`` their count.
    """
    anns = []
    for ann_id, (label, vis) in enumerate(masks, start=first_ann_id):
        ys, xs = np.nonzero(vis)
        x, y = int(xs.min()), int(ys.min())
        anns.append(dict(id=ann_id, image_id=image_id, category_id=label + 1,
                         bbox=[x, y, int(xs.max()) - x + 1, int(ys.max()) - y + 1],
                         area=int(vis.sum()), iscrowd=0))
    return anns


def generate_synthetic_coco(out_dir: str,
                            num_train: int = 1000,
                            num_val: int = 200,
                            img_size: int = 256,
                            max_objects: int = 4,
                            max_occlusion: float = 0.4,
                            seed: int = 0,
                            image_format: str = 'png',
                            overwrite: bool = False,
                            progress: bool = True) -> Dict[str, str]:
    """Write a synthetic shapes dataset in COCO 2017 layout under ``out_dir``.

    Args:
        out_dir (str): Dataset root (``data_root`` in mmdet configs).
        num_train (int): Number of training images. Defaults to 1000.
        num_val (int): Number of validation images. Defaults to 200.
        img_size (int): Width and height of every image, >= 64. Defaults to 256.
        max_objects (int): Each image holds 1 to ``max_objects`` shapes.
            Defaults to 4.
        max_occlusion (float): Largest fraction of a shape's pixels that later
            shapes may hide. Defaults to 0.4.
        seed (int): Random seed; equal arguments give byte-identical output.
            Defaults to 0.
        image_format (str): ``'png'`` (lossless) or ``'jpg'``. Defaults to
            ``'png'``.
        overwrite (bool): Replace an existing dataset in ``out_dir``. Without
            it, existing split folders or annotation files raise
            ``FileExistsError``. Defaults to False.
        progress (bool): Show an mmengine progress bar. Defaults to True.

    Returns:
        dict[str, str]: The annotation file of each split, keyed by split name
        (``'train2017'``, ``'val2017'``).

    Example:
        >>> import tempfile
        >>> from pycocotools.coco import COCO
        >>> out = tempfile.mkdtemp()
        >>> files = generate_synthetic_coco(out, num_train=4, num_val=2,
        ...                                 img_size=64, progress=False)
        >>> coco = COCO(files['val2017'])  # doctest: +ELLIPSIS
        loading annotations into memory...
        >>> len(coco.getImgIds()), [c['name'] for c in coco.loadCats(coco.getCatIds())]
        (2, ['rectangle', 'ellipse', 'triangle', 'cross'])
    """
    _check_args(num_train, num_val, img_size, max_objects, max_occlusion, seed, image_format)
    targets = [osp.join(out_dir, split) for split in SPLITS]
    targets += [annotation_file(out_dir, split) for split in SPLITS]
    existing = [path for path in targets if osp.exists(path)]
    if existing and not overwrite:
        raise FileExistsError(f'{out_dir} already holds a dataset ({existing[0]}); '
                              'pass overwrite=True (--overwrite) to replace it')
    for path in existing:
        shutil.rmtree(path) if osp.isdir(path) else os.remove(path)

    counts = dict(zip(SPLITS, (num_train, num_val)))
    bar = ProgressBar(num_train + num_val) if progress else None
    categories = [dict(id=i + 1, name=name, supercategory='shape')
                  for i, name in enumerate(CLASSES)]
    ann_files = {}
    for split_index, split in enumerate(SPLITS):
        mkdir_or_exist(osp.join(out_dir, split))
        images, annotations = [], []
        for index in range(counts[split]):
            rng = np.random.default_rng([seed, split_index, index])
            img, masks = render_image(rng, img_size, max_objects, max_occlusion)
            image_id = index + 1
            file_name = f'{image_id:012d}.{image_format}'
            ok, encoded = cv2.imencode(f'.{image_format}', img, IMAGE_FORMATS[image_format])
            assert ok, f'OpenCV failed to encode {file_name}'
            encoded.tofile(osp.join(out_dir, split, file_name))
            images.append(dict(id=image_id, file_name=file_name, width=img_size,
                               height=img_size))
            annotations += coco_annotations(masks, image_id, len(annotations) + 1)
            if bar is not None:
                bar.update()
        ann_files[split] = annotation_file(out_dir, split)
        mkdir_or_exist(osp.dirname(ann_files[split]))
        coco = dict(info=dict(description='sbp-mmdet synthetic shapes', version='1.0',
                              seed=int(seed)),
                    licenses=[], images=images, annotations=annotations,
                    categories=categories)
        with open(ann_files[split], 'w') as f:
            json.dump(coco, f)
    if bar is not None:
        print()
    return ann_files
