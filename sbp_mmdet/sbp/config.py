"""The ``sbp=dict(...)`` settings, each with one owner.

- Mask keys (``MaskConfig``) belong to the module that draws the iteration's
  mask: the backbone (or a neck given ``own_mask=True``). Every SBP module
  behind it follows that mask, so a neck or head refuses them, naming where
  they belong: one place to write them, nothing to keep in agreement.
- Layer keys (``LayerConfig``) belong to each SBP module: its layers run with
  them. A module with named groups of layers (a backbone's stages, the FPN's
  lateral and output convs) takes per-group overrides in one form:
  ``sbp=dict(recompute=True, overrides=dict(output=dict(exact_input_grad=True)))``.
- A module's own structural keys (which stages, which convs) are its extras.

``parse_sbp`` splits and validates a module's dict; ``SBPSettings`` holds the
result.
"""
from dataclasses import dataclass, field, fields
from typing import Any, Dict, Mapping, Optional, Sequence, Union

from .policies import MASK_POLICIES, build_mask_policy

GRAD_SCALES = ('none', 'inverse_keep')


def check_keep_ratio(value: Any) -> float:
    """``value`` as a keep ratio in (0, 1].

    Raises:
        TypeError, ValueError: naming ``sbp.keep_ratio`` and the value.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f'sbp.keep_ratio must be a number in (0, 1], got {value!r}')
    if not 0.0 < float(value) <= 1.0:
        raise ValueError(f'sbp.keep_ratio must be in (0, 1], got {value}')
    return float(value)


@dataclass(frozen=True)
class MaskConfig:
    """The mask keys: how the module that draws the mask draws it.

    Args:
        keep_ratio (float): fraction of feature-map rows whose gradients are
            computed in the backward pass, in (0, 1]. 1.0 is plain backprop.
            ``SBPHook`` schedules may change it during training. Default: 0.5.
        sampling (str): the mask policy, a name registered with
            ``register_mask_policy`` (``policies.py``): ``'grid'`` keeps rows
            on a periodic grid whose offset is drawn per iteration (the
            paper's better practice; DDP ranks take complementary offsets);
            ``'random'`` keeps a random subset of rows; ``'objects'`` keeps
            the rows covering ground-truth boxes first (needs ``SBPHook``).
            Default: ``'grid'``.
        per_image (bool): draw one mask per image of the batch (all keeping
            the same number of rows) instead of one shared by the batch.
            Default: False.
        grid_cell (int): with ``'grid'`` sampling, rows of the base mask kept
            (or dropped) together. Taller cells make the halo of 3x3
            convolutions relatively smaller, saving memory and backward time;
            at finer strides cells are taller still. Default: 2.
    """

    keep_ratio: float = 0.5
    sampling: str = 'grid'
    per_image: bool = False
    grid_cell: int = 2

    def __post_init__(self) -> None:
        check_keep_ratio(self.keep_ratio)
        if not isinstance(self.sampling, str) or self.sampling not in MASK_POLICIES:
            build_mask_policy(self.sampling)  # raises, naming the registered policies
        if not isinstance(self.per_image, bool):
            raise TypeError(f'sbp.per_image must be True or False, got {self.per_image!r}')
        if isinstance(self.grid_cell, bool) or not isinstance(self.grid_cell, int) \
                or self.grid_cell < 1:
            raise ValueError(f'sbp.grid_cell must be a positive int, got {self.grid_cell!r}')


@dataclass(frozen=True)
class LayerConfig:
    """The layer keys: how an SBP module's layers run with the mask.

    Args:
        grad_scale (str): ``'none'`` (the paper's code) leaves parameter
            gradients as the sum over kept positions; ``'inverse_keep'``
            divides them by the realised keep fraction so that their
            expectation matches the dense gradient. Default: ``'none'``.
        recompute (bool | str): ``True`` stores only what cannot be
            recomputed cheaply (the inputs of k x k convolutions on the kept
            region) and recomputes the rest of each layer in backward, on the
            kept region only: SBP combined with checkpointing. ``'all'``
            stores only each layer's input (at the rows its convolutions'
            halos reach) and recomputes all of it in backward: the choice for
            towers of equally wide k x k convs (dense heads), where every
            layer feeds a k x k conv; in bottlenecks, whose input is wider
            than their 3x3 conv's, ``True`` stores less. The same gradients
            either way. This is the one switch for an SBP layer's
            recomputation: a backbone's ``with_cp`` checkpoints the blocks
            that run densely. Default: False.
        exact_input_grad (bool): SBP on the parameters' gradients only: every
            layer's input gets the exact gradient of every row (computed from
            the weights, eval-mode BatchNorm scales and the ReLUs' signs, kept
            at one bit per element), the parameters learn on the kept rows.
            It stores what SBP stores (plus the sign bits), cuts no gradient
            path, and computes the input gradients densely in backward. Needs
            layers of convolutions, BatchNorm in eval mode (``norm_eval=True``,
            the COCO practice), residual adds and ReLUs. Default: False.
    """

    grad_scale: str = 'none'
    recompute: Union[bool, str] = False
    exact_input_grad: bool = False

    def __post_init__(self) -> None:
        if self.grad_scale not in GRAD_SCALES:
            raise ValueError(f'sbp.grad_scale must be one of {GRAD_SCALES}, '
                             f'got {self.grad_scale!r}')
        if not (isinstance(self.recompute, bool) or self.recompute == 'all'):
            raise ValueError(f"sbp.recompute must be True, False or 'all', got {self.recompute!r}")
        if not isinstance(self.exact_input_grad, bool):
            raise TypeError(f'sbp.exact_input_grad must be True or False, '
                            f'got {self.exact_input_grad!r}')


MASK_KEYS = tuple(f.name for f in fields(MaskConfig))
LAYER_KEYS = tuple(f.name for f in fields(LayerConfig))


@dataclass(frozen=True)
class SBPSettings:
    """An SBP module's parsed ``sbp=dict(...)``.

    Attributes:
        mask (MaskConfig, optional): how the module draws the mask; None for a
            module that follows the mask of the module before it.
        layer (LayerConfig): the module's layer settings.
        groups (dict): group name -> the layer settings of that group (the
            module's, with the group's overrides); every group of the module.
        extras (dict): the module's own keys that were given.
    """

    mask: Optional[MaskConfig]
    layer: LayerConfig
    groups: Mapping[str, LayerConfig] = field(default_factory=dict)
    extras: Mapping[str, Any] = field(default_factory=dict)

    def for_group(self, group: Optional[str]) -> LayerConfig:
        """The layer settings of ``group`` (the module's for None)."""
        return self.layer if group is None else self.groups[group]


def parse_sbp(sbp: Optional[Mapping[str, Any]], owner: str, *, draws_mask: bool,
              groups: Sequence[str] = (), extra_keys: Sequence[str] = (),
              mask_home: str = 'the backbone') -> SBPSettings:
    """Split and validate the ``sbp`` dict of the SBP module ``owner``.

    Args:
        sbp: the dict (None: every default).
        owner: the module's name, in errors.
        draws_mask: whether the module draws the mask (and so takes the mask
            keys); a module that follows another's refuses them.
        groups: the names of the module's layer groups, which
            ``overrides=dict(name=dict(<layer keys>))`` may override.
        extra_keys: the module's own keys.
        mask_home: where the mask keys of a following module belong, for its
            error message.

    Raises:
        KeyError: for an unknown key or group, listing the allowed ones.
        ValueError: for a mask key on a module that follows another's mask,
            or a group-list value of a layer key, showing the spelling to use.
        TypeError, ValueError: for a bad value.
    """
    given = dict(sbp or {})
    allowed = (MASK_KEYS if draws_mask else ()) + LAYER_KEYS + tuple(extra_keys) \
        + (('overrides',) if groups else ())
    misplaced = [k for k in MASK_KEYS if k in given and not draws_mask]
    if misplaced:
        raise ValueError(
            f'{owner}: sbp.{misplaced[0]} is a mask setting, and this module follows the '
            f'mask that {mask_home} draws: set it there (e.g. model.backbone.sbp.'
            f'{misplaced[0]}), once for the whole detector')
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise KeyError(f'{owner}: unknown key(s) {unknown} in sbp=dict(...); allowed keys are '
                       f'{sorted(allowed)}' + _mask_keys_hint(unknown, draws_mask, mask_home))
    for key in LAYER_KEYS:
        _refuse_group_list(owner, key, given.get(key), groups)
    layer = LayerConfig(**{k: given[k] for k in LAYER_KEYS if k in given})
    return SBPSettings(
        mask=MaskConfig(**{k: given[k] for k in MASK_KEYS if k in given}) if draws_mask else None,
        layer=layer,
        groups=_parse_overrides(owner, given.get('overrides', {}), groups, layer),
        extras={k: given[k] for k in extra_keys if k in given})


def _mask_keys_hint(unknown: Sequence[str], draws_mask: bool, mask_home: str) -> str:
    return '' if draws_mask or not set(unknown) & set(MASK_KEYS) else \
        f' (mask keys belong to {mask_home})'


def _refuse_group_list(owner: str, key: str, value: Any, groups: Sequence[str]) -> None:
    """A layer key given as a list of groups (the old FPN spelling): refused,
    with the ``overrides`` spelling."""
    if isinstance(value, (list, tuple)):
        example = ', '.join(f'{g}=dict({key}=True)' for g in value) or f'<group>=dict({key}=True)'
        raise ValueError(f'{owner}: sbp.{key} takes one value for the module; per group write '
                         f'sbp=dict(overrides=dict({example})) (groups: {list(groups)})')


def _parse_overrides(owner: str, overrides: Any, groups: Sequence[str],
                     layer: LayerConfig) -> Dict[str, LayerConfig]:
    """Every group's layer settings: the module's, with the group's overrides."""
    if not isinstance(overrides, Mapping):
        raise TypeError(f'{owner}: sbp.overrides must be a dict of group name -> dict of layer '
                        f'keys {list(LAYER_KEYS)}, got {overrides!r}')
    unknown = sorted(set(overrides) - set(groups))
    if unknown:
        raise KeyError(f'{owner}: unknown group(s) {unknown} in sbp.overrides; its groups are '
                       f'{list(groups)}')
    settings: Dict[str, LayerConfig] = {}
    for group in groups:
        override = dict(overrides.get(group) or {})
        bad = sorted(set(override) - set(LAYER_KEYS))
        if bad:
            raise KeyError(f'{owner}: sbp.overrides.{group} takes the layer keys '
                           f'{list(LAYER_KEYS)}, got {bad}')
        values = {k: getattr(layer, k) for k in LAYER_KEYS}
        settings[group] = LayerConfig(**{**values, **override})
    return settings
