"""A hook that schedules SBP's keep ratio and logs what SBP does."""
import random
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS
from torch import nn

from ..sbp import SBPConfig


def keep_ratio_schedule(base: float, it: int, max_iters: Optional[int] = None,
                        dense_warmup_iters: int = 0,
                        steps: Sequence[Tuple[int, float]] = (),
                        ramp: Optional[Tuple[int, int, float, float]] = None,
                        dense_last_iters: int = 0) -> float:
    """The keep ratio in force at iteration ``it`` (0-based).

    Precedence: dense warm-up, dense tail, linear ramp, the last step whose
    start iteration has passed, else ``base``.
    """
    if it < dense_warmup_iters:
        return 1.0
    if dense_last_iters and max_iters is not None and it >= max_iters - dense_last_iters:
        return 1.0
    if ramp is not None:
        begin, end, start_ratio, end_ratio = ramp
        if it < begin:
            return start_ratio
        if it >= end:
            return end_ratio
        return start_ratio + (end_ratio - start_ratio) * (it - begin) / (end - begin)
    ratio = base
    for start, value in sorted(steps):
        if it >= start:
            ratio = value
    return ratio


@HOOKS.register_module()
class SBPHook(Hook):
    """Schedules the SBP keep ratio and logs SBP state every iteration.

    Before each training iteration the hook sets the keep ratio of every SBP
    module of the model (``ResNetSBP``, ``FPNSBP``) from its schedule and
    sets their mask step to ``runner.iter``, so the masks (and the schedule)
    are a function of the iteration: a resumed run draws exactly the masks an
    uninterrupted run draws. After each iteration it writes to the message
    hub, hence to every logger/visualizer backend (console, TensorBoard,...):
    ``sbp/keep_ratio`` (in force), ``sbp/kept_fraction_s{stride}`` (realised
    fraction of kept rows per stride) and, on CUDA, ``sbp/max_memory_mib``.

    Args:
        dense_warmup_iters (int): train densely for the first K iterations.
            Default: 0.
        steps (Sequence[tuple[int, float]]): ``(start_iter, keep_ratio)``
            pairs; the ratio changes at each start. Default: () (the model's
            configured ratio throughout).
        ramp (tuple[int, int, float, float], optional): ``(begin, end,
            start_ratio, end_ratio)``: linear change of the ratio between two
            iterations. Default: None.
        dense_last_epochs (int): train densely in the last N epochs (converted
            to iterations with the train loop's length). Default: 0.
        dense_last_iters (int): train densely in the last N iterations.
            Default: 0.

    Example:
        >>> custom_hooks = [dict(type='SBPHook', dense_warmup_iters=500,
        ...                      dense_last_epochs=1)]
    """

    priority = 'NORMAL'

    def __init__(self, dense_warmup_iters: int = 0, steps: Sequence[Sequence] = (),
                 ramp: Optional[Sequence] = None, dense_last_epochs: int = 0,
                 dense_last_iters: int = 0) -> None:
        for name, value in (('dense_warmup_iters', dense_warmup_iters),
                            ('dense_last_epochs', dense_last_epochs),
                            ('dense_last_iters', dense_last_iters)):
            if not isinstance(value, int) or value < 0:
                raise ValueError(f'SBPHook: {name} must be a non-negative int, got {value!r}')
        self.steps: List[Tuple[int, float]] = []
        for step in steps:
            if len(step) != 2:
                raise ValueError(f'SBPHook: steps entries are (start_iter, keep_ratio), got {step!r}')
            self.steps.append((int(step[0]), SBPConfig(keep_ratio=step[1]).keep_ratio))
        if ramp is not None:
            if len(ramp) != 4 or not ramp[0] < ramp[1]:
                raise ValueError('SBPHook: ramp is (begin, end, start_ratio, end_ratio) with '
                                 f'begin < end, got {ramp!r}')
            ramp = (int(ramp[0]), int(ramp[1]), SBPConfig(keep_ratio=ramp[2]).keep_ratio,
                    SBPConfig(keep_ratio=ramp[3]).keep_ratio)
        if ramp is not None and self.steps:
            raise ValueError('SBPHook: give steps or ramp, not both')
        self.ramp = ramp
        self.dense_warmup_iters = dense_warmup_iters
        self.dense_last_epochs = dense_last_epochs
        self.dense_last_iters = dense_last_iters
        self._base: dict = {}

    @staticmethod
    def sbp_modules(model: nn.Module) -> List[nn.Module]:
        model = model.module if is_model_wrapper(model) else model
        return [m for m in model.modules() if hasattr(m, 'mask_sampler')]

    def before_train(self, runner) -> None:
        modules = self.sbp_modules(runner.model)
        if not modules:
            raise RuntimeError('SBPHook: the model has no SBP module (ResNetSBP/FPNSBP); '
                               'remove the hook or use an SBP backbone/neck')
        self._base = {id(m): m.keep_ratio for m in modules}

    def _dense_tail(self, runner) -> int:
        tail = self.dense_last_iters
        if self.dense_last_epochs:
            tail = max(tail, self.dense_last_epochs * len(runner.train_dataloader))
        return tail

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        for module in self.sbp_modules(runner.model):
            module.keep_ratio = keep_ratio_schedule(
                self._base.get(id(module), module.keep_ratio), runner.iter, runner.max_iters,
                self.dense_warmup_iters, self.steps, self.ramp, self._dense_tail(runner))
            module.mask_sampler.step = runner.iter

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        """Store the random states that the next iterations draw from.

        SBP's masks follow ``runner.iter``; the detector's samplers (RPN and
        RoI sampling) draw from the global generators, which mmengine does not
        checkpoint. Restoring them makes a resumed run continue with the
        losses an uninterrupted run would have.
        """
        name, keys, pos, has_gauss, cached = np.random.get_state()
        checkpoint.setdefault('meta', {})['sbp_random_state'] = dict(
            torch=torch.get_rng_state(), python=random.getstate(),
            numpy=(name, keys.tolist(), int(pos), int(has_gauss), float(cached)))

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        state = checkpoint.get('meta', {}).get('sbp_random_state')
        if state is not None:
            torch.set_rng_state(state['torch'])
            name, keys, pos, has_gauss, cached = state['numpy']
            np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
            random.setstate(state['python'])

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        hub = runner.message_hub
        modules = self.sbp_modules(runner.model)
        hub.update_scalar('train/sbp/keep_ratio', modules[0].keep_ratio)
        iteration = getattr(modules[0], 'sbp_iteration', None)
        if iteration is not None:
            for stride, fraction in sorted(iteration.kept_fractions().items()):
                hub.update_scalar(f'train/sbp/kept_fraction_s{stride}', fraction)
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            hub.update_scalar('train/sbp/max_memory_mib', torch.cuda.max_memory_allocated() / 2**20)
