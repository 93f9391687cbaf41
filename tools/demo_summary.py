"""Print the `make demo` summary: per trained config, COCO bbox metrics, training
time and the activation memory it saves for backward, side by side.

Example::

    python tools/demo_summary.py --memory work_dirs/demo/memory/results.json \
        --run faster-rcnn_r18_fpn_synthetic dense 829 work_dirs/demo/x/test/t/t.json \
        --run faster-rcnn_r18_fpn_sbp_synthetic sbp@0.5 739 work_dirs/demo/y/test/t/t.json \
        --study docs/results/accuracy_neck_convs_synthetic/accuracy.json dense sbp@0.5:neck=lateral
"""
import argparse
import json
import os
from typing import Dict, List, Optional

METRICS = ('mAP', 'mAP_50', 'mAP_75')


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Summarise the demo runs')
    parser.add_argument('--run', nargs=4, action='append', required=True,
                        metavar=('NAME', 'VARIANT', 'TRAIN_S', 'METRICS_JSON'),
                        help='a trained config: its name, its benchmark_sbp.py variant '
                        '(dense, sbp@0.5), its training seconds and tools/test.py metrics')
    parser.add_argument('--memory', required=True,
                        help='results.json of tools/analysis_tools/benchmark_sbp.py')
    parser.add_argument('--study', nargs='+', default=None, metavar=('ACCURACY_JSON', 'VARIANT'),
                        help='accuracy.json of tools/analysis_tools/sbp_accuracy.py on the same '
                        'settings, then the study variant of each run (default: the runs\' '
                        'variants): prints the seed spread of single runs and the seeds\' means')
    return parser.parse_args()


def _duration(seconds: int) -> str:
    return f'{seconds // 60} min {seconds % 60:02d} s'


def summary_table(runs: List[List[str]], memory_rows: List[dict]) -> str:
    """A markdown table: one row per run, metrics and memory side by side."""
    memory: Dict[str, float] = {row['variant']: row['saved_mib'] for row in memory_rows}
    dense = memory.get('dense')
    lines = ['| config | keep ratio | training time | bbox mAP | mAP_50 | mAP_75 | '
             'saved MiB | vs dense |', '|---|---|---|---|---|---|---|---|']
    for name, variant, train_s, metrics_file in runs:
        with open(metrics_file) as f:
            metrics = json.load(f)
        saved = memory.get(variant)
        keep = '1.0 (dense)' if variant == 'dense' else variant.split('@')[1]
        cells = [name, keep, _duration(int(train_s))]
        cells += [f"{metrics[f'coco/bbox_{key}']:.3f}" for key in METRICS]
        cells += ['-', '-'] if saved is None else [
            f'{saved:.0f}', f'{saved / dense:.2f}x' if dense else '-']
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def seed_spread_note(study_file: str, variants: List[str]) -> Optional[str]:
    """What one run per config can and cannot say, from a multi-seed study of the
    same configs: each variant's seed range and mean, and the difference of means."""
    with open(study_file) as f:
        study = json.load(f)
    rows = {row['variant']: row for row in study['summary']}
    if not all(v in rows and rows[v]['seeds'] >= 2 for v in variants):
        return None
    ranges = []
    for variant in variants:
        maps = [r['bbox_mAP'] for r in study['runs'] if r['variant'] == variant]
        ranges.append(f'{variant} {min(maps):.3f}-{max(maps):.3f} '
                      f'(mean {rows[variant]["mAP_mean"]:.3f}, {len(maps)} seeds)')
    spread = max(rows[v]['mAP_spread'] for v in variants)
    means = [rows[v]['mAP_mean'] for v in variants]
    return (f'One run per config: on this benchmark single runs of the same config differ by up '
            f'to {100 * spread:.1f} mAP points between seeds, so one pair of runs decides '
            f'little. The multi-seed study {os.path.dirname(study_file)}: '
            + '; '.join(ranges)
            + f'; difference of means {100 * (means[-1] - means[0]):+.1f} points.')


def main() -> None:
    args = parse_args()
    with open(args.memory) as f:
        memory_rows = json.load(f)['rows']
    print(summary_table(args.run, memory_rows))
    if args.study:
        study_file, *variants = args.study
        if variants and len(variants) != len(args.run):
            raise SystemExit(f'--study: give one study variant per --run ({len(args.run)}), '
                             f'got {variants}')
        note = seed_spread_note(study_file, variants or [v for _, v, _, _ in args.run])
        if note:
            print(note)


if __name__ == '__main__':
    main()
