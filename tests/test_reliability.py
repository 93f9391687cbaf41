"""Reliability on the tiny synthetic set: a killed run resumes exactly, multi-scale
training stays finite and resumes exactly, and bad data stops training with the file and
the problem named, or is counted in a warning where mmdet drops it.

Each test works in a temporary folder where the tiny config finds its data
(``data/synthetic_coco_tiny/``); ``tools/train.py`` runs as a subprocess there, as a
user runs it (see ``test_tools.py``).
"""
import copy
import itertools
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, List, Sequence

import pytest
import torch
from mmdet.registry import DATASETS
from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.registry import init_default_scope
from mmengine.runner import Runner

import sbp_mmdet  # noqa: F401
from sbp_mmdet.utils import AnnotationFileError, check_dataset, dataset_check

REPO = Path(__file__).resolve().parents[1]
TINY_SBP = REPO / 'configs' / 'synthetic' / 'faster-rcnn_r18_fpn_sbp_synthetic-tiny.py'
TINY_CFG = Config.fromfile(str(TINY_SBP))


@pytest.fixture
def workspace_copy(workspace: Path, tmp_path: Path) -> Path:
    """``tmp_path`` with a copy of the tiny dataset, for one test to damage."""
    shutil.copytree(workspace / 'data', tmp_path / 'data')
    return tmp_path


def train_command(config: Path, work_dir: Path, max_iters: int, *args: str) -> List[str]:
    """``tools/train.py`` on ``config`` as the demo trains: no fixed seed; a
    checkpoint and an unsmoothed loss log every iteration, no validation. ``args``
    come last: more ``key=value`` overrides, then other options."""
    return [sys.executable, str(REPO / 'tools' / 'train.py'), str(config),
            '--work-dir', str(work_dir), '--cfg-options',
            f'train_cfg.max_iters={max_iters}', 'default_hooks.checkpoint.interval=1',
            'log_processor.window_size=1', 'val_cfg=None', 'val_dataloader=None',
            'val_evaluator=None', *args]


def run_train(config: Path, work_dir: Path, max_iters: int, *args: str, cwd: Path) -> str:
    """Run :func:`train_command` to the end; its console output."""
    proc = subprocess.run(train_command(config, work_dir, max_iters, *args), cwd=cwd,
                          capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONPATH=recorder_path()))
    assert proc.returncode == 0, f'train.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}'
    return proc.stdout + proc.stderr


def recorder_path() -> str:
    """``PYTHONPATH`` for a subprocess that imports ``sbp_recorder`` (this folder)."""
    return os.pathsep.join([str(REPO / 'tests'), str(REPO), os.environ.get('PYTHONPATH', '')])


def recording_config(folder: Path) -> Path:
    """The tiny SBP config plus ``SBPRecorderHook`` (every rank's loss and mask)."""
    config = folder / 'recorded_sbp_tiny.py'
    config.write_text(f'_base_ = {str(TINY_SBP)!r}\n'
                      "custom_imports = dict(imports=['sbp_mmdet', 'sbp_recorder'], "
                      'allow_failed_imports=False)\n'
                      "custom_hooks = [dict(type='SBPHook'), dict(type='SBPRecorderHook')]\n")
    return config


def records(work_dir: Path, rank: int = 0) -> List[dict]:
    """What ``SBPRecorderHook`` wrote for ``rank``, in order."""
    lines = (work_dir / f'record_rank{rank}.jsonl').read_text().splitlines()
    return [json.loads(line) for line in lines]


def last_checkpoint_iter(work_dir: Path) -> int:
    """The iteration of the checkpoint that ``work_dir/last_checkpoint`` names, 0 if none."""
    last = work_dir / 'last_checkpoint'
    match = re.search(r'iter_(\d+)\.pth$', last.read_text().strip()) if last.is_file() else None
    return int(match.group(1)) if match else 0


class _WeightsBeforeTraining(Hook):
    """Keeps a copy of the model's parameters as training starts (after their init)."""

    def before_train(self, runner: Runner) -> None:
        self.weights = {name: p.detach().clone() for name, p in runner.model.named_parameters()}


def test_the_tiny_config_trains_as_the_demo_does(workspace: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """What the resume tests rely on: each run draws its own seed, the training
    pipeline flips some images and not others, and two iterations move the
    weights of every part, the backbone's SBP stages included."""
    monkeypatch.chdir(workspace)
    runners = []
    for name in ('first', 'second'):
        cfg = copy.deepcopy(TINY_CFG)
        cfg.work_dir = str(tmp_path / name)
        cfg.train_cfg.max_iters = 2
        cfg.val_cfg = cfg.val_dataloader = cfg.val_evaluator = None
        cfg.default_hooks.checkpoint = dict(type='CheckpointHook', interval=100)
        runners.append(Runner.from_cfg(cfg))
    assert runners[0].seed != runners[1].seed  # no fixed seed: one drawn per run
    runner = runners[1]
    before = _WeightsBeforeTraining()
    runner.register_hook(before)
    runner.train()
    assert runner.iter == 2
    after = dict(runner.model.named_parameters())
    moved = {name.split('.')[0] for name, p in before.weights.items()
             if not torch.equal(p, after[name])}
    assert moved == {'backbone', 'neck', 'rpn_head', 'roi_head'}
    backbone = runner.model.backbone
    for layer, switches in zip(backbone.res_layers, backbone.sbp_blocks):
        if any(switches):  # an SBP stage learns
            assert any(not torch.equal(before.weights[f'backbone.{layer}.{n}'], p)
                       for n, p in getattr(backbone, layer).named_parameters()), layer
    samples = itertools.islice(iter(runner.train_dataloader), 16)  # 32 images
    flips = {s.metainfo['flip'] for batch in samples for s in batch['data_samples']}
    assert flips == {False, True}


@pytest.mark.slow
def test_run_killed_mid_training_resumes_with_the_same_losses_and_masks(
        workspace: Path) -> None:
    """SIGKILL right after a checkpoint; ``--resume`` goes on from that checkpoint,
    past the truncated file a kill during the next save leaves. The run has no fixed
    seed and flips images at random: every loss and mask of the killed and the
    resumed process equals those of an uninterrupted run with the run's seed."""
    max_iters = 8
    config = recording_config(workspace)
    work_dir = workspace / 'work_dirs' / 'killed'
    proc = subprocess.Popen(train_command(config, work_dir, max_iters), cwd=workspace,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, PYTHONPATH=recorder_path()))
    deadline = time.monotonic() + 300
    while last_checkpoint_iter(work_dir) < 2:
        assert proc.poll() is None, 'training ended before it could be killed'
        assert time.monotonic() < deadline, 'no checkpoint after 300 s'
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    killed_at = last_checkpoint_iter(work_dir)
    assert 2 <= killed_at < max_iters
    partial = work_dir / f'iter_{killed_at + 1}.pth'
    if not partial.exists():  # what a kill during the next save leaves
        partial.write_bytes((work_dir / f'iter_{killed_at}.pth').read_bytes()[:4096])
    seed = torch.load(work_dir / f'iter_{killed_at}.pth', map_location='cpu')['meta']['seed']

    output = run_train(config, work_dir, max_iters, '--resume', cwd=workspace)
    assert f'resumed epoch: 0, iter: {killed_at}' in output
    interrupted = records(work_dir)
    assert [r['iter'] for r in interrupted][-(max_iters - killed_at):] == \
        list(range(killed_at + 1, max_iters + 1))

    reference = workspace / 'work_dirs' / 'uninterrupted'
    run_train(config, reference, max_iters, f'randomness.seed={seed}', cwd=workspace)
    expected = {r['iter']: r for r in records(reference)}
    assert len({r['mask'] for r in expected.values()}) > 1  # masks change between iterations
    for record in interrupted:
        assert record['mask'] == expected[record['iter']]['mask'], record['iter']
        assert record['loss'] == pytest.approx(expected[record['iter']]['loss'], rel=1e-6)


EPOCH_BASED = """
train_cfg = dict(_delete_=True, type='EpochBasedTrainLoop', max_epochs=3, val_interval=100)
train_dataloader = dict(num_workers=1, persistent_workers={persistent})
default_hooks = dict(checkpoint=dict(by_epoch=True, interval=1, max_keep_ckpts=5))
log_processor = dict(by_epoch=True)
"""


@pytest.mark.slow
@pytest.mark.parametrize('persistent', [False, True])
def test_epoch_based_run_with_data_workers_resumes_with_the_same_losses_and_masks(
        workspace: Path, persistent: bool) -> None:
    """As the COCO configs train: epochs, a data worker (restarted each epoch),
    random flips, no fixed seed. Resumed from the epoch-1 checkpoint, the run
    repeats the losses and masks of epochs 2 and 3. With a persistent worker
    the masks are the same, the augmentations are not, and the hook says so."""
    config = recording_config(workspace)
    config.write_text(config.read_text() + EPOCH_BASED.format(persistent=persistent))
    full = workspace / 'work_dirs' / f'epochs_{persistent}'
    command = [sys.executable, str(REPO / 'tools' / 'train.py'), str(config), '--cfg-options',
               'val_cfg=None', 'val_dataloader=None', 'val_evaluator=None', '--work-dir']
    env = dict(os.environ, PYTHONPATH=recorder_path())
    subprocess.run([*command, str(full)], cwd=workspace, env=env, check=True,
                   capture_output=True, timeout=600)
    resumed = workspace / 'work_dirs' / f'epochs_{persistent}_resumed'
    resumed.mkdir()
    shutil.copy(full / 'epoch_1.pth', resumed)
    proc = subprocess.run([*command, str(resumed), '--resume', str(resumed / 'epoch_1.pth')],
                          cwd=workspace, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected, got = records(full), records(resumed)
    assert [r['iter'] for r in expected] == list(range(1, 13))
    assert [r['iter'] for r in got] == list(range(5, 13))
    assert [r['mask'] for r in got] == [r['mask'] for r in expected[4:]]
    warning = 'SBPHook: the data workers of this epoch-based loop persist across epochs'
    assert (warning in proc.stdout) is persistent
    if not persistent:
        assert [r['loss'] for r in got] == pytest.approx([r['loss'] for r in expected[4:]],
                                                         rel=1e-6)


@pytest.mark.parametrize('config', ['faster_rcnn_r50_sbp.py', 'retinanet_r50_sbp.py'])
def test_coco_configs_resume_exactly(config: str) -> None:
    """SBPHook (masks from the run seed, reseeded generators) and data workers
    restarted each epoch (see the test above)."""
    cfg = Config.fromfile(str(REPO / 'configs' / config))
    assert [hook['type'] for hook in cfg.custom_hooks] == ['SBPHook']
    assert cfg.train_dataloader.num_workers > 0
    assert cfg.train_dataloader.persistent_workers is False
    assert cfg.train_cfg.type == 'EpochBasedTrainLoop'


class SBPMasks(Hook):
    """Records the SBP base mask of every training iteration."""

    def __init__(self) -> None:
        self.masks: List[tuple] = []

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        self.masks.append(tuple(runner.model.backbone.sbp_iteration.base_mask.tolist()))


def multi_scale_runner(work_dir: Path, max_iters: int, resume_from: Path = None) -> Runner:
    """The tiny SBP config with every image resized to its own random scale."""
    cfg = Config.fromfile(str(TINY_SBP))
    cfg.work_dir = str(work_dir)
    cfg.randomness = dict(seed=0)
    cfg.train_dataloader.dataset.pipeline = [
        dict(type='LoadImageFromFile'),
        dict(type='LoadAnnotations', with_bbox=True),
        dict(type='RandomResize', scale=cfg.img_scale, ratio_range=(0.5, 2.0), keep_ratio=True),
        dict(type='RandomFlip', prob=0.5),
        dict(type='PackDetInputs'),
    ]
    cfg.train_cfg.max_iters = max_iters
    cfg.default_hooks.checkpoint.interval = 3
    cfg.val_cfg = cfg.val_dataloader = cfg.val_evaluator = None
    if resume_from is not None:
        cfg.resume, cfg.load_from = True, str(resume_from)
    return Runner.from_cfg(cfg)


def test_multi_scale_training_with_sbp_stays_finite_and_resumes_exactly(
        workspace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every image resized to its own random scale: batches of different padded
    sizes, each padded from images of different sizes, train with SBP; resumed
    from iteration 3, the run draws the same scales, flips and masks."""
    monkeypatch.chdir(workspace)
    work_dir = workspace / 'work_dirs' / 'multi_scale'
    runner = multi_scale_runner(work_dir, 6)
    masks = SBPMasks()
    runner.register_hook(masks)
    runner.train()
    losses = runner.message_hub.get_scalar('train/loss').data[0]
    assert len(losses) == 6 and all(math.isfinite(v) for v in losses)
    assert len({len(m) for m in masks.masks}) > 1, masks.masks  # several padded heights

    resumed = multi_scale_runner(workspace / 'work_dirs' / 'multi_scale_resumed', 6,
                                 resume_from=work_dir / 'iter_3.pth')
    resumed_masks = SBPMasks()
    resumed.register_hook(resumed_masks)
    resumed.train()
    assert resumed_masks.masks == masks.masks[3:]
    assert list(resumed.message_hub.get_scalar('train/loss').data[0])[-3:] == \
        pytest.approx(list(losses[3:]), rel=1e-6)


TRAIN_ANNOTATIONS = 'annotations/instances_train2017.json'


@pytest.mark.parametrize('edit,problem', [
    (lambda coco: '{"images": [', 'not valid JSON'),
    (lambda coco: json.dumps(coco['images']), 'the top level is a JSON list'),
    (lambda coco: json.dumps(dict(coco, images=None)), 'no "images" list'),
    (lambda coco: json.dumps(dict(coco, images=[], annotations=[])), '"images" is empty'),
], ids=['not-json', 'json-list', 'no-images-key', 'no-image'])
def test_bad_annotation_file_is_named_with_its_problem(workspace_copy: Path,
                                                       monkeypatch: pytest.MonkeyPatch, edit,
                                                       problem: str) -> None:
    annotations = workspace_copy / TINY_CFG.data_root / TRAIN_ANNOTATIONS
    annotations.write_text(edit(json.loads(annotations.read_text())))
    monkeypatch.chdir(workspace_copy)
    with pytest.raises(AnnotationFileError) as error:
        check_dataset(TINY_CFG, ['train_dataloader', 'val_dataloader'])
    message = str(error.value)
    assert f'{TINY_CFG.data_root}{TRAIN_ANNOTATIONS} (train_dataloader)' in message
    assert problem in message


def test_annotation_files_above_the_size_limit_are_left_to_the_dataset(
        workspace_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    annotations = workspace_copy / TINY_CFG.data_root / TRAIN_ANNOTATIONS
    annotations.write_text('[]')
    monkeypatch.chdir(workspace_copy)
    with pytest.raises(AnnotationFileError):
        check_dataset(TINY_CFG, ['train_dataloader'])
    monkeypatch.setattr(dataset_check, 'MAX_CHECKED_ANN_BYTES', 1)
    check_dataset(TINY_CFG, ['train_dataloader'])  # not parsed a second time


def edit_annotations(workspace: Path, edit: Callable[[dict], dict]) -> dict:
    """Rewrite the tiny train annotation file with ``edit``; the new content."""
    annotations = workspace / TINY_CFG.data_root / TRAIN_ANNOTATIONS
    coco = edit(json.loads(annotations.read_text()))
    annotations.write_text(json.dumps(coco))
    return coco


def with_box(coco: dict, index: int, bbox: list) -> dict:
    """``coco`` with the box (and area) of its ``index``-th annotation replaced."""
    annotations = [dict(a) for a in coco['annotations']]
    annotations[index].update(bbox=bbox, area=bbox[2] * bbox[3])
    return dict(coco, annotations=annotations)


def with_category(coco: dict, indices: Sequence[int], category_id: int) -> dict:
    """``coco`` with the category of the annotations at ``indices`` replaced."""
    annotations = [dict(a, category_id=category_id) if i in indices else a
                   for i, a in enumerate(coco['annotations'])]
    return dict(coco, annotations=annotations)


def test_train_with_no_annotation_stops_before_training_naming_the_file(
        workspace_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """mmdet itself fails with a bare 'need at least one array to concatenate'."""
    coco = edit_annotations(workspace_copy, lambda coco: dict(coco, annotations=[]))
    monkeypatch.chdir(workspace_copy)
    with pytest.raises(ValueError, match='need at least one array to concatenate'):
        init_default_scope('mmdet')
        DATASETS.build(TINY_CFG.train_dataloader.dataset)
    proc = subprocess.run(train_command(TINY_SBP, workspace_copy / 'work_dirs' / 'empty', 4),
                          cwd=workspace_copy, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert (f'Annotation file {TINY_CFG.data_root}{TRAIN_ANNOTATIONS} (train_dataloader): '
            f'"annotations" is empty ({len(coco["images"])} images, 0 annotations)'
            in proc.stderr.strip().splitlines()[-2])  # last but the config line
    assert not (workspace_copy / 'work_dirs').exists()  # stopped before the Runner


def test_images_listed_but_missing_stop_training_up_front(workspace_copy: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    images = sorted((workspace_copy / TINY_CFG.data_root / 'train2017').iterdir())
    for image in images[:2]:
        image.unlink()
    monkeypatch.chdir(workspace_copy)
    with pytest.raises(AnnotationFileError) as error:
        check_dataset(TINY_CFG, ['train_dataloader'])
    assert (f'{TINY_CFG.data_root}{TRAIN_ANNOTATIONS} (train_dataloader): 2 of the '
            f'{len(images)} images it lists are not in {TINY_CFG.data_root}train2017/: '
            f'{images[0].name}, {images[1].name}') in str(error.value)


def test_boxes_and_categories_that_mmdet_drops_are_counted_in_warnings(
        workspace_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    coco = edit_annotations(workspace_copy, lambda coco: with_category(
        with_box(coco, 0, [10, 10, -5, 8]), [1, 2], 99))
    monkeypatch.chdir(workspace_copy)
    warnings = check_dataset(TINY_CFG, ['train_dataloader'])
    where = f'Annotation file {TINY_CFG.data_root}{TRAIN_ANNOTATIONS} (train_dataloader): '
    total = len(coco['annotations'])
    assert warnings == [
        f'{where}1 of the {total} annotations have a box that mmdet drops (width or height '
        f'< 1, area <= 0, or outside the image), e.g. annotation id '
        f'{coco["annotations"][0]["id"]} with bbox [10, 10, -5, 8]',
        f'{where}2 of the {total} annotations have a category_id that is not in "categories" '
        '(99); mmdet drops them']
    # the same data without the problems: no warning
    edit_annotations(workspace_copy, lambda coco: with_category(
        with_box(coco, 0, [10, 10, 5, 8]), [1, 2], coco['categories'][0]['id']))
    assert check_dataset(TINY_CFG, ['train_dataloader']) == []


def test_no_usable_annotation_is_an_error_for_training_only(workspace_copy: Path,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    coco = edit_annotations(workspace_copy, lambda coco: with_category(
        coco, range(len(coco['annotations'])), 99))
    monkeypatch.chdir(workspace_copy)
    with pytest.raises(AnnotationFileError,
                       match=f'none of its {len(coco["annotations"])} annotations is usable'):
        check_dataset(TINY_CFG, ['train_dataloader'])
    test_cfg = Config(dict(test_dataloader=TINY_CFG.train_dataloader))
    assert len(check_dataset(test_cfg, ['test_dataloader'])) == 1  # a warning only


def test_train_with_a_corrupt_image_names_the_image(workspace_copy: Path) -> None:
    image = Path(TINY_CFG.data_root, 'train2017', '000000000003.png')
    (workspace_copy / image).write_bytes(b'not an image' * 100)
    proc = subprocess.run(train_command(TINY_SBP, workspace_copy / 'work_dirs' / 'corrupt', 4),
                          cwd=workspace_copy, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert f'failed to load image: {image}' in proc.stderr
