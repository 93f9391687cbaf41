"""Prepare a config for ``--resume`` before the Runner is built.

mmengine restores the checkpoint's seed only after the Runner has built the
train dataloader with the seed of the new process (drawn at random when the
config fixes none), so the sampler's shuffle order and the data workers'
seeds of a resumed run differ from the interrupted run's. Reading the seed
from the checkpoint first and putting it into ``randomness.seed`` makes the
Runner build everything with the interrupted run's seed. Reading the
checkpoint also stops a run whose checkpoint is missing or unreadable at
once, before the Runner prints its environment and config.
"""
import logging
import os.path as osp
from typing import Optional

import torch
from mmengine.config import Config
from mmengine.logging import print_log
from mmengine.runner import find_latest_checkpoint


class ResumeError(Exception):
    """The checkpoint to resume from is missing or cannot be read."""


def resume_checkpoint(cfg: Config) -> Optional[str]:
    """The checkpoint that ``cfg`` resumes from: ``load_from``, else the latest
    one of the work dir; None when ``cfg`` does not resume or nothing is there."""
    if not cfg.get('resume'):
        return None
    return cfg.get('load_from') or find_latest_checkpoint(cfg.work_dir)


def checkpoint_meta(path: str) -> dict:
    """The ``meta`` dict of an mmengine checkpoint (tensors are memory-mapped,
    not read)."""
    if not osp.isfile(path):
        raise ResumeError(f'Cannot resume: checkpoint {path} does not exist')
    try:
        checkpoint = torch.load(path, map_location='cpu', mmap=True)
    except Exception as err:  # truncated zip, not a checkpoint, unpickling refused
        raise ResumeError(f'Cannot resume: checkpoint {path} cannot be read '
                          f'({type(err).__name__}: {err})') from err
    return checkpoint.get('meta', {}) if isinstance(checkpoint, dict) else {}


def _uses_sbp_hook(cfg: Config) -> bool:
    return any(isinstance(hook, dict) and hook.get('type') in ('SBPHook', 'mmdet.SBPHook')
               for hook in cfg.get('custom_hooks') or [])


def prepare_resume(cfg: Config) -> Optional[str]:
    """Give ``cfg`` the seed of the checkpoint it resumes from.

    Sets ``cfg.randomness.seed`` to the checkpoint's ``meta.seed`` (mmengine
    would switch to it after building the dataloaders), and warns when a
    config without ``SBPHook`` resumes an SBP run (the reverse is
    ``SBPHook``'s warning). Remote checkpoints (``s3://...``) are left to
    mmengine.

    Returns:
        str, optional: the checkpoint resumed from, None when not resuming.

    Raises:
        ResumeError: the checkpoint is missing or unreadable.
    """
    path = resume_checkpoint(cfg)
    if path is None or '://' in path:
        return path
    meta = checkpoint_meta(path)
    if meta.get('seed') is not None:
        cfg.randomness = dict(cfg.get('randomness') or {}, seed=meta['seed'])
    if 'sbp' in meta and not _uses_sbp_hook(cfg):
        print_log(f'Resuming from {path}, written by an SBP run (SBPHook), with a config '
                  'that has no SBPHook: the iterations from here on do not follow the SBP '
                  'schedule of the interrupted run', logger='current', level=logging.WARNING)
    return path
