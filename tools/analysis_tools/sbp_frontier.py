"""The accuracy-memory frontier: mAP change against bytes saved for backward.

Each point of a spec (JSON) pairs a row of an accuracy study
(``accuracy.json`` of ``sbp_accuracy.py``: a variant, several seeds) with a
row of a memory benchmark (``results.json`` of ``benchmark_sbp.py``). The mAP
change is the variant's mean minus the mean of the study's ``dense`` runs on
the same seeds; the spread is the variant's max - min over seeds. A point
with ``"exact": true`` (e.g. ``with_cp``) trains with exact gradients, so its
mAP change is 0 by construction and it needs no accuracy file. Writes
``frontier.md`` (the table) and ``frontier.png`` (the plot) to ``--out-dir``.

Spec::

    {"title": "Faster R-CNN R18 fine-tuning; memory: Faster R-CNN R50 2 x 800x1344",
     "points": [
       {"label": "SBP 0.5 (default)", "accuracy": "docs/results/.../accuracy.json",
        "variant": "sbp@0.5:neck=lateral",
        "memory": "docs/results/faster_rcnn_r50_detector_memory_800x1344_default.json",
        "memory_variant": "sbp@0.5"},
       {"label": "with_cp", "exact": true,
        "memory": "docs/results/faster_rcnn_r50_detector_memory_800x1344_default.json",
        "memory_variant": "with_cp"}]}

Example::

    python tools/analysis_tools/sbp_frontier.py \
        docs/results/faster_rcnn_r50_detector_frontier_800x1344_finetune.json \
        --out-dir docs/results/faster_rcnn_r50_detector_frontier_800x1344_finetune
"""
import argparse
import json
import os
import statistics
from dataclasses import dataclass
from typing import Dict, List, Optional


@dataclass(frozen=True)
class FrontierPoint:
    """One setting: its mAP change to dense and its saved bytes relative to dense."""

    label: str
    seeds: int
    map_change: float  # points of mAP (x100)
    spread: float  # points of mAP (x100)
    saved_vs_dense: float
    saved_mib: float


def load_json(path: str, what: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{what} file {path!r} does not exist')
    with open(path) as f:
        return json.load(f)


def accuracy_change(study: dict, variant: str, path: str) -> tuple:
    """(seeds, mean change in points, spread in points) of ``variant`` in a study."""
    by_seed: Dict[str, Dict[int, float]] = {}
    for run in study['runs']:
        by_seed.setdefault(run['variant'], {})[run['seed']] = run['bbox_mAP']
    if variant not in by_seed or 'dense' not in by_seed:
        raise KeyError(f'{path}: needs runs of {variant!r} and of dense; it has '
                       f'{sorted(by_seed)}')
    seeds = sorted(set(by_seed[variant]) & set(by_seed['dense']))
    if not seeds:
        raise KeyError(f'{path}: {variant!r} and dense share no seed')
    values = [by_seed[variant][s] for s in seeds]
    change = statistics.mean(values) - statistics.mean(by_seed['dense'][s] for s in seeds)
    return len(seeds), 100 * change, 100 * (max(values) - min(values))


def memory_row(results: dict, variant: str, path: str) -> dict:
    rows = {row['variant']: row for row in results['rows']
            if row.get('precision', 'fp32') == 'fp32'}  # older files have fp32 rows only
    if variant not in rows or 'dense' not in rows:
        raise KeyError(f'{path}: needs fp32 rows of {variant!r} and of dense; it has '
                       f'{sorted(rows)}')
    return dict(rows[variant], dense_mib=rows['dense']['saved_mib'])


def frontier_point(spec: dict) -> FrontierPoint:
    """The point a spec entry describes (see the module docstring)."""
    row = memory_row(load_json(spec['memory'], 'memory'), spec['memory_variant'],
                     spec['memory'])
    if spec.get('exact', False):
        seeds, change, spread = 0, 0.0, 0.0
    else:
        seeds, change, spread = accuracy_change(load_json(spec['accuracy'], 'accuracy'),
                                                spec['variant'], spec['accuracy'])
    return FrontierPoint(spec['label'], seeds, change, spread,
                         row['saved_mib'] / row['dense_mib'], row['saved_mib'])


def frontier_table(points: List[FrontierPoint], title: str) -> str:
    lines = [f'{title}', '',
             '| setting | seeds | mAP vs dense (points) | spread (points) | saved MiB | '
             'saved vs dense |', '|---|---|---|---|---|---|']
    for p in sorted(points, key=lambda p: p.saved_vs_dense):
        seeds = 'exact gradients' if p.seeds == 0 else str(p.seeds)
        lines.append(f'| {p.label} | {seeds} | {p.map_change:+.1f} | {p.spread:.1f} | '
                     f'{p.saved_mib:.0f} | {p.saved_vs_dense:.2f}x |')
    return '\n'.join(lines) + '\n'


def plot_frontier(points: List[FrontierPoint], title: str, path: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5))
    for p in points:
        ax.errorbar(p.saved_vs_dense, p.map_change, yerr=p.spread / 2, fmt='o', capsize=3)
        ax.annotate(p.label, (p.saved_vs_dense, p.map_change), textcoords='offset points',
                    xytext=(5, 4), fontsize=8)
    ax.axhline(0, color='grey', lw=0.8)
    ax.set_xlabel('bytes saved for backward, vs dense')
    ax.set_ylabel('bbox mAP vs dense (points; bars: half the seed spread)')
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('spec', help='JSON spec of the points (see the module docstring)')
    parser.add_argument('--out-dir', required=True)
    parser.add_argument('--no-plot', action='store_true')
    args = parser.parse_args(argv)
    try:
        spec = load_json(args.spec, 'spec')
        points = [frontier_point(entry) for entry in spec['points']]
    except (KeyError, FileNotFoundError) as error:
        parser.error(error.args[0])
    table = frontier_table(points, spec.get('title', ''))
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, 'frontier.md'), 'w') as f:
        f.write(table)
    if not args.no_plot:
        plot_frontier(points, spec.get('title', ''), os.path.join(args.out_dir, 'frontier.png'))
    print(table)
    print(f'wrote {args.out_dir}/frontier.md' + ('' if args.no_plot else ', frontier.png'))


if __name__ == '__main__':
    main()
