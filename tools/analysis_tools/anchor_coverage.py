"""Anchor coverage: how many ground-truth boxes an anchor-based head can match.

An anchor-based detector (RetinaNet, the RPN of Faster R-CNN) learns a box
only through anchors whose IoU with it reaches the assigner's positive
threshold. This tool builds the config's anchor generator, lays its anchors
over the training images at the size the pipeline resizes them to, and prints
the fraction of ground-truth boxes whose best anchor reaches the threshold,
overall and by box size. A box no anchor reaches is matched only by the
assigner's ``min_pos_iou`` fallback (one low-quality anchor), if at all.

Example::

    python tools/analysis_tools/anchor_coverage.py \\
        configs/synthetic/retinanet_r18_fpn_synthetic-finetune.py
"""
import argparse
import json
import math
import os.path as osp
from typing import Dict, List, Optional

import torch
from mmdet.registry import TASK_UTILS
from mmdet.structures.bbox import bbox_overlaps
from mmengine.config import Config, DictAction
from mmengine.registry import init_default_scope

SIZE_BUCKETS = ((0, 32), (32, 64), (64, 128), (128, math.inf))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('config', help='a detector config with an anchor-based head')
    parser.add_argument('--head', default=None,
                        help='the model key of the anchor head (default: bbox_head if it has '
                        'an anchor_generator, else rpn_head)')
    parser.add_argument('--iou', type=float, default=None,
                        help='positive IoU threshold (default: the head\'s assigner pos_iou_thr)')
    parser.add_argument('--max-images', type=int, default=None,
                        help='look at the first N training images only')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, default={},
                        help='override config keys')
    return parser.parse_args(argv)


def anchor_head_key(model: Config, head: Optional[str]) -> str:
    """The model key of the head whose anchors are measured."""
    candidates = [head] if head else ['bbox_head', 'rpn_head']
    for key in candidates:
        if 'anchor_generator' in (model.get(key) or {}):
            return key
    raise SystemExit(f'no anchor_generator in model.{" or model.".join(candidates)}: '
                     'the config has no anchor-based head there')


def positive_iou(model: Config, key: str) -> float:
    """The assigner's positive threshold of head ``key`` (train_cfg.rpn for the RPN)."""
    train_cfg = model.get('train_cfg') or {}
    head_cfg = train_cfg.get('rpn') if key == 'rpn_head' else train_cfg
    return float(head_cfg['assigner']['pos_iou_thr'])


def coverage_rows(boxes: torch.Tensor, best: torch.Tensor, iou: float) -> List[Dict]:
    """Per size bucket (the square root of the box area, in pixels) and for all boxes:
    the number of boxes, the fraction whose best anchor IoU ``best`` reaches ``iou``,
    and the median best IoU."""
    sizes = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).sqrt()
    rows = []
    for (low, high), name in [(b, f'{b[0]}-{b[1]}') for b in SIZE_BUCKETS] + [
            ((0, math.inf), 'all')]:
        inside = (sizes >= low) & (sizes < high)
        if inside.any():
            rows.append(dict(size=name, boxes=int(inside.sum()),
                             covered=float((best[inside] >= iou).float().mean()),
                             best_iou_median=float(best[inside].median())))
    return rows


def training_boxes(cfg: Config, max_images: Optional[int]) -> List[torch.Tensor]:
    """Per training image, its boxes (x1y1x2y2) scaled as a keep-ratio ``Resize`` to the
    config's ``img_scale`` scales them, with the resized image's height and width."""
    dataset = cfg.train_dataloader.dataset
    ann_file = osp.join(dataset.data_root, dataset.ann_file)
    if not osp.isfile(ann_file):
        raise SystemExit(f'annotation file not found: {ann_file} (make the dataset first)')
    with open(ann_file) as f:
        coco = json.load(f)
    scale_long, scale_short = max(cfg.img_scale), min(cfg.img_scale)
    boxes: Dict[int, list] = {}
    for ann in coco['annotations']:
        x, y, w, h = ann['bbox']
        boxes.setdefault(ann['image_id'], []).append([x, y, x + w, y + h])
    images = []
    for img in coco['images'][:max_images]:
        factor = min(scale_long / max(img['height'], img['width']),
                     scale_short / min(img['height'], img['width']))
        shape = (round(img['height'] * factor), round(img['width'] * factor))
        images.append((torch.tensor(boxes.get(img['id'], []), dtype=torch.float32).view(-1, 4)
                       * factor, shape))
    return images


def main(argv=None) -> None:
    args = parse_args(argv)
    cfg = Config.fromfile(args.config)
    cfg.merge_from_dict(args.cfg_options)
    init_default_scope('mmdet')
    key = anchor_head_key(cfg.model, args.head)
    iou = args.iou if args.iou is not None else positive_iou(cfg.model, key)
    generator = TASK_UTILS.build(cfg.model[key].anchor_generator)
    all_boxes, all_best = [], []
    for boxes, (h, w) in training_boxes(cfg, args.max_images):
        if len(boxes):
            sizes = [(math.ceil(h / s[1]), math.ceil(w / s[0])) for s in generator.strides]
            anchors = torch.cat(generator.grid_priors(sizes, device='cpu'))
            all_boxes.append(boxes)
            all_best.append(bbox_overlaps(boxes, anchors).max(dim=1).values)
    print(f'{args.config}: model.{key} anchors, positive IoU >= {iou}')
    print('| box size (sqrt area, px) | boxes | covered | median best IoU |')
    print('|---|---|---|---|')
    for row in coverage_rows(torch.cat(all_boxes), torch.cat(all_best), iou):
        print(f"| {row['size']} | {row['boxes']} | {row['covered']:.1%} | "
              f"{row['best_iou_median']:.2f} |")


if __name__ == '__main__':
    main()
