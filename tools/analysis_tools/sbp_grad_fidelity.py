"""Gradient fidelity of SBP: cosine and norm ratio to dense gradients per stage.

For each of ``--iters`` training batches of the config's train dataloader, at
fixed weights (random init, or ``--checkpoint``), the parameter gradients at
each keep ratio are compared with those of plain backprop (keep ratio 1.0) on
the same batch, and the figures are averaged over batches. ``--variants`` names the
keep ratios and settings in the grammar of docs/usage.md (section "Variants"), e.g.
``--variants sbp@0.25:neck=both sbp@0.5:neck=both``; ``--keep-ratios`` alone compares
the config as it is.

Example::

    python tools/analysis_tools/sbp_grad_fidelity.py \
        configs/synthetic/faster-rcnn_r18_fpn_sbp_synthetic.py \
        --checkpoint work_dirs/demo/faster-rcnn_r18_fpn_synthetic/iter_400.pth \
        --keep-ratios 0.25 0.5 0.75 --iters 8 --out-dir outputs/grad_fidelity
"""
import argparse
import csv
import json
import os
import sys
import time
from typing import Dict

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', '..'))


def parse_args(argv=None):
    from mmengine.config import DictAction

    from sbp_mmdet.grad_fidelity import fidelity_variants
    from sbp_mmdet.variants import variant_argument
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('config', help='a detector config with ResNetSBP/FPNSBP')
    parser.add_argument('--checkpoint', default=None,
                        help='weights to measure at (default: the config\'s initialisation)')
    parser.add_argument('--keep-ratios', nargs='+', type=float, default=None,
                        help='keep ratios to compare with dense (default: 0.25 0.5 0.75)')
    parser.add_argument('--variants', nargs='+', type=variant_argument, default=None,
                        help='instead of --keep-ratios: sbp@R variants that differ in keep '
                        'ratio only, e.g. sbp@0.25:neck=both sbp@0.5:neck=both (the grammar '
                        'and its tokens: docs/usage.md#variants)')
    parser.add_argument('--iters', type=int, default=8, help='batches to average over')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--threads', type=int, default=None, help='torch CPU threads')
    parser.add_argument('--out-dir', default='outputs/grad_fidelity')
    parser.add_argument('--no-plot', action='store_true')
    parser.add_argument('--split-heads', action='store_true',
                        help='one row per head layer (tower, classifier, regressor) instead '
                             'of one per head: for SBP heads')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config keys, e.g. model.backbone.sbp.sampling=random')
    args = parser.parse_args(argv)
    if args.iters < 1:
        parser.error('--iters must be >= 1')
    if args.variants and args.keep_ratios:
        parser.error('give --variants or --keep-ratios, not both')
    if args.variants:
        try:
            args.keep_ratios = fidelity_variants(args.variants)[0]
        except ValueError as e:
            parser.error(str(e))
    args.keep_ratios = args.keep_ratios or [0.25, 0.5, 0.75]
    bad = [r for r in args.keep_ratios if not 0.0 < r < 1.0]
    if bad:
        parser.error(f'--keep-ratios must lie in (0, 1) (1.0 is the reference), got {bad}')
    return args


def build(args):
    """The detector in train mode and an iterator over its preprocessed batches."""
    from mmdet.registry import MODELS
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmengine.runner import Runner, load_checkpoint

    import sbp_mmdet  # noqa: F401  (registers the SBP modules)
    from sbp_mmdet.grad_fidelity import fidelity_variants
    from sbp_mmdet.utils.dataset_check import check_dataset
    cfg = Config.fromfile(args.config)
    if args.variants:  # their options, the config's SBP heads counted
        cfg.merge_from_dict(fidelity_variants(args.variants, cfg.model)[1])
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    check_dataset(cfg, ('train_dataloader',))
    torch.manual_seed(args.seed)
    model = MODELS.build(cfg.model)
    model.init_weights()
    if args.checkpoint:
        load_checkpoint(model, args.checkpoint, map_location='cpu')
    model.train()
    loader = Runner.build_dataloader(cfg.train_dataloader, seed=args.seed)

    def batches():
        for i, batch in enumerate(loader):
            if i == args.iters:
                return
            yield model.data_preprocessor(batch, True)

    return model, batches()


def format_table(results: Dict[float, dict]) -> str:
    ratios = sorted(results)
    groups = list(dict.fromkeys(g for r in ratios for g in results[r]))
    head = ['parameters'] + [f'keep {r:g}: cosine / norm ratio' for r in ratios]
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for group in groups:
        cells = [group]
        for r in ratios:
            stats = results[r].get(group)
            cells.append('-' if stats is None else
                         f"{stats['cosine']:.3f} / {stats['norm_ratio']:.3f}")
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def plot(results: Dict[float, dict], path: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    ratios = sorted(results) + [1.0]
    groups = list(dict.fromkeys(g for r in results for g in results[r]))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in ((axes[0], 'cosine', 'cosine similarity to dense gradient'),
                           (axes[1], 'norm_ratio', 'gradient norm / dense norm')):
        for i, group in enumerate(groups):
            values = [results[r][group][key] if group in results.get(r, {}) else None
                      for r in ratios[:-1]] + [1.0]
            ax.plot(ratios, values, 'o-', label=group, color=f'C{i % 10}')
        ax.set_xlabel('keep ratio')
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None):
    from mmengine.utils import ProgressBar

    from sbp_mmdet.grad_fidelity import gradient_fidelity
    from sbp_mmdet.utils import mmengine_logs_to_file
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    log_file = os.path.join(args.out_dir, 'grad_fidelity.log')
    print(f'building the model and the dataloader (log: {log_file})')
    bar = ProgressBar(args.iters)
    with mmengine_logs_to_file(log_file):
        model, batches = build(args)
        results = gradient_fidelity(model, batches, args.keep_ratios, args.seed,
                                    on_batch=bar.update, split_heads=args.split_heads)
    sys.stdout.write('\n')
    table = format_table(results)
    print(table)
    os.makedirs(args.out_dir, exist_ok=True)
    meta = dict(config=args.config, checkpoint=args.checkpoint, iters=args.iters,
                seed=args.seed, variants=args.variants,
                cfg_options=args.cfg_options and dict(args.cfg_options),
                torch=torch.__version__, date=time.strftime('%Y-%m-%d'))
    with open(os.path.join(args.out_dir, 'grad_fidelity.json'), 'w') as f:
        json.dump(dict(meta=meta, results={str(r): v for r, v in results.items()}), f,
                  indent=2, default=str)
    with open(os.path.join(args.out_dir, 'grad_fidelity.csv'), 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(['keep_ratio', 'parameters', 'cosine', 'norm_ratio'])
        for ratio, groups in results.items():
            for group, stats in groups.items():
                writer.writerow([ratio, group, stats['cosine'], stats['norm_ratio']])
    with open(os.path.join(args.out_dir, 'table.md'), 'w') as f:
        f.write(f"{args.config}, weights: {args.checkpoint or 'initialisation'}, mean over "
                f"{args.iters} batches, torch {meta['torch']}, {meta['date']}\n\n{table}\n")
    written = 'grad_fidelity.json, grad_fidelity.csv, table.md'
    if not args.no_plot:
        plot(results, os.path.join(args.out_dir, 'grad_fidelity.png'))
        written += ', grad_fidelity.png'
    print(f'wrote {args.out_dir}/{written}')


if __name__ == '__main__':
    main()
