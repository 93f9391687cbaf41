"""What the accuracy study's evidence rests on: every machine fine-tunes from the same
shipped backbone (its sha256 checked on load), a dense run and an SBP run of one seed
pair step by step, and the study reports paired differences with a t interval."""
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mmengine.config import Config

from sbp_mmdet.datasets import generate_synthetic_coco
from sbp_mmdet.utils import PretrainedDigestError, check_pretrained_weights, file_sha256
from sbp_mmdet.utils.pretrained_check import expected_digest

from sbp_builders import load_tool

REPO = Path(__file__).resolve().parents[1]
SYNTHETIC = REPO / 'configs' / 'synthetic'
FINETUNE_CONFIGS = sorted(SYNTHETIC.glob('*-finetune.py'))
DENSE_FINETUNE = SYNTHETIC / 'faster-rcnn_r18_fpn_synthetic-finetune.py'
SBP_FINETUNE = SYNTHETIC / 'faster-rcnn_r18_fpn_sbp_synthetic-finetune.py'
CONVNEXT_DENSE_FINETUNE = SYNTHETIC / 'faster-rcnn_convnext-w16_fpn_synthetic-finetune.py'
CONVNEXT_SBP_FINETUNE = SYNTHETIC / 'faster-rcnn_convnext-w16_fpn_sbp_synthetic-finetune.py'


def load_accuracy_tool():
    return load_tool('tools/analysis_tools/sbp_accuracy.py')


def shipped_backbone(config: Path = DENSE_FINETUNE) -> Path:
    """The pretrained backbone ``config`` loads, in the repository."""
    return REPO / Config.fromfile(str(config)).model.backbone.init_cfg.checkpoint


@pytest.mark.parametrize('config', FINETUNE_CONFIGS, ids=lambda path: path.stem)
def test_finetune_config_loads_its_shipped_backbone_whose_digest_matches(config: Path) -> None:
    """Each fine-tuning config loads a backbone shipped in configs/synthetic/weights/,
    named after its sha256 (checked on load), into every weight of its backbone."""
    from mmdet.registry import MODELS
    path = shipped_backbone(config)
    assert path.parent == SYNTHETIC / 'weights' and path.is_file(), path
    digest = expected_digest(str(path))
    assert digest is not None and len(digest) >= 8
    assert file_sha256(str(path)).startswith(digest)
    init_cfg = dict(type='Pretrained', checkpoint=str(path))
    check_pretrained_weights(dict(backbone=dict(init_cfg=init_cfg)))
    state = torch.load(path, map_location='cpu', weights_only=True)['state_dict']
    cfg = Config.fromfile(str(config)).model.backbone
    cfg.init_cfg.checkpoint = str(path)
    backbone = MODELS.build(cfg)
    backbone.init_weights()
    assert backbone.state_dict().keys() == state.keys()
    for name, value in backbone.state_dict().items():
        torch.testing.assert_close(value, state[name], rtol=0, atol=0, msg=name)


def test_the_dense_and_sbp_finetune_configs_of_a_backbone_load_the_same_weights() -> None:
    assert len(FINETUNE_CONFIGS) == 6
    r18 = {shipped_backbone(c) for c in FINETUNE_CONFIGS if '_r18_' in c.name}
    convnext = {shipped_backbone(c) for c in FINETUNE_CONFIGS if '_convnext-w16_' in c.name}
    assert r18 == {shipped_backbone()}
    assert convnext == {shipped_backbone(CONVNEXT_DENSE_FINETUNE)} != r18


def test_an_altered_checkpoint_is_refused_naming_key_file_and_digests(tmp_path: Path) -> None:
    path = shipped_backbone()
    copy = tmp_path / path.name
    shutil.copyfile(path, copy)
    model = dict(backbone=dict(init_cfg=dict(type='Pretrained', checkpoint=str(copy))))
    check_pretrained_weights(model)  # the same bytes pass
    data = bytearray(copy.read_bytes())
    data[-100] ^= 1
    copy.write_bytes(bytes(data))
    with pytest.raises(PretrainedDigestError) as err:
        check_pretrained_weights(model)
    message = str(err.value)
    assert 'model.backbone.init_cfg.checkpoint' in message and str(copy) in message
    assert file_sha256(str(copy)) in message and expected_digest(str(copy)) in message
    plain = tmp_path / 'no_digest_in_name.pth'
    copy.rename(plain)  # a name without a digest is not checked
    check_pretrained_weights(dict(init_cfg=dict(type='Pretrained', checkpoint=str(plain))))


def test_train_stops_before_the_runner_on_an_altered_backbone(tmp_path: Path) -> None:
    copy = tmp_path / shipped_backbone().name
    data = bytearray(shipped_backbone().read_bytes())
    data[-100] ^= 1
    copy.write_bytes(bytes(data))
    proc = subprocess.run(
        [sys.executable, str(REPO / 'tools' / 'train.py'), str(DENSE_FINETUNE),
         '--cfg-options', f'model.backbone.init_cfg.checkpoint={copy}'],
        cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert f'its sha256 is {file_sha256(str(copy))}' in proc.stderr
    assert not (tmp_path / 'work_dirs').exists()


def final_weights(config: Path, folder: Path, name: str, *options: str) -> dict:
    """The state dict after two fine-tuning iterations of ``config`` with seed 3."""
    work = folder / 'work_dirs' / name
    proc = subprocess.run(
        [sys.executable, str(REPO / 'tools' / 'train.py'), str(config), '--work-dir', str(work),
         '--cfg-options', 'train_cfg.max_iters=2', 'default_hooks.checkpoint.interval=2',
         'val_cfg=None', 'val_dataloader=None', 'val_evaluator=None', 'randomness.seed=3',
         f'model.backbone.init_cfg.checkpoint={shipped_backbone(config)}', *options],
        cwd=folder, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(work / 'iter_2.pth', map_location='cpu', weights_only=False)['state_dict']


@pytest.mark.slow
@pytest.mark.parametrize('dense_config, sbp_config, sbp_stage, frozen_stage', [
    (DENSE_FINETUNE, SBP_FINETUNE, 'backbone.layer2.', 'backbone.layer1.'),
    (CONVNEXT_DENSE_FINETUNE, CONVNEXT_SBP_FINETUNE, 'backbone.stages.0.', None),
], ids=['r18', 'convnext-w16'])
def test_dense_config_and_sbp_config_at_keep_1_train_the_same_run(
        tmp_path: Path, dense_config: Path, sbp_config: Path, sbp_stage: str,
        frozen_stage: str) -> None:
    """The study's dense runs are the SBP config at keep ratio 1.0; a user runs the dense
    config. Same seed: the same initial weights, data, flips and RoI sampling, so
    bitwise the same weights after training; keep 0.5 moves them elsewhere."""
    generate_synthetic_coco(str(tmp_path / 'data' / 'synthetic_coco'), num_train=8, num_val=2,
                            progress=False)
    dense = final_weights(dense_config, tmp_path, 'dense')
    sbp_dense = final_weights(sbp_config, tmp_path, 'sbp1', 'model.backbone.sbp.keep_ratio=1.0')
    assert dense.keys() == sbp_dense.keys()
    for key in dense:
        torch.testing.assert_close(sbp_dense[key], dense[key], rtol=0, atol=0, msg=key)
    sbp = final_weights(sbp_config, tmp_path, 'sbp05')
    changed = [k for k in dense if not torch.equal(sbp[k], dense[k])]
    assert any(k.startswith(sbp_stage) for k in changed)
    if frozen_stage:
        assert not any(k.startswith(frozen_stage) for k in changed)


def test_t_critical_values_match_the_t_distribution() -> None:
    tool = load_accuracy_tool()
    assert tool.t_critical_95(1) == 12.706 and tool.t_critical_95(4) == 2.776
    assert tool.t_critical_95(60) == pytest.approx(2.000, abs=1e-3)
    assert tool.t_critical_95(120) == pytest.approx(1.980, abs=1e-3)
    with pytest.raises(ValueError, match='degree of freedom'):
        tool.t_critical_95(0)


def test_paired_difference_uses_the_seeds_both_ran_and_a_t_interval() -> None:
    tool = load_accuracy_tool()
    dense = {0: 0.30, 1: 0.40, 2: 0.35, 3: 0.33, 4: 0.31}
    variant = {0: 0.29, 1: 0.38, 2: 0.36, 3: 0.31, 5: 0.50}  # seed 4 missing, 5 unpaired
    row = tool.paired_difference(variant, dense)
    diffs = [-1.0, -2.0, 1.0, -2.0]
    assert row['paired_seeds'] == [0, 1, 2, 3]
    assert row['paired_diffs'] == pytest.approx(diffs)
    assert row['paired_mean'] == pytest.approx(-1.0)
    half = 3.182 * statistics.stdev(diffs) / 2
    assert row['paired_ci95'] == pytest.approx((-1.0 - half, -1.0 + half))
    single = tool.paired_difference({0: 0.2}, dense)
    assert single['paired_mean'] == pytest.approx(-10.0) and single['paired_ci95'] is None


def test_summary_and_table_report_the_paired_difference_next_to_the_means() -> None:
    tool = load_accuracy_tool()
    runs = [dict(variant=v, seed=s, bbox_mAP=m, train_s=1.0) for v, s, m in
            [('dense', 0, 0.30), ('dense', 1, 0.40), ('dense', 2, 0.20),
             ('sbp@0.5', 0, 0.29), ('sbp@0.5', 1, 0.38), ('sbp@0.5', 2, 0.20)]]
    rows = tool.summarise(runs)
    assert rows[0]['paired_mean'] == 0.0 and rows[0]['paired_ci95'] == (0.0, 0.0)
    assert rows[1]['paired_mean'] == pytest.approx(-1.0)
    assert rows[1]['mAP_spread'] == pytest.approx(0.18)
    table = tool.format_table(rows).splitlines()
    assert 'paired diff. to dense' in table[0] and '95 % interval' in table[0]
    low, high = rows[1]['paired_ci95']
    assert f'| -1.0 | [{low:+.1f}, {high:+.1f}] |' in table[3]
