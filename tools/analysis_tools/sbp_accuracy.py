"""Accuracy fidelity: train dense and SBP detectors with identical schedules and seeds.

For each variant and seed this runs ``tools/train.py`` then ``tools/test.py``
(the real COCO evaluator) and reports per variant the bbox mAP mean and spread,
the wall time, and the paired difference to dense: the runs of one seed share
initial weights, data order and sampling (``SBPHook``/``StepSeedHook`` reseed
every step), so the per-seed differences are what is compared, with their mean
and a 95 % Student-t interval over the seeds both ran. Each run's
``result.json`` records its options, the config digest, the commit and the
sha256 of the pretrained weights it loaded.

Variants: ``dense``, ``sbp@R`` (keep ratio R), with optional ``:random`` (random instead
of grid sampling), ``:stages=0110`` (which backbone stages use SBP), ``:cell=4`` (grid
cell rows), ``:inverse_keep`` (gradients scaled by 1/keep ratio in backbone and neck),
``:dense_neck`` (mmdet's ``FPN`` instead of ``FPNSBP``: SBP in the backbone only),
``:neck=lateral`` / ``:neck=output`` / ``:neck=both`` (``FPNSBP``'s ``sbp.convs``: SBP
on the lateral convs, the output convs or both, the others dense), ``:exact_output``
(with ``:neck=both``: the output convs' SBP on their weight gradients only, their inputs
get the exact gradient; ``sbp.exact_input_grad``), ``:exact`` (``sbp.exact_input_grad``
in the backbone, the neck and an SBP head: SBP on the parameters' gradients only; needs
``norm_eval=True``), ``:sbp_rpn_head`` and ``:sbp_retina_head``
(``RPNHeadSBP``/``RetinaHeadSBP`` instead of the dense head: SBP in the head too),
``:head_exact``, ``:head_inverse_keep`` and ``:head_dense_outputs`` (with an SBP head:
``exact_input_grad``, gradients scaled by 1/keep ratio, or ``dense_outputs``: SBP on the
tower only, in the head only), ``:per_image`` (one mask per image), ``:objects``
(per-image masks keeping the rows that cover ground-truth boxes first; the config needs
``SBPHook``) and ``:recompute`` (``sbp.recompute``: the same gradients at less memory,
more backward time) suffixes, e.g. ``sbp@0.5:random``.

Example::

    python tools/analysis_tools/sbp_accuracy.py \
        configs/synthetic/faster-rcnn_r18_fpn_sbp_synthetic.py \
        --variants dense sbp@0.5 sbp@0.25 --seeds 0 1 --out-dir outputs/accuracy
"""
import argparse
import csv
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from functools import lru_cache
from typing import Dict, List, Optional, Tuple

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..'))
NECK_CONVS = {'neck=lateral': '(lateral,)', 'neck=output': '(output,)',
              'neck=both': '(lateral,output)'}
HEAD_PARTS = {'sbp_rpn_head': 'rpn_head', 'sbp_retina_head': 'bbox_head'}
HEAD_SETTINGS = {'head_exact': 'exact_input_grad=True',
                 'head_inverse_keep': 'grad_scale=inverse_keep',
                 'head_dense_outputs': 'dense_outputs=True'}
HEAD_SUFFIXES = {'sbp_rpn_head': 'model.rpn_head.type=RPNHeadSBP',
                 'sbp_retina_head': 'model.bbox_head.type=RetinaHeadSBP'}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('config', help='an SBP detector config (ResNetSBP/FPNSBP)')
    parser.add_argument('--variants', nargs='+', default=['dense', 'sbp@0.5', 'sbp@0.25'])
    parser.add_argument('--seeds', nargs='+', type=int, default=[0, 1])
    parser.add_argument('--iters', type=int, default=None,
                        help='override max_iters, stretching the LR schedule to it (use its '
                        'own --work-dir: run dirs are named by variant and seed)')
    parser.add_argument('--work-dir', default='work_dirs/sbp_accuracy')
    parser.add_argument('--out-dir', default='outputs/sbp_accuracy')
    parser.add_argument('--cfg-options', nargs='+', default=[],
                        help='extra key=value options for every run')
    parser.add_argument('--threads', type=int, default=None,
                        help='torch threads of each training and test run (OMP_NUM_THREADS); '
                        'default: the environment\'s. Two studies at a time on a 2-core CPU '
                        'want 1: oversubscribed cores ran 8x slower')
    parser.add_argument('--reuse', action='store_true',
                        help='reuse a run whose work dir already holds its result.json from '
                             'the same options and config settings (to extend or resume a '
                             'study)')
    parser.add_argument('--summarise-only', action='store_true',
                        help='train nothing: summarise the finished runs of the work dir and '
                             'name the missing ones (a study still running or cut short)')
    return parser.parse_args(argv)


def variant_options(name: str) -> List[str]:
    """``--cfg-options`` that turn the SBP config into variant ``name``."""
    head, *suffixes = name.split(':')
    if head == 'dense':
        if suffixes:
            raise ValueError(f'variant {name!r}: dense takes no suffix')
        # keep ratio 1.0 runs mmdet's dense forward and backward (the SBP modules'
        # dense path) with the same modules and initial weights as the SBP variants
        return ['model.backbone.sbp.keep_ratio=1.0']
    if not head.startswith('sbp@'):
        raise ValueError(f'unknown variant {name!r}: use dense or '
                         'sbp@R[:random][:stages=0110][:cell=4][:inverse_keep][:dense_neck]'
                         '[:neck=lateral|:neck=output|:neck=both][:exact_output|:exact]'
                         '[:sbp_rpn_head|:sbp_retina_head][:head_exact][:head_inverse_keep]'
                         '[:head_dense_outputs]'
                         '[:per_image][:objects][:recompute]')
    opts = [f'model.backbone.sbp.keep_ratio={float(head[4:])}']
    for suffix in suffixes:
        if suffix == 'random':
            opts.append('model.backbone.sbp.sampling=random')
        elif suffix.startswith('stages='):
            flags = ','.join('True' if c == '1' else 'False' for c in suffix[7:])
            opts.append(f'model.backbone.sbp.stages=({flags},)')
        elif suffix.startswith('cell='):
            opts.append(f'model.backbone.sbp.grid_cell={int(suffix[5:])}')
        elif suffix == 'inverse_keep':  # in the SBP modules: not in a dense neck
            parts = ('backbone',) if 'dense_neck' in suffixes else ('backbone', 'neck')
            opts += [f'model.{part}.sbp.grad_scale=inverse_keep' for part in parts]
        elif suffix == 'dense_neck':
            opts.append('model.neck.type=FPN')
        elif suffix in NECK_CONVS:
            opts.append(f'model.neck.sbp.convs={NECK_CONVS[suffix]}')
        elif suffix == 'exact_output':
            opts.append('model.neck.sbp.overrides.output.exact_input_grad=True')
        elif suffix == 'exact':
            parts = ['backbone', 'neck'] + [HEAD_PARTS[s] for s in suffixes if s in HEAD_PARTS]
            opts += [f'model.{part}.sbp.exact_input_grad=True' for part in parts]
        elif suffix in HEAD_SUFFIXES:
            opts.append(HEAD_SUFFIXES[suffix])
        elif suffix in HEAD_SETTINGS:
            heads = [HEAD_PARTS[s] for s in suffixes if s in HEAD_PARTS]
            if not heads:
                raise ValueError(f'variant {name!r}: :{suffix} needs an SBP head '
                                 f'(:{" or :".join(HEAD_PARTS)})')
            opts += [f'model.{part}.sbp.{HEAD_SETTINGS[suffix]}' for part in heads]
        elif suffix == 'per_image':
            opts.append('model.backbone.sbp.per_image=True')
        elif suffix == 'objects':
            opts += ['model.backbone.sbp.sampling=objects', 'model.backbone.sbp.per_image=True']
        elif suffix == 'recompute':
            opts.append('model.backbone.sbp.recompute=True')
        else:
            raise ValueError(f'unknown variant suffix {suffix!r} in {name!r}')
    return opts


def git_commit() -> str:
    """The repository's commit, with ``+dirty`` when tracked files have changes."""
    def git(*args):
        return subprocess.run(['git', *args], cwd=REPO, capture_output=True, text=True).stdout
    commit = git('rev-parse', '--short', 'HEAD').strip() or 'unknown'
    return commit + ('+dirty' if git('status', '--porcelain', '--untracked-files=no') else '')


def run(cmd: List[str], log_file: str, threads: Optional[int] = None) -> None:
    """Run ``cmd`` in the repository with its whole output in ``log_file``, with
    ``threads`` torch threads if given."""
    os.makedirs(os.path.dirname(log_file), exist_ok=True)
    env = dict(os.environ)
    if threads is not None:
        env['OMP_NUM_THREADS'] = str(threads)
    with open(log_file, 'w') as log:
        proc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True,
                              env=env)
    if proc.returncode:
        with open(log_file) as log:
            tail = log.read()[-3000:]
        raise SystemExit(f'failed: {" ".join(cmd)}\n--- end of {log_file}:\n{tail}')


def run_plan(args, variant: str, seed: int) -> Tuple[str, List[str]]:
    """The work dir and the ``--cfg-options`` of one run."""
    work = os.path.join(args.work_dir, f"{variant.replace(':', '_').replace('@', '')}_seed{seed}")
    opts = variant_options(variant) + [f'randomness.seed={seed}',
                                       'randomness.deterministic=False'] + args.cfg_options
    if args.iters:
        opts += list(schedule_options(args.config, args.iters))
    return work, opts


@lru_cache(maxsize=None)  # one config read per study, not one per run
def schedule_options(config: str, iters: int) -> Tuple[str, ...]:
    """``--cfg-options`` that stretch the config's schedule to ``iters`` iterations:
    the LR schedulers that end with the old schedule (e.g. its cosine decay) end
    with the new one; a warm-up that ends earlier keeps its length."""
    from mmengine.config import Config
    cfg = Config.fromfile(config)
    old = cfg.train_cfg.max_iters
    opts = [f'train_cfg.max_iters={iters}', f'train_cfg.val_interval={iters}',
            f'default_hooks.checkpoint.interval={iters}']
    for i, scheduler in enumerate(cfg.get('param_scheduler') or []):
        if scheduler.get('end') == old:
            opts.append(f'param_scheduler.{i}.end={iters}')
            if 'T_max' in scheduler:
                opts.append(f'param_scheduler.{i}.T_max={iters - scheduler.get("begin", 0)}')
    return tuple(opts)


@lru_cache(maxsize=None)  # one config read per study
def config_digest(config: str) -> str:
    """A digest of the config's effective settings (the file and every base it
    inherits), so that a run made from another version of it is not reused."""
    from mmengine.config import Config
    settings = json.dumps(Config.fromfile(config).to_dict(), sort_keys=True, default=repr)
    return hashlib.sha256(settings.encode()).hexdigest()[:16]


def pretrained_digests(config: str, opts: List[str]) -> Dict[str, str]:
    """``{path: sha256}`` of the local pretrained weights a run of ``config`` with
    ``--cfg-options opts`` loads (the backbone a fine-tuning study starts from)."""
    from mmengine.config import Config, DictAction

    from sbp_mmdet.utils import file_sha256
    from sbp_mmdet.utils.pretrained_check import local_pretrained_weights
    parser = argparse.ArgumentParser()
    parser.add_argument('--options', nargs='+', action=DictAction, default={})
    cfg = Config.fromfile(config)
    cfg.merge_from_dict(parser.parse_args(['--options', *opts]).options)
    paths = [path for _, path in local_pretrained_weights(cfg.model)]
    return {path: file_sha256(os.path.join(REPO, path)) for path in paths
            if os.path.isfile(os.path.join(REPO, path))}


def finished_run(work: str, opts: List[str], digest: str) -> Optional[Dict]:
    """The result in run dir ``work``, if that run finished with options ``opts``
    from the config version ``digest`` (a result recorded before digests were,
    without one, counts as that version)."""
    result_file = os.path.join(work, 'result.json')
    if not os.path.exists(result_file):
        return None
    with open(result_file) as f:
        result = json.load(f)
    same_config = result.get('config_digest', digest) == digest
    return result if result.get('options') == opts and same_config else None


def train_and_test(args, variant: str, seed: int) -> Dict:
    work, opts = run_plan(args, variant, seed)
    result_file = os.path.join(work, 'result.json')
    done = finished_run(work, opts, config_digest(args.config)) if args.reuse else None
    if done is not None:
        return done
    python = sys.executable
    start = time.time()
    print(f'  training (log: {work}/train.log)', flush=True)
    run([python, 'tools/train.py', args.config, '--work-dir', work, '--cfg-options', *opts],
        os.path.join(work, 'train.log'), args.threads)
    train_s = time.time() - start
    with open(os.path.join(work, 'last_checkpoint')) as f:
        checkpoint = f.read().strip()
    test_dir = os.path.join(work, 'test')
    print(f'  evaluating (log: {work}/test.log)', flush=True)
    run([python, 'tools/test.py', args.config, checkpoint, '--work-dir', test_dir,
         '--cfg-options', *opts], os.path.join(work, 'test.log'), args.threads)
    logs = sorted(p for p in os.listdir(test_dir) if os.path.isdir(os.path.join(test_dir, p)))
    metrics_file = next(os.path.join(test_dir, logs[-1], f) for f in
                        os.listdir(os.path.join(test_dir, logs[-1])) if f.endswith('.json'))
    with open(metrics_file) as f:
        bbox_map, bbox_map_50, detected = bbox_metrics(json.load(f))
    if not detected:
        print('  no detections above the test score threshold on the whole set: '
              'mAP recorded as 0', flush=True)
    result = dict(variant=variant, seed=seed, bbox_mAP=bbox_map, bbox_mAP_50=bbox_map_50,
                  train_s=train_s, options=opts, config_digest=config_digest(args.config),
                  pretrained=pretrained_digests(args.config, opts), commit=git_commit())
    if not detected:
        result['no_detections'] = True
    with open(result_file, 'w') as f:
        json.dump(result, f, indent=2)
    return result


def bbox_metrics(metrics: Dict) -> Tuple[float, float, bool]:
    """(bbox mAP, mAP@0.5, whether the model detected anything) from test.py's metrics.

    mmdet's ``CocoMetric`` reports no mAP when the model detects nothing on the
    whole set (an undertrained model): COCO's mAP of an empty result is 0.
    """
    if 'coco/bbox_mAP' not in metrics:
        return 0.0, 0.0, False
    return metrics['coco/bbox_mAP'], metrics['coco/bbox_mAP_50'], True


# Two-sided 95 % critical values of Student's t for 1-30 degrees of freedom.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_critical_95(dof: int) -> float:
    """The two-sided 95 % critical value of Student's t with ``dof`` degrees of freedom
    (a table to 30, then the Cornish-Fisher expansion, within 0.001 of the exact one)."""
    if dof < 1:
        raise ValueError(f'a t interval needs >= 1 degree of freedom, got {dof}')
    if dof <= len(_T975):
        return _T975[dof - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * dof) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * dof**2)


def paired_difference(variant: Dict[int, float], dense: Dict[int, float]) -> Dict:
    """The paired difference of ``variant`` to ``dense`` in mAP points, over the seeds
    both have (a seed's runs share initial weights and data order): per seed, its
    mean and a 95 % Student-t interval over seeds (None with fewer than two seeds)."""
    seeds = sorted(set(variant) & set(dense))
    diffs = [100 * (variant[s] - dense[s]) for s in seeds]
    mean = statistics.mean(diffs) if diffs else None
    half = (t_critical_95(len(diffs) - 1) * statistics.stdev(diffs) / len(diffs) ** 0.5
            if len(diffs) >= 2 else None)
    return dict(paired_seeds=seeds, paired_diffs=diffs, paired_mean=mean,
                paired_ci95=None if half is None else (mean - half, mean + half))


def summarise(runs: List[Dict]) -> List[Dict]:
    rows = []
    for variant in dict.fromkeys(r['variant'] for r in runs):
        mine = [r for r in runs if r['variant'] == variant]
        maps = [r['bbox_mAP'] for r in mine]
        rows.append(dict(variant=variant, seeds=len(maps), mAP_mean=statistics.mean(maps),
                         mAP_spread=max(maps) - min(maps),
                         train_s_mean=statistics.mean(r['train_s'] for r in mine),
                         per_seed={r['seed']: r['bbox_mAP'] for r in mine}))
    dense = next((r for r in rows if r['variant'] == 'dense'), None)
    for row in rows:
        row['mAP_points_vs_dense'] = (100 * (row['mAP_mean'] - dense['mAP_mean'])
                                      if dense else None)
        row.update(paired_difference(row['per_seed'], dense['per_seed']) if dense else
                   dict(paired_seeds=[], paired_diffs=[], paired_mean=None, paired_ci95=None))
    return rows


def format_table(rows: List[Dict]) -> str:
    """The summary as markdown: means and spreads, and each variant's paired
    difference to dense (mean and 95 % interval over the seeds both ran)."""
    lines = ['| variant | seeds | bbox mAP (mean) | spread | paired diff. to dense (points) | '
             '95 % interval | per seed | train s |', '|---|---|---|---|---|---|---|---|']
    for r in rows:
        paired = '-' if r['paired_mean'] is None else f"{r['paired_mean']:+.1f}"
        if r['variant'] == 'dense' or r['paired_ci95'] is None:
            interval = '-'
        else:
            interval = f"[{r['paired_ci95'][0]:+.1f}, {r['paired_ci95'][1]:+.1f}]"
        per_seed = ' / '.join(f'{m:.3f} (s{seed})' for seed, m in r['per_seed'].items())
        lines.append(f"| {r['variant']} | {r['seeds']} | {r['mAP_mean']:.3f} | "
                     f"{r['mAP_spread']:.3f} | {paired} | {interval} | {per_seed} | "
                     f"{r['train_s_mean']:.0f} |")
    return '\n'.join(lines)


def main(argv=None):
    args = parse_args(argv)
    for variant in args.variants:
        variant_options(variant)  # fail early on a bad name
    jobs = [(v, s) for v in args.variants for s in args.seeds]
    runs, missing = [], []
    for i, (variant, seed) in enumerate(jobs, 1):
        print(f'[{i}/{len(jobs)}] {variant}, seed {seed}', flush=True)
        if args.summarise_only:
            result = finished_run(*run_plan(args, variant, seed), config_digest(args.config))
            if result is None:
                missing.append(f'{variant} seed {seed}')
                print('  missing (not finished in the work dir)', flush=True)
                continue
            runs.append(result)
        else:
            runs.append(train_and_test(args, variant, seed))
        print(f"  bbox mAP {runs[-1]['bbox_mAP']:.3f}, training {runs[-1]['train_s']:.0f} s",
              flush=True)
    print()
    if not runs:
        raise SystemExit(f'no finished run in {args.work_dir}')
    rows = summarise(runs)
    table = format_table(rows)
    print(table)
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, 'accuracy.json'), 'w') as f:
        json.dump(dict(config=args.config, seeds=args.seeds, iters=args.iters, runs=runs,
                       summary=rows, date=time.strftime('%Y-%m-%d'), commit=git_commit(),
                       missing=missing),
                  f, indent=2)
    with open(os.path.join(args.out_dir, 'accuracy.csv'), 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=['variant', 'seed', 'bbox_mAP', 'bbox_mAP_50',
                                               'train_s', 'commit'],
                                extrasaction='ignore', restval='')
        writer.writeheader()
        writer.writerows(runs)
    with open(os.path.join(args.out_dir, 'table.md'), 'w') as f:
        f.write(table + '\n')
    print(f'wrote {args.out_dir}/accuracy.json, accuracy.csv, table.md')


if __name__ == '__main__':
    main()
