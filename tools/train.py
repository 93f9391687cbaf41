"""Train a detector with an mmengine Runner; the CLI of mmdet's ``tools/train.py``.

``import sbp_mmdet`` comes first, so that its modules are registered and its
checkpoint compatibility fix (``sbp_mmdet.compat``) applies to ``--resume``;
and the dataset is checked before the Runner is built, so that a missing
dataset stops the run at once with directions.

Examples::

    python tools/train.py configs/synthetic/faster-rcnn_r18_fpn_synthetic.py
    python tools/train.py CONFIG --resume                 # latest checkpoint of the work dir
    python tools/train.py CONFIG --resume work_dirs/x/iter_400.pth
    bash tools/dist_train.sh CONFIG 8                     # 8 processes, --launcher pytorch
"""
import argparse
import os

from mmdet.utils import setup_cache_size_limit_of_dynamo
from mmengine.config import Config, DictAction
from mmengine.model import is_model_wrapper

import sbp_mmdet  # noqa: F401  registers sbp_mmdet modules, patches checkpoint loading
from sbp_mmdet.engine import close_distributed, setup_cpu_distributed
from sbp_mmdet.exact_tools import ExactToolError, prepare_training
from sbp_mmdet.models import sbp_model_problem
from sbp_mmdet.utils import (DatasetError, PretrainedWeightsError, ResumeError, build_runner,
                             check_dataset, check_pretrained_weights, load_tool_config,
                             prepare_resume)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Train a detector')
    parser.add_argument('config', help='train config file')
    parser.add_argument('--work-dir',
                        help='where logs and checkpoints go '
                        '(default: the config\'s work_dir, else ./work_dirs/<config name>)')
    parser.add_argument('--amp', action='store_true',
                        help='train with automatic mixed precision (needs an accelerator)')
    parser.add_argument('--auto-scale-lr', action='store_true',
                        help='scale the learning rate by the actual total batch size over '
                        'the config\'s auto_scale_lr.base_batch_size')
    parser.add_argument('--resume', nargs='?', const='auto', metavar='CHECKPOINT',
                        help='resume from CHECKPOINT; without one, from the latest '
                        'checkpoint in the work dir')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config keys, e.g. train_cfg.max_iters=100 '
                        'optim_wrapper.optimizer.lr=0.01; lists as key="[a,b]"')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'],
                        default='none', help='how the processes were started')
    # torch.distributed.launch passes --local-rank (older versions --local_rank)
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args()
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    return args


def build_config(args: argparse.Namespace) -> Config:
    """The config of ``args.config`` with the command-line options applied."""
    cfg = load_tool_config(args.config, args.launcher, args.cfg_options, args.work_dir)

    if args.amp:
        if cfg.optim_wrapper.get('type', 'OptimWrapper') not in ('OptimWrapper',
                                                                 'AmpOptimWrapper'):
            raise SystemExit(f'--amp needs optim_wrapper.type OptimWrapper, got '
                             f'{cfg.optim_wrapper.type}')
        cfg.optim_wrapper.type = 'AmpOptimWrapper'
        cfg.optim_wrapper.setdefault('loss_scale', 'dynamic')

    if args.auto_scale_lr:
        if not cfg.get('auto_scale_lr', {}).get('base_batch_size'):
            raise SystemExit('--auto-scale-lr needs auto_scale_lr.base_batch_size in the '
                             'config: the total batch size its learning rate was set for')
        cfg.auto_scale_lr.enable = True

    if args.resume == 'auto':
        cfg.resume, cfg.load_from = True, None
    elif args.resume is not None:
        cfg.resume, cfg.load_from = True, args.resume
    return cfg


def main() -> None:
    args = parse_args()
    # Only matters with torch.compile: detectors' dynamic shapes make dynamo recompile,
    # and mmdet caps its cache (DYNAMO_CACHE_SIZE_LIMIT, default 4) to bound that.
    setup_cache_size_limit_of_dynamo()
    cfg = build_config(args)
    problem = sbp_model_problem(cfg.model)
    if problem is not None:
        raise SystemExit(f'{problem}\n(config: {args.config})')
    validates = cfg.get('val_cfg') is not None
    try:
        check_pretrained_weights(cfg.model)
        check_dataset(cfg, ['train_dataloader'] +
                      (['val_dataloader', 'val_evaluator'] if validates else []))
        prepare_resume(cfg)  # the checkpoint's seed, before the dataloaders are built
    except (DatasetError, PretrainedWeightsError, ResumeError) as err:
        raise SystemExit(f'{err}\n(config: {args.config})')
    setup_cpu_distributed(cfg)  # gloo + a CPU DDP wrapper when torch has no CUDA
    runner = build_runner(cfg, args.config)
    model = runner.model.module if is_model_wrapper(runner.model) else runner.model
    try:  # selective_checkpointing=[...]; the exact tools refused where not exact
        prepare_training(model, cfg)
    except ExactToolError as err:
        raise SystemExit(f'{err}\n(config: {args.config})')
    runner.train()
    close_distributed(runner)  # before exit: gloo can abort at shutdown otherwise


if __name__ == '__main__':
    main()
