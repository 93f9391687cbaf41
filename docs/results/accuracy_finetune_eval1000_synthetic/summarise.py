"""The paired fine-tuning study's checkpoints evaluated on 1000 val images as well as on the
study's 200 (the first 200 of the 1000): how much of dense's seed spread is evaluation
noise. Each checkpoint was evaluated with

    python tools/test.py configs/synthetic/faster-rcnn_r18_fpn_sbp_synthetic-finetune.py \
        work_dirs/acc_frcnn_finetune/RUN/iter_200.pth \
        --work-dir work_dirs/acc_frcnn_finetune/RUN/test1000 --cfg-options \
        test_dataloader.dataset.data_root=data/synthetic_coco_val1000/ \
        test_evaluator.ann_file=data/synthetic_coco_val1000/annotations/instances_val2017.json

on a set made by ``python tools/make_synthetic_coco.py data/synthetic_coco_val1000
--num-train 1 --num-val 1000``; then ``python <this file> work_dirs/acc_frcnn_finetune``
writes ``table.md`` and ``eval1000.json`` beside it.
"""
import glob
import importlib.util
import json
import os.path as osp
import sys

HERE = osp.dirname(osp.abspath(__file__))
REPO = osp.abspath(osp.join(HERE, '..', '..', '..'))
VARIANTS = {'dense': 'dense', 'sbp0.75_recompute': 'sbp@0.75:recompute', 'sbp0.5': 'sbp@0.5',
            'sbp0.75_recompute_sbp_rpn_head': 'sbp@0.75:recompute:sbp_rpn_head'}


def accuracy_tool():
    """tools/analysis_tools/sbp_accuracy.py, for its paired statistics."""
    spec = importlib.util.spec_from_file_location(
        'sbp_accuracy', osp.join(REPO, 'tools', 'analysis_tools', 'sbp_accuracy.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(work: str) -> None:
    rows = {}
    for prefix, variant in VARIANTS.items():
        for seed in range(5):
            run = osp.join(work, f'{prefix}_seed{seed}')
            metrics = sorted(glob.glob(osp.join(run, 'test1000', '*', '*.json')))
            if not metrics or not osp.exists(osp.join(run, 'test1000', 'done')):
                continue
            with open(osp.join(run, 'result.json')) as f:
                on200 = json.load(f)['bbox_mAP']
            with open(metrics[-1]) as f:
                on1000 = json.load(f)['coco/bbox_mAP']
            rows.setdefault(variant, {})[seed] = (on200, on1000)
    tool = accuracy_tool()
    lines = ['| variant | seeds | mAP on 200 (per seed) | spread | mAP on 1000 (per seed) | '
             'spread | paired diff. to dense on 1000 (points, per seed) | mean | 95 % interval |',
             '|---|---|---|---|---|---|---|---|---|']
    dense = rows.get('dense', {})
    for variant, runs in rows.items():
        seeds = sorted(runs)
        small = [runs[s][0] for s in seeds]
        large = [runs[s][1] for s in seeds]
        paired = tool.paired_difference({s: r[1] for s, r in runs.items()},
                                        {s: r[1] for s, r in dense.items()})
        diffs = paired['paired_diffs']
        mean = f"{paired['paired_mean']:+.1f}" if diffs else '-'
        ci = paired['paired_ci95']
        interval = f'[{ci[0]:+.1f}, {ci[1]:+.1f}]' if ci and variant != 'dense' else '-'
        lines.append(
            f"| {variant} | {len(seeds)} | {' / '.join(f'{m:.3f}' for m in small)} | "
            f'{100 * (max(small) - min(small)):.1f} | '
            f"{' / '.join(f'{m:.3f}' for m in large)} | {100 * (max(large) - min(large)):.1f} | "
            f"{' / '.join(f'{d:+.1f}' for d in diffs) or '-'} | {mean} | {interval} |")
    with open(osp.join(HERE, 'table.md'), 'w') as f:
        f.write('\n'.join(lines) + '\n')
    with open(osp.join(HERE, 'eval1000.json'), 'w') as f:
        json.dump({v: {str(s): dict(map_200=a, map_1000=b) for s, (a, b) in r.items()}
                   for v, r in rows.items()}, f, indent=2)
    print('\n'.join(lines))


if __name__ == '__main__':
    main(sys.argv[1])
