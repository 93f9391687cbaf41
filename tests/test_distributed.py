"""Two CPU processes through mmengine's launcher: tools/dist_train.sh and dist_test.sh."""
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from mmengine.config import Config

from sbp_mmdet.datasets import generate_synthetic_coco

REPO = Path(__file__).resolve().parents[1]
TINY_SBP = REPO / 'configs' / 'synthetic' / 'faster-rcnn_r18_fpn_sbp_synthetic-tiny.py'


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def run_script(script: str, args, cwd: Path) -> subprocess.CompletedProcess:
    """``bash tools/<script> args`` in ``cwd``, this folder importable (``sbp_recorder``)."""
    path = os.pathsep.join([str(REPO / 'tests'), os.environ.get('PYTHONPATH', '')])
    env = dict(os.environ, PYTHON=sys.executable, PORT=str(free_port()), OMP_NUM_THREADS='1',
               PYTHONPATH=path)
    proc = subprocess.run(['bash', str(REPO / 'tools' / script)] + [str(a) for a in args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f'{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}'
    return proc


def clone_like(folder: Path) -> Path:
    """``folder`` laid out as a clone after ``make env``: the repository's tools,
    configs and package, and ``.venv`` (this interpreter's environment); a
    ``python`` on ``PATH`` that cannot run anything, as a system Python without
    torch; and the tiny dataset."""
    for name in ('tools', 'configs'):  # copies: the scripts find .venv next to tools/
        shutil.copytree(REPO / name, folder / name)
    (folder / 'sbp_mmdet').symlink_to(REPO / 'sbp_mmdet')
    (folder / '.venv').symlink_to(Path(sys.prefix))
    fake_bin = folder / 'system_bin'
    fake_bin.mkdir()
    for name in ('python', 'python3'):
        (fake_bin / name).write_text('#!/bin/sh\necho "no torch here" >&2\nexit 1\n')
        (fake_bin / name).chmod(0o755)
    cfg = Config.fromfile(str(TINY_SBP))
    generate_synthetic_coco(str(folder / cfg.data_root), num_train=8, num_val=4,
                            img_size=cfg.img_scale[0], progress=False)
    return folder


@pytest.mark.slow
def test_two_process_cpu_training_and_evaluation_with_sbp_as_the_readme_writes_it(tmp_path):
    """``bash tools/dist_train.sh CONFIG 2`` from the repository root, with no
    PYTHON set and no usable ``python`` on PATH: the scripts find ``.venv``."""
    clone = clone_like(tmp_path)
    env = dict(os.environ, PORT=str(free_port()), OMP_NUM_THREADS='1',
               PATH=f"{clone / 'system_bin'}{os.pathsep}{os.environ['PATH']}")
    env.pop('PYTHON', None)
    config = 'configs/synthetic/faster-rcnn_r18_fpn_sbp_synthetic-tiny.py'
    proc = subprocess.run(['bash', 'tools/dist_train.sh', config, '2'], cwd=clone, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    work = clone / 'work_dirs' / 'faster-rcnn_r18_fpn_sbp_synthetic-tiny'
    max_iters = Config.fromfile(str(TINY_SBP)).train_cfg.max_iters
    checkpoint = work / f'iter_{max_iters}.pth'
    assert checkpoint.is_file()
    log = next(work.glob('*/vis_data/scalars.json')).read_text().splitlines()
    assert any('sbp/kept_fraction_s16' in line for line in log)
    env['PORT'] = str(free_port())
    proc = subprocess.run(['bash', 'tools/dist_test.sh', config, str(checkpoint), '2',
                           '--work-dir', 'work_dirs/dist_test'], cwd=clone, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads(sorted((clone / 'work_dirs' / 'dist_test').glob('*/*.json'))[-1]
                         .read_text())
    assert 'coco/bbox_mAP' in metrics


@pytest.mark.slow
def test_two_process_run_resumed_mid_epoch_repeats_losses_and_masks_of_every_rank(tmp_path):
    """2 processes, no fixed seed, random flips: resumed from the iteration-3
    checkpoint (the dataloader advances across an epoch end: 4 images per rank,
    batch 2), each rank logs the losses and draws the masks of the
    uninterrupted run; the ranks draw complementary grid masks (keep 0.5: every
    row kept by exactly one rank, at every iteration)."""
    cfg = Config.fromfile(str(TINY_SBP))
    generate_synthetic_coco(str(tmp_path / cfg.data_root), num_train=8, num_val=4,
                            img_size=cfg.img_scale[0], progress=False)
    config = tmp_path / 'recorded.py'
    config.write_text(f'_base_ = {str(TINY_SBP)!r}\n'
                      "custom_imports = dict(imports=['sbp_mmdet', 'sbp_recorder'], "
                      'allow_failed_imports=False)\n'
                      "custom_hooks = [dict(type='SBPHook'), dict(type='SBPRecorderHook')]\n")
    options = ['--cfg-options', 'train_cfg.max_iters=6', 'default_hooks.checkpoint.interval=3',
               'val_cfg=None', 'val_dataloader=None', 'val_evaluator=None']
    full, resumed = tmp_path / 'work_dirs' / 'full', tmp_path / 'work_dirs' / 'resumed'
    run_script('dist_train.sh', [config, 2, '--work-dir', full, *options], tmp_path)
    resumed.mkdir()
    shutil.copy(full / 'iter_3.pth', resumed)
    run_script('dist_train.sh', [config, 2, '--work-dir', resumed, '--resume',
                                 resumed / 'iter_3.pth', *options], tmp_path)
    masks = {}
    for rank in (0, 1):
        expected = [json.loads(line) for line in
                    (full / f'record_rank{rank}.jsonl').read_text().splitlines()]
        got = [json.loads(line) for line in
               (resumed / f'record_rank{rank}.jsonl').read_text().splitlines()]
        assert [r['iter'] for r in got] == [4, 5, 6]
        assert [r['mask'] for r in got] == [r['mask'] for r in expected[3:]]
        assert [r['loss'] for r in got] == pytest.approx([r['loss'] for r in expected[3:]],
                                                         rel=1e-6)
        masks[rank] = [r['mask'] for r in expected]
    assert len(masks[0]) == 6
    for mask_0, mask_1 in zip(masks[0], masks[1]):
        assert len(mask_0) == len(mask_1) and all(a != b for a, b in zip(mask_0, mask_1))


def test_test_tool_has_the_metrics_file_written_by_the_main_process_only():
    """mmengine's LoggerHook dumps the test metrics from every rank into one file;
    tools/test.py swaps in MainProcessLoggerHook, built from mmdet's registry."""
    from mmdet.registry import HOOKS
    from mmdet.utils import register_all_modules
    from mmengine.config import Config

    from sbp_mmdet.engine import MainProcessLoggerHook, use_main_process_logger
    register_all_modules()
    cfg = Config.fromfile(str(REPO / 'configs' / 'synthetic' / 'faster-rcnn_r18_fpn_synthetic.py'))
    assert cfg.default_hooks.logger.type == 'LoggerHook'
    use_main_process_logger(cfg)
    hook = HOOKS.build(cfg.default_hooks.logger)
    assert isinstance(hook, MainProcessLoggerHook) and hook.interval == 20
    cfg.default_hooks.logger.type = 'TextLoggerHookOfMine'  # someone else's: left alone
    use_main_process_logger(cfg)
    assert cfg.default_hooks.logger.type == 'TextLoggerHookOfMine'


def test_close_distributed_releases_the_ddp_wrapper_and_destroys_the_process_group(tmp_path):
    """A gloo group still referenced by a DDP wrapper at interpreter shutdown can
    abort the process (SIGABRT); tools/train.py and tools/test.py end with
    ``close_distributed(runner)``, which drops the wrapper, even from inside a
    reference cycle, and destroys the group."""
    import gc
    import weakref

    import torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel

    from sbp_mmdet.engine import close_distributed

    class Runner:  # the part of mmengine's Runner close_distributed touches
        model = None

    close_distributed(Runner())  # outside a distributed run: nothing to do
    dist.init_process_group('gloo', init_method=f'file://{tmp_path / "store"}',
                            rank=0, world_size=1)
    try:
        runner = Runner()
        runner.model = DistributedDataParallel(nn.Linear(2, 2))
        runner.itself = runner  # a cycle, as the Runner's hooks and loops make
        wrapper = weakref.ref(runner.model)
        close_distributed(runner)
        del runner
        assert wrapper() is None and not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        gc.collect()
