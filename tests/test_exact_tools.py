"""The exact memory savers as variant tokens (``ecbe``, ``act_ckpt``, ``sac``; sbp_mmdet/
exact_tools.py): the training step equals dense's, memory is really saved, the operator
counter counts what runs, and the compositions that would not be exact are refused."""
import pytest
import torch
from mmengine.config import Config, DictAction
from torch.nn.modules.batchnorm import _BatchNorm

import sbp_mmdet  # noqa: F401
from sbp_mmdet.accuracy_study import DEFAULT_STUDY, AccuracyStudy
from sbp_mmdet.benchmark import OpCounter, build_step, measure_variant
from sbp_mmdet.exact_tools import ExactToolError
from sbp_mmdet.sbp import SBPTracingError
from sbp_mmdet.variants import parse_variant

from sbp_builders import REPO

TINY_SBP = REPO / 'configs' / 'synthetic' / 'faster-rcnn_r18_fpn_sbp_synthetic-tiny.py'
COCO = REPO / 'configs' / 'faster_rcnn_r50_sbp.py'
SIZE = (1, 64, 96)  # batch, height, width


@pytest.fixture(scope='module')
def config() -> Config:
    """The tiny SBP Faster R-CNN as the COCO configs train: stage 1 frozen, BatchNorm in
    eval mode (what efficient_conv_bn_eval fuses)."""
    cfg = Config.fromfile(str(TINY_SBP))
    cfg.model.backbone.update(frozen_stages=1, norm_eval=True)
    return cfg


def step_of(config: Config, name: str):
    step = build_step(config, parse_variant(name, config.model), *SIZE, 'cpu')
    torch.manual_seed(1)
    for m in step.model.modules():  # BatchNorm statistics that make a fused conv differ
        if isinstance(m, _BatchNorm):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return step


def loss_and_grads(step) -> tuple:
    step.model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # the same proposals and samples
    loss = step.loss()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in step.model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.fixture(scope='module')
def dense(config: Config) -> tuple:
    return loss_and_grads(step_of(config, 'dense'))


@pytest.mark.parametrize('name', ['ecbe', 'act_ckpt', 'sac',
                                  'ecbe=backbone.layer4:sac=backbone.layer2,backbone.layer3'])
def test_exact_tools_train_as_dense(config: Config, dense: tuple, name: str) -> None:
    loss, grads = loss_and_grads(step_of(config, name))
    dense_loss, dense_grads = dense
    assert torch.allclose(loss, dense_loss, rtol=1e-5)
    assert grads.keys() == dense_grads.keys()
    for key, grad in grads.items():
        assert torch.allclose(grad, dense_grads[key], rtol=1e-3, atol=1e-5), key


def test_exact_tools_are_switched_on_as_the_runner_does(config: Config) -> None:
    model = step_of(config, 'ecbe').model
    assert 'forward' in vars(model.backbone)  # efficient_conv_bn_eval's traced graph
    model = step_of(config, 'act_ckpt').model
    assert [n for n, m in model.named_modules() if 'forward' in vars(m)] == [
        'backbone.layer3', 'backbone.layer4']


def test_selective_checkpointing_saves_memory_and_counts_what_it_keeps(config: Config) -> None:
    saved = {name: measure_variant(config, parse_variant(name, config.model), *SIZE, 0, 0,
                                   'cpu').saved_by_component_mib['backbone']
             for name in ('dense', 'sac')}
    assert 0 < saved['sac'] < saved['dense']


def test_operator_counter_counts_dispatched_operators() -> None:
    x = torch.randn(3, 3)
    with OpCounter() as ops:
        (x @ x + 1).relu()
    assert ops.total == 3


def test_checkpointing_dispatches_the_recomputed_operators(config: Config) -> None:
    ops = {name: measure_variant(config, parse_variant(name, config.model), *SIZE, 0, 0,
                                 'cpu').ops for name in ('dense', 'act_ckpt')}
    assert ops['act_ckpt'] > ops['dense'] > 0


def test_sbp_composes_with_exact_tools_on_its_dense_stage(config: Config) -> None:
    """SBP at keep 1.0 with each tool on the dense stage 4: the SBP modules' dense path, so
    the step equals plain SBP's at keep 1.0."""
    ref = loss_and_grads(step_of(config, 'sbp@1.0'))
    for tool in ('ecbe', 'act_ckpt', 'sac'):
        variant = parse_variant(f'sbp@1.0:{tool}', config.model)
        assert variant.options[tool_key(tool)] == ['backbone.layer4']
        loss, grads = loss_and_grads(step_of(config, f'sbp@1.0:{tool}'))
        assert torch.allclose(loss, ref[0], rtol=1e-5)
        for key, grad in grads.items():
            assert torch.allclose(grad, ref[1][key], rtol=1e-3, atol=1e-5), (tool, key)


def tool_key(token: str) -> str:
    return {'ecbe': 'efficient_conv_bn_eval', 'act_ckpt': 'activation_checkpointing',
            'sac': 'selective_checkpointing'}[token]


@pytest.mark.parametrize('name, error, message', [
    ('sbp@0.5:act_ckpt=backbone.layer2', ExactToolError, 'holds layers that run with SBP'),
    ('sbp@0.5:sac=backbone', ExactToolError, 'holds layers that run with SBP'),
    ('sbp@0.5:ecbe=backbone', SBPTracingError, 'cannot trace an SBP module'),
    ('with_cp:ecbe', ExactToolError, 'torch.fx cannot trace'),
    ('sbp@0.5:with_cp:ecbe', ExactToolError, 'torch.fx cannot trace'),
    ('ecbe:sac', ExactToolError, 'overlap'),
    ('sac=backbone.layer9', ExactToolError, "no module 'backbone.layer9'"),
])
def test_compositions_that_would_not_be_exact_are_refused(
        config: Config, name: str, error, message: str) -> None:
    with pytest.raises(error, match=message):
        step_of(config, name)


@pytest.mark.parametrize('modules', ['backbone', 'backbone.layer2', 'neck'])
def test_reentrant_checkpointing_that_drops_gradients_stops_the_benchmark(
        config: Config, modules: str) -> None:
    """mmengine's activation_checkpointing (torch's reentrant checkpoint) of a module whose
    inputs need no gradient (the image, a frozen stage's output, a tuple of features) silently
    drops its gradients: the benchmark stops."""
    with pytest.raises(RuntimeError, match='got no gradient'):
        measure_variant(config, parse_variant(f'act_ckpt={modules}', config.model),
                        *SIZE, 0, 0, 'cpu')


def test_tokens_name_what_each_tool_can_act_on() -> None:
    model = Config.fromfile(str(COCO)).model  # stage 1 frozen, SBP on stages 2-3
    options = {name: parse_variant(name, model).options for name in (
        'ecbe', 'act_ckpt', 'sac', 'sbp@0.75:ecbe', 'sbp@0.5:stages=0100:sac')}
    assert options['ecbe']['efficient_conv_bn_eval'] == ['backbone']
    assert options['act_ckpt']['activation_checkpointing'] == ['backbone.layer3',
                                                               'backbone.layer4']
    assert options['sac']['selective_checkpointing'] == [
        'backbone.layer2', 'backbone.layer3', 'backbone.layer4']
    assert options['sbp@0.75:ecbe']['efficient_conv_bn_eval'] == ['backbone.layer4']
    assert options['sbp@0.5:stages=0100:sac']['selective_checkpointing'] == [
        'backbone.layer3', 'backbone.layer4']
    # the training tools' --cfg-options read the module lists back
    words = parse_variant('ecbe=backbone.layer4,neck', model).cli_options()
    parsed = {}
    for word in words:
        key, value = word.split('=', 1)
        parsed[key] = DictAction._parse_iterable(value)
    assert parsed['efficient_conv_bn_eval'] == ['backbone.layer4', 'neck']


def test_tool_tokens_refuse_empty_module_paths() -> None:
    with pytest.raises(ValueError, match='module paths joined by commas'):
        parse_variant('ecbe=backbone.layer4,')


def test_accuracy_of_a_setting_is_that_of_its_gradients() -> None:
    study = AccuracyStudy(str(REPO / DEFAULT_STUDY))
    assert study.cost('with_cp:ecbe').exact and study.cost('sac').label() == 'exact'
    assert study.cost('sbp@0.5:with_cp:recompute') == study.cost('sbp@0.5')
    assert study.cost('sbp@0.75:recompute:sac').ci95 is not None
    assert study.cost('sbp@0.25') is None and study.cost('amp') is None


def test_benchmark_rows_take_the_study_of_their_own_detector_only() -> None:
    """The Faster R-CNN study prices Faster R-CNN's SBP rows; a RetinaNet row is "not
    measured" unless it computes dense's gradients ("exact")."""
    from sbp_builders import load_tool
    bench = load_tool('tools/analysis_tools/benchmark_sbp.py')
    paired = AccuracyStudy(str(REPO / DEFAULT_STUDY)).cost('sbp@0.5').label()
    for config, sbp in (('faster_rcnn_r50_sbp.py', paired),
                        ('retinanet_r50_sbp.py', 'not measured')):
        rows = [dict(variant=v) for v in ('sbp@0.5:with_cp', 'sac', 'amp')]
        bench.add_accuracy(rows, str(REPO / DEFAULT_STUDY), str(REPO / 'configs' / config))
        assert [r['accuracy'] for r in rows] == [sbp, 'exact', 'not measured']


def test_train_applies_selective_checkpointing_and_refuses_it_on_sbp_stages(
        workspace) -> None:
    """tools/train.py: ``selective_checkpointing=[...]`` trains; on a stage that runs SBP it
    stops before the first iteration, naming the module and the reason."""
    import subprocess
    import sys

    def train(*options: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, str(REPO / 'tools' / 'train.py'), str(TINY_SBP), '--work-dir',
             'work_dirs/sac', '--cfg-options', 'train_cfg.max_iters=1', *options],
            cwd=workspace, capture_output=True, text=True, timeout=300)
    refused = train('selective_checkpointing=[backbone.layer2]')
    assert refused.returncode != 0
    assert 'selective_checkpointing: backbone.layer2 holds layers that run with SBP' in \
        refused.stderr
    assert not list((workspace / 'work_dirs' / 'sac').rglob('iter_*.pth'))
    trained = train('selective_checkpointing=[backbone.layer4]')
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert (workspace / 'work_dirs' / 'sac' / 'iter_1.pth').is_file()
