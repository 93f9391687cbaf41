"""The benchmark tool runs end to end at a tiny size and writes well-formed outputs."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from sbp_mmdet.benchmark import Variant

REPO = Path(__file__).resolve().parents[1]
SBP_CONFIG = REPO / 'configs' / 'synthetic' / 'faster-rcnn_r18_fpn_sbp_synthetic.py'


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
         '--variants', 'dense', 'sbp@0.5', 'sbp@0.25', '--out-dir', str(out)],
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
    assert (out / 'sbp_vs_keep_ratio.png').stat().st_size > 1000


def test_accuracy_study_trains_evaluates_and_summarises(tmp_path):
    from mmengine.config import Config

    from sbp_mmdet.datasets import generate_synthetic_coco
    tiny = REPO / 'configs' / 'synthetic' / 'faster-rcnn_r18_fpn_sbp_synthetic-tiny.py'
    cfg = Config.fromfile(str(tiny))
    root = tmp_path / 'data'
    generate_synthetic_coco(str(root), num_train=8, num_val=4, img_size=cfg.img_scale[0],
                            progress=False)
    ann = str(root / 'annotations' / 'instances_val2017.json')
    data = [f'{loader}.dataset.data_root={root}/' for loader in
            ('train_dataloader', 'val_dataloader', 'test_dataloader')]
    data += [f'val_evaluator.ann_file={ann}', f'test_evaluator.ann_file={ann}']
    out = tmp_path / 'out'
    proc = subprocess.run(
        [sys.executable, str(REPO / 'tools' / 'analysis_tools' / 'sbp_accuracy.py'), str(tiny),
         '--variants', 'dense', 'sbp@0.5:random', '--seeds', '0', '--iters', '2',
         '--work-dir', str(tmp_path / 'work'), '--out-dir', str(out), '--cfg-options', *data],
        cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / 'accuracy.json').read_text())
    assert [r['variant'] for r in result['summary']] == ['dense', 'sbp@0.5:random']
    assert all(0.0 <= r['bbox_mAP'] <= 1.0 for r in result['runs'])  # COCOeval's figure
    assert result['summary'][0]['mAP_points_vs_dense'] == 0.0
