"""What every SBP backbone, neck and head shares."""
import inspect
from contextlib import contextmanager
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .config import SBPConfig
from .context import SBPFeatures
from .masks import RowMaskSampler, SBPIteration
from .program import SBPProgram
from .state import SBPState, sbp_states
from .tracing import check_module_not_traced, mark_sbp_layers

Layers = Iterable[Tuple[nn.Module, int]]


def dense_class(cls: type) -> type:
    """The class ``cls`` adds SBP to: the first class in its MRO that is no
    SBP mixin (``ResNetSBP`` -> mmdet's ``ResNet``)."""
    return next(c for c in cls.__mro__ if not issubclass(c, SBPModuleMixin))


def sbp_signature(cls: type) -> inspect.Signature:
    """The signature of SBP class ``cls``: its dense class's parameters, in
    their order, then the keyword-only ``sbp`` (before a ``**kwargs``)."""
    params = list(inspect.signature(dense_class(cls)).parameters.values())
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
    ``sbp_signature``), calls ``init_sbp`` there and, in a training forward, either draws the
    iteration (``sbp_draw``, the backbone) or follows its input's
    (``sbp_follow``, necks and heads), runs the parent's forward inside
    ``sbp_layers`` and returns ``SBPFeatures`` with its outputs' strides. Its
    layers are modules with a ``sbp_program()`` and a ``sbp_state`` attribute
    (``SBPConvModule``, the SBP residual blocks).

    ``sbp=dict(...)`` keys: ``keep_ratio``, ``sampling``, ``per_image``,
    ``grid_cell``, ``grad_scale``, ``recompute`` and ``exact_input_grad``
    (see ``SBPConfig``), plus
    the module's own (``extra_keys`` of ``init_sbp``). A module that follows
    its input's mask uses that mask's keep ratio, sampling and per-image
    setting: given ``keep_ratio``, ``sampling`` or ``per_image`` must agree
    with it.

    Attributes:
        sbp_cfg (SBPConfig): the validated settings.
        mask_sampler (RowMaskSampler): draws the masks (``SBPHook`` schedules
            its keep ratio).
        sbp_iteration (SBPIteration): the iteration of the last training
            forward (for hooks and tests), None before.
    """

    sbp_iteration: Optional[SBPIteration] = None
    __signature__ = _SBPSignature()

    def init_sbp(self, sbp: Optional[dict], extra_keys: Tuple[str, ...] = ()) -> dict:
        """Validate ``sbp``; returns the values of ``extra_keys`` that were given."""
        self.sbp_given = dict(sbp or {})
        self.sbp_cfg, extras = SBPConfig.from_dict(sbp, extra_keys, self.sbp_name)
        self.mask_sampler = RowMaskSampler(self.sbp_cfg)
        return extras

    @property
    def sbp_name(self) -> str:
        return type(self).__name__

    @property
    def keep_ratio(self) -> float:
        """The keep ratio in force (``SBPHook`` schedules may change it)."""
        return self.mask_sampler.keep_ratio

    @keep_ratio.setter
    def keep_ratio(self, value: float) -> None:
        self.mask_sampler.keep_ratio = SBPConfig(keep_ratio=value).keep_ratio

    def sbp_training(self) -> bool:
        """Whether this forward trains (SBP applies, possibly with a dense mask).

        Every SBP module's forward asks this first.

        Raises:
            SBPTracingError: under ``torch.fx.symbolic_trace`` (e.g. mmengine's
                ``efficient_conv_bn_eval``), which would record a dense graph
                (``sbp_mmdet.sbp.tracing``).
        """
        check_module_not_traced(self, self.sbp_name)
        return self.training and torch.is_grad_enabled()

    def sbp_draw(self, image_height: int, base_stride: int, dense: bool = False,
                 batch_size: int = 1) -> SBPIteration:
        """The iteration's mask, drawn by the first SBP module of the forward."""
        if dense or self.keep_ratio >= 1.0:
            return SBPIteration.dense(base_stride)
        return SBPIteration.sample(self.mask_sampler, image_height, base_stride, batch_size)

    def sbp_follow(self, inputs: Sequence) -> SBPFeatures:
        """The SBP context that ``inputs`` carry.

        Raises:
            ValueError: when ``inputs`` carry none (a module in between
                rebuilt them, or no SBP module drew a mask before this one),
                or when the module's settings disagree with the mask.
        """
        if not isinstance(inputs, SBPFeatures):
            raise ValueError(
                f"{self.sbp_name}: its inputs carry no SBP mask (they are a "
                f"{type(inputs).__name__}, not SBPFeatures): put it right behind an SBP module "
                '(e.g. ResNetSBP, FPNSBP), with nothing in between that rebuilds the feature '
                'tuple, or use its dense counterpart')
        iteration = inputs.iteration
        if iteration.keep_ratio != 1.0:
            for key in ('keep_ratio', 'sampling', 'per_image'):
                value = self.keep_ratio if key == 'keep_ratio' else getattr(self.sbp_cfg, key)
                if key in self.sbp_given and value != getattr(iteration, key):
                    raise ValueError(
                        f'{self.sbp_name}: sbp.{key}={value!r} disagrees with the mask it '
                        f'follows ({getattr(iteration, key)!r}); drop the key or make them equal')
        return inputs

    @contextmanager
    def sbp_layers(self, iteration: SBPIteration, layers: Layers) -> Iterator[None]:
        """Run ``(layer, input stride)`` pairs with SBP while inside, each with
        the settings ``sbp_layer_cfg`` gives it.

        Layers whose output stride the mask does not cover run densely (maps
        coarser than the base mask), and all of them with a dense mask.
        """
        self.sbp_iteration = iteration
        states = [(layer, self.sbp_state(iteration, stride, layer.sbp_program(),
                                         self.sbp_layer_cfg(layer)))
                  for layer, stride in layers]
        with sbp_states([(layer, state) for layer, state in states if state is not None]):
            yield

    def sbp_layer_cfg(self, layer: nn.Module) -> SBPConfig:
        """The settings ``layer`` runs with: the module's (a module that sets
        some per layer overrides this)."""
        return self.sbp_cfg

    def sbp_state(self, iteration: SBPIteration, stride: int, program: SBPProgram,
                  cfg: Optional[SBPConfig] = None) -> Optional[SBPState]:
        """The state to run ``program`` on a map at ``stride`` with settings
        ``cfg`` (default: the module's); None where it runs densely (a dense
        mask, or maps coarser than the base mask)."""
        if iteration.keep_ratio == 1.0 or not iteration.covers(stride * program.stride):
            return None
        return SBPState(iteration, stride, cfg or self.sbp_cfg)


class SBPBackboneMixin(SBPModuleMixin):
    """The forward of an SBP backbone: draws the iteration's mask and runs its layers.

    A backbone subclasses it before its parent class and sets, in ``__init__``:
    ``sbp_layer_inputs`` (``(layer, input stride)`` of its SBP layers),
    ``sbp_base_stride`` (the coarsest stride they run at: the base mask's) and
    ``stage_strides`` (the output stride of each stage, read with the parent's
    ``out_indices``). Its training forward returns ``SBPFeatures``; in eval
    mode and under ``torch.no_grad()`` it is the parent's forward.
    """

    sbp_layer_inputs: List[Tuple[nn.Module, int]] = []

    def sbp_check_layers(self) -> None:
        """Build each SBP layer's program now, so that a layer SBP cannot run
        (or, with ``exact_input_grad``, cannot give exact input gradients)
        fails at build time, naming it, and mark them as SBP layers (torch.fx
        may not trace them). BatchNorm's mode is checked at each training
        forward: ``norm_eval`` sets it only then."""
        mark_sbp_layers(layer for layer, _ in self.sbp_layer_inputs)
        for layer, _ in self.sbp_layer_inputs:
            program = layer.sbp_program()
            if self.sbp_layer_cfg(layer).exact_input_grad:
                program.check_exact_input_grad(layer.sbp_where, modes=False)

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
