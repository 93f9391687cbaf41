"""tools/analysis_tools/sbp_fit.py: picks within the budget, ranked by accuracy cost; the
configs it writes train; bad input is refused, naming the problem."""
import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
from mmengine.config import Config

from sbp_builders import REPO, load_tool

fit = load_tool('tools/analysis_tools/sbp_fit.py')
TINY_SBP = str(REPO / 'configs' / 'synthetic' / 'faster-rcnn_r18_fpn_sbp_synthetic-tiny.py')
TINY_DENSE = str(REPO / 'configs' / 'synthetic' / 'faster-rcnn_r18_fpn_synthetic-tiny.py')
SIZE = ['128', '128']


def run_fit(*args: str) -> list:
    return fit.main([TINY_SBP, '--batch-size', '2', '--size', *SIZE, *args])


@pytest.fixture(scope='module')
def all_fit() -> dict:
    """Every candidate's estimate at a budget they all fit."""
    estimates = run_fit('--budget-gib', '100')
    assert all(e.fits for e in estimates)
    return {e.name: e for e in estimates}


def measured_total_gib(config: str) -> float:
    """A written config's total, measured anew: bytes saved for backward at the tool's
    batch and size (the benchmarks' measure_variant) plus the model state."""
    from sbp_mmdet.benchmark import measure_variant, random_init
    from sbp_mmdet.variants import parse_variant
    cfg = Config.fromfile(config)
    saved = measure_variant(cfg, parse_variant('dense'), 2, int(SIZE[0]), int(SIZE[1]),
                            steps=0, warmup=0, device='cpu',
                            model_cfg=random_init(cfg.model)).saved_mib
    state = fit.model_state_bytes(cfg)
    return saved / 1024 + (state['parameters'] + state['gradients'] + state['optimizer']) / 2**30


def test_every_candidate_is_measured(all_fit: dict) -> None:
    assert set(all_fit) == {c.name for c in fit.CANDIDATES}
    dense = all_fit['dense']
    for e in all_fit.values():  # SBP and with_cp store less than dense, at the same state
        assert e.name == 'dense' or e.saved_gib < dense.saved_gib
    assert all_fit['with_cp'].map_change == all_fit['dense'].map_change == 0  # exact
    assert all_fit['sbp@0.5+cp'].map_change == all_fit['sbp@0.5'].map_change < 0


def test_picks_fit_the_budget_and_looser_budgets_cost_no_more_accuracy(
        all_fit: dict, tmp_path: Path) -> None:
    """Budgets between the smallest candidate and dense (the model state is most of the tiny
    detector's total, so they are the state plus a fraction of dense's saved bytes)."""
    dense = all_fit['dense']
    state = dense.total_gib - dense.saved_gib
    smallest = min(e.saved_gib for e in all_fit.values()) / dense.saved_gib
    costs = []
    for fraction in (smallest + 0.01, (smallest + 1) / 2, 1.05):
        budget = state + fraction * dense.saved_gib
        out = tmp_path / f'fit_{fraction:.2f}.py'
        pick = run_fit('--budget-gib', str(budget), '--write', str(out))[0]
        assert pick.fits and pick.total_gib <= budget
        assert measured_total_gib(str(out)) <= budget * 1.001  # the written config, measured
        fitting = [e for e in all_fit.values() if e.total_gib <= budget]
        assert pick.map_change == max(e.map_change for e in fitting)
        costs.append(-pick.map_change)
    assert costs == sorted(costs, reverse=True)  # a looser budget never costs more accuracy
    assert costs[-1] == 0  # dense fits the loosest one


def test_written_configs_train(all_fit: dict, workspace: Path) -> None:
    """The pick of a tight budget and an SBP + with_cp composition, written by the tool,
    train a few iterations with tools/train.py."""
    dense = all_fit['dense']
    tight = min(all_fit.values(), key=lambda e: e.total_gib).total_gib
    written = workspace / 'fit_tight.py'
    run_fit('--budget-gib', str(tight), '--write', str(written))
    composed = workspace / 'fit_sbp_cp.py'
    args = copy.copy(fit.parse_args([TINY_SBP, '--budget-gib', str(dense.total_gib),
                                     '--batch-size', '2', '--size', *SIZE])[1])
    composed.write_text(fit.config_text(TINY_SBP, str(composed), all_fit['sbp@0.5+cp'], args))
    cfg = Config.fromfile(str(composed))
    assert cfg.model.backbone.with_cp and cfg.model.backbone.sbp.recompute
    assert cfg.model.backbone.sbp.keep_ratio == 0.5 and cfg.model.backbone.type == 'ResNetSBP'
    for config in (written, composed):
        work_dir = workspace / 'work_dirs' / config.stem
        proc = subprocess.run([sys.executable, str(REPO / 'tools' / 'train.py'), str(config),
                               '--work-dir', str(work_dir), '--cfg-options',
                               'train_cfg.max_iters=2', 'train_cfg.val_interval=2'],
                              cwd=workspace, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert (work_dir / 'iter_2.pth').is_file()


def test_scaling_in_pixels_predicts_a_direct_measurement() -> None:
    cfg = fit.load_config(TINY_SBP)
    for cand in (fit.CANDIDATES[0], fit.CANDIDATES[5]):  # dense, SBP 0.5 + with_cp
        sizes = fit.measure_sizes(320, 320, 160 * 160)
        assert len(sizes) == 2 and all(h * w <= 160 * 160 for h, w in sizes)
        runs = [fit.measure(cfg, cand, 2, size, False) for size in sizes]
        predicted = fit.extrapolate([(r['size'][0] * r['size'][1], r['saved_mib'])
                                     for r in runs], 320 * 320)
        direct = fit.measure(cfg, cand, 2, (320, 320), False)['saved_mib']
        assert abs(predicted - direct) <= 0.1 * direct, (cand.name, predicted, direct)


@pytest.mark.parametrize('budget', ['0', '-1'])
def test_refuses_a_budget_of_zero_or_less(budget: str, capsys) -> None:
    with pytest.raises(SystemExit):
        run_fit('--budget-gib', budget)
    assert '--budget-gib must be > 0' in capsys.readouterr().err


def test_nothing_fits_names_the_smallest_candidate(all_fit: dict, capsys) -> None:
    smallest = min(all_fit.values(), key=lambda e: e.total_gib)
    with pytest.raises(SystemExit) as error:
        run_fit('--budget-gib', str(smallest.total_gib * 0.9))
    assert error.value.code == 2
    err = capsys.readouterr().err
    assert f'the smallest candidate, {smallest.name}, needs {smallest.total_gib:.2f} GiB' in err


@pytest.mark.parametrize('config, message', [
    (TINY_DENSE, 'is not an SBP backbone'),
    (str(REPO / 'configs' / 'faster_rcnn_r50_sbp_heads.py'), 'already an SBP head'),
    ('no/such/config.py', 'does not exist')])
def test_refuses_configs_it_cannot_fit(config: str, message: str, capsys) -> None:
    with pytest.raises(SystemExit):
        fit.main([config, '--budget-gib', '8', '--batch-size', '2', '--size', *SIZE])
    assert message in capsys.readouterr().err


@pytest.mark.parametrize('optimizer, states', [
    (dict(type='SGD', lr=0.02, momentum=0.9), 1), (dict(type='SGD', lr=0.02), 0),
    (dict(type='AdamW', lr=1e-4), 2), (dict(type='torch.optim.Adam', lr=1e-4), 2)])
def test_optimizer_state_counts(optimizer: dict, states: int) -> None:
    cfg = Config(dict(optim_wrapper=dict(optimizer=optimizer)))
    assert fit.optimizer_states(cfg) == states


def test_refuses_an_optimizer_it_does_not_count() -> None:
    cfg = Config(dict(optim_wrapper=dict(optimizer=dict(type='Adagrad', lr=0.01))))
    with pytest.raises(fit.FitError, match='optimizer Adagrad is not one the tool counts'):
        fit.optimizer_states(cfg)


def test_accuracy_costs_are_the_studys_paired_differences(tmp_path: Path) -> None:
    """The default study is the accuracy tool's accuracy.json; a setting costs what the
    study's variant with its gradients costs (with_cp and recompute change nothing)."""
    default = fit.parse_args([TINY_SBP, '--budget-gib', '1', '--batch-size', '1',
                              '--size', '64', '64'])[1].accuracy
    study = json.loads(Path(default).read_text())
    paired = {row['variant']: row['paired_mean'] for row in study['summary']}
    costs = fit.accuracy_study(default)
    assert costs.cost('sbp@0.5').mean == paired['sbp@0.5']
    assert costs.cost('sbp@0.75:recompute:with_cp').mean == paired['sbp@0.75:recompute']
    assert costs.cost('with_cp').exact and costs.cost('sbp@0.25') is None


def test_refuses_an_accuracy_file_that_is_not_a_study(tmp_path: Path, capsys) -> None:
    path = tmp_path / 'eval1000.json'
    path.write_text(json.dumps({'dense': {'0': {'map_1000': 0.3}}}))
    with pytest.raises(SystemExit):
        run_fit('--budget-gib', '1', '--accuracy', str(path))
    assert 'no "summary"' in capsys.readouterr().err
