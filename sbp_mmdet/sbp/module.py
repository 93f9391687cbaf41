"""What every SBP backbone, neck and head shares."""
import inspect
import warnings
from contextlib import contextmanager
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .config import check_keep_ratio, parse_sbp
from .context import SBPFeatures
from .layer import adopt, dense_class
from .masks import RowMaskSampler, SBPIteration
from .program import SBPProgram
from .state import SBPState, sbp_states
from .tracing import check_module_not_traced

Layers = Iterable[Tuple[nn.Module, int]]


def sbp_signature(cls: type) -> inspect.Signature:
    """The signature of SBP class ``cls``: its dense class's parameters, in
    their order, then the keyword-only ``sbp`` (before a ``**kwargs``)."""
    params = list(inspect.signature(dense_class(cls, SBPModuleMixin)).parameters.values())
    sbp = inspect.Parameter('sbp', inspect.Parameter.KEYWORD_ONLY, default=None,
                            annotation=Optional[dict])
    at = len(params) - (bool(params) and params[-1].kind is inspect.Parameter.VAR_KEYWORD)
    return inspect.Signature(params[:at] + [sbp] + params[at:])


class _SBPSignature:
    """``inspect.signature`` of an SBP class, read on the class: ``sbp_signature``.

    An SBP module's ``__init__`` is ``(*args, sbp=None, **kwargs)`` and passes
    ``args`` and ``kwargs`` on to its dense class unchanged, so the dense
    class's signature, plus ``sbp``, is the one it has. On an instance the
    attribute does not exist (the module's call signature stays its own).
    """

    def __get__(self, obj: Optional[object], owner: type) -> inspect.Signature:
        if obj is not None:
            raise AttributeError('__signature__')
        return sbp_signature(owner)


class SBPModuleMixin:
    """The mechanism of an SBP module; the module itself only declares its layers.

    An SBP module subclasses this mixin before its mmdet class, takes
    ``(*args, sbp=None, **kwargs)`` in ``__init__`` (the mmdet class's
    arguments, positional ones in their order, and a keyword-only ``sbp``:
    ``sbp_signature``), calls ``init_sbp`` there, turns the layers that run
    with SBP into SBP layers with ``sbp_adopt`` and, in a training forward,
    either draws the iteration (``sbp_draw``: the backbone, the module that
    owns the mask keys) or follows its input's (``sbp_follow``: necks and
    heads), runs the parent's forward inside ``sbp_layers`` and returns
    ``SBPFeatures`` with its outputs' strides.

    ``sbp=dict(...)`` keys (``parse_sbp``): the mask keys (``MaskConfig``) on
    the module that draws the mask only, the layer keys (``LayerConfig``),
    ``overrides`` (per-group layer keys, for a module with groups) and the
    module's own (``extra_keys`` of ``init_sbp``).

    Attributes:
        sbp_settings (SBPSettings): the validated settings.
        sbp_cfg (LayerConfig): the module's layer settings.
        mask_sampler (RowMaskSampler, optional): draws the masks of a module
            that owns them (``SBPHook`` schedules its keep ratio); None in a
            module that follows another's mask.
        sbp_iteration (SBPIteration): the iteration of the last training
            forward (for hooks and tests), None before.
    """

    sbp_iteration: Optional[SBPIteration] = None
    mask_sampler: Optional[RowMaskSampler] = None
    __signature__ = _SBPSignature()

    def init_sbp(self, sbp: Optional[dict], *, draws_mask: bool, groups: Sequence[str] = (),
                 extra_keys: Sequence[str] = (), mask_home: str = 'the backbone') -> dict:
        """Validate ``sbp`` (``parse_sbp``); returns the module's own keys that were given."""
        self.sbp_settings = parse_sbp(sbp, self.sbp_name, draws_mask=draws_mask, groups=groups,
                                      extra_keys=extra_keys, mask_home=mask_home)
        self.sbp_cfg = self.sbp_settings.layer
        self.sbp_adopted: List[nn.Module] = []
        if self.sbp_settings.mask is not None:
            self.mask_sampler = RowMaskSampler(self.sbp_settings.mask)
        return dict(self.sbp_settings.extras)

    def sbp_adopt(self, module: nn.Module, sbp_classes: Sequence[type], where: str,
                  group: Optional[str] = None) -> nn.Module:
        """Make ``module`` an SBP layer of this module (``adopt``), with the
        layer settings of ``group``."""
        layer = adopt(module, sbp_classes, f'{self.sbp_name}.{where}',
                      self.sbp_settings.for_group(group))
        self.sbp_adopted.append(layer)
        return layer

    @property
    def sbp_name(self) -> str:
        return type(self).__name__

    @property
    def keep_ratio(self) -> float:
        """The keep ratio in force (``SBPHook`` schedules may change it).

        Raises:
            AttributeError: on a module that follows another's mask.
        """
        if self.mask_sampler is None:
            raise AttributeError(f'{self.sbp_name} follows the mask of the module before it '
                                 'and has no keep ratio of its own')
        return self.mask_sampler.keep_ratio

    @keep_ratio.setter
    def keep_ratio(self, value: float) -> None:
        if self.mask_sampler is None:
            raise AttributeError(f'{self.sbp_name} follows the mask of the module before it: '
                                 'set the keep ratio of the module that draws it')
        self.mask_sampler.keep_ratio = check_keep_ratio(value)

    def train(self, mode: bool = True) -> nn.Module:
        """Set the mode and return the module (also where the parent's ``train``
        returns None, as mmdet's ``ResNet.train`` does); the modes SBP depends on
        are checked at the next training forward (after the parent's ``train``,
        e.g. ``norm_eval``)."""
        self.__dict__['_sbp_modes_checked'] = False
        super().train(mode)
        return self

    def sbp_training(self) -> bool:
        """Whether this forward trains (SBP applies, possibly with a dense mask).

        Every SBP module's forward asks this first. The first training
        forward after each ``.train()`` checks the modes of the module's SBP
        layers (``check_sbp_modes``).

        Raises:
            SBPTracingError: under ``torch.fx.symbolic_trace`` (e.g. mmengine's
                ``efficient_conv_bn_eval``), which would record a dense graph
                (``sbp_mmdet.sbp.tracing``).
        """
        check_module_not_traced(self, self.sbp_name)
        training = self.training and torch.is_grad_enabled()
        if training and not self.__dict__.get('_sbp_modes_checked', False):
            self.check_sbp_modes()
            self.__dict__['_sbp_modes_checked'] = True
        return training

    def check_sbp_modes(self) -> None:
        """Raise what the SBP layers cannot run in their current modes (e.g.
        ``exact_input_grad`` with BatchNorm in train mode), naming the layer."""
        for layer in self.sbp_adopted:
            layer.sbp_program().check_modes(layer.sbp_cfg.exact_input_grad)

    def sbp_draw(self, image_height: int, base_stride: int, dense: bool = False,
                 batch_size: int = 1) -> SBPIteration:
        """The iteration's mask, drawn by the module that owns the mask keys."""
        if dense or self.keep_ratio >= 1.0:
            return SBPIteration.dense(base_stride)
        return SBPIteration.sample(self.mask_sampler, image_height, base_stride, batch_size)

    def sbp_follow(self, inputs: Sequence) -> SBPFeatures:
        """The SBP context that ``inputs`` carry.

        Raises:
            ValueError: when ``inputs`` carry none (a module in between
                rebuilt them, or no SBP module drew a mask before this one).
        """
        if not isinstance(inputs, SBPFeatures):
            raise ValueError(
                f"{self.sbp_name}: its inputs carry no SBP mask (they are a "
                f"{type(inputs).__name__}, not SBPFeatures): put it right behind an SBP module "
                '(e.g. ResNetSBP, FPNSBP), with nothing in between that rebuilds the feature '
                'tuple, or use its dense counterpart')
        return inputs

    @contextmanager
    def sbp_layers(self, iteration: SBPIteration, layers: Layers) -> Iterator[None]:
        """Run ``(layer, input stride)`` pairs with SBP while inside.

        Layers whose output stride the mask does not cover run densely (maps
        coarser than the base mask), and all of them with a dense mask.
        """
        self.sbp_iteration = iteration
        states = [(layer, layer_state(iteration, stride, layer.sbp_program()))
                  for layer, stride in layers]
        with sbp_states([(layer, state) for layer, state in states if state is not None]):
            yield


def layer_state(iteration: SBPIteration, stride: int,
                program: SBPProgram) -> Optional[SBPState]:
    """The state to run ``program`` on a map at ``stride``; None where it runs
    densely (a dense mask, or maps coarser than the base mask)."""
    if iteration.keep_ratio == 1.0 or not iteration.covers(stride * program.stride):
        return None
    return SBPState(iteration, stride)


class SBPBackboneMixin(SBPModuleMixin):
    """The forward of an SBP backbone: draws the iteration's mask and runs its layers.

    A backbone subclasses it before its parent class and sets, in ``__init__``:
    ``sbp_layer_inputs`` (``(layer, input stride)`` of its SBP layers, each
    made one with ``sbp_adopt``),
    ``sbp_base_stride`` (the coarsest stride they run at: the base mask's) and
    ``stage_strides`` (the output stride of each stage, read with the parent's
    ``out_indices``). Its training forward returns ``SBPFeatures``; in eval
    mode and under ``torch.no_grad()`` it is the parent's forward.
    """

    sbp_layer_inputs: List[Tuple[nn.Module, int]] = []

    def sbp_active(self) -> bool:
        """Whether the next forward uses SBP."""
        return self.sbp_training() and self.keep_ratio < 1.0 and bool(self.sbp_layer_inputs)

    def forward(self, x: torch.Tensor):
        if not self.sbp_training():
            return super().forward(x)
        iteration = self.sbp_draw(x.shape[2], self.sbp_base_stride, dense=not self.sbp_active(),
                                  batch_size=x.shape[0])
        with self.sbp_layers(iteration, self.sbp_layer_inputs):
            outs = super().forward(x)
        return SBPFeatures(outs, iteration,
                           [self.stage_strides[i] for i in sorted(self.out_indices)])


def warn_with_cp_without_recompute(module: SBPModuleMixin) -> None:
    """Warn where a layer with ``with_cp=True`` runs with SBP without recompute:
    ``with_cp`` checkpoints the layers that run densely, ``sbp.recompute`` is
    the one switch of the SBP layers."""
    storing = [layer.sbp_where for layer in module.sbp_adopted
               if getattr(layer, 'with_cp', False) and not layer.sbp_cfg.recompute]
    if storing:
        warnings.warn(
            f'{module.sbp_name}: with_cp=True checkpoints the blocks that run densely; the '
            f'SBP blocks ({storing[0]}, ...) store their kept rows: add sbp.recompute=True '
            "(or 'all') to recompute them too", stacklevel=3)


def stage_switches(name: str, stage_blocks: Sequence[int], frozen_stages: int,
                   stages: Optional[Sequence[bool]],
                   blocks: Optional[Sequence[Sequence[bool]]]) -> List[List[bool]]:
    """Per-block SBP switches of a staged backbone from ``sbp.stages``/``sbp.blocks``.

    Default: every stage but the last, skipping frozen stages (the paper's
    practice: SBP in the early and middle stages, the last blocks dense).

    Raises:
        ValueError: for both keys, wrong lengths, or SBP on a frozen stage.
    """
    num = len(stage_blocks)
    for key, value in (('stages', stages), ('blocks', blocks)):
        if value is not None and not isinstance(value, (list, tuple)):
            raise TypeError(f'{name}: sbp.{key} must be a list or tuple (one entry per stage), '
                            f'got {value!r}')
    if stages is not None and blocks is not None:
        raise ValueError(f'{name}: give sbp.stages or sbp.blocks, not both')
    if blocks is not None:
        if len(blocks) != num or any(len(b) != n for b, n in zip(blocks, stage_blocks)):
            raise ValueError(f'{name}: sbp.blocks must have {num} lists of lengths '
                             f'{list(stage_blocks)}, got {[len(b) for b in blocks]}')
        switches = [[bool(s) for s in b] for b in blocks]
        asked = [any(s) for s in switches]
    else:
        if stages is not None and len(stages) != num:
            raise ValueError(f'{name}: sbp.stages must have {num} entries (one per '
                             f'stage), got {len(stages)}')
        asked = [bool(s) for s in stages] if stages is not None else [
            frozen_stages <= i < num - 1 for i in range(num)]
        switches = [[s] * n for s, n in zip(asked, stage_blocks)]
    frozen = [i for i in range(num) if asked[i] and i < frozen_stages]
    if frozen:
        raise ValueError(
            f'{name}: SBP asked on frozen stage(s) {frozen} (frozen_stages='
            f'{frozen_stages}); frozen stages compute no gradients, so SBP would '
            'change nothing there. Turn it off for those stages in sbp.stages/sbp.blocks.')
    return switches


def stage_layers(stages: Sequence[Sequence[nn.Module]], switches: Sequence[Sequence[bool]],
                 stem_stride: int, stage_strides: Sequence[int]) -> List[Tuple[nn.Module, int]]:
    """``(block, input stride)`` of the switched-on blocks of a staged backbone
    (the first block of a stage reads the previous stage's stride)."""
    layers, in_stride = [], stem_stride
    for blocks, stage_on, stride in zip(stages, switches, stage_strides):
        for j, (block, on) in enumerate(zip(blocks, stage_on)):
            if on:
                layers.append((block, in_stride if j == 0 else stride))
        in_stride = stride
    return layers
