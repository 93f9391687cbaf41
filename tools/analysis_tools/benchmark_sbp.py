"""Memory and speed of a detector config: dense vs SBP vs the alternatives.

Each variant runs in its own process (so the CPU peak RSS is its own), on the
same synthetic batch and random init, and reports the bytes saved for
backward (device independent, split by component), the FLOPs of one backward
(convolutions and matrix products, device independent; mmcv's ops such as
RoIAlign are not counted), peak memory and the median forward/backward/step
time over ``--steps`` steps after warm-up.
Ratios ("vs dense") compare each variant with the dense variant of the same
precision: ``dense`` for fp32 rows, ``amp`` for mixed-precision rows (fp16
autocast on CUDA, bf16 on the CPU). The console shows progress and the table;
each variant's full log is written to ``OUT_DIR/logs/``. ``--part backbone_neck``
trains the backbone and neck alone (where SBP acts, without the heads' costs).
Every row also counts the aten operators one training step dispatches (forward and
backward, recompute included): a device-independent proxy for GPU kernel launches. SBP
memoises its row bookkeeping per mask layout, so ``ops/step`` is a step on masks seen before
(the steady state of training), ``ops, new masks`` the first step on new ones.

``--interleave`` runs every variant in this one process instead: each is measured once at
``--size`` (bytes, FLOPs, operators), then all are timed round robin, one step of each in
turn, at ``--time-size`` (default ``--size``), so that the load of a shared machine hits
every row alike; no peak memory then (the process holds every model). ``--accuracy`` adds
each row's mAP change from an accuracy study (``sbp_mmdet/accuracy_study.py``: "exact" for
settings with dense's gradients), and ``--interleave`` then plots bytes against step time
with the accuracy at each point (``frontier.png``).

Examples::

    python tools/analysis_tools/benchmark_sbp.py configs/faster_rcnn_r50_sbp.py \
        --size 800 1344 --steps 5 --out-dir outputs/benchmark_frcnn
    python tools/analysis_tools/benchmark_sbp.py configs/faster_rcnn_r50_sbp.py \
        --variants dense with_cp ecbe sbp@0.75:recompute sbp@0.75:recompute:ecbe \
        --interleave --time-size 512 832 --accuracy \
        docs/results/accuracy_finetune_w16_synthetic/accuracy.json --out-dir outputs/frontier
"""
import argparse
import csv
import json
import multiprocessing as mp
import os
import sys
import time
from queue import Empty
from typing import List

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', '..'))

CPU_VARIANTS = ['dense', 'sbp@0.25', 'sbp@0.5', 'sbp@0.75', 'with_cp', 'sbp@0.5+cp',
                'sbp@0.5+recompute']
CUDA_EXTRA = ['amp', 'sbp@0.5+amp', 'with_cp+amp', 'sbp@0.5+cp+amp']


def parse_args(argv=None):
    from mmengine.config import DictAction

    from sbp_mmdet.benchmark import PARTS
    from sbp_mmdet.variants import variant_argument
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('config', help='detector config (with ResNetSBP/FPNSBP)')
    parser.add_argument('--variants', nargs='+', default=None, type=variant_argument,
                        help='variants to measure, e.g. dense sbp@0.5 sbp@0.5:recompute '
                        'with_cp:amp (the grammar and its tokens: docs/usage.md#variants); '
                        f'default: {" ".join(CPU_VARIANTS)} (+ {" ".join(CUDA_EXTRA)} on CUDA)')
    parser.add_argument('--size', nargs=2, type=int, default=[800, 1344], metavar=('H', 'W'))
    parser.add_argument('--batch-size', type=int, default=2)
    parser.add_argument('--steps', type=int, default=5,
                        help='timed steps per variant; 0 measures memory only')
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--threads', type=int, default=None, help='torch CPU threads')
    parser.add_argument('--out-dir', default='outputs/benchmark_sbp')
    parser.add_argument('--part', choices=PARTS, default='detector',
                        help='what each step trains: the whole detector on its losses, or '
                        'the backbone and neck alone on the sum of the neck outputs (where '
                        'SBP acts, without the heads\' costs, e.g. the CPU RoIAlign)')
    parser.add_argument('--interleave', action='store_true',
                        help='every variant in this process: measured once at --size, then '
                        'timed round robin, one step of each in turn, at --time-size')
    parser.add_argument('--time-size', nargs=2, type=int, default=None, metavar=('H', 'W'),
                        help='the timed steps\' input size with --interleave (default --size)')
    parser.add_argument('--accuracy', default=None,
                        help="an accuracy study's accuracy.json: each row's mAP change to "
                        'dense ("exact" where the gradients are dense\'s; "not measured" '
                        'where the study trains another kind of detector than CONFIG)')
    parser.add_argument('--no-plot', action='store_true')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config keys for every variant, e.g. '
                        'model.backbone.sbp.grid_cell=4 (dense variants drop the sbp keys)')
    args = parser.parse_args(argv)
    if args.steps < 0 or args.warmup < 0 or args.batch_size < 1 or min(args.size) < 32:
        parser.error('need --steps >= 0, --warmup >= 0, --batch-size >= 1 and --size >= 32')
    if args.time_size is not None and not args.interleave:
        parser.error('--time-size goes with --interleave')
    if args.time_size is not None and min(args.time_size) < 32:
        parser.error('need --time-size >= 32')
    args.time_size = args.time_size or args.size
    return args


def _run_variant(args, name, queue, log_path):
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)  # this process's output (mmengine's logs too) goes to its log file
    os.dup2(log, 2)
    if args.threads:
        torch.set_num_threads(args.threads)
    from mmengine.config import Config

    import sbp_mmdet  # noqa: F401  (registers the SBP modules)
    from sbp_mmdet.benchmark import measure_variant
    from sbp_mmdet.variants import parse_variant
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    result = measure_variant(cfg, parse_variant(name, cfg.model), args.batch_size, args.size[0],
                             args.size[1], args.steps, args.warmup, args.device,
                             on_step=lambda: queue.put('step'), part=args.part)
    if not args.steps:
        queue.put('step')
    queue.put(result.summary())


# measured key -> its ratio to the dense variant of the same precision
RATIOS = {'saved_mib': 'saved_vs_dense', 'backward_median_s': 'backward_vs_dense',
          'backward_gflop': 'backward_gflop_vs_dense', 'step_median_s': 'step_vs_dense',
          'peak_mib': 'peak_vs_dense', 'ops': 'ops_vs_dense',
          'first_layout_ops': 'first_layout_ops_vs_dense'}


def variant_names(args) -> List[str]:
    return args.variants or CPU_VARIANTS + (CUDA_EXTRA if args.device.startswith('cuda')
                                            else [])


def run_interleaved(args) -> List[dict]:
    """Every variant in this process: measured once at ``--size``, then timed round robin
    at ``--time-size`` (see the module docstring)."""
    from mmengine.config import Config
    from mmengine.logging import MMLogger
    from mmengine.utils import ProgressBar

    import sbp_mmdet  # noqa: F401  (registers the SBP modules)
    from sbp_mmdet.benchmark import build_step, interleaved_step_times, measure_variant
    from sbp_mmdet.variants import parse_variant
    if args.threads:
        torch.set_num_threads(args.threads)
    MMLogger.get_instance('benchmark_sbp', log_level='WARNING')  # no weight-init log per row
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    names = variant_names(args)
    variants = [parse_variant(name, cfg.model) for name in names]
    bar = ProgressBar(len(names) * (1 + args.steps + args.warmup))
    results = []
    for variant in variants:
        results.append(measure_variant(cfg, variant, args.batch_size, *args.size, 0, 0,
                                       args.device, part=args.part))
        results[-1].peak_mib = None
        bar.update()
    if args.steps:
        steps = [build_step(cfg, v, args.batch_size, *args.time_size, args.device,
                            part=args.part) for v in variants]
        times = interleaved_step_times(steps, args.steps, args.warmup,
                                       on_round=lambda: bar.update(len(steps)))
        for result, mine in zip(results, times):
            result.step_s = mine
    sys.stdout.write('\n')
    return [r.summary() for r in results]


def run_all(args) -> List[dict]:
    """Every variant's row, with its ratios to the dense variant of its precision."""
    from sbp_mmdet.benchmark import is_reference
    from sbp_mmdet.variants import parse_variant
    rows = run_interleaved(args) if args.interleave else run_separately(args)
    variants = [parse_variant(row['variant']) for row in rows]
    for variant, row in zip(variants, rows):
        dense = next((r for v, r in zip(variants, rows)
                      if is_reference(v) and r['precision'] == row['precision']), None)
        for key, ratio in RATIOS.items():
            ref = dense and dense.get(key)
            row[ratio] = row[key] / ref if row.get(key) is not None and ref else None
    if args.accuracy:
        add_accuracy(rows, args.accuracy, args.config)
    return rows


def add_accuracy(rows: List[dict], path: str, config: str) -> None:
    """Each row's mAP change to dense from the study at ``path`` (``'exact'``, the paired
    mean and 95 % interval, or ``'not measured'``); the study's differences count only where
    it trains the same kind of detector as ``config`` (its ``model.type``)."""
    from mmengine.config import Config

    from sbp_mmdet.accuracy_study import AccuracyStudy
    study = AccuracyStudy(path)
    mine = Config.fromfile(config).model.type
    theirs = Config.fromfile(study.config).model.type if os.path.isfile(study.config) else None
    for row in rows:
        cost = study.cost(row['variant'])
        if cost is not None and not cost.exact and theirs != mine:
            cost = None  # a study of another detector: exact settings only
        row['accuracy'] = 'not measured' if cost is None else cost.label()
        row['map_change'] = None if cost is None else cost.mean
        row['map_ci95'] = None if cost is None else cost.ci95


def run_separately(args) -> List[dict]:
    """Each variant in its own process (its own CPU peak RSS)."""
    from mmengine.utils import ProgressBar
    names = variant_names(args)
    log_dir = os.path.join(args.out_dir, 'logs')
    os.makedirs(log_dir, exist_ok=True)
    ctx = mp.get_context('spawn')
    bar = ProgressBar(len(names) * (args.steps + args.warmup if args.steps else 1))
    rows = []
    for name in names:
        queue = ctx.Queue()
        log_path = os.path.join(log_dir, f'{name}.log')
        proc = ctx.Process(target=_run_variant, args=(args, name, queue, log_path))
        proc.start()
        while proc.is_alive() or not queue.empty():
            try:
                item = queue.get(timeout=1)
            except Empty:
                continue
            if item == 'step':
                bar.update()
            else:
                rows.append(item)
                break
        proc.join()
        if proc.exitcode:
            with open(log_path) as f:
                tail = ''.join(f.readlines()[-15:])
            raise SystemExit(f'\n{tail}\nvariant {name} failed (exit code {proc.exitcode}); '
                             f'the end of its log is above, the whole log is {log_path}')
    sys.stdout.write('\n')
    return rows


def format_table(rows: List[dict], frontier: bool = False) -> str:
    """The markdown table; ``frontier``: ``format_frontier``'s (``--interleave``)."""
    if frontier:
        return format_frontier(rows)
    components = sorted({c for r in rows for c in r['saved_by_component_mib']})
    head = (['variant', 'precision', 'saved MiB', 'vs dense'] + [f'{c} MiB' for c in components]
            + ['peak MiB', 'peak vs dense', 'fwd s', 'bwd s', 'bwd vs dense',
               'bwd GFLOP', 'bwd GFLOP vs dense', 'step s', 'step vs dense', 'ops/step',
               'ops vs dense', 'ops, new masks']
            + (['mAP vs dense (points)'] if any('accuracy' in r for r in rows) else []))
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for r in rows:
        cells = [r['variant'], r['precision'], f"{r['saved_mib']:.0f}",
                 _ratio(r['saved_vs_dense'])]
        cells += [f"{r['saved_by_component_mib'].get(c, 0):.0f}" for c in components]
        cells += [_mib(r['peak_mib']), _ratio(r['peak_vs_dense']),
                  _seconds(r['forward_median_s']),
                  _seconds(r['backward_median_s']), _ratio(r['backward_vs_dense']),
                  f"{r['backward_gflop']:.1f}", _ratio(r['backward_gflop_vs_dense']),
                  _seconds(r['step_median_s']), _ratio(r['step_vs_dense']), str(r['ops']),
                  _ratio(r['ops_vs_dense']), _count(r.get('first_layout_ops'))]
        cells += [r['accuracy']] if 'accuracy' in r else []
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def format_frontier(rows: List[dict]) -> str:
    """The ``--interleave`` table: bytes, backward FLOPs, operators, step time, accuracy."""
    head = ['variant', 'precision', 'saved MiB', 'saved vs dense', 'bwd GFLOP',
            'bwd GFLOP vs dense', 'ops/step', 'ops vs dense', 'ops, new masks',
            'step s (median)', 'spread s',
            'step vs dense', 'mAP vs dense (points, 95 % interval)']
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for r in rows:
        lines.append('| ' + ' | '.join([
            r['variant'], r['precision'], f"{r['saved_mib']:.0f}", _ratio(r['saved_vs_dense']),
            f"{r['backward_gflop']:.0f}", _ratio(r['backward_gflop_vs_dense']),
            str(r['ops']), _ratio(r['ops_vs_dense']), _count(r.get('first_layout_ops')),
            _seconds(r['step_median_s']),
            _seconds(r['step_spread_s']), _ratio(r['step_vs_dense']),
            r.get('accuracy', 'not measured')]) + ' |')
    return '\n'.join(lines)


def _count(value) -> str:
    return '-' if value is None else str(value)


def _mib(value) -> str:
    return '-' if value is None else f'{value:.0f}'


def _seconds(value) -> str:
    return '-' if value is None else f'{value:.3f}'


def _ratio(value) -> str:
    return '-' if value is None else f'{value:.2f}x'


def write_outputs(args, rows: List[dict], table: str) -> None:
    from sbp_mmdet.benchmark import device_name
    os.makedirs(args.out_dir, exist_ok=True)
    meta = dict(config=args.config, cfg_options=args.cfg_options and dict(args.cfg_options),
                part=args.part, size=args.size, batch_size=args.batch_size,
                steps=args.steps, warmup=args.warmup, device=args.device,
                device_name=device_name(args.device),
                threads=torch.get_num_threads(), torch=torch.__version__,
                date=time.strftime('%Y-%m-%d'), interleave=args.interleave,
                time_size=args.time_size, accuracy=args.accuracy)
    with open(os.path.join(args.out_dir, 'results.json'), 'w') as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=2)
    flat = [{k: v for k, v in r.items() if not isinstance(v, dict)} for r in rows]
    with open(os.path.join(args.out_dir, 'results.csv'), 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=list(flat[0]))
        writer.writeheader()
        writer.writerows(flat)
    with open(os.path.join(args.out_dir, 'table.md'), 'w') as f:
        options = ''.join(f' {k}={v}' for k, v in (meta['cfg_options'] or {}).items())
        part = ', backbone + neck only' if meta['part'] == 'backbone_neck' else ''
        f.write(f"{meta['config']}{options}{part}, batch {meta['batch_size']} x {meta['size'][0]}x"
                f"{meta['size'][1]}, {meta['device']} ({meta['device_name']}, "
                f"{meta['threads']} threads), torch {meta['torch']}, {meta['date']}\n\n")
        if args.interleave:
            f.write(interleave_note(args) + '\n\n')
        f.write(table + '\n')
    if not args.no_plot and args.steps:
        if args.interleave:
            plot_frontier(rows, meta, os.path.join(args.out_dir, 'frontier.png'))
        else:
            plot(rows, os.path.join(args.out_dir, 'sbp_vs_keep_ratio.png'))


def interleave_note(args) -> str:
    """What the ``--interleave`` table measured, and at which sizes."""
    h, w = args.time_size
    accuracy = (f'mAP change: paired difference to dense in {args.accuracy} ("exact": the '
                'same gradients as dense, 0 by construction)' if args.accuracy else '')
    return (f'Saved bytes, backward GFLOP and operators per step (forward + backward) at '
            f"{args.batch_size} x {args.size[0]}x{args.size[1]}, one step each; step time: "
            f'median of {args.steps} steps after {args.warmup} warm-up at {args.batch_size} x '
            f'{h}x{w}, the rows interleaved (one step of each in turn); random init. '
            + accuracy)


def plot_frontier(rows: List[dict], meta: dict, path: str) -> None:
    """Bytes saved for backward against step time, both vs dense, one point per row of
    each precision, labelled with the row's mAP change."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    precisions = sorted({r['precision'] for r in rows}, key=lambda p: (p != 'fp32', p))
    fig, axes = plt.subplots(1, len(precisions), figsize=(7 * len(precisions), 5.5),
                             squeeze=False)
    for ax, prec in zip(axes[0], precisions):
        for i, r in enumerate(r for r in rows if r['precision'] == prec):
            if r['step_vs_dense'] is None:
                continue
            sbp = r['variant'].startswith('sbp@')
            ax.plot(r['step_vs_dense'], r['saved_vs_dense'], 'o' if sbp else 's',
                    color='C0' if sbp else 'C1')
            ax.annotate(f"{r['variant']}\n{r.get('accuracy', '')}",
                        (r['step_vs_dense'], r['saved_vs_dense']), textcoords='offset points',
                        xytext=(5, -10 if i % 2 else 4), fontsize=7)
        ax.set_xlabel(f"step time vs dense ({meta['time_size'][0]}x{meta['time_size'][1]})")
        ax.set_ylabel(f"bytes saved for backward vs dense ({meta['size'][0]}x"
                      f"{meta['size'][1]})")
        ax.set_title(f"{os.path.basename(meta['config'])}, {prec}; squares: exact, "
                     'circles: SBP (mAP points)', fontsize=9)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot(rows: List[dict], path: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    from sbp_mmdet.variants import parse_variant
    variants = [parse_variant(r['variant']) for r in rows]
    # the SBP curve: plain sbp@R rows; the others are lines across it
    curve = [v.sbp and not v.tokens for v in variants]
    sbp = sorted((v.keep_ratio, r) for v, r, on in zip(variants, rows, curve) if on)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], 'saved_mib', 'saved for backward (MiB)'),
                           (axes[1], 'backward_median_s', 'backward time (s)')):
        ax.plot([k for k, _ in sbp], [r[key] for _, r in sbp], 'o-', label='SBP')
        for r, on in zip(rows, curve):
            if not on:
                ax.axhline(r[key], linestyle='--', linewidth=1, label=r['variant'],
                           color=f"C{1 + rows.index(r) % 9}")
        ax.set_xlabel('keep ratio')
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None):
    args = parse_args(argv)
    rows = run_all(args)
    table = format_table(rows, frontier=args.interleave)
    print(table)
    write_outputs(args, rows, table)
    figure = 'frontier.png' if args.interleave else 'sbp_vs_keep_ratio.png'
    print(f'wrote {args.out_dir}/results.json, results.csv, table.md'
          + ('' if args.no_plot or not args.steps else f', {figure}'))


if __name__ == '__main__':
    main()
