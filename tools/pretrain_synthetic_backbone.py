"""Make the pretrained backbone of the synthetic fine-tuning regime.

COCO detectors start from an ImageNet-pretrained backbone; the synthetic world
has no ImageNet, so this tool makes its stand-in. The repository ships the one
the fine-tuning configs load (``configs/synthetic/weights/``, its sha256 in its
name and checked on load), because a remake is not bitwise the same on another
CPU (its float kernels differ), and a study must start from the same weights
on every machine. The tool writes a second synthetic
set (other images, same classes; seed 7 by default, so no image of the
fine-tuning set is seen), trains the dense detector of ``--config`` (a
``*-pretrain.py`` config, whose data root it fills) on it with
``tools/train.py`` and saves the backbone's weights alone, as a checkpoint that
``init_cfg=dict(type='Pretrained', checkpoint=...)`` loads into that backbone
or its SBP class (``ResNet``/``ResNetSBP``, ``mmpretrain.ConvNeXt``/``ConvNeXtSBP``:
the ``*-finetune.py`` configs). Paths are relative to the working
directory, as for ``tools/train.py``: run it from the repository root.

Example::

    python tools/pretrain_synthetic_backbone.py      # ResNet-18, ~12 min on one CPU thread
    python tools/train.py configs/synthetic/faster-rcnn_r18_fpn_sbp_synthetic-finetune.py \
        --cfg-options model.backbone.init_cfg.checkpoint=checkpoints/synthetic_r18-w16_backbone.pth
    python tools/pretrain_synthetic_backbone.py \
        --config configs/synthetic/faster-rcnn_convnext-w16_fpn_synthetic-pretrain.py \
        --out checkpoints/synthetic_convnext-w16_backbone.pth    # small ConvNeXt, ~13 min
"""
import argparse
import os
import os.path as osp
import subprocess
import sys
from typing import Dict, List

import torch
from mmengine.config import Config
from mmengine.runner import CheckpointLoader

import sbp_mmdet  # noqa: F401  checkpoint loading under torch >= 2.6 (sbp_mmdet.compat)
from sbp_mmdet.datasets import generate_synthetic_coco
from sbp_mmdet.utils import file_sha256

REPO = osp.abspath(osp.join(osp.dirname(__file__), '..'))

PREFIX = 'backbone.'


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--config',
                        default='configs/synthetic/faster-rcnn_r18_fpn_synthetic-pretrain.py',
                        help='dense detector config that trains on the pretraining set')
    parser.add_argument('--out', default='checkpoints/synthetic_r18-w16_backbone.pth',
                        help='where the backbone weights go')
    parser.add_argument('--work-dir', default='work_dirs/pretrain_synthetic_backbone')
    parser.add_argument('--data-seed', type=int, default=7,
                        help='seed of the pretraining set (the fine-tuning set uses 0)')
    parser.add_argument('--num-train', type=int, default=1000)
    parser.add_argument('--num-val', type=int, default=200)
    parser.add_argument('--cfg-options', nargs='+', default=[],
                        help='key=value options passed to tools/train.py')
    return parser.parse_args(argv)


def backbone_state_dict(checkpoint: Dict) -> Dict[str, torch.Tensor]:
    """The ``backbone.`` weights of a detector checkpoint, without the prefix.

    Raises:
        KeyError: the checkpoint holds no backbone weights.
    """
    state = checkpoint.get('state_dict', checkpoint)
    backbone = {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}
    if not backbone:
        raise KeyError(f'no {PREFIX!r} weights in the checkpoint (keys: {sorted(state)[:5]}...)')
    return backbone


def run(cmd: List[str], log_file: str) -> None:
    """Run ``cmd``, its output in ``log_file``; its tail on failure."""
    os.makedirs(osp.dirname(log_file), exist_ok=True)
    with open(log_file, 'w') as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
    if proc.returncode:
        with open(log_file) as log:
            tail = log.read()[-3000:]
        raise SystemExit(f'failed: {" ".join(cmd)}\n--- end of {log_file}:\n{tail}')


def main(argv=None) -> None:
    args = parse_args(argv)
    cfg = Config.fromfile(args.config)
    data_root = cfg.train_dataloader.dataset.data_root
    if osp.exists(data_root):
        print(f'pretraining set: {data_root} (exists, kept)', flush=True)
    else:
        print(f'making the pretraining set in {data_root} (seed {args.data_seed})', flush=True)
        generate_synthetic_coco(data_root, num_train=args.num_train, num_val=args.num_val,
                                img_size=cfg.img_scale[0], seed=args.data_seed, progress=False)
    print(f'training {args.config} (log: {args.work_dir}/train.log)', flush=True)
    cmd = [sys.executable, osp.join(REPO, 'tools', 'train.py'), args.config,
           '--work-dir', args.work_dir]
    run(cmd + (['--cfg-options', *args.cfg_options] if args.cfg_options else []),
        osp.join(args.work_dir, 'train.log'))
    with open(osp.join(args.work_dir, 'last_checkpoint')) as f:
        last = f.read().strip()
    checkpoint = CheckpointLoader.load_checkpoint(last, map_location='cpu')
    out = args.out
    os.makedirs(osp.dirname(out) or '.', exist_ok=True)
    meta = dict(config=args.config, data_seed=args.data_seed, source=last,
                iter=checkpoint.get('meta', {}).get('iter'))
    torch.save(dict(state_dict=backbone_state_dict(checkpoint), meta=meta), out)
    digest = file_sha256(out)
    stem, ext = osp.splitext(osp.basename(out))
    print(f'wrote {args.out}: the backbone of {last}\nsha256 {digest}: to have configs check '
          f'it on load, name it {stem}-{digest[:8]}{ext}', flush=True)


if __name__ == '__main__':
    main()
