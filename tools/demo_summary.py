"""Print the `make demo` summary: per trained config, COCO bbox metrics, training
time and the activation memory it saves for backward, side by side.

Example::

    python tools/demo_summary.py --memory work_dirs/demo/memory/results.json \
        --run faster-rcnn_r18_fpn_synthetic dense 829 work_dirs/demo/x/test/t/t.json \
        --run faster-rcnn_r18_fpn_sbp_synthetic sbp@0.5 739 work_dirs/demo/y/test/t/t.json
"""
import argparse
import json
from typing import Dict, List

METRICS = ('mAP', 'mAP_50', 'mAP_75')


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Summarise the demo runs')
    parser.add_argument('--run', nargs=4, action='append', required=True,
                        metavar=('NAME', 'VARIANT', 'TRAIN_S', 'METRICS_JSON'),
                        help='a trained config: its name, its benchmark_sbp.py variant '
                        '(dense, sbp@0.5), its training seconds and tools/test.py metrics')
    parser.add_argument('--memory', required=True,
                        help='results.json of tools/analysis_tools/benchmark_sbp.py')
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


def main() -> None:
    args = parse_args()
    with open(args.memory) as f:
        memory_rows = json.load(f)['rows']
    print(summary_table(args.run, memory_rows))


if __name__ == '__main__':
    main()
