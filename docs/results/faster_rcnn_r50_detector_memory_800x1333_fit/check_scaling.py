"""Checks sbp_fit.py's scaling in pixels against direct measurements at the full size.

Reads fit.json (this folder: the tool's run), measures the named candidates at the run's
batch and full size with the tool's own ``measure`` (the benchmarks' ``measure_variant``),
and writes scaling_check.md and scaling_check.json next to it. From the repository root::

    PYTHONPATH=. python docs/results/faster_rcnn_r50_detector_memory_800x1333_fit/check_scaling.py \
        dense sbp@0.5+cp
"""
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, '..', '..', '..', 'tests'))

from sbp_builders import load_tool  # noqa: E402

fit = load_tool('tools/analysis_tools/sbp_fit.py')


def main(names):
    from mmengine.logging import MMLogger
    MMLogger.get_instance('check_scaling', log_level='WARNING')  # no weight-init log
    with open(os.path.join(HERE, 'fit.json')) as f:
        run = json.load(f)
    args = run['args']
    cfg = fit.load_config(args['config'])
    candidates = {c.name: c for c in fit.candidates_for(cfg)}
    estimates = {e['name']: e for e in run['estimates']}
    rows = []
    for name in names:
        direct = fit.measure(cfg, candidates[name], args['batch_size'], tuple(args['size']),
                             args['amp'])
        est = estimates[name]
        rows.append(dict(name=name, extrapolated_mib=est['saved_gib'] * 1024,
                         measured_mib=direct['saved_mib'],
                         extrapolated_gflop=est['backward_gflop'],
                         measured_gflop=direct['backward_gflop'],
                         from_sizes=[m['size'] for m in est['measured']]))
        print(rows[-1], flush=True)
    h, w = args['size']
    lines = [f"{args['config']}, batch {args['batch_size']} x {h}x{w}, "
             f"{'bf16 autocast' if args['amp'] else 'fp32'}, cpu, {time.strftime('%Y-%m-%d')}: "
             'sbp_fit.py\'s extrapolation (fit.json) against a direct measurement', '',
             '| setting | extrapolated MiB | measured MiB | error | extrapolated GFLOP | '
             'measured GFLOP | error |', '|---|---|---|---|---|---|---|']
    for r in rows:
        lines.append(f"| {r['name']} | {r['extrapolated_mib']:.0f} | {r['measured_mib']:.0f} | "
                     f"{r['extrapolated_mib'] / r['measured_mib'] - 1:+.1%} | "
                     f"{r['extrapolated_gflop']:.0f} | {r['measured_gflop']:.0f} | "
                     f"{r['extrapolated_gflop'] / r['measured_gflop'] - 1:+.1%} |")
    with open(os.path.join(HERE, 'scaling_check.md'), 'w') as f:
        f.write('\n'.join(lines) + '\n')
    with open(os.path.join(HERE, 'scaling_check.json'), 'w') as f:
        json.dump(rows, f, indent=2)
    print('\n'.join(lines))


if __name__ == '__main__':
    main(sys.argv[1:])
