"""The variant grammar of the benchmark, the accuracy and the gradient-fidelity tools.

A variant names one way to train the same SBP detector config, e.g. ``sbp@0.5``,
``sbp@0.75:recompute:sbp_rpn_head``, ``with_cp:amp`` or ``sbp@0.75:recompute:ecbe`` (the
exact tools' tokens ``ecbe``, ``act_ckpt``, ``sac``: sbp_mmdet/exact_tools.py): an optional
base (``dense``, the default, or ``sbp@R``) and tokens, joined by ``:``. ``parse_variant``
turns it into its config options (``--cfg-options`` key -> value); ``TOKENS`` is the one
table of tokens and their options, documented in docs/usage.md (section "Variants").
"""
import argparse
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

SEPARATOR = ':'
# ``+`` joins tokens in the benchmark's names (``sbp@0.5+cp``, docs/results/*.json)
SEPARATOR_ALIASES = ('+',)
# alias -> token, for names that committed results and the docs use
ALIASES = {'cp': 'with_cp'}
# head token -> (the head's part of the model, its SBP type)
HEADS = {'sbp_rpn_head': ('rpn_head', 'RPNHeadSBP'),
         'sbp_retina_head': ('bbox_head', 'RetinaHeadSBP')}
NECK_CONVS = {'neck=lateral': ('lateral',), 'neck=output': ('output',),
              'neck=both': ('lateral', 'output')}


@dataclass(frozen=True)
class Parts:
    """The detector parts that run SBP in a variant: ``'backbone'``, ``'neck'``, and the
    SBP heads (``'rpn_head'``/``'bbox_head'``) that its tokens or its config name; and the
    backbone's stages (``Stages``) for the exact tools' tokens."""

    names: Tuple[str, ...]
    stages: Optional['Stages'] = None

    @property
    def heads(self) -> Tuple[str, ...]:
        return tuple(p for p in self.names if p.endswith('_head'))

    @property
    def backbone_neck(self) -> Tuple[str, ...]:
        return tuple(p for p in self.names if p in ('backbone', 'neck'))


@dataclass(frozen=True)
class Token:
    """One token of ``TOKENS``: what it does and its options.

    ``options(argument, parts)`` gives the token's config options; ``argument`` is what
    follows ``=`` in a token written ``key=<argument>`` (``''`` for the others).
    ``sbp_only``: the token needs an ``sbp@R`` variant.
    """

    help: str
    options: Callable[[str, Parts], Dict[str, Any]]
    sbp_only: bool = True


def _on(parts: Tuple[str, ...], key: str, value: Any) -> Dict[str, Any]:
    return {f'model.{part}.sbp.{key}': value for part in parts}


def _on_heads(key: str, value: Any) -> Callable[[str, Parts], Dict[str, Any]]:
    def options(_: str, parts: Parts) -> Dict[str, Any]:
        if not parts.heads:
            raise ValueError(f'needs an SBP head ({" or ".join(HEADS)}, or a config '
                             'with one)')
        return _on(parts.heads, key, value)
    return options


def _stages(bits: str, _: Parts) -> Dict[str, Any]:
    if not bits or set(bits) - {'0', '1'}:
        raise ValueError('stages=<one 0 or 1 per backbone stage>, e.g. stages=0110')
    return {'model.backbone.sbp.stages': tuple(bit == '1' for bit in bits)}


def _cell(rows: str, _: Parts) -> Dict[str, Any]:
    if not rows.isdigit() or int(rows) < 1:
        raise ValueError('cell=<rows>, a positive integer, e.g. cell=4')
    return {'model.backbone.sbp.grid_cell': int(rows)}


def _with_cp(_: str, parts: Parts) -> Dict[str, Any]:
    # mmdet's checkpointing; SBP blocks recompute with sbp.recompute only
    options: Dict[str, Any] = {'model.backbone.with_cp': True}
    if parts.names:
        options['model.backbone.sbp.recompute'] = True
    return options


@dataclass(frozen=True)
class Stages:
    """A ResNet-style backbone's stages (``backbone.layer1``, ...) as the exact tools see
    them: which train (after ``frozen_stages``), which run SBP."""

    num: int
    frozen: int
    sbp: Tuple[bool, ...]

    def paths(self, first: int) -> List[str]:
        """The dense stages from index ``first`` on, as module paths."""
        return [f'backbone.layer{i + 1}' for i in range(max(first, 0), self.num)
                if not self.sbp[i]]


def _tool(key: str, default: Callable[[Stages], List[str]], what: str
          ) -> Callable[[str, Parts], Dict[str, Any]]:
    """The options of an exact tool's token: the config key ``key`` with the module paths
    given after ``=`` (comma separated), else ``default`` of the backbone's stages."""
    def options(paths: str, parts: Parts) -> Dict[str, Any]:
        if paths:
            modules = paths.split(',')
            if not all(modules):
                raise ValueError('module paths joined by commas, e.g. backbone.layer3,'
                                 'backbone.layer4')
        elif parts.stages is None:
            raise ValueError('the default needs a ResNet-style backbone (layer1, ...): '
                             'name the modules, e.g. =backbone.layer4')
        else:
            modules = default(parts.stages)
            if not modules:
                raise ValueError(f'no dense stage {what}: name the modules after =')
        return {key: modules}
    return options


# the exact tools' defaults: what each can act on exactly in a ResNet-style backbone
def _ecbe_default(stages: Stages) -> List[str]:
    # the whole dense backbone; with SBP its trainable dense stages (SBP modules refuse)
    return ['backbone'] if not any(stages.sbp) else stages.paths(stages.frozen)


def _act_ckpt_default(stages: Stages) -> List[str]:
    # reentrant checkpoint: only stages whose input needs a gradient get theirs
    return stages.paths(stages.frozen + 1)


def _sac_default(stages: Stages) -> List[str]:
    return stages.paths(stages.frozen)


def _fixed(**options: Any) -> Callable[[str, Parts], Dict[str, Any]]:
    """A token's options that depend on nothing (``backbone__sbp__recompute=True`` is
    ``model.backbone.sbp.recompute=True``)."""
    fixed = {f"model.{key.replace('__', '.')}": value for key, value in options.items()}
    return lambda _, __: dict(fixed)


# token -> what it does and its options; ``key=`` tokens take an argument after ``=``
TOKENS: Dict[str, Token] = {
    'with_cp': Token("mmdet's gradient checkpointing in the backbone; with SBP also "
                     'sbp.recompute', _with_cp, sbp_only=False),
    'amp': Token('mixed precision: the benchmark autocasts each step (fp16 on CUDA, bf16 on '
                 'the CPU); training uses AmpOptimWrapper (GPU only)',
                 lambda _, __: {'optim_wrapper.type': 'AmpOptimWrapper',
                                'optim_wrapper.loss_scale': 'dynamic'}, sbp_only=False),
    'recompute': Token('sbp.recompute in the backbone: less memory, more backward time',
                       _fixed(backbone__sbp__recompute=True)),
    'random': Token('random rows instead of the grid', _fixed(backbone__sbp__sampling='random')),
    'per_image': Token('one mask per image', _fixed(backbone__sbp__per_image=True)),
    'objects': Token('per-image masks keeping the rows of ground-truth boxes first (the '
                     'config needs SBPHook)', _fixed(backbone__sbp__sampling='objects',
                                                     backbone__sbp__per_image=True)),
    'stages=': Token('which backbone stages run SBP, one 0/1 per stage, e.g. stages=0110',
                     _stages),
    'cell=': Token('grid cell rows, e.g. cell=4', _cell),
    'inverse_keep': Token('gradients scaled by 1/keep ratio in the SBP backbone and neck',
                          lambda _, parts: _on(parts.backbone_neck, 'grad_scale',
                                               'inverse_keep')),
    'dense_neck': Token("mmdet's FPN instead of FPNSBP: SBP in the backbone only",
                        _fixed(neck__type='FPN')),
    **{name: Token(f"FPNSBP's sbp.convs={convs}: SBP on these conv groups",
                   _fixed(neck__sbp__convs=convs)) for name, convs in NECK_CONVS.items()},
    'exact_output': Token("the neck's output convs pass the exact input gradient "
                          '(sbp.overrides.output.exact_input_grad=True)',
                          _fixed(neck__sbp__overrides__output__exact_input_grad=True)),
    'exact': Token('sbp.exact_input_grad on every SBP module: SBP on the weight gradients '
                   'only (needs norm_eval=True)',
                   lambda _, parts: _on(parts.names, 'exact_input_grad', True)),
    **{name: Token(f'{sbp_type} instead of the dense head: SBP in the head too',
                   _fixed(**{f'{part}__type': sbp_type}))
       for name, (part, sbp_type) in HEADS.items()},
    'head_exact': Token('sbp.exact_input_grad in the SBP head(s)',
                        _on_heads('exact_input_grad', True)),
    'head_inverse_keep': Token('gradients scaled by 1/keep ratio in the SBP head(s)',
                               _on_heads('grad_scale', 'inverse_keep')),
    'head_dense_outputs': Token('SBP on the head tower only (sbp.dense_outputs=True)',
                                _on_heads('dense_outputs', True)),
    # the exact tools (sbp_mmdet/exact_tools.py); =<paths> names the modules, e.g.
    # ecbe=backbone.layer4
    **{name: Token(help, _tool(key, default, what), sbp_only=False)
       for names, key, default, what, help in (
           (('ecbe', 'ecbe='), 'efficient_conv_bn_eval', _ecbe_default, 'trains',
            "mmengine's efficient_conv_bn_eval (exact): the dense backbone, or an SBP "
            "backbone's trainable dense stages; =<paths> names the modules"),
           (('act_ckpt', 'act_ckpt='), 'activation_checkpointing', _act_ckpt_default,
            'has an input that needs a gradient',
            "mmengine's activation_checkpointing (exact, reentrant): the dense stages whose "
            'input needs a gradient; =<paths> names the modules'),
           (('sac', 'sac='), 'selective_checkpointing', _sac_default, 'trains',
            "torch's selective activation checkpointing (exact): convolution outputs saved, "
            'the rest recomputed, on the trainable dense stages; =<paths> names the modules'))
       for name in names},
}
# the tokens that do not change the gradients (the exact tools, SBP's recompute): a variant
# trains as the variant without them (amp is not one: it changes the rounding)
GRADIENT_NEUTRAL = ('with_cp', 'recompute', 'ecbe', 'act_ckpt', 'sac')


@dataclass(frozen=True)
class Variant:
    """A parsed variant: its name as written, its keep ratio (None: dense), its tokens
    (aliases resolved) and its config options (``--cfg-options`` key -> value)."""

    name: str
    keep_ratio: Optional[float]
    tokens: Tuple[str, ...]
    options: Mapping[str, Any]

    @property
    def sbp(self) -> bool:
        return self.keep_ratio is not None

    @property
    def with_cp(self) -> bool:
        return 'with_cp' in self.tokens

    @property
    def amp(self) -> bool:
        return 'amp' in self.tokens

    def gradient_key(self) -> Tuple[Optional[float], Tuple[str, ...]]:
        """What the gradients depend on: the keep ratio and the other tokens (sorted)."""
        return self.keep_ratio, tuple(sorted(
            t for t in self.tokens if _table_key(t).rstrip('=') not in GRADIENT_NEUTRAL))

    def model_options(self) -> Dict[str, Any]:
        """The options under ``model.``, keyed from the model config (``backbone.with_cp``)."""
        return {key[len('model.'):]: value for key, value in self.options.items()
                if key.startswith('model.')}

    def cli_options(self) -> List[str]:
        """The options as ``--cfg-options`` words (``model.neck.sbp.convs=(lateral,)``)."""
        return [f'{key}={format_value(value)}' for key, value in self.options.items()]


def format_value(value: Any) -> str:
    """``value`` as mmengine's ``DictAction`` reads it back (tuples as ``(a,)``, ``(a,b)``)."""
    if isinstance(value, tuple):
        items = ','.join(format_value(v) for v in value)
        return f'({items},)' if len(value) == 1 else f'({items})'
    if isinstance(value, list):
        return '[' + ','.join(format_value(v) for v in value) + ']'
    return str(value)


def grammar() -> str:
    """The grammar in one line, for error messages and ``--help``."""
    tokens = ' '.join(f'{name}<arg>' if name.endswith('=') else name for name in TOKENS)
    aliases = ', '.join(f'{a} = {t}' for a, t in ALIASES.items())
    return (f'[dense|sbp@R]{SEPARATOR}TOKEN..., tokens: {tokens} (aliases: {aliases}; '
            f'{" ".join(SEPARATOR_ALIASES)} also joins tokens); see docs/usage.md#variants')


def parse_variant(name: str, model: Optional[Mapping] = None) -> Variant:
    """The ``Variant`` that ``name`` writes; ``ValueError`` naming the problem otherwise.

    Args:
        name: e.g. ``'sbp@0.5:neck=both:exact'``; without a base it is dense (``with_cp``).
        model: the config's ``model``, if known: its SBP heads and a dense neck count for
            the tokens that act on every SBP module (``exact``, ``head_*``); without it the
            backbone and neck are SBP and the heads are those the tokens make SBP.
    """
    words = name
    for alias in SEPARATOR_ALIASES:
        words = words.replace(alias, SEPARATOR)
    base, *rest = words.split(SEPARATOR)
    if base == 'dense' or not base.startswith('sbp@'):
        keep_ratio = None
        if base != 'dense':
            rest = [base, *rest]
    else:
        keep_ratio = _keep_ratio(name, base[len('sbp@'):])
    tokens = tuple(ALIASES.get(word, word) for word in rest)
    for token in tokens:
        key = _table_key(token)
        if key not in TOKENS:
            raise ValueError(f'unknown token {token!r} in variant {name!r}; {grammar()}')
        if TOKENS[key].sbp_only and keep_ratio is None:
            raise ValueError(f'variant {name!r}: {token} applies to sbp@R variants only')
    if len(set(tokens)) != len(tokens):
        raise ValueError(f'variant {name!r} repeats a token')
    names = _sbp_parts(tokens, model) if keep_ratio is not None else ()
    options: Dict[str, Any] = {}
    if keep_ratio is not None:
        options['model.backbone.sbp.keep_ratio'] = keep_ratio
    elif model is None or _is_sbp(model.get('backbone')):
        # keep ratio 1.0: the SBP modules' dense path (mmdet's forward and backward), with
        # the same modules and initial weights as the SBP variants
        options['model.backbone.sbp.keep_ratio'] = 1.0
    setter: Dict[str, str] = {}
    # the exact tools' tokens last: their defaults follow the stages the others set
    tools = [t for t in tokens if _table_key(t).rstrip('=') in ('ecbe', 'act_ckpt', 'sac')]
    for token in [t for t in tokens if t not in tools] + tools:
        parts = Parts(names, _stages(model, options, keep_ratio is not None))
        key = _table_key(token)
        try:
            mine = TOKENS[key].options(token[len(key):], parts)
        except ValueError as e:
            raise ValueError(f'variant {name!r}: {token}: {e}') from None
        for option, value in mine.items():
            if option in options and options[option] != value:
                raise ValueError(f'variant {name!r}: {token} sets {option}={value!r}, '
                                 f'{setter.get(option, "sbp@R")} sets it to {options[option]!r}')
            options[option] = value
            setter.setdefault(option, token)
    return Variant(name, keep_ratio, tokens, options)


def variant_argument(name: str) -> str:
    """An ``argparse`` ``type``: ``name`` if it parses, else the parser's error naming why."""
    try:
        parse_variant(name)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return name


def _table_key(token: str) -> str:
    """The ``TOKENS`` key of ``token``: itself, or ``key=`` for ``key=<argument>``."""
    if token in TOKENS or '=' not in token:
        return token
    return token.split('=')[0] + '='


def _keep_ratio(name: str, text: str) -> float:
    try:
        ratio = float(text)
    except ValueError:
        ratio = float('nan')
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f'variant {name!r}: sbp@R needs a keep ratio R in (0, 1], '
                         f'got {text!r}')
    return ratio


def _is_sbp(part: Any) -> bool:
    return isinstance(part, Mapping) and str(part.get('type', '')).endswith('SBP')


def _stages(model: Optional[Mapping], options: Mapping[str, Any], sbp: bool
            ) -> Optional[Stages]:
    """The backbone's ``Stages`` (None: not a ResNet-style backbone); without ``model``,
    mmdet's ``ResNet`` defaults (4 stages, none frozen)."""
    backbone = dict((model or {}).get('backbone') or {})
    name = str(backbone.get('type', 'ResNet')).split('.')[-1]
    if not name.startswith(('ResNet', 'ResNeXt', 'RegNet', 'Res2Net')):
        return None
    num = int(backbone.get('num_stages', 4))
    frozen = int(backbone.get('frozen_stages', -1))
    asked = options.get('model.backbone.sbp.stages',
                        (backbone.get('sbp') or {}).get('stages'))
    if not sbp:
        on: Tuple[bool, ...] = (False,) * num
    elif asked is not None:
        on = tuple(bool(s) for s in asked)
    else:  # stage_switches' default: every trainable stage but the last
        on = tuple(frozen <= i < num - 1 for i in range(num))
    return Stages(num, frozen, on)


def _sbp_parts(tokens: Tuple[str, ...], model: Optional[Mapping]) -> Tuple[str, ...]:
    names = ['backbone']
    if 'dense_neck' not in tokens and (model is None or _is_sbp(model.get('neck'))):
        names.append('neck')
    names += [part for token, (part, _) in HEADS.items()
              if token in tokens or (model is not None and _is_sbp(model.get(part)))]
    return tuple(names)
