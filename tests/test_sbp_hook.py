"""SBPHook (keep-ratio schedules, logging, mask step) and the mask visualiser."""
import math
import subprocess
import sys
from pathlib import Path

import cv2
import pytest
from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.runner import Runner

import sbp_mmdet  # noqa: F401
from sbp_mmdet.datasets import generate_synthetic_coco
from sbp_mmdet.hooks import SBPHook, keep_ratio_schedule

from sbp_builders import load_tool

REPO = Path(__file__).resolve().parents[1]
TINY_SBP = REPO / 'configs' / 'synthetic' / 'faster-rcnn_r18_fpn_sbp_synthetic-tiny.py'


def test_schedule_warmup_steps_ramp_and_dense_tail():
    assert [keep_ratio_schedule(0.5, i, dense_warmup_iters=2) for i in range(4)] == \
        [1.0, 1.0, 0.5, 0.5]
    assert [keep_ratio_schedule(0.5, i, steps=[(2, 0.25), (3, 0.75)]) for i in range(4)] == \
        [0.5, 0.5, 0.25, 0.75]
    assert [keep_ratio_schedule(0.5, i, ramp=(1, 3, 1.0, 0.5)) for i in range(5)] == \
        [1.0, 1.0, 0.75, 0.5, 0.5]
    assert [keep_ratio_schedule(0.5, i, max_iters=4, dense_last_iters=1) for i in range(4)] == \
        [0.5, 0.5, 0.5, 1.0]


@pytest.mark.parametrize('kwargs,error', [
    (dict(dense_warmup_iters=-1), 'dense_warmup_iters must be a non-negative int'),
    (dict(steps=[(10, 1.5)]), 'keep_ratio must be in'),
    (dict(steps=[(10,)]), 'steps entries are'),
    (dict(ramp=(5, 2, 1.0, 0.5)), 'begin < end'),
    (dict(ramp=(0, 2, 1.0, 0.5), steps=[(1, 0.5)]), 'not both'),
    (dict(ramp=(-2, 5, 1.0, 0.5)), 'ramp begin must be a non-negative int'),
    (dict(ramp=(0, 2.5, 1.0, 0.5)), 'ramp end must be a non-negative int'),
    (dict(steps=[(-1, 0.5)]), 'steps start_iter must be a non-negative int'),
    (dict(dense_warmup_iters=True), 'dense_warmup_iters must be a non-negative int'),
    (dict(dense_last_epochs=1.5), 'dense_last_epochs must be a non-negative int'),
    (dict(steps=[(2, 0.5), (2, 0.25)]), r'steps start at the same iteration more than once: '
                                        r'\[2, 2\]'),
])
def test_bad_hook_settings_are_refused(kwargs, error):
    with pytest.raises(ValueError, match=error):
        SBPHook(**kwargs)


@pytest.fixture(scope='module')
def tiny_workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp('sbp_hook')
    cfg = Config.fromfile(str(TINY_SBP))
    generate_synthetic_coco(str(root / cfg.data_root), num_train=8, num_val=4,
                            img_size=cfg.img_scale[0], progress=False)
    return root


class _DrawnMasks(Hook):
    """Records the fraction of base-mask rows kept in each SBP iteration, read from the
    mask that the backbone's outputs carry (``SBPFeatures.iteration``)."""

    def before_train(self, runner: Runner) -> None:
        self.kept = []
        runner.model.backbone.register_forward_hook(self._record)

    def _record(self, module, args, features) -> None:
        if features.iteration.keep_ratio < 1.0:
            self.kept.append(features.iteration.base_mask.float().mean().item())


def test_hook_schedules_logs_and_drives_the_mask_step(tiny_workspace, monkeypatch):
    monkeypatch.chdir(tiny_workspace)
    cfg = Config.fromfile(str(TINY_SBP))
    cfg.work_dir = str(tiny_workspace / 'work_dirs' / 'hook')
    # keep 0.3 at the last step: 1 row in 3 of the 4-row base mask of the 64-pixel images
    # (stride 16), so what is kept (1 or 2 rows of 4) is not the keep ratio
    cfg.custom_hooks = [dict(type='SBPHook', dense_warmup_iters=1, steps=[(3, 0.3)])]
    # one-row grid cells: at keep 0.5 the base mask keeps 1 row in 2 for any offset
    cfg.model.backbone.sbp.grid_cell = 1
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', interval=100)
    cfg.val_cfg = cfg.val_dataloader = cfg.val_evaluator = None
    cfg.train_cfg.val_interval = 100
    runner = Runner.from_cfg(cfg)
    drawn = _DrawnMasks()
    runner.register_hook(drawn)
    runner.train()
    history = runner.message_hub.get_scalar('train/sbp/keep_ratio').data[0]
    assert list(history) == [1.0, 0.5, 0.5, 0.3]
    logged = {key: list(runner.message_hub.get_scalar(key).data[0])
              for key in runner.message_hub.log_scalars if 'kept_fraction' in key}
    # every stride SBP ran at (the backbone's stages 1-3 and the FPN laterals), SBP
    # iterations only, each the fraction of rows the iteration's mask kept
    assert drawn.kept[:2] == [0.5, 0.5] and drawn.kept[2] in (0.25, 0.5)
    assert logged == {f'train/sbp/kept_fraction_s{s}': drawn.kept for s in (4, 8, 16)}
    backbone = runner.model.backbone
    assert backbone.mask_sampler.step == runner.iter  # last step drawn was iteration 3


def test_visualiser_writes_one_panel_per_stride_and_sampling(tmp_path):
    image = tmp_path / 'img.png'
    cv2.imwrite(str(image), (255 * __import__('numpy').ones((64, 96, 3))).astype('uint8'))
    out = tmp_path / 'masks.png'
    proc = subprocess.run([sys.executable, str(REPO / 'tools' / 'visualize_sbp_masks.py'),
                           str(image), '--out', str(out), '--strides', '4', '8', '16'],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    drawn = cv2.imread(str(out))
    assert drawn.shape == (2 * 64, 3 * 96, 3)
    # about half of the rows are shaded (dropped) in each panel
    shaded = (drawn[..., 2].astype(int) > drawn[..., 0].astype(int) + 50).mean()
    assert 0.3 < shaded < 0.7


def test_visualiser_masks_match_across_strides():
    vis = load_tool('tools/visualize_sbp_masks.py')
    masks = vis.masks_for(64, 0.5, 'grid', [4, 8, 16], 16, seed=0, iteration=3)
    assert (masks[4] == masks[16]).all() and (masks[8] == masks[16]).all()
    assert masks[16].mean() == 0.5


def _train(cfg_path, work_dir, max_iters, resume=None, checkpoint_interval=2):
    cfg = Config.fromfile(str(cfg_path))
    cfg.work_dir = str(work_dir)
    cfg.randomness = dict(seed=0, deterministic=True)
    cfg.train_cfg.max_iters = max_iters
    cfg.train_cfg.val_interval = 100
    cfg.val_cfg = cfg.val_dataloader = cfg.val_evaluator = None
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', interval=checkpoint_interval,
                                        by_epoch=False)
    if resume:
        cfg.resume, cfg.load_from = True, str(resume)
    runner = Runner.from_cfg(cfg)
    runner.train()
    return list(runner.message_hub.get_scalar('train/loss').data[0])


def test_same_seed_same_losses_and_resume_continues_them(tiny_workspace, monkeypatch):
    """Two runs with one seed give identical losses; a run resumed from its
    iteration-2 checkpoint continues with the losses of the uninterrupted run
    (masks follow runner.iter; the hook checkpoints the samplers' generators)."""
    monkeypatch.chdir(tiny_workspace)
    first = _train(TINY_SBP, tiny_workspace / 'w1', 4)
    second = _train(TINY_SBP, tiny_workspace / 'w2', 4)
    assert first == second
    _train(TINY_SBP, tiny_workspace / 'w3', 2)
    resumed = _train(TINY_SBP, tiny_workspace / 'w3r', 4,
                     resume=tiny_workspace / 'w3' / 'iter_2.pth')
    assert resumed[-2:] == pytest.approx(first[-2:], rel=1e-6)


@pytest.mark.slow
def test_sbp_training_is_finite_and_the_loss_decreases(tiny_workspace, monkeypatch):
    """200 SBP iterations (about 3 minutes on one CPU thread): no NaN or Inf, and the
    mean loss of the last 20 iterations is well below that of the first 20."""
    monkeypatch.chdir(tiny_workspace)
    losses = _train(TINY_SBP, tiny_workspace / 'long', 200, checkpoint_interval=200)
    assert len(losses) == 200 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-20:]) < 0.8 * sum(losses[:20])


def test_a_misplaced_mask_key_or_own_mask_is_refused_before_training(tiny_workspace,
                                                                     monkeypatch):
    """A mask key on the neck fails when the runner builds the model; a neck told to draw
    its own mask behind an SBP backbone builds, and SBPHook refuses it before training."""
    monkeypatch.chdir(tiny_workspace)
    cfg = Config.fromfile(str(TINY_SBP))
    cfg.work_dir = str(tiny_workspace / 'work_dirs' / 'misplaced')
    cfg.val_cfg = cfg.val_dataloader = cfg.val_evaluator = None
    cfg.model.neck.sbp = dict(keep_ratio=0.25)
    with pytest.raises(ValueError, match='FPNSBP: sbp.keep_ratio is a mask setting'):
        Runner.from_cfg(cfg)
    cfg.model.neck.sbp = dict(own_mask=True)
    runner = Runner.from_cfg(cfg)
    with pytest.raises(ValueError, match='FPNSBP: sbp.own_mask=True behind an SBP backbone'):
        runner.train()
    assert runner.iter == 0 and 'train/loss' not in runner.message_hub.log_scalars


def test_hook_hands_the_boxes_to_an_object_aware_per_image_policy(tiny_workspace, monkeypatch):
    monkeypatch.chdir(tiny_workspace)
    cfg = Config.fromfile(str(TINY_SBP))
    cfg.work_dir = str(tiny_workspace / 'work_dirs' / 'objects')
    cfg.model.backbone.sbp.update(sampling='objects', per_image=True)
    cfg.custom_hooks = [dict(type='SBPHook')]
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', interval=100)
    cfg.val_cfg = cfg.val_dataloader = cfg.val_evaluator = None
    cfg.train_cfg.update(max_iters=2, val_interval=100)
    runner = Runner.from_cfg(cfg)
    runner.train()  # without the boxes the policy would refuse to draw
    iteration = runner.model.backbone.sbp_iteration
    batch_size = cfg.train_dataloader.batch_size
    assert iteration.per_image and iteration.base_mask.shape[0] == batch_size
    assert len(set(iteration.base_mask.sum(dim=1).tolist())) == 1
    assert runner.model._forward_pre_hooks == {}  # removed after training
