"""Draw SBP keep masks over an image: which regions get gradients in one iteration.

Writes a PNG with one panel per stride and sampling method; kept rows are
shown as they are, dropped rows are shaded red.

Example::

    python tools/visualize_sbp_masks.py data/synthetic_coco/val2017/000000000001.png \
        --keep-ratio 0.5 --out outputs/sbp_masks.png
"""
import argparse
import math
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))

from sbp_mmdet.sbp import MaskConfig, RowMaskSampler, SBPIteration  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('image', help='image file (any format OpenCV reads)')
    parser.add_argument('--keep-ratio', type=float, default=0.5)
    parser.add_argument('--samplings', nargs='+', default=['grid', 'random'],
                        choices=['grid', 'random'])
    parser.add_argument('--strides', nargs='+', type=int, default=[4, 8, 16])
    parser.add_argument('--base-stride', type=int, default=None,
                        help='stride of the base mask (default: the largest of --strides)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--iteration', type=int, default=0, help='which iteration to draw')
    parser.add_argument('--out', default='outputs/sbp_masks.png')
    return parser.parse_args(argv)


def masks_for(image_height: int, keep_ratio: float, sampling: str, strides, base_stride: int,
              seed: int, iteration: int):
    """Per stride, a bool array over image rows: True where rows are kept."""
    sampler = RowMaskSampler(MaskConfig(keep_ratio=keep_ratio, sampling=sampling), seed=seed)
    sampler.step = iteration
    it = SBPIteration.sample(sampler, image_height, base_stride)
    out = {}
    for stride in strides:
        height = math.ceil(image_height / stride)
        rows = torch.zeros(height, dtype=torch.bool)
        rows[it.kept_rows(stride, height)] = True
        out[stride] = np.repeat(rows.numpy(), stride)[:image_height]
    return out


def render(image: np.ndarray, args) -> np.ndarray:
    import cv2
    base = args.base_stride or max(args.strides)
    panels = []
    for sampling in args.samplings:
        masks = masks_for(image.shape[0], args.keep_ratio, sampling, args.strides, base,
                          args.seed, args.iteration)
        row = []
        for stride, kept in masks.items():
            panel = image.copy()
            red = np.zeros_like(panel)
            red[..., 2] = 255
            dropped = ~kept
            panel[dropped] = (0.45 * panel[dropped] + 0.55 * red[dropped]).astype(np.uint8)
            label = f'{sampling} r={args.keep_ratio} stride {stride} ({kept.mean():.0%} kept)'
            cv2.putText(panel, label, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1)
            row.append(panel)
        panels.append(np.concatenate(row, axis=1))
    return np.concatenate(panels, axis=0)


def main(argv=None):
    import cv2
    args = parse_args(argv)
    MaskConfig(keep_ratio=args.keep_ratio)  # clear error for a bad ratio
    image = cv2.imread(args.image)
    if image is None:
        raise SystemExit(f'cannot read image {args.image!r}')
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    cv2.imwrite(args.out, render(image, args))
    print(f'wrote {args.out}')


if __name__ == '__main__':
    main()
