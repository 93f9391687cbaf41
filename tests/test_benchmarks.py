"""The benchmark tool runs end to end at a tiny size and writes well-formed outputs."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sbp_mmdet.benchmark import describe_cpu, measure_variant
from sbp_mmdet.variants import parse_variant

from sbp_builders import TINY_DATA_CFG, build_detector, load_tool, small_retinanet_cfg

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


def run_benchmark_tool(out: Path, *args: str, config: Path = SBP_CONFIG):
    return subprocess.run(
        [sys.executable, str(REPO / 'tools' / 'analysis_tools' / 'benchmark_sbp.py'),
         str(config), '--size', '64', '96', '--steps', '1', '--warmup', '0',
         '--out-dir', str(out), *args],
        cwd=REPO, capture_output=True, text=True, timeout=600)


def test_benchmark_tool_writes_table_json_csv_and_plot(tmp_path):
    out = tmp_path / 'bench'
    proc = run_benchmark_tool(out, '--variants', 'dense', 'sbp@0.5', 'sbp@0.25',
                              '--cfg-options', 'model.backbone.sbp.grad_scale=inverse_keep')
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert '| sbp@0.5 |' in proc.stdout
    # the console shows progress and the table; each variant's log is in its own file
    assert len((proc.stdout + proc.stderr).splitlines()) <= 60
    assert 'Init' not in proc.stdout + proc.stderr
    assert 'mmengine' in (out / 'logs' / 'sbp@0.5.log').read_text()
    results = json.loads((out / 'results.json').read_text())
    rows = {r['variant']: r for r in results['rows']}
    assert set(rows) == {'dense', 'sbp@0.5', 'sbp@0.25'}
    assert rows['dense']['saved_vs_dense'] == 1.0
    assert rows['sbp@0.25']['saved_mib'] < rows['sbp@0.5']['saved_mib'] < rows['dense']['saved_mib']
    assert all(r['backward_median_s'] > 0 for r in rows.values())
    # a lower keep ratio skips more backward compute (the heads' stays the same)
    assert rows['sbp@0.25']['backward_gflop'] < rows['sbp@0.5']['backward_gflop'] < (
        rows['dense']['backward_gflop'])
    assert rows['dense']['backward_gflop_vs_dense'] == 1.0
    with open(out / 'results.csv') as f:
        assert len(list(csv.DictReader(f))) == 3
    assert (out / 'table.md').read_text().count('\n| ') >= 4
    assert 'model.backbone.sbp.grad_scale=inverse_keep' in (out / 'table.md').read_text()
    assert results['meta']['cfg_options'] == {'model.backbone.sbp.grad_scale': 'inverse_keep'}
    if os.path.exists('/proc/cpuinfo'):  # the CPU and its bf16 arithmetic head the table
        assert 'bf16 arithmetic: ' in (out / 'table.md').read_text().splitlines()[0]
    assert (out / 'sbp_vs_keep_ratio.png').stat().st_size > 1000


def test_benchmark_tool_measures_the_backbone_and_neck_alone(tmp_path):
    out = tmp_path / 'bench'
    proc = run_benchmark_tool(out, '--variants', 'dense', 'sbp@0.5', '--part', 'backbone_neck',
                              '--no-plot')
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / 'results.json').read_text())
    assert results['meta']['part'] == 'backbone_neck'
    assert 'backbone + neck only' in (out / 'table.md').read_text().splitlines()[0]
    rows = {r['variant']: r for r in results['rows']}
    for row in rows.values():  # no head ran, and the loss (a sum) saved nothing
        assert set(row['saved_by_component_mib']) == {'backbone', 'neck'}
        assert row['backward_median_s'] > 0
    assert rows['sbp@0.5']['saved_by_component_mib']['backbone'] < (
        0.75 * rows['dense']['saved_by_component_mib']['backbone'])


def test_backward_flops_count_the_engine_packed_rows_and_recomputed_convs():
    """The FLOP count sees the SBP engine's own convolutions: on the backbone and
    neck, SBP 0.5 needs well under dense's backward compute, and recompute and
    checkpointing add their re-run forward convolutions."""
    from mmengine.config import Config
    cfg = Config.fromfile(str(SBP_CONFIG))
    gflop = {name: measure_variant(cfg, parse_variant(name), 1, 64, 96, 0, 0, 'cpu',
                                   part='backbone_neck').backward_gflop
             for name in ('dense', 'with_cp', 'sbp@0.5', 'sbp@0.5+recompute')}
    assert 0.3 * gflop['dense'] < gflop['sbp@0.5'] < 0.8 * gflop['dense']
    assert gflop['sbp@0.5+recompute'] > gflop['sbp@0.5']
    assert gflop['with_cp'] > gflop['dense']


def test_backward_flops_are_counted_through_an_sbp_head():
    """RetinaHeadSBP's backward calls ``torch.autograd.grad`` inside the backward
    (its tail re-runs): the count goes through it, and the SBP head skips
    compute that the same detector with the dense head does not."""
    from mmengine.config import Config
    cfg = Config.fromfile(str(REPO / 'configs' / 'synthetic'
                              / 'retinanet_r18_fpn_sbp_synthetic-finetune.py'))
    gflop = {}
    for head in ('RetinaHead', 'RetinaHeadSBP'):
        cfg.model.bbox_head.type = head
        gflop[head] = measure_variant(cfg, parse_variant('sbp@0.5'), 1, 64, 96, 0, 0,
                                      'cpu').backward_gflop
    assert 0 < gflop['RetinaHeadSBP'] < gflop['RetinaHead']


def test_benchmark_refuses_an_unknown_part():
    from mmengine.config import Config
    with pytest.raises(ValueError, match="part must be one of .*'rpn'"):
        measure_variant(Config.fromfile(str(SBP_CONFIG)), parse_variant('dense'), 1, 64, 96,
                        0, 0, 'cpu', part='rpn')


def test_cpu_description_names_the_model_and_its_bf16_arithmetic():
    amx = ('processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum\n'
           'flags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n'
           'processor\t: 1\nmodel name\t: another\nflags\t\t: fpu\n')
    assert describe_cpu(amx) == 'Intel(R) Xeon(R) Platinum, bf16 arithmetic: avx512_bf16 amx_bf16'
    plain = 'model name\t: Intel(R) Xeon(R) Processor\nflags\t\t: fpu avx2 avx512f\n'
    assert describe_cpu(plain) == 'Intel(R) Xeon(R) Processor, bf16 arithmetic: none'
    assert describe_cpu('').endswith('bf16 arithmetic: unknown')  # no cpuinfo: the platform's


def test_benchmark_tool_measures_mixed_precision_on_the_cpu_against_dense_amp(tmp_path):
    """AMP variants run on the CPU (bf16 autocast) and are compared with the dense
    detector in the same precision; SBP stores less than it there too."""
    out = tmp_path / 'bench'
    proc = run_benchmark_tool(out, '--variants', 'dense', 'amp', 'sbp@0.5+amp', '--no-plot')
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r['variant']: r for r in json.loads((out / 'results.json').read_text())['rows']}
    assert [rows[v]['precision'] for v in ('dense', 'amp', 'sbp@0.5+amp')] == [
        'fp32', 'bf16', 'bf16']
    assert rows['amp']['saved_vs_dense'] == 1.0
    assert rows['sbp@0.5+amp']['saved_vs_dense'] == pytest.approx(
        rows['sbp@0.5+amp']['saved_mib'] / rows['amp']['saved_mib'])
    # at this toy size the dense modules' half-precision weight copies weigh as much
    # as the activations; the full-size ratios are in docs/memory.md
    assert rows['sbp@0.5+amp']['saved_by_component_mib']['backbone'] < (
        0.8 * rows['amp']['saved_by_component_mib']['backbone'])


def test_benchmark_tool_ends_with_the_error_of_a_failing_variant(tmp_path):
    out = tmp_path / 'bench'
    proc = run_benchmark_tool(out, '--variants', 'dense', 'sbp@0.5', '--cfg-options',
                              'model.backbone.sbp.sampling=rows')
    assert proc.returncode != 0
    last_lines = proc.stderr.strip().splitlines()[-3:]
    assert ("sbp.sampling must be one of the registered mask policies ['grid', 'objects', "
            "'random'], got 'rows'") in proc.stderr
    assert 'variant sbp@0.5 failed' in last_lines[-1]
    assert str(out / 'logs' / 'sbp@0.5.log') in last_lines[-1]


@pytest.mark.slow
def test_gpu_benchmark_script_dry_runs_on_the_cpu(tmp_path):
    """``tools/benchmark_gpu.sh`` with DRY_RUN=1: every variant of the GPU table, both
    detectors, at toy size on the CPU."""
    proc = subprocess.run(['bash', str(REPO / 'tools' / 'benchmark_gpu.sh'), str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=1200,
                          env=dict(os.environ, DRY_RUN='1', PYTHON=sys.executable))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    for name in ('faster_rcnn_r50_sbp', 'retinanet_r50_sbp'):
        rows = json.loads((tmp_path / name / 'results.json').read_text())['rows']
        assert [(r['variant'], r['precision']) for r in rows] == [
            ('dense', 'fp32'), ('sbp@0.5', 'fp32'), ('sbp@0.75+recompute', 'fp32'),
            ('with_cp', 'fp32'), ('sbp@0.5+cp', 'fp32'), ('amp', 'bf16'), ('sbp@0.5+amp', 'bf16'),
            ('sbp@0.75+recompute+amp', 'bf16'), ('with_cp+amp', 'bf16'),
            ('sbp@0.5+cp+amp', 'bf16'), ('ecbe', 'fp32'), ('act_ckpt', 'fp32'), ('sac', 'fp32'),
            ('sbp@0.75+recompute+ecbe', 'fp32'), ('sbp@0.75+recompute+act_ckpt', 'fp32'),
            ('sbp@0.75+recompute+sac', 'fp32'), ('ecbe+amp', 'bf16'), ('act_ckpt+amp', 'bf16'),
            ('sac+amp', 'bf16'), ('sbp@0.75+recompute+sac+amp', 'bf16')]
        assert all(r['step_median_s'] > 0 and r['peak_vs_dense'] is not None and r['ops'] > 0
                   for r in rows)
        # the study is of Faster R-CNN: it prices that detector's SBP rows only
        accuracy = {r['variant']: r['accuracy'] for r in rows}
        assert (accuracy['sbp@0.5+cp'] == 'not measured') == name.startswith('retinanet')
        assert accuracy['sac'] == 'exact'


def test_gpu_benchmark_script_refuses_a_machine_without_cuda():
    if torch.cuda.is_available():
        pytest.skip('this machine has CUDA')
    proc = subprocess.run(['bash', str(REPO / 'tools' / 'benchmark_gpu.sh')], cwd=REPO,
                          capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHON=sys.executable))
    assert proc.returncode != 0
    assert 'no CUDA device here; DRY_RUN=1 runs it on the CPU' in proc.stderr


def run_files(work: Path, run: dict) -> tuple:
    """The result.json of ``run`` and the metrics its tools/test.py logged, read
    from its run dir under ``work``."""
    (result_file,) = [path for path in work.rglob('result.json')
                      if json.loads(path.read_text())['options'] == run['options']]
    (metrics_file,) = (result_file.parent / 'test').glob('*/*.json')
    return json.loads(result_file.read_text()), json.loads(metrics_file.read_text())


def test_accuracy_study_trains_evaluates_and_summarises(tmp_path, workspace):
    result = run_accuracy_tool(tmp_path, workspace, '--variants', 'dense', 'sbp@0.5:random')
    assert [r['variant'] for r in result['summary']] == ['dense', 'sbp@0.5:random']
    for run in result['runs']:  # the figures COCOeval gave in each run's test, recorded
        recorded, metrics = run_files(tmp_path / 'work', run)
        assert run == recorded
        assert (run['bbox_mAP'], run['bbox_mAP_50']) == (
            metrics.get('coco/bbox_mAP', 0.0), metrics.get('coco/bbox_mAP_50', 0.0))
        assert run.get('no_detections', False) == ('coco/bbox_mAP' not in metrics)
    assert result['summary'][0]['mAP_points_vs_dense'] == 0.0
    head = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=REPO,
                          capture_output=True, text=True).stdout.strip()
    head = head or 'unknown'  # a checkout without git history
    assert all(r['commit'].split('+')[0] == head for r in result['runs'])  # which code ran
    assert result['commit'].split('+')[0] == head

    # --reuse takes finished runs from their work dirs instead of training them again
    work_files = sorted((tmp_path / 'work').rglob('*.pth'))
    mtimes = [p.stat().st_mtime for p in work_files]
    reused = run_accuracy_tool(tmp_path, workspace, '--variants', 'sbp@0.5:random', '--reuse')
    assert reused['runs'] == result['runs'][1:]
    assert [p.stat().st_mtime for p in sorted((tmp_path / 'work').rglob('*.pth'))] == mtimes

    # --summarise-only trains nothing: finished runs are summarised, missing ones named
    summary = run_accuracy_tool(tmp_path, workspace, '--variants', 'dense', 'sbp@0.5:random',
                                'sbp@0.25', '--summarise-only')
    assert summary['runs'] == result['runs'] and summary['missing'] == ['sbp@0.25 seed 0']
    assert not list((tmp_path / 'work').glob('sbp0.25*'))
    table = (tmp_path / 'out' / 'table.md').read_text()
    assert f"{result['runs'][0]['bbox_mAP']:.3f} (s0)" in table.splitlines()[2]


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


def test_split_heads_gives_each_head_layer_its_own_group():
    """A dense head's layers are exact; an SBP head's get their kept rows' gradient."""
    from sbp_mmdet.benchmark import detector_batch
    from sbp_mmdet.grad_fidelity import gradient_fidelity
    half = {}
    for head in ('RetinaHead', 'RetinaHeadSBP'):
        cfg = small_retinanet_cfg(sbp=True)
        cfg.bbox_head.type = head
        model = build_detector(cfg)
        batch = detector_batch(model, 2, 96, 128, num_classes=3)
        half[head] = gradient_fidelity(model, [batch], [0.5], split_heads=True)[0.5]
    layers = ['bbox_head.cls_convs', 'bbox_head.reg_convs', 'bbox_head.retina_cls',
              'bbox_head.retina_reg']
    assert [g for g in half['RetinaHead'] if g.startswith('bbox_head')] == layers
    for layer in layers:
        assert half['RetinaHead'][layer]['cosine'] == pytest.approx(1.0, abs=1e-6)
        assert 0.0 < half['RetinaHeadSBP'][layer]['cosine'] < 0.999


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


def test_accuracy_iters_stretch_the_lr_schedule_and_keep_the_warmup():
    tool = load_tool('tools/analysis_tools/sbp_accuracy.py')
    config = REPO / 'configs' / 'synthetic' / 'faster-rcnn_r18_fpn_sbp_synthetic-finetune.py'
    assert list(tool.schedule_options(str(config), 400)) == [
        'train_cfg.max_iters=400', 'train_cfg.val_interval=400',
        'default_hooks.checkpoint.interval=400', 'param_scheduler.1.end=400',
        'param_scheduler.1.T_max=350']


def test_accuracy_reuse_needs_the_same_config_settings(tmp_path):
    """A run made from another version of the config is trained again; a config
    that only moves settings between files keeps its digest."""
    tool = load_tool('tools/analysis_tools/sbp_accuracy.py')
    base = REPO / 'configs' / 'synthetic' / 'faster-rcnn_r18_fpn_sbp_synthetic-finetune.py'
    same, changed = tmp_path / 'same.py', tmp_path / 'changed.py'
    same.write_text(f"_base_ = '{base}'\n")
    changed.write_text(f"_base_ = '{base}'\noptim_wrapper = dict(optimizer=dict(lr=0.5))\n")
    digest = tool.config_digest(str(base))
    assert tool.config_digest(str(same)) == digest != tool.config_digest(str(changed))
    opts = ['randomness.seed=0']
    (tmp_path / 'run').mkdir()
    result = dict(bbox_mAP=0.3, options=opts, config_digest=digest)
    (tmp_path / 'run' / 'result.json').write_text(json.dumps(result))
    assert tool.finished_run(str(tmp_path / 'run'), opts, digest) == result
    assert tool.finished_run(str(tmp_path / 'run'), opts, 'another') is None
    assert tool.finished_run(str(tmp_path / 'run'), ['randomness.seed=1'], digest) is None
    del result['config_digest']  # recorded before digests were: taken as the same version
    (tmp_path / 'run' / 'result.json').write_text(json.dumps(result))
    assert tool.finished_run(str(tmp_path / 'run'), opts, 'another') == result


def test_accuracy_of_a_model_that_detects_nothing_is_zero():
    """mmdet's CocoMetric gives no mAP for an empty result (an undertrained model)."""
    tool = load_tool('tools/analysis_tools/sbp_accuracy.py')
    assert tool.bbox_metrics({'time': 0.4}) == (0.0, 0.0, False)
    assert tool.bbox_metrics({'coco/bbox_mAP': 0.3, 'coco/bbox_mAP_50': 0.5}) == (0.3, 0.5, True)


def test_frontier_pairs_accuracy_and_memory_rows_and_names_missing_ones(tmp_path):
    """sbp_frontier.py: mAP change on the seeds shared with dense, spread, saved
    ratio; exact-gradient points sit at 0; missing rows are named."""
    runs = [dict(variant=v, seed=s, bbox_mAP=m) for v, s, m in [
        ('dense', 0, 0.30), ('dense', 1, 0.32), ('dense', 2, 0.50),
        ('sbp@0.5', 0, 0.28), ('sbp@0.5', 1, 0.29)]]
    (tmp_path / 'accuracy.json').write_text(json.dumps(dict(runs=runs)))
    rows = [dict(variant=v, precision='fp32', saved_mib=m)
            for v, m in [('dense', 2000.0), ('sbp@0.5', 1200.0), ('with_cp', 1300.0)]]
    (tmp_path / 'memory.json').write_text(json.dumps(dict(rows=rows)))
    acc, mem = str(tmp_path / 'accuracy.json'), str(tmp_path / 'memory.json')
    spec = dict(title='toy', points=[
        dict(label='SBP', accuracy=acc, variant='sbp@0.5', memory=mem, memory_variant='sbp@0.5'),
        dict(label='cp', exact=True, memory=mem, memory_variant='with_cp')])
    (tmp_path / 'spec.json').write_text(json.dumps(spec))
    proc = subprocess.run(
        [sys.executable, str(REPO / 'tools' / 'analysis_tools' / 'sbp_frontier.py'),
         str(tmp_path / 'spec.json'), '--out-dir', str(tmp_path / 'out')],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    table = (tmp_path / 'out' / 'frontier.md').read_text()
    # seeds 0 and 1 only: (0.285 - 0.31) * 100 = -2.5, spread 1.0, 1200 / 2000
    assert '| SBP | 2 | -2.5 | 1.0 | 1200 | 0.60x |' in table
    assert '| cp | exact gradients | +0.0 | 0.0 | 1300 | 0.65x |' in table
    assert (tmp_path / 'out' / 'frontier.png').stat().st_size > 0
    spec['points'][0]['variant'] = 'sbp@0.25'
    (tmp_path / 'spec.json').write_text(json.dumps(spec))
    proc = subprocess.run(
        [sys.executable, str(REPO / 'tools' / 'analysis_tools' / 'sbp_frontier.py'),
         str(tmp_path / 'spec.json'), '--out-dir', str(tmp_path / 'out'), '--no-plot'],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "needs runs of 'sbp@0.25' and of dense; it has ['dense', 'sbp@0.5']" in proc.stderr
