"""tools/train.py and tools/test.py through the real mmengine Runner, on tiny synthetic data.

Each tool runs as a subprocess in a temporary folder, as a user would run it: the
tiny config finds its dataset at data/synthetic_coco_tiny/ and writes to work_dirs/.
"""
import copy
import json
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import List

import pytest
import torch
from mmengine.config import Config

import sbp_mmdet  # noqa: F401  the checkpoint compat fix under test
from sbp_mmdet.datasets import generate_synthetic_coco
from sbp_mmdet.utils import DatasetNotFoundError, check_dataset, missing_dataset_files

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / 'configs' / 'synthetic' / 'faster-rcnn_r18_fpn_synthetic-tiny.py')
TINY_CFG = Config.fromfile(TINY)
MAX_ITERS = TINY_CFG.train_cfg.max_iters


def run_tool(tool: str, args: List[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run ``tools/<tool>`` with this interpreter in ``cwd``; fail loudly on error."""
    proc = subprocess.run([sys.executable, str(REPO / 'tools' / tool)] + args, cwd=cwd,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f'{tool} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}'
    return proc


def logged_metrics(work_dir: Path) -> dict:
    """The metrics that the last ``tools/test.py`` run in ``work_dir`` logged."""
    logs = sorted(work_dir.glob('*/*.json'))
    return json.loads(logs[-1].read_text())


@pytest.fixture(scope='module')
def trained(workspace: Path) -> Path:
    """The work dir of a finished tiny training run."""
    run_tool('train.py', [TINY, '--work-dir', 'work_dirs/tiny'], workspace)
    return workspace / 'work_dirs' / 'tiny'


def test_train_writes_checkpoints(trained: Path) -> None:
    assert (trained / f'iter_{MAX_ITERS}.pth').is_file()
    last = (trained / 'last_checkpoint').read_text().strip()
    assert Path(last).name == f'iter_{MAX_ITERS}.pth'


def test_checkpoint_loads_with_weights_only(trained: Path) -> None:
    """mmengine checkpoints hold HistoryBuffers and numpy data; sbp_mmdet allow-lists them."""
    path = trained / f'iter_{MAX_ITERS}.pth'
    assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == []  # all allowed
    ckpt = torch.load(path, map_location='cpu', weights_only=True)
    assert ckpt['meta']['iter'] == MAX_ITERS
    assert 'train/loss' in ckpt['message_hub']['log_scalars']
    assert 'backbone.conv1.weight' in ckpt['state_dict']


def test_compat_fix_is_still_needed(trained: Path) -> None:
    """Without ``import sbp_mmdet`` torch refuses mmengine's checkpoints.

    When this fails, mmengine or torch load such checkpoints by themselves:
    delete sbp_mmdet/compat.py and this test.
    """
    code = ('import sys, torch; torch.load(sys.argv[1], map_location="cpu")')
    proc = subprocess.run([sys.executable, '-c', code, str(trained / f'iter_{MAX_ITERS}.pth')],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and 'Weights only load failed' in proc.stderr


def checkpoint_model(checkpoint: Path) -> torch.nn.Module:
    """The tiny config's detector with the weights of ``checkpoint``, in eval mode."""
    from mmdet.registry import MODELS
    from mmengine.registry import init_default_scope
    from mmengine.runner import load_checkpoint
    init_default_scope('mmdet')
    model = MODELS.build(TINY_CFG.model)
    load_checkpoint(model, str(checkpoint), map_location='cpu')
    return model.eval()


def val_set(workspace: Path, pipeline: list):
    """The tiny validation set in ``workspace`` through ``pipeline``."""
    from mmdet.registry import DATASETS
    cfg = copy.deepcopy(TINY_CFG.test_dataloader.dataset)
    cfg.update(data_root=str(workspace / TINY_CFG.data_root), pipeline=pipeline)
    return DATASETS.build(cfg)


def predict(model: torch.nn.Module, inputs: torch.Tensor, data_sample) -> dict:
    """``model``'s prediction for one image: bboxes, scores, labels."""
    from mmengine.dataset import pseudo_collate
    with torch.no_grad():
        (result,) = model.test_step(pseudo_collate([dict(inputs=inputs,
                                                         data_samples=data_sample)]))
    return {key: result.pred_instances[key] for key in ('bboxes', 'scores', 'labels')}


def assert_same_predictions(predictions: dict, expected: dict) -> None:
    for key in ('bboxes', 'scores', 'labels'):
        torch.testing.assert_close(predictions[key], expected[key], atol=1e-4, rtol=1e-4,
                                   msg=lambda m: f'{key}: {m}')


def coco_stats(predictions: List[dict], ann_file: Path) -> List[float]:
    """COCOeval's bbox mAP, mAP@0.5 and mAP@0.75 of ``predictions`` (tools/test.py
    ``--out`` entries), computed here with pycocotools alone."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from sbp_mmdet.datasets import CLASSES
    gt = COCO(str(ann_file))
    category = {c['name']: c['id'] for c in gt.loadCats(gt.getCatIds())}
    detections = [dict(image_id=p['img_id'], category_id=category[CLASSES[int(label)]],
                       bbox=[x1, y1, x2 - x1, y2 - y1], score=float(score))
                  for p in predictions
                  for (x1, y1, x2, y2), score, label in zip(
                      p['pred_instances']['bboxes'].tolist(), p['pred_instances']['scores'],
                      p['pred_instances']['labels'])]
    evaluation = COCOeval(gt, gt.loadRes(detections), 'bbox')
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    return list(evaluation.stats[:3])


def test_test_evaluates_checkpoint_with_coco_metrics(trained: Path, tmp_path: Path) -> None:
    """The predictions are the checkpoint's (the model run here on the same
    images), the logged mAPs are COCO's for those predictions."""
    workspace = trained.parent.parent
    checkpoint = trained / f'iter_{MAX_ITERS}.pth'
    results = tmp_path / 'results.pkl'
    run_tool('test.py', [TINY, str(checkpoint), '--work-dir', str(tmp_path), '--out',
                         str(results), '--show-dir', 'vis'], workspace)
    metrics = logged_metrics(tmp_path)
    with open(results, 'rb') as f:
        predictions = pickle.load(f)
    model = checkpoint_model(checkpoint)
    dataset = val_set(workspace, TINY_CFG.test_dataloader.dataset.pipeline)
    assert [p['img_id'] for p in predictions] == [
        dataset.get_data_info(i)['img_id'] for i in range(len(dataset))]
    assert sum(len(p['pred_instances']['scores']) for p in predictions) > 0
    for i, prediction in enumerate(predictions):
        item = dataset[i]
        assert_same_predictions(prediction['pred_instances'],
                                predict(model, item['inputs'], item['data_samples']))
    expected = coco_stats(predictions, workspace / TINY_CFG.val_evaluator.ann_file)
    logged = [metrics[f'coco/bbox_{key}'] for key in ('mAP', 'mAP_50', 'mAP_75')]
    assert logged == [round(stat, 3) for stat in expected]  # CocoMetric logs 3 decimals
    assert len(list(tmp_path.glob('*/vis/*.png'))) == 4


def flip_merged(views: List[dict], metas: List[dict]) -> dict:
    """The flip TTA result of one image: the views' boxes, those of flipped views
    mirrored back, pooled and reduced by per-class NMS (IoU 0.5, 100 at most)."""
    from mmcv.ops import batched_nms
    boxes = []
    for view, meta in zip(views, metas):
        b = view['bboxes'].clone()
        if meta['flip']:
            assert meta['flip_direction'] == 'horizontal'
            width = meta['ori_shape'][1]
            b[:, 0], b[:, 2] = width - view['bboxes'][:, 2], width - view['bboxes'][:, 0]
        boxes.append(b)
    boxes, scores = torch.cat(boxes), torch.cat([v['scores'] for v in views])
    labels = torch.cat([v['labels'] for v in views])
    if not len(boxes):
        return views[0]
    dets, keep = batched_nms(boxes, scores, labels, dict(type='nms', iou_threshold=0.5))
    return dict(bboxes=dets[:100, :4], scores=dets[:100, 4], labels=labels[keep][:100])


def test_test_with_flip_tta_merges_the_flipped_views(trained: Path, tmp_path: Path) -> None:
    """--tta: each image's predictions are those of the image and of its mirror
    image (boxes mirrored back) merged by NMS, computed here from the checkpoint."""
    workspace = trained.parent.parent
    checkpoint = trained / f'iter_{MAX_ITERS}.pth'
    results = tmp_path / 'tta.pkl'
    run_tool('test.py', [TINY, str(checkpoint), '--tta', '--work-dir', str(tmp_path),
                         '--out', str(results)], workspace)
    assert 'coco/bbox_mAP' in logged_metrics(tmp_path)
    with open(results, 'rb') as f:
        predictions = pickle.load(f)
    model = checkpoint_model(checkpoint)
    dataset = val_set(workspace, TINY_CFG.tta_pipeline)
    plain = val_set(workspace, TINY_CFG.test_dataloader.dataset.pipeline)
    assert len(predictions) == len(dataset) == 4
    differs = False
    for i, prediction in enumerate(predictions):
        item = dataset[i]
        metas = [sample.metainfo for sample in item['data_samples']]
        assert sorted(meta['flip'] for meta in metas) == [False, True]
        views = [predict(model, inputs, sample)
                 for inputs, sample in zip(item['inputs'], item['data_samples'])]
        assert_same_predictions(prediction['pred_instances'], flip_merged(views, metas))
        unflipped = predict(model, plain[i]['inputs'], plain[i]['data_samples'])
        differs |= not torch.equal(prediction['pred_instances']['scores'], unflipped['scores'])
    assert differs  # the mirrored view changed the predictions


@pytest.mark.parametrize('resume', ['auto', 'path'])
def test_resume_continues_from_the_checkpoint_iteration(trained: Path, tmp_path: Path,
                                                        resume: str) -> None:
    """--resume picks up at the saved iteration and trains on to the new max_iters."""
    work_dir = tmp_path / 'resumed'
    shutil.copytree(trained, work_dir)
    ckpt = work_dir / f'iter_{MAX_ITERS}.pth'
    args = ['--resume'] if resume == 'auto' else ['--resume', str(ckpt)]
    proc = run_tool('train.py', [TINY, '--work-dir', str(work_dir), *args, '--cfg-options',
                                 f'train_cfg.max_iters={MAX_ITERS + 2}'],
                    trained.parent.parent)
    assert f'resumed epoch: 0, iter: {MAX_ITERS}' in proc.stdout + proc.stderr
    final = torch.load(work_dir / f'iter_{MAX_ITERS + 2}.pth', map_location='cpu',
                       weights_only=True)
    assert final['meta']['iter'] == MAX_ITERS + 2


def test_missing_checkpoints_stop_the_tools_before_the_runner(trained: Path,
                                                              tmp_path: Path) -> None:
    for tool, args in (('train.py', [TINY, '--resume', 'missing.pth']),
                       ('test.py', [TINY, 'missing.pth'])):
        proc = subprocess.run([sys.executable, str(REPO / 'tools' / tool), *args],
                              cwd=trained.parent.parent, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 1
        assert 'missing.pth does not exist' in proc.stderr.strip().splitlines()[-2], tool
    truncated = tmp_path / 'iter_1.pth'
    truncated.write_bytes((trained / f'iter_{MAX_ITERS}.pth').read_bytes()[:4096])
    proc = subprocess.run([sys.executable, str(REPO / 'tools' / 'train.py'), TINY, '--resume',
                           str(truncated), '--work-dir', str(tmp_path / 'w')],
                          cwd=trained.parent.parent, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert f'Cannot resume: checkpoint {truncated} cannot be read' in proc.stderr
    assert not (tmp_path / 'w').exists()


def test_resuming_across_dense_and_sbp_configs_warns(trained: Path, tmp_path: Path) -> None:
    """The dense tiny run's checkpoint resumed by the SBP config, and the same
    checkpoint marked as an SBP run's (``meta.sbp``) resumed by the dense config."""
    sbp_tiny = str(REPO / 'configs' / 'synthetic' / 'faster-rcnn_r18_fpn_sbp_synthetic-tiny.py')
    dense_ckpt = trained / f'iter_{MAX_ITERS}.pth'
    checkpoint = torch.load(dense_ckpt, map_location='cpu')
    assert 'sbp' not in checkpoint['meta']
    checkpoint['meta']['sbp'] = dict(seed=checkpoint['meta']['seed'])
    sbp_ckpt = tmp_path / 'sbp.pth'
    torch.save(checkpoint, sbp_ckpt)
    for config, ckpt, warning in (
            (sbp_tiny, dense_ckpt, 'SBPHook: resumed at iteration 4 from a checkpoint written '
             'without SBPHook (a dense run, or an SBP run without the hook)'),
            (TINY, sbp_ckpt, f'Resuming from {sbp_ckpt}, written by an SBP run (SBPHook), '
             'with a config that has no SBPHook')):
        proc = run_tool('train.py', [config, '--work-dir', str(tmp_path / Path(config).stem),
                                     '--resume', str(ckpt), '--cfg-options',
                                     f'train_cfg.max_iters={MAX_ITERS + 1}'],
                        trained.parent.parent)
        assert warning in proc.stdout + proc.stderr


COCO_CONFIGS = [
    'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py',  # what the SBP configs inherit
    str(REPO / 'configs' / 'faster_rcnn_r50_sbp.py'),
    str(REPO / 'configs' / 'retinanet_r50_sbp.py'),
]


@pytest.mark.parametrize('base', COCO_CONFIGS)
def test_train_without_coco_stops_at_once_with_directions(tmp_path: Path, base: str) -> None:
    config = tmp_path / 'config.py'
    config.write_text(f'_base_ = {base!r}\n')
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(REPO / 'tools' / 'train.py'), str(config)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert time.perf_counter() - start < 60  # no Runner, no model was built
    assert not (tmp_path / 'work_dirs').exists()
    for expected in ('data/coco/annotations/instances_train2017.json', 'data/coco/train2017/',
                     'data/coco/annotations/instances_val2017.json',
                     '--cfg-options train_dataloader.dataset.data_root=', 'data_root',
                     'make demo'):
        assert expected in proc.stderr, expected


def test_train_stops_before_the_runner_on_a_mask_key_given_to_the_neck(tmp_path: Path) -> None:
    sbp_tiny = str(REPO / 'configs' / 'synthetic' / 'faster-rcnn_r18_fpn_sbp_synthetic-tiny.py')
    proc = subprocess.run([sys.executable, str(REPO / 'tools' / 'train.py'), sbp_tiny,
                           '--cfg-options', 'model.neck.sbp.keep_ratio=0.25'],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert 'FPNSBP: sbp.keep_ratio is a mask setting' in \
        proc.stderr.strip().splitlines()[-2]  # then the config's name, nothing else
    assert not (tmp_path / 'work_dirs').exists()


def test_train_prints_no_pkg_resources_warning(trained: Path) -> None:
    """mmengine imports pkg_resources twice per run; setuptools >= 80.9 warns each time
    (requirements.txt pins setuptools below it)."""
    proc = run_tool('train.py', [TINY, '--work-dir', str(trained.parent / 'one_iter'),
                                 '--cfg-options', 'train_cfg.max_iters=1', 'val_cfg=None',
                                 'val_dataloader=None', 'val_evaluator=None'],
                    trained.parent.parent)
    assert 'pkg_resources is deprecated' not in proc.stdout + proc.stderr


def test_a_build_error_is_the_last_thing_train_prints(trained: Path) -> None:
    """mmengine prints the environment and the config before it builds the model."""
    proc = subprocess.run([sys.executable, str(REPO / 'tools' / 'train.py'), TINY,
                           '--work-dir', str(trained.parent / 'bad_depth'),
                           '--cfg-options', 'model.backbone.depth=19'],
                          cwd=trained.parent.parent, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert 'Config:' in proc.stdout  # mmengine's conventions stay
    assert proc.stderr.strip().splitlines()[-2:] == [
        "Could not build the run: KeyError: 'invalid depth 19 for resnet'",
        f'(config: {TINY}; the traceback above)']


def test_test_without_dataset_stops_with_directions(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(REPO / 'tools' / 'test.py'), TINY, 'x.pth'],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert f'{TINY_CFG.data_root}annotations/instances_val2017.json' in proc.stderr
    assert 'test_dataloader.dataset.data_root=' in proc.stderr


def test_check_dataset_follows_wrappers_and_data_root(tmp_path: Path) -> None:
    generate_synthetic_coco(str(tmp_path / 'data'), num_train=1, num_val=1, img_size=64,
                            progress=False)
    coco = dict(type='CocoDataset', data_root=str(tmp_path / 'data'),
                ann_file='annotations/instances_train2017.json',
                data_prefix=dict(img='train2017/'))
    cfg = Config(dict(train_dataloader=dict(dataset=dict(type='RepeatDataset', times=2,
                                                         dataset=coco)),
                      val_dataloader=None))
    check_dataset(cfg, ['train_dataloader', 'val_dataloader', 'val_evaluator'])

    cfg.train_dataloader.dataset.dataset.data_prefix.img = 'images/'
    assert missing_dataset_files(cfg, ['train_dataloader']) == [
            ('train_dataloader', str(tmp_path / 'data') + '/images/')]
    with pytest.raises(DatasetNotFoundError, match='images/'):
        check_dataset(cfg, ['train_dataloader'])


def test_demo_summary_puts_metrics_and_memory_side_by_side(tmp_path: Path) -> None:
    memory = tmp_path / 'results.json'
    memory.write_text(json.dumps(dict(meta={}, rows=[
        dict(variant='dense', saved_mib=200.0), dict(variant='sbp@0.5', saved_mib=130.0)])))
    runs = []
    for name, variant, m_ap, seconds in (('dense_cfg', 'dense', 0.35, 829),
                                         ('sbp_cfg', 'sbp@0.5', 0.31, 61)):
        metrics = tmp_path / f'{name}.json'
        metrics.write_text(json.dumps({'coco/bbox_mAP': m_ap, 'coco/bbox_mAP_50': 0.6,
                                       'coco/bbox_mAP_75': 0.3}))
        runs += ['--run', name, variant, str(seconds), str(metrics)]
    proc = run_tool('demo_summary.py', ['--memory', str(memory), *runs], tmp_path)
    assert proc.stdout.splitlines()[2:] == [
        '| dense_cfg | 1.0 (dense) | 13 min 49 s | 0.350 | 0.600 | 0.300 | 200 | 1.00x |',
        '| sbp_cfg | 0.5 | 1 min 01 s | 0.310 | 0.600 | 0.300 | 130 | 0.65x |']


def test_demo_summary_says_how_far_single_runs_spread_between_seeds(tmp_path: Path) -> None:
    memory = tmp_path / 'results.json'
    memory.write_text(json.dumps(dict(meta={}, rows=[dict(variant='dense', saved_mib=200.0)])))
    metrics = tmp_path / 'dense.json'
    metrics.write_text(json.dumps({'coco/bbox_mAP': 0.35, 'coco/bbox_mAP_50': 0.6,
                                   'coco/bbox_mAP_75': 0.3}))
    runs = [dict(variant=v, seed=s, bbox_mAP=m) for v, s, m in (
        ('dense', 0, 0.34), ('dense', 1, 0.36), ('sbp@0.5', 0, 0.30), ('sbp@0.5', 1, 0.33))]
    summary = [dict(variant='dense', seeds=2, mAP_mean=0.35, mAP_spread=0.02),
               dict(variant='sbp@0.5', seeds=2, mAP_mean=0.315, mAP_spread=0.03)]
    study = tmp_path / 'study' / 'accuracy.json'
    study.parent.mkdir()
    study.write_text(json.dumps(dict(runs=runs, summary=summary)))
    args = ['--memory', str(memory), '--run', 'd', 'dense', '60', str(metrics),
            '--run', 's', 'sbp@0.5', '60', str(metrics)]
    lines = run_tool('demo_summary.py', args + ['--study', str(study)], tmp_path).stdout
    assert lines.splitlines()[-1] == (
        'One run per config: on this benchmark single runs of the same config differ by up to '
        '3.0 mAP points between seeds, so one pair of runs decides little. The multi-seed study '
        f'{study.parent}: dense 0.340-0.360 (mean 0.350, 2 seeds); sbp@0.5 0.300-0.330 '
        '(mean 0.315, 2 seeds); difference of means -3.5 points.')
    named = run_tool('demo_summary.py', args + ['--study', str(study), 'sbp@0.5', 'dense'],
                     tmp_path).stdout
    assert named.splitlines()[-1].endswith('difference of means +3.5 points.')
    without = run_tool('demo_summary.py', args, tmp_path).stdout
    assert 'seeds' not in without


FINETUNE = REPO / 'configs' / 'synthetic' / 'faster-rcnn_r18_fpn_sbp_synthetic-finetune.py'
RETINA_FINETUNE = REPO / 'configs' / 'synthetic' / 'retinanet_r18_fpn_sbp_synthetic-finetune.py'


@pytest.mark.parametrize('model, backbone, max_iters', [
    ('faster-rcnn_r18', 'ResNet', 200), ('retinanet_r18', 'ResNet', 800),
    ('faster-rcnn_convnext-w16', 'mmpretrain.ConvNeXt', 200)])
def test_finetune_config_pairs_differ_by_sbp_only(model: str, backbone: str,
                                                  max_iters: int) -> None:
    """The SBP fine-tuning config is its dense baseline with SBP modules and SBPHook (which
    reseeds each step as the dense config's StepSeedHook does)."""
    synthetic = REPO / 'configs' / 'synthetic'
    dense = Config.fromfile(str(synthetic / f'{model}_fpn_synthetic-finetune.py'))
    sbp = Config.fromfile(str(synthetic / f'{model}_fpn_sbp_synthetic-finetune.py'))
    assert sbp.model.backbone.pop('sbp') == dict(keep_ratio=0.5, sampling='grid')
    sbp_backbone = backbone.split('.')[-1] + 'SBP'
    assert (sbp.model.backbone.type, sbp.model.neck.type) == (sbp_backbone, 'FPNSBP')
    assert dense.model.backbone.type == backbone
    sbp.model.backbone.type, sbp.model.neck.type = backbone, 'FPN'
    assert sbp.model == dense.model
    assert sbp.custom_hooks == [dict(type='SBPHook')]
    assert dense.custom_hooks == [dict(type='StepSeedHook')]
    for key in ('train_dataloader', 'val_evaluator', 'train_cfg', 'param_scheduler',
                'optim_wrapper'):
        assert sbp[key] == dense[key], key
    assert dense.train_cfg.max_iters == max_iters


def test_pretrained_backbone_tool_makes_weights_the_finetune_configs_load(
        tmp_path: Path) -> None:
    """tools/pretrain_synthetic_backbone.py: a second synthetic set, a dense training,
    the backbone's weights alone; ResNetSBP with the fine-tuning configs' init_cfg
    loads exactly those weights."""
    from mmdet.registry import MODELS
    from mmengine.runner import CheckpointLoader
    config = tmp_path / 'pretrain_tiny.py'
    config.write_text(
        f"_base_ = '{TINY}'\ndata_root = 'data/pretrain_tiny/'\n"
        # the fine-tuning configs' backbone width (the pretrain config's)
        "model = dict(backbone=dict(base_channels=16), neck=dict(in_channels=[16, 32, 64, 128]))\n"
        "train_dataloader = dict(dataset=dict(data_root=data_root))\n"
        "val_dataloader = dict(dataset=dict(data_root=data_root))\n"
        "test_dataloader = val_dataloader\n"
        "val_evaluator = dict(ann_file=data_root + 'annotations/instances_val2017.json')\n"
        "test_evaluator = val_evaluator\n")
    proc = run_tool('pretrain_synthetic_backbone.py',
                    ['--config', str(config), '--out', 'checkpoints/backbone.pth',
                     '--num-train', '8', '--num-val', '4', '--work-dir', 'work_dirs/pre'],
                    tmp_path)
    assert 'wrote checkpoints/backbone.pth' in proc.stdout
    assert (tmp_path / 'data' / 'pretrain_tiny' / 'annotations').is_dir()
    detector = CheckpointLoader.load_checkpoint(
        str(tmp_path / 'work_dirs' / 'pre' / f'iter_{MAX_ITERS}.pth'))['state_dict']
    saved = torch.load(tmp_path / 'checkpoints' / 'backbone.pth', weights_only=True)
    assert saved['state_dict'].keys() == {k[9:] for k in detector if k.startswith('backbone.')}

    for finetune in (FINETUNE, RETINA_FINETUNE):
        cfg = Config.fromfile(str(finetune)).model.backbone
        assert cfg.frozen_stages == 1 and cfg.norm_eval
        cfg.init_cfg.checkpoint = str(tmp_path / 'checkpoints' / 'backbone.pth')
        backbone = MODELS.build(cfg)
        assert backbone.sbp_blocks == [[False] * 2, [True] * 2, [True] * 2, [False] * 2]
        backbone.init_weights()
        for name, value in backbone.state_dict().items():
            torch.testing.assert_close(value, detector[f'backbone.{name}'], rtol=0, atol=0)


def test_train_names_missing_pretrained_weights_before_the_runner(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(REPO / 'tools' / 'train.py'), str(FINETUNE)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    checkpoint = Config.fromfile(str(FINETUNE)).model.backbone.init_cfg.checkpoint
    assert f"model.backbone.init_cfg.checkpoint = '{checkpoint}'" in proc.stderr
    assert 'configs/synthetic/weights/' in proc.stderr  # where the shipped one lies
    assert not (tmp_path / 'work_dirs').exists()
