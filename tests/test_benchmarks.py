"""The benchmark tool runs end to end at a tiny size and writes well-formed outputs."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sbp_mmdet.benchmark import Variant

from conftest import TINY_DATA_CFG

REPO = Path(__file__).resolve().parents[1]
SBP_CONFIG = REPO / 'configs' / 'synthetic' / 'faster-rcnn_r18_fpn_sbp_synthetic.py'
TINY_SBP_CONFIG = REPO / 'configs' / 'synthetic' / 'faster-rcnn_r18_fpn_sbp_synthetic-tiny.py'


def tiny_dataset_options(workspace: Path) -> list:
    """``--cfg-options`` pointing the tiny config at the tiny dataset in ``workspace``."""
    root = workspace / TINY_DATA_CFG.data_root
    ann = str(root / 'annotations' / 'instances_val2017.json')
    data = [f'{loader}.dataset.data_root={root}/' for loader in
            ('train_dataloader', 'val_dataloader', 'test_dataloader')]
    return data + [f'val_evaluator.ann_file={ann}', f'test_evaluator.ann_file={ann}']


def run_accuracy_tool(tmp_path: Path, workspace: Path, *args: str) -> dict:
    """Run sbp_accuracy.py on the tiny config; its ``accuracy.json``."""
    out = tmp_path / 'out'
    proc = subprocess.run(
        [sys.executable, str(REPO / 'tools' / 'analysis_tools' / 'sbp_accuracy.py'),
         str(TINY_SBP_CONFIG), *args, '--seeds', '0', '--iters', '2',
         '--work-dir', str(tmp_path / 'work'), '--out-dir', str(out),
         '--cfg-options', *tiny_dataset_options(workspace)],
        cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / 'accuracy.json').read_text())
    # progress and results on the console (4 lines per run, the table), logs in the work dir
    assert len(proc.stdout.splitlines()) <= 4 * len(result['runs']) + len(result['summary']) + 5
    assert 'Config:' not in proc.stdout
    for log in ('train.log', 'test.log'):
        assert all('Config:' in path.read_text() for path in (tmp_path / 'work').rglob(log))
    return result


def test_variants_parse_and_turn_the_config_dense_or_sbp():
    model = dict(backbone=dict(type='ResNetSBP', sbp=dict(keep_ratio=0.5)),
                 neck=dict(type='FPNSBP'))
    dense = Variant.parse('dense').apply(model)
    assert dense['backbone']['type'] == 'ResNet' and 'sbp' not in dense['backbone']
    assert dense['neck']['type'] == 'FPN'
    sbp = Variant.parse('sbp@0.25+recompute+cp').apply(model)
    assert sbp['backbone']['sbp'] == dict(keep_ratio=0.25, recompute=True)
    assert sbp['backbone']['with_cp'] and sbp['neck']['type'] == 'FPNSBP'
    assert Variant.parse('with_cp').apply(model)['backbone']['with_cp']
    for bad in ('sparse', 'sbp@0.5+fast'):
        with pytest.raises(ValueError, match='unknown variant'):
            Variant.parse(bad)


def test_benchmark_tool_writes_table_json_csv_and_plot(tmp_path):
    out = tmp_path / 'bench'
    proc = subprocess.run(
        [sys.executable, str(REPO / 'tools' / 'analysis_tools' / 'benchmark_sbp.py'),
         str(SBP_CONFIG), '--size', '64', '96', '--steps', '1', '--warmup', '0',
         '--variants', 'dense', 'sbp@0.5', 'sbp@0.25', '--out-dir', str(out),
         '--cfg-options', 'model.backbone.sbp.grad_scale=inverse_keep'],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert '| sbp@0.5 |' in proc.stdout
    results = json.loads((out / 'results.json').read_text())
    rows = {r['variant']: r for r in results['rows']}
    assert set(rows) == {'dense', 'sbp@0.5', 'sbp@0.25'}
    assert rows['dense']['saved_vs_dense'] == 1.0
    assert rows['sbp@0.25']['saved_mib'] < rows['sbp@0.5']['saved_mib'] < rows['dense']['saved_mib']
    assert all(r['backward_median_s'] > 0 for r in rows.values())
    with open(out / 'results.csv') as f:
        assert len(list(csv.DictReader(f))) == 3
    assert (out / 'table.md').read_text().count('\n| ') >= 4
    assert 'model.backbone.sbp.grad_scale=inverse_keep' in (out / 'table.md').read_text()
    assert results['meta']['cfg_options'] == {'model.backbone.sbp.grad_scale': 'inverse_keep'}
    assert (out / 'sbp_vs_keep_ratio.png').stat().st_size > 1000


def test_accuracy_study_trains_evaluates_and_summarises(tmp_path, workspace):
    result = run_accuracy_tool(tmp_path, workspace, '--variants', 'dense', 'sbp@0.5:random')
    assert [r['variant'] for r in result['summary']] == ['dense', 'sbp@0.5:random']
    assert all(0.0 <= r['bbox_mAP'] <= 1.0 for r in result['runs'])  # COCOeval's figure
    assert result['summary'][0]['mAP_points_vs_dense'] == 0.0

    # --reuse takes finished runs from their work dirs instead of training them again
    work_files = sorted((tmp_path / 'work').rglob('*.pth'))
    mtimes = [p.stat().st_mtime for p in work_files]
    reused = run_accuracy_tool(tmp_path, workspace, '--variants', 'sbp@0.5:random', '--reuse')
    assert reused['runs'] == result['runs'][1:]
    assert [p.stat().st_mtime for p in sorted((tmp_path / 'work').rglob('*.pth'))] == mtimes


def test_sbp_gradients_match_dense_in_the_heads_and_shrink_in_sbp_stages():
    from mmdet.registry import MODELS
    from mmengine.config import Config
    from mmengine.registry import init_default_scope

    from sbp_mmdet.benchmark import detector_batch
    from sbp_mmdet.grad_fidelity import gradient_fidelity
    init_default_scope('mmdet')
    cfg = Config.fromfile(str(SBP_CONFIG))
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    model.init_weights()
    model.train()
    batch = detector_batch(model, 2, 96, 128, num_classes=4)
    same = gradient_fidelity(model, [batch], [1.0])[1.0]
    for stats in same.values():  # keep ratio 1.0 is plain backprop
        assert stats['cosine'] == pytest.approx(1.0, abs=1e-9)
        assert stats['norm_ratio'] == pytest.approx(1.0, abs=1e-9)
    half = gradient_fidelity(model, [batch], [0.5])[0.5]
    assert list(half)[:5] == ['backbone.stem'] + [f'backbone.layer{i}' for i in range(1, 5)]
    for head in ('rpn_head', 'roi_head'):  # the forward is exact, so dense heads are too
        assert half[head]['cosine'] == pytest.approx(1.0, abs=1e-6)
        assert half[head]['norm_ratio'] == pytest.approx(1.0, abs=1e-6)
    for stage in ('backbone.stem', 'backbone.layer1', 'backbone.layer2', 'backbone.layer3'):
        assert 0.0 < half[stage]['cosine'] < 0.99  # gradients from kept rows only


def test_grad_fidelity_tool_writes_table_json_csv_and_plot(tmp_path, workspace):
    out = tmp_path / 'fidelity'
    proc = subprocess.run(
        [sys.executable, str(REPO / 'tools' / 'analysis_tools' / 'sbp_grad_fidelity.py'),
         str(TINY_SBP_CONFIG), '--keep-ratios', '0.25', '0.5', '--iters', '1',
         '--out-dir', str(out), '--cfg-options', *tiny_dataset_options(workspace)],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / 'grad_fidelity.json').read_text())
    assert set(result['results']) == {'0.25', '0.5'}
    assert result['results']['0.5']['roi_head']['cosine'] == pytest.approx(1.0, abs=1e-6)
    with open(out / 'grad_fidelity.csv') as f:
        rows = list(csv.DictReader(f))
    assert {r['keep_ratio'] for r in rows} == {'0.25', '0.5'}
    assert '| backbone.layer1 |' in (out / 'table.md').read_text()
    assert (out / 'grad_fidelity.png').stat().st_size > 1000
    # progress and the table on the console; weight-init and dataset logs in the log file
    assert len(proc.stdout.splitlines()) <= 15, proc.stdout
    log = (out / 'grad_fidelity.log').read_text()
    assert 'KaimingInit' in log and 'loading annotations into memory' in log


def test_grad_fidelity_tool_refuses_keep_ratios_outside_0_1():
    proc = subprocess.run(
        [sys.executable, str(REPO / 'tools' / 'analysis_tools' / 'sbp_grad_fidelity.py'),
         str(TINY_SBP_CONFIG), '--keep-ratios', '0.5', '1.0'],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and '--keep-ratios must lie in (0, 1)' in proc.stderr


def test_accuracy_variants_become_config_options():
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        'sbp_accuracy', REPO / 'tools' / 'analysis_tools' / 'sbp_accuracy.py')
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.variant_options('dense') == ['model.backbone.sbp.keep_ratio=1.0']
    assert tool.variant_options('sbp@0.25:random:stages=0110:cell=4:inverse_keep') == [
        'model.backbone.sbp.keep_ratio=0.25', 'model.backbone.sbp.sampling=random',
        'model.backbone.sbp.stages=(False,True,True,False,)', 'model.backbone.sbp.grid_cell=4',
        'model.backbone.sbp.grad_scale=inverse_keep', 'model.neck.sbp.grad_scale=inverse_keep']
    for bad in ('sbp@0.5:fast', 'dense:random', 'sparse'):
        with pytest.raises(ValueError, match='variant'):
            tool.variant_options(bad)
