"""The variant grammar (sbp_mmdet/variants.py) and the three study tools that use it."""
import json
import re
from pathlib import Path

import pytest
from mmengine.config import Config, DictAction

from sbp_mmdet.benchmark import is_reference, precision, variant_model
from sbp_mmdet.grad_fidelity import fidelity_variants
from sbp_mmdet.variants import TOKENS, parse_variant

from sbp_builders import load_tool

REPO = Path(__file__).resolve().parents[1]
TINY_SBP_CONFIG = REPO / 'configs' / 'synthetic' / 'faster-rcnn_r18_fpn_sbp_synthetic-tiny.py'
KEEP = {'model.backbone.sbp.keep_ratio': 0.5}
# each token after sbp@0.5 (head_* after sbp_rpn_head) -> its options besides the keep ratio
TOKEN_OPTIONS = {
    'with_cp': {'model.backbone.with_cp': True, 'model.backbone.sbp.recompute': True},
    'amp': {'optim_wrapper.type': 'AmpOptimWrapper', 'optim_wrapper.loss_scale': 'dynamic'},
    'recompute': {'model.backbone.sbp.recompute': True},
    'random': {'model.backbone.sbp.sampling': 'random'},
    'per_image': {'model.backbone.sbp.per_image': True},
    'objects': {'model.backbone.sbp.sampling': 'objects', 'model.backbone.sbp.per_image': True},
    'stages=0110': {'model.backbone.sbp.stages': (False, True, True, False)},
    'cell=4': {'model.backbone.sbp.grid_cell': 4},
    'inverse_keep': {'model.backbone.sbp.grad_scale': 'inverse_keep',
                     'model.neck.sbp.grad_scale': 'inverse_keep'},
    'dense_neck': {'model.neck.type': 'FPN'},
    'neck=lateral': {'model.neck.sbp.convs': ('lateral',)},
    'neck=output': {'model.neck.sbp.convs': ('output',)},
    'neck=both': {'model.neck.sbp.convs': ('lateral', 'output')},
    'exact_output': {'model.neck.sbp.overrides.output.exact_input_grad': True},
    'exact': {'model.backbone.sbp.exact_input_grad': True,
              'model.neck.sbp.exact_input_grad': True},
    'sbp_rpn_head': {'model.rpn_head.type': 'RPNHeadSBP'},
    'sbp_retina_head': {'model.bbox_head.type': 'RetinaHeadSBP'},
    'head_exact': {'model.rpn_head.sbp.exact_input_grad': True},
    'head_inverse_keep': {'model.rpn_head.sbp.grad_scale': 'inverse_keep'},
    'head_dense_outputs': {'model.rpn_head.sbp.dense_outputs': True},
    # the exact tools, without a config: ResNet's stages, SBP on all but the last
    'ecbe': {'efficient_conv_bn_eval': ['backbone.layer4']},
    'act_ckpt': {'activation_checkpointing': ['backbone.layer4']},
    'sac=backbone.layer4,neck': {'selective_checkpointing': ['backbone.layer4', 'neck']},
}


def test_the_test_table_covers_every_token():
    assert {token.split('=')[0] for token in TOKEN_OPTIONS} == \
        {token.split('=')[0] for token in TOKENS}


@pytest.mark.parametrize('token', TOKEN_OPTIONS)
def test_each_token_sets_its_options(token):
    head = 'sbp_rpn_head:' if token.startswith('head_') else ''
    variant = parse_variant(f'sbp@0.5:{head}{token}')
    expected = {**KEEP, **TOKEN_OPTIONS['sbp_rpn_head' if head else token], **TOKEN_OPTIONS[token]}
    assert dict(variant.options) == expected
    assert variant.keep_ratio == 0.5 and variant.sbp
    # the --cfg-options words read back (mmengine's DictAction) to the same values
    words = DictAction._parse_iterable
    assert {w.split('=', 1)[0]: words(w.split('=', 1)[1]) for w in variant.cli_options()} == \
        expected


def test_dense_and_the_bases():
    assert dict(parse_variant('dense').options) == {'model.backbone.sbp.keep_ratio': 1.0}
    assert parse_variant('dense').keep_ratio is None and not parse_variant('dense').sbp
    # without a base a variant is dense; with_cp then checkpoints without SBP's recompute
    assert dict(parse_variant('with_cp').options) == {'model.backbone.sbp.keep_ratio': 1.0,
                                                      'model.backbone.with_cp': True}
    assert parse_variant('with_cp:amp').amp and not parse_variant('with_cp:amp').sbp
    assert parse_variant('sbp@1.0').keep_ratio == 1.0
    # a config whose backbone is dense: dense sets nothing
    assert dict(parse_variant('dense', dict(backbone=dict(type='ResNet'))).options) == {}


def test_combinations_keep_the_written_order_and_read_the_parts():
    assert parse_variant('sbp@0.25:random:stages=0110:cell=4:inverse_keep').cli_options() == [
        'model.backbone.sbp.keep_ratio=0.25', 'model.backbone.sbp.sampling=random',
        'model.backbone.sbp.stages=(False,True,True,False)', 'model.backbone.sbp.grid_cell=4',
        'model.backbone.sbp.grad_scale=inverse_keep', 'model.neck.sbp.grad_scale=inverse_keep']
    # a dense neck is no SBP part: inverse_keep and exact leave it alone
    assert parse_variant('sbp@0.5:dense_neck:inverse_keep').cli_options() == [
        'model.backbone.sbp.keep_ratio=0.5', 'model.neck.type=FPN',
        'model.backbone.sbp.grad_scale=inverse_keep']
    assert 'model.neck.sbp.exact_input_grad' not in \
        parse_variant('sbp@0.5:dense_neck:exact').options
    # exact reaches the SBP heads that the tokens or the config name
    assert parse_variant('sbp@0.5:neck=both:sbp_rpn_head:exact').cli_options()[3:] == [
        'model.backbone.sbp.exact_input_grad=True', 'model.neck.sbp.exact_input_grad=True',
        'model.rpn_head.sbp.exact_input_grad=True']
    model = dict(backbone=dict(type='ResNetSBP'), neck=dict(type='FPN'),
                 bbox_head=dict(type='RetinaHeadSBP'))
    assert dict(parse_variant('sbp@0.5:exact:head_inverse_keep', model).options) == {
        **KEEP, 'model.backbone.sbp.exact_input_grad': True,
        'model.bbox_head.sbp.exact_input_grad': True,
        'model.bbox_head.sbp.grad_scale': 'inverse_keep'}
    assert parse_variant('sbp@0.5:sbp_retina_head:head_exact:head_inverse_keep').cli_options()[
        2:] == ['model.bbox_head.sbp.exact_input_grad=True',
                'model.bbox_head.sbp.grad_scale=inverse_keep']


def test_aliases_name_the_same_variant():
    """The benchmark's names in docs/results: ``+`` joins tokens, ``cp`` is ``with_cp``."""
    plus, colon = parse_variant('sbp@0.5+cp+amp'), parse_variant('sbp@0.5:with_cp:amp')
    assert plus.options == colon.options and plus.tokens == colon.tokens
    assert plus.name == 'sbp@0.5+cp+amp'  # the name as written labels the rows
    assert parse_variant('sbp@0.5+exact+cp').options == parse_variant('sbp@0.5:exact:cp').options


def test_every_variant_in_the_committed_results_parses():
    names = set()
    for path in (REPO / 'docs' / 'results').rglob('*.json'):
        data = json.loads(path.read_text())
        if isinstance(data, dict):
            rows = data.get('rows', []) + data.get('summary', []) + data.get('runs', [])
            names |= {r['variant'] for r in rows if isinstance(r, dict) and 'variant' in r}
    assert len(names) > 30
    for name in names:
        parse_variant(name)


@pytest.mark.parametrize('name,message', [
    ('sparse', r"unknown token 'sparse' in variant 'sparse'"),
    ('sbp@0.5:fast', r"unknown token 'fast'"),
    ('sbp@0.5+fast', r"unknown token 'fast'"),
    ('sbp@0.5:neck=middle', r"unknown token 'neck=middle'"),
    ('dense:random', r"variant 'dense:random': random applies to sbp@R variants only"),
    ('dense+exact', r'exact applies to sbp@R variants only'),
    ('sbp@x', r'sbp@R needs a keep ratio R in \(0, 1\], got .x.'),
    ('sbp@0', r'sbp@R needs a keep ratio'),
    ('sbp@1.5', r'sbp@R needs a keep ratio'),
    ('sbp@0.5:recompute:recompute', 'repeats a token'),
    ('sbp@0.5:cp:with_cp', 'repeats a token'),
    ('sbp@0.5:random:objects', r"objects sets model.backbone.sbp.sampling='objects', random "),
    ('sbp@0.5:neck=lateral:neck=both', r'neck=both sets model.neck.sbp.convs'),
    ('sbp@0.5:stages=01a', r'stages=01a: stages=<one 0 or 1 per backbone stage>'),
    ('sbp@0.5:stages=', r'stages=<one 0 or 1'),
    ('sbp@0.5:cell=0', r'cell=<rows>, a positive integer'),
    ('sbp@0.5:head_exact', r'head_exact: needs an SBP head \(sbp_rpn_head or sbp_retina_head'),
])
def test_bad_names_are_refused_saying_why(name, message):
    with pytest.raises(ValueError, match=message):
        parse_variant(name)


def test_an_unknown_token_lists_the_valid_ones():
    with pytest.raises(ValueError) as error:
        parse_variant('sbp@0.5:fast')
    for token in TOKENS:
        assert token in str(error.value)
    assert 'docs/usage.md#variants' in str(error.value) and 'cp = with_cp' in str(error.value)


def test_usage_documents_every_token():
    text = (REPO / 'docs' / 'usage.md').read_text()
    section = text.split('\n## Variants\n')[1].split('\n## ')[0]
    rows = [line for line in section.splitlines() if line.startswith('| `')]
    written = {t for row in rows for t in re.findall(r'`([^`]+)`', row.split(' | ')[0])}
    documented = {t if t in TOKENS else re.sub(r'=.*', '=', t) for t in written}
    assert documented == {'dense', 'sbp@R', *TOKENS}


# ---------------------------------------------------------------------------------------
# The three tools use the parser


def test_benchmark_applies_the_variant_to_its_model():
    model = dict(backbone=dict(type='ResNetSBP', sbp=dict(keep_ratio=0.75, recompute=True)),
                 neck=dict(type='FPNSBP'), rpn_head=dict(type='RPNHeadSBP'))
    dense = variant_model(model, parse_variant('dense', model))
    assert dense['backbone']['type'] == 'ResNet' and 'sbp' not in dense['backbone']
    assert dense['neck']['type'] == 'FPN' and dense['rpn_head']['type'] == 'RPNHead'
    # every variant starts with with_cp and recompute off, then takes its options
    sbp = variant_model(model, parse_variant('sbp@0.5', model))
    assert sbp['backbone']['sbp'] == dict(keep_ratio=0.5, recompute=False)
    assert not sbp['backbone']['with_cp'] and sbp['neck']['type'] == 'FPNSBP'
    cp = variant_model(model, parse_variant('sbp@0.25+recompute+cp', model))
    assert cp['backbone']['sbp'] == dict(keep_ratio=0.25, recompute=True)
    assert cp['backbone']['with_cp']
    assert variant_model(model, parse_variant('with_cp', model))['backbone']['with_cp']
    exact = variant_model(model, parse_variant('sbp@0.5+exact', model))
    assert all(exact[part]['sbp']['exact_input_grad'] for part in ('backbone', 'neck', 'rpn_head'))
    assert model['backbone']['sbp'] == dict(keep_ratio=0.75, recompute=True)  # not edited
    assert [is_reference(parse_variant(n)) for n in ('dense', 'amp', 'with_cp', 'sbp@0.5')] == [
        True, True, False, False]
    assert precision(parse_variant('sbp@0.5:amp'), 'cpu') == 'bf16'
    assert precision(parse_variant('amp'), 'cuda') == 'fp16'
    assert precision(parse_variant('sbp@0.5'), 'cuda') == 'fp32'


@pytest.mark.parametrize('tool', ['benchmark_sbp', 'sbp_accuracy', 'sbp_grad_fidelity'])
def test_each_tool_refuses_a_bad_variant_with_the_grammar(tool, capsys):
    parse_args = load_tool(f'tools/analysis_tools/{tool}.py').parse_args
    with pytest.raises(SystemExit) as stop:
        parse_args([str(TINY_SBP_CONFIG), '--variants', 'sbp@0.5:fast'])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "unknown token 'fast' in variant 'sbp@0.5:fast'" in err and 'neck=lateral' in err
    with pytest.raises(SystemExit):
        parse_args(['--help'])
    assert 'docs/usage.md#variants' in capsys.readouterr().out


def test_accuracy_runs_get_the_variant_options():
    tool = load_tool('tools/analysis_tools/sbp_accuracy.py')
    args = tool.parse_args([str(TINY_SBP_CONFIG), '--variants', 'sbp@0.75:recompute',
                            '--cfg-options', 'a=1'])
    work, opts = tool.run_plan(args, 'sbp@0.75:recompute', 3)
    assert opts == ['model.backbone.sbp.keep_ratio=0.75', 'model.backbone.sbp.recompute=True',
                    'randomness.seed=3', 'randomness.deterministic=False', 'a=1']
    assert work.endswith('sbp0.75_recompute_seed3')
    assert tool.variant_options('dense', str(TINY_SBP_CONFIG)) == \
        parse_variant('dense').cli_options()


def test_grad_fidelity_takes_variants_that_differ_in_keep_ratio_only():
    ratios, options = fidelity_variants(['sbp@0.25:neck=both', 'sbp@0.5:neck=both'])
    assert ratios == [0.25, 0.5] and options == {'model.neck.sbp.convs': ('lateral', 'output')}
    for names, message in ((['sbp@0.25:random', 'sbp@0.5'], 'differ in more than the keep'),
                           (['dense'], 'compares sbp@R variants'),
                           (['sbp@1.0'], 'compares sbp@R variants'),
                           (['sbp@0.5:amp'], 'sets optim_wrapper.type')):
        with pytest.raises(ValueError, match=message):
            fidelity_variants(names)
    tool = load_tool('tools/analysis_tools/sbp_grad_fidelity.py')
    args = tool.parse_args([str(TINY_SBP_CONFIG), '--variants', 'sbp@0.25', 'sbp@0.75'])
    assert args.keep_ratios == [0.25, 0.75]
    assert tool.parse_args([str(TINY_SBP_CONFIG)]).keep_ratios == [0.25, 0.5, 0.75]
    with pytest.raises(SystemExit):
        tool.parse_args([str(TINY_SBP_CONFIG), '--variants', 'sbp@0.5', '--keep-ratios', '0.5'])
    with pytest.raises(SystemExit):
        tool.parse_args([str(TINY_SBP_CONFIG), '--variants', 'sbp@0.5:random', 'sbp@0.25'])


def test_grad_fidelity_builds_the_model_of_its_variants(workspace, monkeypatch):
    monkeypatch.chdir(workspace)  # the tiny config's data root is relative
    tool = load_tool('tools/analysis_tools/sbp_grad_fidelity.py')
    args = tool.parse_args([str(TINY_SBP_CONFIG), '--variants', 'sbp@0.25:dense_neck:sbp_rpn_head',
                            'sbp@0.5:dense_neck:sbp_rpn_head', '--iters', '1'])
    model, _ = tool.build(args)
    assert (type(model.neck).__name__, type(model.rpn_head).__name__) == ('FPN', 'RPNHeadSBP')
    assert Config.fromfile(str(TINY_SBP_CONFIG)).model.neck.type == 'FPNSBP'
