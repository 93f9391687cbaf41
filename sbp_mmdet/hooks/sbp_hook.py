"""A hook that schedules SBP's keep ratio, makes resumed runs exact and logs SBP."""
import logging
from typing import Any, List, Optional, Sequence, Tuple

import torch
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..models.checks import sbp_model_problem
from ..sbp.config import check_keep_ratio
from .step_seed_hook import StepSeedHook


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


def _resumed(runner) -> bool:
    """Whether the run goes on from a checkpoint (it starts past iteration 0)."""
    return runner.iter > 0 or runner.epoch > 0


@HOOKS.register_module()
class SBPHook(StepSeedHook):
    """Schedules the SBP keep ratio, makes ``--resume`` exact and logs SBP state.

    **Schedule.** Before each training iteration the hook sets the keep ratio
    of every SBP module of the model (``ResNetSBP``, ``FPNSBP``) from its
    schedule and their mask step to ``runner.iter``.

    **Exact resume.** The masks are a function of (run seed, rank,
    iteration): the run seed is ``runner.seed``, which mmengine draws at
    start when the config fixes none, stores in every checkpoint
    (``meta.seed``; the hook also stores it in ``meta.sbp.seed``) and
    restores on resume. The other random draws of a training step, the data
    pipeline's in the main process (``RandomFlip``, ``RandomResize`` with
    ``num_workers=0``) and the detector's RPN/RoI sampling, come from the
    global generators, which the hook reseeds from (run seed, rank, iteration)
    before each batch is fetched (iteration-based loops: mmengine's "advance
    dataloader" on resume then replays the skipped batches with their own
    seeds) or from (run seed, rank, epoch) before each epoch (epoch-based
    loops, which resume at an epoch start). Python, numpy and torch (CPU and
    CUDA) generators are seeded. Data workers (``num_workers > 0``) are seeded
    by mmengine from the run seed when they start; they replay the same
    batches on resume, except ``persistent_workers=True`` in an epoch-based
    loop, where a resumed run's workers start again from their initial state
    (the hook warns; the COCO SBP configs set ``persistent_workers=False``).

    **Ground-truth boxes.** When a module's mask policy needs the batch's
    boxes before the forward (``sbp.sampling='objects'``), the hook hands
    them over with ``feed_gt_boxes``: a forward pre-hook on the detector that,
    in every ``mode='loss'`` call, gives the data samples' ``gt_instances``
    boxes (after the data preprocessor, in input pixels) to the SBP modules'
    mask samplers.

    **Logging.** After each iteration the hook writes to the message hub,
    hence to every logger/visualizer backend (console, TensorBoard,...):
    ``sbp/keep_ratio`` (in force), ``sbp/kept_fraction_s{stride}`` (realised
    fraction of kept rows per stride) and, on CUDA, ``sbp/max_memory_mib``.

    Args:
        dense_warmup_iters (int): train densely for the first K iterations.
            Default: 0.
        steps (Sequence[tuple[int, float]]): ``(start_iter, keep_ratio)``
            pairs with distinct, non-negative start iterations; the ratio
            changes at each start. Default: () (the model's configured ratio
            throughout).
        ramp (tuple[int, int, float, float], optional): ``(begin, end,
            start_ratio, end_ratio)`` with ``0 <= begin < end``: linear change
            of the ratio between two iterations. Default: None.
        dense_last_epochs (int): train densely in the last N epochs (converted
            to iterations with the train loop's length). Default: 0.
        dense_last_iters (int): train densely in the last N iterations.
            Default: 0.

    Example:
        >>> custom_hooks = [dict(type='SBPHook', dense_warmup_iters=500,
        ...                      dense_last_epochs=1)]
    """

    def __init__(self, dense_warmup_iters: int = 0, steps: Sequence[Sequence] = (),
                 ramp: Optional[Sequence] = None, dense_last_epochs: int = 0,
                 dense_last_iters: int = 0) -> None:
        for name, value in (('dense_warmup_iters', dense_warmup_iters),
                            ('dense_last_epochs', dense_last_epochs),
                            ('dense_last_iters', dense_last_iters)):
            _check_iteration(value, f'SBPHook: {name}')
        self.steps: List[Tuple[int, float]] = []
        for step in steps:
            if not isinstance(step, (list, tuple)) or len(step) != 2:
                raise ValueError('SBPHook: steps entries are (start_iter, keep_ratio), '
                                 f'got {step!r}')
            _check_iteration(step[0], 'SBPHook: steps start_iter')
            self.steps.append((step[0], check_keep_ratio(step[1])))
        starts = [start for start, _ in self.steps]
        if len(set(starts)) != len(starts):
            raise ValueError(f'SBPHook: steps start at the same iteration more than once: '
                             f'{sorted(starts)}; give each start_iter once')
        if ramp is not None:
            if not isinstance(ramp, (list, tuple)) or len(ramp) != 4:
                raise ValueError('SBPHook: ramp is (begin, end, start_ratio, end_ratio), '
                                 f'got {ramp!r}')
            _check_iteration(ramp[0], 'SBPHook: ramp begin')
            _check_iteration(ramp[1], 'SBPHook: ramp end')
            if not ramp[0] < ramp[1]:
                raise ValueError(f'SBPHook: ramp needs begin < end, got {ramp!r}')
            ramp = (ramp[0], ramp[1], check_keep_ratio(ramp[2]),
                    check_keep_ratio(ramp[3]))
        if ramp is not None and self.steps:
            raise ValueError('SBPHook: give steps or ramp, not both')
        self.ramp = ramp
        self.dense_warmup_iters = dense_warmup_iters
        self.dense_last_epochs = dense_last_epochs
        self.dense_last_iters = dense_last_iters
        super().__init__()
        self._base: dict = {}
        self._loaded_meta: Optional[dict] = None
        self._boxes_handle: Optional[RemovableHandle] = None

    @staticmethod
    def sbp_modules(model: nn.Module) -> List[nn.Module]:
        """The modules that draw masks (the SBP backbone, or a neck with its own
        mask): the one home of each keep ratio."""
        model = model.module if is_model_wrapper(model) else model
        return [m for m in model.modules() if getattr(m, 'mask_sampler', None) is not None]

    def before_run(self, runner) -> None:
        """Refuse an SBP model that cannot train (``sbp_model_problem``),
        before weights are initialised or data is loaded."""
        problem = sbp_model_problem(runner.cfg.get('model') or {})
        if problem is not None:
            raise ValueError(problem)

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        self._loaded_meta = checkpoint.get('meta', {})

    def _resumed_sbp_meta(self, runner) -> Optional[dict]:
        """The ``meta.sbp`` of the checkpoint a resumed run loaded (None when the run
        starts afresh or the checkpoint has none)."""
        return (self._loaded_meta or {}).get('sbp') if _resumed(runner) else None

    def run_seed(self, runner) -> int:
        """The seed of the interrupted run on resume (``meta.sbp``), else the run's."""
        sbp_meta = self._resumed_sbp_meta(runner)
        return int(sbp_meta['seed'] if sbp_meta else runner.seed)

    def before_train(self, runner) -> None:
        modules = self.sbp_modules(runner.model)
        if not modules:
            raise RuntimeError('SBPHook: the model has no SBP module (ResNetSBP/FPNSBP); '
                               'remove the hook or use an SBP backbone/neck')
        self._base = {id(m): m.keep_ratio for m in modules}
        super().before_train(runner)  # self.seed; the reseeded batches
        for module in modules:
            module.mask_sampler.set_seed(self.seed)
        samplers = [m.mask_sampler for m in modules if m.mask_sampler.policy.needs_boxes]
        if samplers and self._boxes_handle is None:
            model = runner.model.module if is_model_wrapper(runner.model) else runner.model
            self._boxes_handle = feed_gt_boxes(model, samplers)
        if _resumed(runner):
            self._check_resume(runner, self._resumed_sbp_meta(runner))

    def _check_resume(self, runner, sbp_meta: Optional[dict]) -> None:
        """Warn about what a resumed run cannot repeat of the interrupted one."""
        if sbp_meta is None:
            print_log(f'SBPHook: resumed at iteration {runner.iter} from a checkpoint written '
                      'without SBPHook (a dense run, or an SBP run without the hook): the '
                      'iterations before it did not train with this config\'s SBP schedule '
                      'and masks', logger='current', level=logging.WARNING)
        loader = runner.train_dataloader
        if not hasattr(runner.train_loop, 'dataloader_iterator') and \
                getattr(loader, 'num_workers', 0) > 0 and getattr(loader, 'persistent_workers',
                                                                  False):
            print_log('SBPHook: the data workers of this epoch-based loop persist across epochs, '
                      'so the resumed run\'s workers start from their initial random state, '
                      'not from where the interrupted run\'s were: augmentations differ (masks, '
                      'data order and the model\'s sampling do not). Set '
                      'train_dataloader.persistent_workers=False for an exact resume',
                      logger='current', level=logging.WARNING)
        sampler = getattr(loader, 'sampler', None)
        diff_rank_seed = (runner.cfg.get('randomness') or {}).get('diff_rank_seed', False)
        sampler_seed = getattr(sampler, 'seed', None)
        if sampler_seed is not None and not diff_rank_seed and sampler_seed != runner.seed:
            print_log(f'SBPHook: the train dataloader was built with seed {sampler_seed} before '
                      f'the checkpoint\'s seed {runner.seed} was restored, so the data order '
                      'and the data workers\' augmentations differ from the interrupted run. '
                      f'Resume with randomness.seed={runner.seed} (tools/train.py --resume '
                      'does this) for an exact resume', logger='current', level=logging.WARNING)

    def after_train(self, runner) -> None:
        if self._boxes_handle is not None:
            self._boxes_handle.remove()
            self._boxes_handle = None

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
        """Store the run seed the masks are drawn from (``meta.sbp``)."""
        checkpoint.setdefault('meta', {})['sbp'] = dict(seed=self.seed)

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


def feed_gt_boxes(detector: nn.Module, samplers: Sequence[Any]) -> RemovableHandle:
    """Give ``samplers`` (``RowMaskSampler``) the batch's ground-truth boxes
    before every ``mode='loss'`` forward of ``detector``.

    The pre-hook reads ``data_samples`` of ``detector.forward(inputs,
    data_samples, mode)``: what the data preprocessor produced, so the boxes
    are in the coordinates of the backbone's input (batch augments included).

    Returns:
        RemovableHandle: removes the pre-hook.
    """
    def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        mode = kwargs.get('mode', args[2] if len(args) > 2 else 'tensor')
        samples = kwargs.get('data_samples', args[1] if len(args) > 1 else None)
        if mode != 'loss' or samples is None:
            return
        boxes = [sample.gt_instances.bboxes for sample in samples]
        boxes = [getattr(b, 'tensor', b) for b in boxes]  # mmdet's box types hold a tensor
        for sampler in samplers:
            sampler.set_gt_boxes(boxes)
    return detector.register_forward_pre_hook(pre_hook, with_kwargs=True)


def _check_iteration(value, name: str) -> None:
    """Refuse anything but a non-negative int (``True`` included)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f'{name} must be a non-negative int (an iteration count), '
                         f'got {value!r}')
