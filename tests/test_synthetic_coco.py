"""The synthetic COCO generator: deterministic, valid COCO, loadable by mmdet."""
import colorsys
import os
import os.path as osp
import subprocess
import sys
from pathlib import Path
from typing import Dict

import numpy as np
import pytest
from mmengine.config import Config
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from sbp_mmdet.datasets import CLASSES, PALETTE, generate_synthetic_coco
from sbp_mmdet.datasets.synthetic_coco import CLASS_HUES, coco_annotations, render_image

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(num_train=6, num_val=3, img_size=96, progress=False)


def read_tree(root: Path) -> Dict[str, bytes]:
    """Every file under ``root``, by relative path, with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob('*'))
            if p.is_file()}


@pytest.fixture(scope='module')
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp('synthetic_coco')
    generate_synthetic_coco(str(root), **SMALL)
    return root


def test_layout_is_coco_2017(dataset: Path) -> None:
    assert sorted(read_tree(dataset)) == sorted(
        ['annotations/instances_train2017.json', 'annotations/instances_val2017.json'] +
        [f'train2017/{i:012d}.png' for i in range(1, 7)] +
        [f'val2017/{i:012d}.png' for i in range(1, 4)])


def test_same_seed_gives_same_bytes(dataset: Path, tmp_path: Path) -> None:
    generate_synthetic_coco(str(tmp_path), **SMALL)
    assert read_tree(tmp_path) == read_tree(dataset)


def test_other_seed_gives_other_data(dataset: Path, tmp_path: Path) -> None:
    generate_synthetic_coco(str(tmp_path), seed=1, **SMALL)
    ours, theirs = read_tree(tmp_path), read_tree(dataset)
    assert ours.keys() == theirs.keys()
    assert all(ours[name] != theirs[name] for name in ours)


def test_val_images_differ_from_train_images(dataset: Path) -> None:
    files = read_tree(dataset)
    train = {data for name, data in files.items() if name.startswith('train2017/')}
    assert not any(data in train for name, data in files.items()
                   if name.startswith('val2017/'))


def test_an_image_does_not_depend_on_the_split_size(dataset: Path, tmp_path: Path) -> None:
    generate_synthetic_coco(str(tmp_path), **dict(SMALL, num_train=2, num_val=1))
    name = 'train2017/000000000002.png'
    assert (tmp_path / name).read_bytes() == (dataset / name).read_bytes()


@pytest.mark.parametrize('split', ['train2017', 'val2017'])
def test_pycocotools_loads_valid_annotations(dataset: Path, split: str) -> None:
    coco = COCO(str(dataset / 'annotations' / f'instances_{split}.json'))
    assert [cat['name'] for cat in coco.loadCats(coco.getCatIds())] == list(CLASSES)
    assert len(coco.getImgIds()) == SMALL['num_train' if split == 'train2017' else 'num_val']
    anns = coco.loadAnns(coco.getAnnIds())
    assert len({ann['id'] for ann in anns}) == len(anns)
    for img in coco.loadImgs(coco.getImgIds()):
        assert (img['width'], img['height']) == (96, 96)
        assert osp.isfile(dataset / split / img['file_name'])
        img_anns = coco.loadAnns(coco.getAnnIds(imgIds=img['id']))
        assert 1 <= len(img_anns) <= 4
        for ann in img_anns:
            x, y, w, h = ann['bbox']
            assert 0 <= x and 0 <= y and w > 0 and h > 0
            assert x + w <= img['width'] and y + h <= img['height']
            # area counts the visible pixels of the shape, so it fits in its box
            assert 0 < ann['area'] <= w * h
            assert ann['iscrowd'] == 0 and 1 <= ann['category_id'] <= len(CLASSES)


def test_cocoeval_scores_ground_truth_as_perfect(dataset: Path) -> None:
    gt = COCO(str(dataset / 'annotations' / 'instances_val2017.json'))
    detections = [dict(image_id=ann['image_id'], category_id=ann['category_id'],
                       bbox=ann['bbox'], score=1.0) for ann in gt.loadAnns(gt.getAnnIds())]
    evaluator = COCOeval(gt, gt.loadRes(detections), 'bbox')
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    assert evaluator.stats[0] == pytest.approx(1.0)  # mAP@[.5:.95]


def test_annotations_describe_the_visible_pixels() -> None:
    """bbox is the tight box of the visible pixels and area their count."""
    for index in range(5):
        img, masks = render_image(np.random.default_rng([0, 0, index]), 128, 6, 0.4)
        assert img.shape == (128, 128, 3) and img.dtype == np.uint8
        for ann, (label, visible) in zip(coco_annotations(masks, 1, 1), masks):
            x, y, w, h = ann['bbox']
            ys, xs = np.nonzero(visible)
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x, y, x + w, y + h)
            assert ann['area'] == visible.sum()
            assert ann['category_id'] == label + 1


def test_each_class_is_coloured_in_its_hue_band() -> None:
    for index in range(10):
        img, masks = render_image(np.random.default_rng([3, 0, index]), 128, 4, 0.4)
        for label, visible in masks:
            b, g, r = img[visible].mean(axis=0) / 255
            hue = colorsys.rgb_to_hsv(r, g, b)[0] * 360
            # 25 degrees of jitter, plus shading and noise
            assert abs((hue - CLASS_HUES[label] + 180) % 360 - 180) < 40


def test_mmdet_coco_dataset_loads_it(dataset: Path) -> None:
    from mmdet.datasets import CocoDataset
    from mmdet.utils import register_all_modules
    register_all_modules()
    coco = COCO(str(dataset / 'annotations' / 'instances_train2017.json'))
    ds = CocoDataset(
        data_root=str(dataset), ann_file='annotations/instances_train2017.json',
        data_prefix=dict(img='train2017/'), metainfo=dict(classes=CLASSES),
        pipeline=[dict(type='LoadImageFromFile'), dict(type='LoadAnnotations', with_bbox=True),
                  dict(type='PackDetInputs')])
    assert len(ds) == SMALL['num_train']
    sample = ds[0]
    assert tuple(sample['inputs'].shape) == (3, 96, 96)
    gt = sample['data_samples'].gt_instances
    anns = coco.loadAnns(coco.getAnnIds(imgIds=sample['data_samples'].img_id))
    expected = [[x, y, x + w, y + h] for x, y, w, h in (ann['bbox'] for ann in anns)]
    np.testing.assert_allclose(gt.bboxes.tensor.numpy(), expected)
    assert gt.labels.tolist() == [ann['category_id'] - 1 for ann in anns]


def test_synthetic_configs_name_the_generated_classes() -> None:
    for config in sorted((REPO / 'configs' / 'synthetic').glob('*.py')):
        cfg = Config.fromfile(str(config))
        metainfo = cfg.train_dataloader.dataset.metainfo
        assert tuple(metainfo['classes']) == CLASSES, config
        assert [tuple(color) for color in metainfo['palette']] == PALETTE, config
        head = cfg.model.roi_head.bbox_head if 'roi_head' in cfg.model else cfg.model.bbox_head
        assert head.num_classes == len(CLASSES), config


@pytest.mark.parametrize('kwargs, message', [
    (dict(num_train=0), 'num_train must be >= 1'),
    (dict(num_val=-3), 'num_val must be >= 1'),
    (dict(num_train=2.5), 'num_train must be an integer'),
    (dict(img_size=32), 'img_size must be >= 64'),
    (dict(max_objects=0), 'max_objects must be >= 1'),
    (dict(max_occlusion=1.0), r'max_occlusion must be in \[0, 1\)'),
    (dict(seed=-1), 'seed must be >= 0'),
    (dict(image_format='bmp'), "image_format must be one of \\['jpg', 'png'\\]"),
])
def test_bad_arguments_raise_clear_errors(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        generate_synthetic_coco(str(tmp_path), **dict(SMALL, **kwargs))
    assert not os.listdir(tmp_path)  # nothing written


def test_existing_dataset_is_kept_unless_overwrite(dataset: Path, tmp_path: Path) -> None:
    generate_synthetic_coco(str(tmp_path), **dict(SMALL, seed=1))
    with pytest.raises(FileExistsError, match='overwrite'):
        generate_synthetic_coco(str(tmp_path), **SMALL)
    generate_synthetic_coco(str(tmp_path), overwrite=True, **dict(SMALL, num_train=2))
    assert sorted(os.listdir(tmp_path / 'train2017')) == ['000000000001.png',
                                                          '000000000002.png']


def test_cli_writes_the_dataset_and_rejects_bad_arguments(tmp_path: Path) -> None:
    tool = str(REPO / 'tools' / 'make_synthetic_coco.py')
    ok = subprocess.run([sys.executable, tool, str(tmp_path / 'd'), '--num-train', '3',
                         '--num-val', '2', '--img-size', '64', '--format', 'jpg'],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert 'instances_val2017.json' in ok.stdout
    assert sorted(os.listdir(tmp_path / 'd' / 'val2017')) == ['000000000001.jpg',
                                                              '000000000002.jpg']
    bad = subprocess.run([sys.executable, tool, str(tmp_path / 'e'), '--img-size', '10'],
                         capture_output=True, text=True)
    assert bad.returncode == 2
    assert 'img_size must be >= 64, got 10' in bad.stderr
