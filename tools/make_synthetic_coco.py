"""Write the synthetic shapes dataset in COCO 2017 layout.

Example::

    python tools/make_synthetic_coco.py data/synthetic_coco --num-train 1000 --num-val 200
"""
import argparse
import time

from sbp_mmdet.datasets import generate_synthetic_coco


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description='Make a deterministic synthetic COCO-format detection dataset')
    parser.add_argument('out_dir', help='dataset root, e.g. data/synthetic_coco')
    parser.add_argument('--num-train', type=int, default=1000, help='training images')
    parser.add_argument('--num-val', type=int, default=200, help='validation images')
    parser.add_argument('--img-size', type=int, default=256, help='image width and height')
    parser.add_argument('--max-objects', type=int, default=4, help='most shapes per image')
    parser.add_argument('--max-occlusion', type=float, default=0.4,
                        help='largest fraction of a shape that later shapes may hide')
    parser.add_argument('--seed', type=int, default=0, help='same seed, same bytes')
    parser.add_argument('--format', dest='image_format', default='png', choices=['png', 'jpg'],
                        help='image file format')
    parser.add_argument('--overwrite', action='store_true',
                        help='replace a dataset that already exists in out_dir')
    parser.add_argument('--no-progress', dest='progress', action='store_false',
                        help='do not show a progress bar')
    return parser


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    start = time.perf_counter()
    try:
        ann_files = generate_synthetic_coco(**vars(args))
    except (ValueError, FileExistsError) as err:
        parser.error(str(err))
    print(f'Wrote {args.num_train} train and {args.num_val} val images to {args.out_dir} '
          f'in {time.perf_counter() - start:.1f} s:')
    for ann_file in ann_files.values():
        print(f'  {ann_file}')


if __name__ == '__main__':
    main()
