"""Evaluate a checkpoint with an mmengine Runner; the CLI of mmdet's ``tools/test.py``.

``import sbp_mmdet`` comes first, so that its modules are registered and
mmengine checkpoints load under torch's ``weights_only`` default
(``sbp_mmdet.compat``); and the dataset is checked before the Runner is built.

Examples::

    python tools/test.py CONFIG work_dirs/x/iter_1000.pth
    python tools/test.py CONFIG CHECKPOINT --out results.pkl --show-dir vis
    bash tools/dist_test.sh CONFIG CHECKPOINT 8
"""
import argparse
import os

from mmdet.evaluation import DumpDetResults
from mmdet.utils import setup_cache_size_limit_of_dynamo
from mmengine.config import Config, ConfigDict, DictAction

import sbp_mmdet  # noqa: F401  registers sbp_mmdet modules, patches checkpoint loading
from sbp_mmdet.engine import close_distributed, setup_cpu_distributed, use_main_process_logger
from sbp_mmdet.utils import DatasetError, build_runner, check_dataset, load_tool_config


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Evaluate a detector checkpoint')
    parser.add_argument('config', help='test config file')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--work-dir',
                        help='where logs and metrics go '
                        '(default: the config\'s work_dir, else ./work_dirs/<config name>)')
    parser.add_argument('--out', metavar='FILE.pkl',
                        help='also dump the raw predictions to this pickle file')
    parser.add_argument('--show', action='store_true', help='show predictions in a window')
    parser.add_argument('--show-dir', metavar='DIR',
                        help='save images with drawn predictions to DIR '
                        '(relative to <work_dir>/<timestamp>)')
    parser.add_argument('--wait-time', type=float, default=2,
                        help='seconds each image is shown with --show')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config keys, e.g. test_dataloader.batch_size=4')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'],
                        default='none', help='how the processes were started')
    parser.add_argument('--tta', action='store_true',
                        help='test-time augmentation: needs tta_pipeline in the config '
                        '(tta_model defaults to mmdet\'s DetTTAModel)')
    # torch.distributed.launch passes --local-rank (older versions --local_rank)
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args()
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    if args.out is not None and not args.out.endswith(('.pkl', '.pickle')):
        parser.error(f'--out must be a .pkl or .pickle file, got {args.out}')
    return args


def build_config(args: argparse.Namespace) -> Config:
    """The config of ``args.config`` with the command-line options applied."""
    cfg = load_tool_config(args.config, args.launcher, args.cfg_options, args.work_dir)
    cfg.load_from = args.checkpoint
    use_main_process_logger(cfg)  # one process writes the metrics file

    if args.show or args.show_dir:
        visualization = cfg.get('default_hooks', {}).get('visualization')
        if visualization is None:
            raise SystemExit('--show/--show-dir need default_hooks.visualization '
                             '(mmdet\'s DetVisualizationHook) in the config')
        visualization.draw = True
        if args.show:
            visualization.show = True
            visualization.wait_time = args.wait_time
        if args.show_dir:
            visualization.test_out_dir = args.show_dir

    if args.tta:
        if 'tta_pipeline' not in cfg:
            raise SystemExit('--tta needs a tta_pipeline in the config (e.g. a TestTimeAug '
                             'over flips); see configs/synthetic/ for one')
        cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline
        # without a tta_model in the config, merge the augmented views as mmdet does
        tta_model = cfg.get('tta_model') or ConfigDict(
            type='DetTTAModel',
            tta_cfg=dict(nms=dict(type='nms', iou_threshold=0.5), max_per_img=100))
        tta_model.module = cfg.model
        cfg.model = tta_model
    return cfg


def main() -> None:
    args = parse_args()
    # Only matters with torch.compile: detectors' dynamic shapes make dynamo recompile,
    # and mmdet caps its cache (DYNAMO_CACHE_SIZE_LIMIT, default 4) to bound that.
    setup_cache_size_limit_of_dynamo()
    cfg = build_config(args)
    try:
        check_dataset(cfg, ['test_dataloader', 'test_evaluator'])
    except DatasetError as err:
        raise SystemExit(f'{err}\n(config: {args.config})')
    if '://' not in args.checkpoint and not os.path.isfile(args.checkpoint):
        raise SystemExit(f'Checkpoint {args.checkpoint} does not exist\n(config: {args.config})')
    setup_cpu_distributed(cfg)  # gloo + a CPU DDP wrapper when torch has no CUDA
    runner = build_runner(cfg, args.config)
    if args.out is not None:
        runner.test_evaluator.metrics.append(DumpDetResults(out_file_path=args.out))
    runner.test()
    close_distributed(runner)  # before exit: gloo can abort at shutdown otherwise


if __name__ == '__main__':
    main()
