"""SBP composed with mmengine's ``efficient_conv_bn_eval`` and ``torch.compile``.

``efficient_conv_bn_eval`` traces the modules it names with torch.fx and
replaces their forward by the graph: an SBP module, or a layer its module runs
with SBP, refuses, naming itself and the reason (a traced graph would train
densely); the dense parts of an SBP model trace and SBP stays exact.
``torch.compile`` (the Runner's ``compile`` key) runs SBP models: forward
equal to dense, gradients equal to the where/detach reference, a new mask at
every step (docs/composition.md).
"""
import subprocess
import sys

import pytest
import torch
from mmengine.config import Config
from mmengine.model.efficient_conv_bn_eval import turn_on_efficient_conv_bn_eval
from mmengine.runner import Runner
from torch.nn.modules.batchnorm import _BatchNorm

import sbp_mmdet  # noqa: F401
from sbp_mmdet.sbp import SBPTracingError

from sbp_builders import REPO, build_detector, preprocessed_batch, small_faster_rcnn_cfg
from sbp_reference import (STRIDES, add_reference_hooks, assert_grads_match,
                           assert_matches_reference, backward_both, reference_units, total_loss)

COCO = REPO / 'configs' / 'faster_rcnn_r50_sbp.py'
COCO_HEADS = REPO / 'configs' / 'faster_rcnn_r50_sbp_heads.py'
TINY_SBP = REPO / 'configs' / 'synthetic' / 'faster-rcnn_r18_fpn_sbp_synthetic-tiny.py'


def config_detector(path) -> torch.nn.Module:
    """The detector of config ``path``, no pretrained weights, in train mode."""
    cfg = Config.fromfile(str(path)).model
    cfg.backbone.init_cfg = None
    return build_detector(cfg)


def replaced_forwards(model: torch.nn.Module) -> list:
    """The modules whose forward was replaced (by a torch.fx graph's)."""
    return [name for name, m in model.named_modules() if 'forward' in vars(m)]


def sbp_and_dense(norm_eval: bool = False, **sbp):
    """The small SBP Faster R-CNN (``sbp``: more ``sbp`` keys) and its dense twin
    with the same weights, BatchNorm statistics random (so that a fused conv +
    BN differs from the conv)."""
    configs = [small_faster_rcnn_cfg(sbp) for sbp in (True, False)]
    configs[0].backbone.sbp.update(sbp)
    for cfg in configs:
        cfg.backbone.norm_eval = norm_eval
    sbp_model = build_detector(configs[0])
    for m in sbp_model.modules():
        if isinstance(m, _BatchNorm):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    dense = build_detector(configs[1])
    dense.load_state_dict(sbp_model.state_dict())
    return sbp_model, dense


# ------------------------------------------------------------- efficient_conv_bn_eval


@pytest.fixture(scope='module')
def coco_detector() -> torch.nn.Module:
    """configs/faster_rcnn_r50_sbp.py's detector (the refusals leave it untouched)."""
    return config_detector(COCO)


@pytest.mark.parametrize('modules,error', [
    (['backbone'], r"ResNetSBP: torch.fx cannot trace an SBP module.*name its dense "
                   r"submodules instead: \['layer4'\].*efficient_conv_bn_eval="
                   r"\['backbone.layer4'\]"),
    (['neck'], 'FPNSBP: torch.fx cannot trace an SBP module.*leave it out'),
    (['backbone.layer2'], r'ResNetSBP.layer2.0: torch.fx cannot trace a layer that runs '
                          r'with SBP.*silently train densely'),
    (['backbone.layer3.1'], 'ResNetSBP.layer3.1: torch.fx cannot trace a layer'),
    (['neck.lateral_convs.0'], 'FPNSBP.lateral_convs.0: torch.fx cannot trace a layer'),
])
def test_efficient_conv_bn_eval_refuses_sbp_modules_and_layers_naming_them(
        coco_detector, modules, error):
    """The COCO config's frozen stage 1 is not suggested: it trains nothing."""
    with pytest.raises(SBPTracingError, match=error):
        turn_on_efficient_conv_bn_eval(coco_detector, modules)
    assert replaced_forwards(coco_detector) == []  # nothing was half done


@pytest.mark.parametrize('config,modules,error', [
    (COCO_HEADS, ['rpn_head'], 'RPNHeadSBP: torch.fx cannot trace an SBP module'),
    (TINY_SBP, ['backbone'], r"ResNetSBP: .*efficient_conv_bn_eval=\['backbone.layer4'\]"),
])
def test_efficient_conv_bn_eval_refuses_the_other_configs_sbp_modules(config, modules, error):
    model = config_detector(config)
    with pytest.raises(SBPTracingError, match=error):
        turn_on_efficient_conv_bn_eval(model, modules)
    assert replaced_forwards(model) == []


def test_efficient_conv_bn_eval_on_the_dense_stage_fuses_it_and_sbp_stays_exact():
    """``backbone.layer4`` (dense, BatchNorm frozen by ``norm_eval``) runs its
    conv + BN pairs fused; the SBP stages and neck still equal the reference."""
    sbp_model, dense = sbp_and_dense(norm_eval=True)
    turn_on_efficient_conv_bn_eval(sbp_model, ['backbone.layer4'])
    assert replaced_forwards(sbp_model) == ['backbone.layer4']
    graph = sbp_model.backbone.layer4.forward.__self__.graph
    fused = [n for n in graph.nodes if n.name.startswith('efficient_conv_bn_eval')]
    assert len(fused) == 5  # two BasicBlocks of two convs, one downsample conv
    data = preprocessed_batch(sbp_model, [(96, 128)] * 2)
    loss = total_loss(sbp_model, data)
    iteration = sbp_model.backbone.sbp_iteration
    assert iteration is not None and iteration.keep_ratio == 0.5
    add_reference_hooks(reference_units(dense, sbp_model, iteration, enumerate(STRIDES)),
                        iteration, data['inputs'].shape[2])
    assert_matches_reference(sbp_model, dense, data, loss)


def tiny_runner_cfg(workspace, name: str) -> Config:
    cfg = Config.fromfile(str(TINY_SBP))
    cfg.work_dir = str(workspace / 'work_dirs' / name)
    cfg.train_cfg.max_iters = 2
    cfg.val_cfg = cfg.val_dataloader = cfg.val_evaluator = None
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', interval=100)
    return cfg


def test_runner_fuses_the_dense_stage_and_trains_with_sbp(workspace, monkeypatch):
    monkeypatch.chdir(workspace)
    cfg = tiny_runner_cfg(workspace, 'dense_stage')
    cfg.efficient_conv_bn_eval = ['backbone.layer4']
    runner = Runner.from_cfg(cfg)
    runner.train()
    backbone = runner.model.backbone
    assert replaced_forwards(runner.model) == ['backbone.layer4']
    assert backbone.mask_sampler.step == 2 and backbone.sbp_iteration.keep_ratio == 0.5


def test_train_py_stops_before_the_first_iteration_naming_the_module(workspace):
    """The route a user types: ``--cfg-options efficient_conv_bn_eval="['backbone']"``."""
    proc = subprocess.run(
        [sys.executable, str(REPO / 'tools' / 'train.py'), str(TINY_SBP),
         '--work-dir', str(workspace / 'work_dirs' / 'refused'),
         '--cfg-options', "efficient_conv_bn_eval=['backbone']"],
        cwd=workspace, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "SBPTracingError: ResNetSBP: torch.fx cannot trace an SBP module" in proc.stderr
    assert "efficient_conv_bn_eval=['backbone.layer4']" in proc.stderr
    assert 'Iter(train)' not in proc.stdout + proc.stderr


# ------------------------------------------------------------------------ torch.compile


@pytest.mark.slow  # dynamo traces SBP's Python at every recompile: minutes on a CPU
def test_torch_compile_gives_the_dense_forward_and_reference_gradients_at_every_step():
    """Dynamo + AOTAutograd (``backend='aot_eager'``: what ``compile=True``
    hands to inductor, without its code generation) on the SBP backbone (SBP
    on stage 2, to keep the compile short) and neck: each step draws a new
    mask, its forward equals dense and its gradients equal the reference with
    that mask."""
    torch._dynamo.reset()
    sbp_model, dense = sbp_and_dense(stages=(False, True, False, False))
    compiled = torch.compile(sbp_model.extract_feat, backend='aot_eager')
    masks = []
    for step in range(2):
        torch.manual_seed(step)
        x = torch.rand(2, 3, 64, 96)
        outs = compiled(x)
        iteration = sbp_model.backbone.sbp_iteration
        masks.append(iteration.base_mask.clone())
        handles = add_reference_hooks(
            reference_units(dense, sbp_model, iteration, enumerate(STRIDES)), iteration,
            x.shape[2])
        ref_outs = dense.extract_feat(x)
        for handle in handles:
            handle.remove()
        assert len(outs) == len(ref_outs) == 5
        for out, ref in zip(outs, ref_outs):
            torch.testing.assert_close(out, ref)
        backward_both(outs, ref_outs)
        assert_grads_match(sbp_model, dense)
        sbp_model.zero_grad(set_to_none=True)
        dense.zero_grad(set_to_none=True)
    assert sbp_model.backbone.mask_sampler.step == 2
    assert not torch.equal(masks[0], masks[1])
    torch._dynamo.reset()
