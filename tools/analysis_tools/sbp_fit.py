"""Which setting fits a memory budget: measure the candidates, rank those that fit, write one.

For a detector config with an SBP backbone (e.g. ``configs/faster_rcnn_r50_sbp.py``), a
batch size and an input size, each candidate of ``CANDIDATES`` (dense, ``with_cp``, the
SBP settings and their compositions with ``with_cp``) is measured with the benchmarks'
``measure_variant`` (``sbp_mmdet/benchmark.py``: bytes saved for backward in one training
forward, and the FLOPs of its backward; device independent, measured on this CPU, in bf16
autocast with ``--amp``). Its total is those bytes plus the model state: parameters and
buffers, the gradients of the trainable parameters and the optimizer's state (from the
config's ``optim_wrapper``: one tensor per parameter for SGD with momentum, none without,
two for Adam and AdamW). The candidates within ``--budget-gib`` are ranked by the mAP change
the accuracy study measured for their gradients (``--accuracy``: an ``accuracy.json`` of
``sbp_accuracy.py``, by default the quarter-width R18 fine-tuning study on 1000 images,
5 seeds; its paired differences to dense, read by ``sbp_mmdet/accuracy_study.py``;
``with_cp`` and recompute do not change the gradients, so a composition has the cost of its
SBP setting and ``with_cp`` the cost 0 of dense), then by backward FLOPs. ``--write``
writes a config that inherits CONFIG and sets the first one.

Scaling: an input of more than ``--measure-pixels`` pixels is not measured itself. Each
candidate is measured at two smaller sizes of the same aspect (about ``--measure-pixels``
and a quarter of it, multiples of 32), and its bytes and FLOPs are extrapolated to the
requested size with the line through the two (``a + b * pixels``: activations grow with
the pixels, the RoI head's sampled boxes and the proposals do not). Sizes are counted
padded to multiples of 32, as the data preprocessor pads them.

The total is not a GPU's peak: the CUDA context, cuDNN workspaces, the forward's transient
tensors and allocator fragmentation come on top; give a budget below the card's memory.

Example (an 11 GiB card, batch 4 at 1333x800)::

    python tools/analysis_tools/sbp_fit.py configs/faster_rcnn_r50_sbp.py \
        --budget-gib 10 --batch-size 4 --size 800 1333 --write configs/my_fit.py
"""
import argparse
import copy
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Tuple

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', '..'))

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..'))
GIB = 2**30


def _backbone(keep_ratio: float, recompute: bool, with_cp: bool) -> Dict[str, object]:
    """The backbone keys of a candidate. Keep 1.0 runs the SBP backbone densely (mmdet's
    blocks, mmdet's ``with_cp``); SBP + ``with_cp`` sets both ``with_cp`` and
    ``sbp.recompute`` (with_cp alone checkpoints only the blocks that run densely)."""
    return {'model.backbone.sbp.keep_ratio': keep_ratio,
            'model.backbone.sbp.recompute': recompute,
            'model.backbone.with_cp': with_cp}


@dataclass(frozen=True)
class Candidate:
    """A setting the tool can pick.

    Args:
        name: its label in the table.
        study: the accuracy study's variant whose gradients it computes (its mAP
            change is this candidate's accuracy cost).
        options: its cfg-options (``--cfg-options`` keys of ``tools/train.py``).
        sbp_heads: it also runs the config's heads as their SBP versions (with
            ``recompute='all'``, as the ``_heads`` configs); the study variant gets
            the study's name of each head appended (``:sbp_rpn_head``).
    """

    name: str
    study: str
    options: Dict[str, object]
    sbp_heads: bool = False


# The candidates, in one place.
CANDIDATES: Tuple[Candidate, ...] = (
    Candidate('dense', 'dense', _backbone(1.0, False, False)),
    Candidate('with_cp', 'dense', _backbone(1.0, False, True)),
    Candidate('sbp@0.75+recompute', 'sbp@0.75:recompute', _backbone(0.75, True, False)),
    Candidate('sbp@0.75+recompute+cp', 'sbp@0.75:recompute', _backbone(0.75, True, True)),
    Candidate('sbp@0.5', 'sbp@0.5', _backbone(0.5, False, False)),
    Candidate('sbp@0.5+cp', 'sbp@0.5', _backbone(0.5, True, True)),
    Candidate('sbp@0.75+recompute+heads', 'sbp@0.75:recompute', _backbone(0.75, True, False),
              sbp_heads=True),
    Candidate('sbp@0.75+recompute+heads+cp', 'sbp@0.75:recompute',
              _backbone(0.75, True, True), sbp_heads=True),
)

# optimizer type -> the number of per-parameter state tensors it keeps
OPTIMIZER_STATES = {'SGD': lambda opt: 1 if opt.get('momentum', 0) else 0,
                    'Adam': lambda opt: 2, 'AdamW': lambda opt: 2}
HEADS = ('rpn_head', 'bbox_head')
# SBP head type -> how the accuracy study's variants name it
STUDY_HEADS = {'RPNHeadSBP': 'sbp_rpn_head', 'RetinaHeadSBP': 'sbp_retina_head'}


class FitError(ValueError):
    """Input the tool cannot work with; the message says what and why."""


@dataclass
class Estimate:
    """One candidate at the requested batch and size."""

    name: str
    study: str
    options: Dict[str, object]
    map_change: Optional[float]  # mAP points vs dense in the study; None: not measured
    accuracy: str  # the change as the table shows it: 'exact', mean [95 % interval]
    saved_gib: float
    backward_gflop: float
    total_gib: float
    fits: bool
    measured: List[dict] = field(default_factory=list)  # the measurements behind it


def pad32(value: int) -> int:
    return -(-value // 32) * 32


def measure_sizes(height: int, width: int, max_pixels: int) -> List[Tuple[int, int]]:
    """The sizes to measure: the requested one if small enough, else two smaller ones of
    its aspect (about ``max_pixels`` and a quarter of it, multiples of 32)."""
    if pad32(height) * pad32(width) <= max_pixels:
        return [(height, width)]
    scale = math.sqrt(max_pixels / (pad32(height) * pad32(width)))
    return [(max(32, int(height * s) // 32 * 32), max(32, int(width * s) // 32 * 32))
            for s in (scale, scale / 2)]


def extrapolate(points: List[Tuple[int, float]], pixels: int) -> float:
    """The value at ``pixels`` of the line through two ``(pixels, value)`` points (the
    value itself for one point)."""
    if len(points) == 1:
        return points[0][1]
    (p1, v1), (p2, v2) = points
    slope = (v1 - v2) / (p1 - p2)
    return v1 + slope * (pixels - p1)


def load_config(path: str):
    """CONFIG, checked: an SBP backbone, heads not yet SBP, a known optimizer."""
    from mmengine.config import Config

    import sbp_mmdet  # noqa: F401  (registers the SBP modules)
    from sbp_mmdet.models.sbp_types import is_sbp_backbone, type_name
    if not os.path.isfile(path):
        raise FitError(f'config {path!r} does not exist')
    cfg = Config.fromfile(path)
    backbone = cfg.model.get('backbone', {}).get('type')
    if not is_sbp_backbone(backbone):
        raise FitError(f'{path}: its backbone {type_name(backbone)} is not an SBP backbone; '
                       'give a config with one (e.g. configs/faster_rcnn_r50_sbp.py, or '
                       'type=ResNetSBP and an FPNSBP neck): the candidates set its sbp keys')
    for head in HEADS:
        if type_name((cfg.model.get(head) or {}).get('type')) in _sbp_heads():
            raise FitError(f'{path}: its {head} is already an SBP head; give the config '
                           'without SBP heads (e.g. configs/faster_rcnn_r50_sbp.py): the '
                           'tool adds them as a candidate')
    optimizer_states(cfg, path)
    return cfg


def _sbp_heads() -> Dict[str, str]:
    """SBP head type -> its dense type."""
    from sbp_mmdet.benchmark import SBP_TYPES
    return {k: v for k, v in SBP_TYPES.items() if 'Head' in k}


def head_options(cfg) -> Tuple[Dict[str, object], List[str]]:
    """The cfg-options that run the config's heads as their SBP versions, and the study's
    names of those heads."""
    from sbp_mmdet.models.sbp_types import type_name
    dense_to_sbp = {dense: sbp for sbp, dense in _sbp_heads().items()}
    options, heads = {}, []
    for head in HEADS:
        name = type_name((cfg.model.get(head) or {}).get('type'))
        if name in dense_to_sbp:
            options[f'model.{head}.type'] = dense_to_sbp[name]
            options[f'model.{head}.sbp'] = dict(recompute='all')
            heads.append(STUDY_HEADS.get(dense_to_sbp[name], f'sbp_{head}'))
    return options, heads


def candidates_for(cfg) -> List[Candidate]:
    """``CANDIDATES`` as they apply to ``cfg`` (the SBP-head ones where it has such heads)."""
    options, heads = head_options(cfg)
    out = []
    for cand in CANDIDATES:
        if not cand.sbp_heads:
            out.append(cand)
        elif heads:
            study = cand.study + ''.join(f':{head}' for head in heads)
            out.append(Candidate(cand.name, study, {**cand.options, **options}, True))
    return out


def optimizer_states(cfg, path: str = 'config') -> int:
    """Per-parameter state tensors of the config's optimizer."""
    from sbp_mmdet.models.sbp_types import type_name
    optimizer = (cfg.get('optim_wrapper') or {}).get('optimizer')
    if not optimizer:
        raise FitError(f'{path}: no optim_wrapper.optimizer, so its state cannot be counted')
    name = type_name(optimizer.get('type'))
    if name not in OPTIMIZER_STATES:
        raise FitError(f'{path}: optimizer {name} is not one the tool counts; it knows '
                       f'{", ".join(OPTIMIZER_STATES)}')
    return OPTIMIZER_STATES[name](optimizer)


def model_state_bytes(cfg) -> Dict[str, float]:
    """Bytes of parameters and buffers, gradients and optimizer state (trainable
    parameters only, as the training step of the built model sees them)."""
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules

    from sbp_mmdet.benchmark import random_init
    register_all_modules()
    model = MODELS.build(random_init(cfg.model))
    model.train()  # frozen stages are frozen by train()
    params = sum(t.numel() * t.element_size()
                 for t in list(model.parameters()) + list(model.buffers()))
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    states = optimizer_states(cfg)
    return dict(parameters=params, gradients=trainable, optimizer=states * trainable,
                optimizer_states=states)


def accuracy_study(path: str):
    """The study at ``path`` (``sbp_mmdet.accuracy_study.AccuracyStudy``)."""
    from sbp_mmdet.accuracy_study import AccuracyStudy
    try:
        return AccuracyStudy(path)
    except (FileNotFoundError, ValueError) as error:
        raise FitError(str(error)) from None


def measure(cfg, cand: Candidate, batch_size: int, size: Tuple[int, int],
            amp: bool) -> dict:
    """Bytes saved for backward and backward GFLOP of ``cand`` at ``size``."""
    from sbp_mmdet.benchmark import measure_variant, random_init
    from sbp_mmdet.variants import Variant
    run = copy.deepcopy(cfg)
    run.merge_from_dict(cand.options)
    variant = Variant(cand.name, None, ('amp',) if amp else (), {})  # name and precision
    result = measure_variant(run, variant, batch_size, size[0], size[1], steps=0, warmup=0,
                             device='cpu', model_cfg=random_init(run.model), count_ops=False)
    return dict(size=list(size), saved_mib=result.saved_mib,
                backward_gflop=result.backward_gflop)


def estimate_all(cfg, args, log=print) -> Tuple[List[Estimate], dict]:
    """Every candidate's estimate at ``args``' batch and size (not yet ranked), and the
    model state they share."""
    study = accuracy_study(args.accuracy)
    state = model_state_bytes(cfg)
    state_gib = (state['parameters'] + state['gradients'] + state['optimizer']) / GIB
    sizes = measure_sizes(*args.size, args.measure_pixels)
    pixels = pad32(args.size[0]) * pad32(args.size[1])
    estimates = []
    for cand in candidates_for(cfg):
        runs = [measure(cfg, cand, args.batch_size, size, args.amp) for size in sizes]
        log(f'measured {cand.name} at ' + ', '.join(f'{h}x{w}' for h, w in sizes))
        points = {key: [(pad32(r['size'][0]) * pad32(r['size'][1]), r[key]) for r in runs]
                  for key in ('saved_mib', 'backward_gflop')}
        saved_gib = extrapolate(points['saved_mib'], pixels) / 1024
        cost = study.cost(cand.study)
        estimates.append(Estimate(cand.name, cand.study, cand.options,
                                  None if cost is None else cost.mean,
                                  'not measured' if cost is None else cost.label(), saved_gib,
                                  extrapolate(points['backward_gflop'], pixels),
                                  saved_gib + state_gib, False, runs))
    return estimates, dict(state, state_gib=state_gib, sizes=sizes)


def rank(estimates: List[Estimate], budget_gib: float) -> List[Estimate]:
    """The estimates that fit ``budget_gib`` first, by mAP change then backward FLOPs;
    then the others by total."""
    for e in estimates:
        e.fits = e.total_gib <= budget_gib
    fitting = sorted((e for e in estimates if e.fits), key=rank_key)
    return fitting + sorted((e for e in estimates if not e.fits), key=lambda e: e.total_gib)


def rank_key(e: Estimate) -> tuple:
    """Measured accuracy first (the smallest loss of mAP), then fewer backward FLOPs."""
    return (e.map_change is None, -(e.map_change or 0.0), e.backward_gflop)


def format_report(args, estimates: List[Estimate], info: dict) -> str:
    import torch

    from sbp_mmdet.benchmark import device_name
    h, w = args.size
    precision = 'bf16 autocast (--amp)' if args.amp else 'fp32'
    sizes = ', '.join(f'{a}x{b}' for a, b in info['sizes'])
    how = ('measured at that size' if info['sizes'] == [tuple(args.size)] else
           f'measured at {sizes} and extrapolated in pixels (a + b * pixels)')
    lines = [f'{args.config}, batch {args.batch_size} x {h}x{w}, {precision}, budget '
             f'{args.budget_gib:g} GiB; bytes saved for backward {how} on the CPU '
             f'({device_name("cpu")}, {torch.get_num_threads()} threads), torch '
             f'{torch.__version__}, {time.strftime("%Y-%m-%d")}',
             '',
             f"model state {info['state_gib']:.2f} GiB: parameters and buffers "
             f"{info['parameters'] / GIB:.2f}, gradients {info['gradients'] / GIB:.2f}, "
             f"optimizer {info['optimizer'] / GIB:.2f} ({info['optimizer_states']} state "
             'tensor(s) per trainable parameter)',
             f'mAP change: paired difference to dense in {_shown(args.accuracy)} '
             '(mean [95 % interval] over its seeds; "exact": the gradients of dense)',
             '',
             '| rank | setting | fits | saved for backward MiB | total GiB | '
             'mAP vs dense (points, 95 % interval) | backward GFLOP |',
             '|---|---|---|---|---|---|---|']
    for rank, e in enumerate(estimates, 1):
        change = e.accuracy
        lines.append(f"| {rank if e.fits else '-'} | {e.name} | {'yes' if e.fits else 'no'} | "
                     f'{e.saved_gib * 1024:.0f} | {e.total_gib:.3f} | {change} | '
                     f'{e.backward_gflop:.0f} |')
    best = estimates[0]
    lines += ['', f'pick: {best.name} ({best.total_gib:.3f} GiB of {args.budget_gib:g}): '
              '--cfg-options ' + ' '.join(f'{k}={_option(v)}' for k, v in best.options.items()),
              'the total leaves out the CUDA context, workspaces, transient tensors and '
              'fragmentation: keep a margin below the card\'s memory']
    return '\n'.join(lines)


def _shown(path: str) -> str:
    """``path`` relative to the repository where it is inside it."""
    relative = os.path.relpath(os.path.abspath(path), REPO)
    return path if relative.startswith('..') else relative


def _option(value) -> str:
    if isinstance(value, dict):
        return 'dict(' + ','.join(f'{k}={_option(v)}' for k, v in value.items()) + ')'
    return repr(value) if isinstance(value, str) else str(value)


def config_text(config: str, out: str, e: Estimate, args) -> str:
    """A config inheriting ``config`` (relative to ``out``'s folder) with ``e``'s keys."""
    nested: dict = {}
    for key, value in e.options.items():
        *parents, leaf = key.split('.')
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    base = os.path.relpath(os.path.abspath(config), os.path.dirname(os.path.abspath(out)))
    h, w = args.size
    lines = [f'# Written by tools/analysis_tools/sbp_fit.py: {e.name} for batch '
             f"{args.batch_size} x {h}x{w}{' with --amp' if args.amp else ''} in "
             f'{args.budget_gib:g} GiB (estimated {e.total_gib:.2f} GiB with the model state).',
             f'_base_ = {base!r}', '']
    lines += [f'{key} = {_literal(value)}' for key, value in nested.items()]
    return '\n'.join(lines) + '\n'


def _literal(value) -> str:
    if isinstance(value, dict):
        return 'dict(' + ', '.join(f'{k}={_literal(v)}' for k, v in value.items()) + ')'
    return repr(value)


def parse_args(argv=None):
    from sbp_mmdet.accuracy_study import DEFAULT_STUDY
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('config', help='detector config with an SBP backbone')
    parser.add_argument('--budget-gib', type=float, required=True,
                        help='memory for training: bytes saved for backward + model state')
    parser.add_argument('--batch-size', type=int, required=True)
    parser.add_argument('--size', nargs=2, type=int, required=True, metavar=('H', 'W'))
    parser.add_argument('--amp', action='store_true', help='mixed precision (tools/train.py --amp)')
    parser.add_argument('--write', metavar='CONFIG_OUT',
                        help='write a config inheriting CONFIG with the first setting that fits')
    parser.add_argument('--measure-pixels', type=int, default=384 * 640,
                        help='largest input measured; larger sizes are extrapolated')
    parser.add_argument('--accuracy', default=os.path.join(REPO, DEFAULT_STUDY),
                        help="an accuracy study's accuracy.json (tools/analysis_tools/"
                        'sbp_accuracy.py); default: the quarter-width R18 fine-tuning study')
    parser.add_argument('--out-dir', help='also write fit.md and fit.json there')
    args = parser.parse_args(argv)
    if not args.budget_gib > 0:
        parser.error(f'--budget-gib must be > 0, got {args.budget_gib:g}')
    if args.batch_size < 1 or min(args.size) < 32:
        parser.error('need --batch-size >= 1 and --size H W of at least 32 each')
    if args.measure_pixels < 128 * 128:
        parser.error('--measure-pixels must be at least 16384 (128x128)')
    return parser, args


def main(argv=None) -> List[Estimate]:
    from mmengine.logging import MMLogger
    parser, args = parse_args(argv)
    MMLogger.get_instance('sbp_fit', log_level='WARNING')  # no weight-init log per candidate
    try:
        cfg = load_config(args.config)
        estimates, info = estimate_all(cfg, args, log=lambda m: print(m, file=sys.stderr))
        estimates = rank(estimates, args.budget_gib)
    except FitError as error:
        parser.error(str(error))
    report = format_report(args, estimates, info)
    if args.out_dir:
        os.makedirs(args.out_dir, exist_ok=True)
        with open(os.path.join(args.out_dir, 'fit.md'), 'w') as f:
            f.write(report + '\n')
        with open(os.path.join(args.out_dir, 'fit.json'), 'w') as f:
            json.dump(dict(args=dict(vars(args), accuracy=_shown(args.accuracy)),
                           model_state=info, estimates=[asdict(e) for e in estimates]),
                      f, indent=2)
    if not estimates[0].fits:
        smallest = min(estimates, key=lambda e: e.total_gib)
        print(report)
        parser.exit(2, f'{parser.prog}: error: nothing fits {args.budget_gib:g} GiB: the '
                    f'smallest candidate, {smallest.name}, needs {smallest.total_gib:.2f} GiB '
                    f'({smallest.saved_gib:.2f} saved for backward + {info["state_gib"]:.2f} '
                    'model state); lower the batch size or the input size\n')
    print(report)
    if args.write:
        os.makedirs(os.path.dirname(os.path.abspath(args.write)), exist_ok=True)
        with open(args.write, 'w') as f:
            f.write(config_text(args.config, args.write, estimates[0], args))
        print(f'wrote {args.write}')
    return estimates


if __name__ == '__main__':
    main()
