"""The README, the docs pages and the configs say what the code does.

Each test reads a document and checks it against the code, the configs or the files it
names: the key table against ``MaskConfig``, ``LayerConfig`` and each module's own keys,
the configs table against the configs, the results index against ``docs/results/``, every
command against the parser of the tool it runs. Nothing here measures anything.
"""
import ast
import re
import shlex
import subprocess
import sys
from dataclasses import MISSING, fields
from pathlib import Path

import pytest
import torch
from mmdet.models.backbones import ResNet
from mmdet.registry import MODELS

import sbp_mmdet  # noqa: F401  (registers the SBP modules)
from sbp_mmdet.models.necks.fpn_sbp import CONV_GROUPS
from sbp_mmdet.sbp import MASK_POLICIES, LayerConfig, MaskConfig, SBPModuleMixin
from sbp_mmdet.sbp.config import GRAD_SCALES, LAYER_KEYS, MASK_KEYS

from sbp_builders import load_tool

REPO = Path(__file__).resolve().parents[1]
README = REPO / 'README.md'
DOC_PAGES = sorted((REPO / 'docs').glob('*.md'))
RESULTS = REPO / 'docs' / 'results'
CONFIGS_README = REPO / 'configs' / 'README.md'
BUILTIN_POLICIES = ('grid', 'random', 'objects')

# Tiny arguments with which each SBP module builds on the CPU in well under a second.
TINY_CONVNEXT = dict(arch=dict(depths=[1, 1, 1, 1], channels=[8, 16, 32, 64]),
                     out_indices=(0, 1, 2, 3), gap_before_final_norm=False)
TINY_ARGS = {
    'ResNetSBP': dict(depth=18),
    'ResNetV1dSBP': dict(depth=18),
    'ResNeXtSBP': dict(depth=50, groups=4, base_width=4),
    'RegNetSBP': dict(arch='regnetx_400mf'),
    'Res2NetSBP': dict(depth=50, scales=2, base_width=4),
    'ConvNeXtSBP': TINY_CONVNEXT,
    'SwinTransformerSBP': dict(embed_dims=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2)),
    'FPNSBP': dict(in_channels=[8, 16, 32, 64], out_channels=8, num_outs=5),
    'RPNHeadSBP': dict(in_channels=8, feat_channels=8),
    'RetinaHeadSBP': dict(num_classes=4, in_channels=8, feat_channels=8, stacked_convs=1),
}
BACKBONES = ('ResNetSBP', 'ResNetV1dSBP', 'ResNeXtSBP', 'RegNetSBP', 'Res2NetSBP', 'ConvNeXtSBP',
             'SwinTransformerSBP')


def build(type_name: str, sbp=None, **kwargs):
    args = dict(TINY_ARGS[type_name], **kwargs)
    if sbp is not None:
        args['sbp'] = sbp
    return MODELS.build(dict(type=type_name, **args))


def accepted_keys(type_name: str) -> set:
    """The ``sbp`` keys a module accepts, as its own error for an unknown key lists them."""
    with pytest.raises(KeyError) as error:
        build(type_name, sbp={'not_a_key': 1})
    allowed = re.search(r'allowed keys are (\[.*?\])', str(error.value))
    assert allowed, str(error.value)
    return set(ast.literal_eval(allowed.group(1)))


def markdown_tables(text: str) -> list:
    """Every table of a markdown text as a list of rows, each a dict by header."""
    tables, lines = [], text.splitlines()
    i = 0
    while i < len(lines) - 1:
        if lines[i].startswith('|') and re.match(r'^\|\s*-{3}', lines[i + 1]):
            header = split_row(lines[i])
            rows = []
            i += 2
            while i < len(lines) and lines[i].startswith('|'):
                rows.append(dict(zip(header, split_row(lines[i]))))
                i += 1
            tables.append(rows)
        else:
            i += 1
    return tables


def split_row(line: str) -> list:
    cells = re.split(r'(?<!\\)\|', line.strip())[1:-1]
    return [c.strip() for c in cells]


def table_with(text: str, first_header: str) -> list:
    found = [t for t in markdown_tables(text) if t and next(iter(t[0])) == first_header]
    assert len(found) == 1, f'expected one table headed {first_header!r}, found {len(found)}'
    return found[0]


def code_spans(text: str) -> list:
    return re.findall(r'(?<!`)`([^`\n]+)`(?!`)', text)


def keyword_args(code: str):
    """``code`` as keyword arguments (``a=1, b='x'``), or None if it is not that."""
    try:
        call = ast.parse(f'f({code})', mode='eval').body
    except SyntaxError:
        return None
    if call.args or not call.keywords:
        return None
    try:
        return {k.arg: literal(k.value) for k in call.keywords}
    except ValueError:
        return None


def literal(node):
    """A literal, with ``dict(...)`` calls as dicts."""
    if isinstance(node, ast.Call) and getattr(node.func, 'id', None) == 'dict':
        return {k.arg: literal(k.value) for k in node.keywords}
    return ast.literal_eval(node)


# ---------------------------------------------------------------------------------------
# The README's bars


def test_readme_is_short_dated_nowhere_and_shows_usage_first():
    text = README.read_text()
    lines = text.splitlines()
    assert len(lines) <= 250, f'README.md has {len(lines)} lines; the bar is 250'
    first_python = next(i for i, line in enumerate(lines, 1) if line.startswith('```python'))
    assert first_python <= 60, f'the first usage snippet starts at line {first_python}'
    dates = re.findall(r'\b20\d\d-[01]\d(?:-[0-3]\d)?\b', text)
    assert not dates, f'README.md names dates: {dates}'


def test_readme_gives_two_setup_commands_and_ci_runs_the_same_tests():
    text = README.read_text()
    setup = re.search(r'## Set up.*?```bash\n(.*?)```', text, flags=re.S).group(1)
    commands = [line.split('#')[0].strip() for line in setup.splitlines() if line.strip()]
    assert commands == ['make demo', 'make test']
    ci = (REPO / '.ci' / 'run').read_text().splitlines()
    assert 'make test' in [line.strip() for line in ci]


# ---------------------------------------------------------------------------------------
# The key table and the module docstrings


def readme_key_table() -> dict:
    rows = table_with(README.read_text(), 'key')
    table = {}
    for row in rows:
        key = row['key'].strip('`')
        assert key not in table, f'key {key} listed twice'
        table[key] = row
    return table


def modules_of(row: dict) -> set:
    names = set()
    for token in re.split(r',\s*', row['modules']):
        token = token.strip('` ')
        names |= set(TINY_ARGS) if token == 'all' else \
            set(BACKBONES) if token == 'backbones' else {token}
    return names


def test_readme_key_table_lists_exactly_the_keys_each_module_accepts():
    table = readme_key_table()
    for type_name in TINY_ARGS:
        listed = {key for key, row in table.items() if type_name in modules_of(row)}
        assert listed == accepted_keys(type_name), type_name


def test_readme_key_table_defaults_are_the_code_defaults():
    table = readme_key_table()
    for field in fields(MaskConfig) + fields(LayerConfig):
        assert field.default is not MISSING
        assert ast.literal_eval(table[field.name]['default'].strip('`')) == field.default, \
            field.name
    fpn, head = build('FPNSBP'), build('RPNHeadSBP')
    assert ast.literal_eval(table['overrides']['default'].strip('`')) == {}
    assert all(cfg == fpn.sbp_cfg for cfg in fpn.sbp_settings.groups.values())
    convs = ast.literal_eval(table['convs']['default'].strip('`'))
    assert fpn.sbp_conv_groups == tuple(CONV_GROUPS[c] for c in convs)
    assert fpn.own_mask is ast.literal_eval(table['own_mask']['default'].strip('`'))
    assert head.sbp_dense_outputs is ast.literal_eval(table['dense_outputs']['default'].strip('`'))
    convnext = build('ConvNeXtSBP')
    assert convnext.sbp_downsample is ast.literal_eval(table['downsample']['default'].strip('`'))
    # `stages`: every stage but the last, frozen stages skipped
    assert 'but the last' in table['stages']['default'] and 'frozen' in table['stages']['default']
    assert [any(s) for s in build('ResNetSBP').sbp_blocks] == [True, True, True, False]
    assert [any(s) for s in build('ResNetSBP', frozen_stages=1).sbp_blocks] == \
        [False, True, True, False]


def test_readme_key_table_names_every_allowed_value():
    table = readme_key_table()
    for policy in BUILTIN_POLICIES:
        assert policy in MASK_POLICIES
        assert f"`'{policy}'`" in table['sampling']['meaning'], policy
    for scale in GRAD_SCALES:
        assert f"`'{scale}'`" in table['grad_scale']['meaning'] + table['grad_scale']['default']
    assert "`'all'`" in table['recompute']['meaning'] and '`True`' in table['recompute']['meaning']
    for group in CONV_GROUPS:
        assert f"`'{group}'`" in table['convs']['meaning'], group
        assert f"`'{group}'`" in table['overrides']['meaning'], group
    overrides = table['overrides']['meaning']
    assert "`'layer1'`" in overrides and "`'stage0'`" in overrides
    assert 'layer1' in build('ResNetSBP').sbp_settings.groups
    for type_name in ('ConvNeXtSBP', 'SwinTransformerSBP'):
        assert 'stage0' in build(type_name).sbp_settings.groups, type_name


def check_sbp_example(settings: dict) -> None:
    """Build what an ``sbp=dict(...)`` example asks for, as the module it belongs to."""
    fpn_groups = set((settings.get('overrides') or {})) & set(CONV_GROUPS)
    if {'convs', 'own_mask'} & set(settings) or fpn_groups:
        build('FPNSBP', sbp=settings)
    elif 'downsample' in settings:
        build('ConvNeXtSBP', sbp=settings)
    elif 'dense_outputs' in settings:
        build('RPNHeadSBP', sbp=settings)
    else:
        build('ResNetSBP', sbp=settings)


def test_readme_key_table_examples_build():
    table = readme_key_table()
    for key, row in table.items():
        for span in code_spans(row['meaning']):
            settings = keyword_args(span)
            if settings and set(settings) <= set(table):
                check_sbp_example(settings)
    fpn_examples = [keyword_args(s) for s in code_spans(table['overrides']['meaning'])]
    assert any(s and set(s['overrides']) <= set(CONV_GROUPS) for s in fpn_examples), \
        'the overrides row shows no FPNSBP example'


def sbp_examples(text: str):
    """``(type or None, settings)`` of every ``sbp=dict(...)`` in the code of a page."""
    code = '\n'.join(re.findall(r'```python\n(.*?)```', text, flags=re.S) + code_spans(text))
    for match in re.finditer(r'sbp=dict\(', code):
        start, depth = match.end() - len('dict('), 0
        for end in range(match.end() - 1, len(code)):
            depth += {'(': 1, ')': -1}.get(code[end], 0)
            if depth == 0:
                break
        settings = literal(ast.parse(code[start:end + 1], mode='eval').body)
        before = code[max(0, match.start() - 80):match.start()].split('\n')[-1]
        owner = re.findall(r"type='(\w+)'|(\w+SBP)\($", before)
        type_name = next((a or b for a, b in reversed(owner)), None)
        yield type_name, settings


# docs/extending.md runs its own examples (tests/test_docs_examples.py), among them an error
@pytest.mark.parametrize('page', [README, CONFIGS_README, *[p for p in DOC_PAGES
                                                            if p.name != 'extending.md']],
                         ids=lambda p: p.name)
def test_sbp_examples_in_the_docs_build(page):
    text = page.read_text()
    for type_name, settings in sbp_examples(text):
        if type_name in TINY_ARGS:
            build(type_name, sbp=settings)
        else:
            check_sbp_example(settings)
    sbp_keys = set(readme_key_table())
    for span in code_spans(text):  # settings written as keywords, e.g. `keep_ratio=0.75, ...`
        settings = keyword_args(span)
        if settings and set(settings) <= sbp_keys:
            check_sbp_example(settings)


def docstring_keys(doc: str, keys: set) -> set:
    return {key for key in keys if f'``{key}``' in doc}


def test_module_docstrings_name_every_key_they_accept():
    """A docstring that lists ``sbp`` keys lists them all; one that lists none names the
    class whose docstring does."""
    docs = {name: MODELS.get(name).__doc__ or '' for name in TINY_ARGS}
    for name in TINY_ARGS:
        keys = accepted_keys(name)
        named = docstring_keys(docs[name], keys)
        if named:
            assert named == keys, f'{name} docstring misses {sorted(keys - named)}'
        else:
            refs = [other for other in docs if other != name and f'``{other}``' in docs[name]]
            assert any(docstring_keys(docs[r], keys) == keys for r in refs), name
    for keys, cls in ((MASK_KEYS, MaskConfig), (LAYER_KEYS, LayerConfig)):
        assert {k for k in keys if f'{k} (' in cls.__doc__} == set(keys)


def test_convnext_docstrings_count_the_units_a_block_has():
    from sbp_mmdet.models.backbones.convnext_sbp import SBPConvNeXtBlock
    words = {1: 'one', 2: 'two', 3: 'three', 4: 'four'}
    block = build('ConvNeXtSBP').stages[0][0]
    count = len(block.sbp_program().units)
    pattern = (r"(?:block is|``ConvNeXtBlock`` as)\s+(one|two|three|four)\s+SBP"
               r"|(one|two|three|four) (?:SBP )?units per block")
    texts = {'ConvNeXtSBP': MODELS.get('ConvNeXtSBP').__doc__,
             'SBPConvNeXtBlock': SBPConvNeXtBlock.__doc__,
             'docs/usage.md': (REPO / 'docs' / 'usage.md').read_text(),
             'README.md': README.read_text()}
    for where, text in texts.items():
        stated = [a or b for a, b in re.findall(pattern, text)]
        assert stated, f'{where} does not say how many SBP units a block is'
        assert set(stated) == {words[count]}, f'{where} says {stated}, a block has {count}'


def test_readme_module_table_lists_every_sbp_module_and_its_mmdet_class():
    rows = table_with(README.read_text(), 'part')
    listed = {row['SBP type'].strip('`'): row['mmdet type'].strip('`') for row in rows}
    ours = {name for name, cls in MODELS.module_dict.items()
            if isinstance(cls, type) and issubclass(cls, SBPModuleMixin)
            and cls.__module__.startswith('sbp_mmdet')}
    assert set(listed) == ours == set(TINY_ARGS)
    for sbp_name, mmdet_name in listed.items():
        bases = {b.__name__ for b in MODELS.get(sbp_name).__mro__}
        assert mmdet_name.split('.')[-1] in bases, (sbp_name, mmdet_name)


# ---------------------------------------------------------------------------------------
# One home for each figure: configs and docstrings link the docs instead


FIGURE = re.compile(r'\b\d\.\d+x\b|\b\d+(?:\.\d+)? (?:mAP )?points\b|\b\d+ MiB\b|\bmAP\b')


def comments_and_docstrings(path: Path) -> list:
    source = path.read_text()
    texts = [line.split('#', 1)[1] for line in source.splitlines() if '#' in line]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)):
            texts.append(ast.get_docstring(node) or '')
    return texts


@pytest.mark.parametrize('path', sorted((REPO / 'configs').glob('*.py'))
                         + sorted((REPO / 'sbp_mmdet').rglob('*.py')),
                         ids=lambda p: str(p.relative_to(REPO)))
def test_configs_and_docstrings_hold_no_measured_figures(path):
    found = [m.group(0) for text in comments_and_docstrings(path) for m in FIGURE.finditer(text)]
    assert not found, f'{path.name} states figures {found}: link the docs page instead'


# ---------------------------------------------------------------------------------------
# configs/README.md against the configs


def config_rows() -> list:
    rows = []
    for table in markdown_tables(CONFIGS_README.read_text()):
        rows += [r for r in table if 'SBP setting' in r]
    return rows


def test_configs_readme_lists_every_config_once():
    listed = [r['config'].strip('`') for r in config_rows()]
    assert len(listed) == len(set(listed))
    files = {str(p.relative_to(REPO / 'configs')) for p in (REPO / 'configs').rglob('*.py')
             if '_base_' not in p.parts}
    assert set(listed) == files


@pytest.mark.parametrize('row', config_rows(), ids=lambda r: r['config'].strip('`'))
def test_config_sbp_settings_parse_and_match_configs_readme(row):
    from mmengine.config import Config

    from sbp_mmdet.models.checks import sbp_model_problem
    cfg = Config.fromfile(str(REPO / 'configs' / row['config'].strip('`')))
    model = cfg.model
    actual = {part: (model[part]['type'], dict(model[part].get('sbp') or {}))
              for part in ('backbone', 'neck', 'rpn_head', 'bbox_head')
              if isinstance(model.get(part), dict) and str(model[part]['type']).endswith('SBP')}
    stated = {}
    if row['SBP setting'] != 'dense':
        call = ast.parse('f({})'.format(row['SBP setting'].strip('`')), mode='eval').body
        for part in call.keywords:
            stated[part.arg] = (part.value.func.id,
                                {k.arg: ast.literal_eval(k.value) for k in part.value.keywords})
    assert actual == stated
    assert sbp_model_problem(model) is None  # builds the SBP backbone and neck


# ---------------------------------------------------------------------------------------
# docs/results/ and every reference to it


RESULT_NAME = re.compile(
    r'^(?P<model>[a-z0-9_.]+?)_(?P<part>detector|backbone_neck)'
    r'_(?P<metric>memory|speed|flops|grad_fidelity|frontier|ops)_(?P<size>\d+x\d+)'
    r'_(?P<setting>[a-z0-9_]+?)(?:_(?P<cpu>intel|amx|epyc))?(?:\.md|\.json)?$')
ACCURACY_NAME = re.compile(r'^accuracy_(?:[a-z0-9_]+_)?synthetic(?:_[a-z0-9]+)?$')


def index_entries() -> list:
    entries = []
    for table in markdown_tables((RESULTS / 'README.md').read_text()):
        for row in table:
            first = next(iter(row.values()))
            if first.startswith('`'):
                entries.append(first.strip('`'))
    return entries


def test_results_index_lists_every_file_and_only_files_that_exist():
    entries = index_entries()
    for entry in entries:
        assert (RESULTS / entry).exists(), f'docs/results/README.md lists missing {entry}'
    covered = set()
    for entry in entries:
        path = RESULTS / entry
        if entry.endswith('/'):
            covered |= {p for p in path.rglob('*') if p.is_file()}
        else:
            covered |= {path, path.with_suffix('.json')}
    files = {p for p in RESULTS.rglob('*') if p.is_file() and p != RESULTS / 'README.md'}
    missing = sorted(str(p.relative_to(RESULTS)) for p in files - covered)
    assert not missing, f'not in docs/results/README.md: {missing}'


def test_result_names_follow_one_pattern():
    for path in RESULTS.iterdir():
        if path.name == 'README.md':
            continue
        pattern = ACCURACY_NAME if path.name.startswith('accuracy_') else RESULT_NAME
        assert pattern.match(path.name), f'docs/results/{path.name} breaks the naming pattern'


REFERENCING = [README, CONFIGS_README, *DOC_PAGES, *sorted((REPO / 'configs').rglob('*.py')),
               *sorted((REPO / 'tools').rglob('*.py')), *sorted((REPO / 'tools').glob('*.sh')),
               *sorted(RESULTS.glob('*.json'))]


@pytest.mark.parametrize('path', REFERENCING, ids=lambda p: str(p.relative_to(REPO)))
def test_referenced_result_files_exist(path):
    for ref in re.findall(r'docs/results/[\w.*{},/-]*', path.read_text()):
        ref = ref.rstrip('.,/')
        if '...' in ref or '{' in ref:
            continue
        if '*' in ref:
            assert list(REPO.glob(ref)), f'{path.name}: {ref} matches nothing'
        else:
            assert (REPO / ref).exists(), f'{path.name}: {ref} does not exist'


def github_anchor(heading: str) -> str:
    text = re.sub(r'[^\w\- ]', '', heading.strip().lower().replace('`', ''))
    return text.replace(' ', '-')


@pytest.mark.parametrize('page', [README, CONFIGS_README, *DOC_PAGES, RESULTS / 'README.md'],
                         ids=lambda p: str(p.relative_to(REPO)))
def test_links_point_at_files_and_headings_that_exist(page):
    for target in re.findall(r'\]\(([^)\s]+)\)', page.read_text()):
        if target.startswith(('http://', 'https://')):
            continue
        file_part, _, anchor = target.partition('#')
        linked = (page.parent / file_part).resolve() if file_part else page
        assert linked.exists(), f'{page.name} links {target}: no such file'
        if anchor:
            headings = re.findall(r'^#+ (.*)$', linked.read_text(), flags=re.M)
            assert anchor in {github_anchor(h) for h in headings}, \
                f'{page.name} links {target}: no such heading'


# ---------------------------------------------------------------------------------------
# Every command the README and the docs pages show


def shown_commands() -> list:
    """``(page, command words)`` of every line of every bash block, continuations joined
    and comments dropped."""
    commands = []
    for page in [README, *DOC_PAGES]:
        for block in re.findall(r'```bash\n(.*?)```', page.read_text(), flags=re.S):
            for line in block.replace('\\\n', ' ').splitlines():
                line = line.split(' #')[0].strip()
                if line and not line.startswith('#'):
                    commands.append((page.name, shlex.split(line)))
    return commands


def parse_tool_args(path: str, args: list, monkeypatch) -> None:
    """Parse ``args`` with the tool's own parser (it exits on what it refuses)."""
    tool = load_tool(path)
    if hasattr(tool, 'build_parser'):
        tool.build_parser().parse_args(args)
        return
    monkeypatch.setattr(sys, 'argv', [path, *args])
    try:
        tool.parse_args(args)
    except TypeError:  # parse_args() reading sys.argv
        tool.parse_args()


def test_docs_show_commands():
    assert len(shown_commands()) >= 20


@pytest.mark.parametrize('page,words', shown_commands(),
                         ids=lambda x: x if isinstance(x, str) else ' '.join(x)[:60])
def test_every_shown_command_parses(page, words, monkeypatch, tmp_path):
    while words and re.match(r'^[A-Z_]+=', words[0]):  # VAR=value prefixes
        words = words[1:]
    if words[0] == 'make':
        targets = re.findall(r'^([\w-]+):', (REPO / 'Makefile').read_text(), flags=re.M)
        assert words[1] in targets
        subprocess.run(['make', '-n', words[1]], cwd=REPO, check=True, capture_output=True)
        return
    if words[0] == 'bash':
        script, args = words[1], words[2:]
        subprocess.run(['bash', '-n', script], cwd=REPO, check=True)
        if script == 'tools/dist_train.sh':
            parse_tool_args('tools/train.py', [args[0], *args[2:]], monkeypatch)
        elif script == 'tools/dist_test.sh':
            parse_tool_args('tools/test.py', [args[0], args[1], *args[3:]], monkeypatch)
        else:
            pytest.fail(f'{page}: no parser check for {script}')
        return
    assert words[0] in ('.venv/bin/python', 'python'), f'{page}: {words}'
    tool, args = words[1], words[2:]
    assert (REPO / tool).exists(), tool
    if tool == 'tools/analysis_tools/sbp_frontier.py':
        run_frontier(args, tmp_path)
        return
    if tool == 'tools/visualize_sbp_masks.py':
        run_visualize(args, tmp_path)
        return
    parse_tool_args(tool, args, monkeypatch)


def run_frontier(args: list, tmp_path: Path) -> None:
    """Short enough to run: the committed frontier table comes out again."""
    out = args.index('--out-dir')
    committed = REPO / args[out + 1] / 'frontier.md'
    args = args[:out + 1] + [str(tmp_path)] + args[out + 2:]
    subprocess.run([sys.executable, 'tools/analysis_tools/sbp_frontier.py', *args, '--no-plot'],
                   cwd=REPO, check=True, capture_output=True)
    assert (tmp_path / 'frontier.md').read_text() == committed.read_text()


def run_visualize(args: list, tmp_path: Path) -> None:
    """Short enough to run, on a generated image instead of the dataset's."""
    import cv2
    import numpy as np
    image = tmp_path / 'image.png'
    cv2.imwrite(str(image), np.full((64, 96, 3), 128, np.uint8))
    out = args.index('--out')
    args = [str(image)] + args[1:out + 1] + [str(tmp_path / 'masks.png')] + args[out + 2:]
    subprocess.run([sys.executable, 'tools/visualize_sbp_masks.py', *args], cwd=REPO,
                   check=True, capture_output=True)
    assert (tmp_path / 'masks.png').stat().st_size > 0


def test_sbp_modules_build_with_the_tiny_arguments():
    """The builders above make real modules (the tests that use them can fail)."""
    backbone = build('ResNetSBP')
    assert isinstance(backbone, ResNet)
    assert isinstance(backbone, SBPModuleMixin)
    backbone.train()
    assert len(backbone(torch.rand(1, 3, 64, 64))) == 4
