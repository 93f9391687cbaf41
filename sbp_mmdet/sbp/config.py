"""Validated SBP settings shared by every SBP module."""
from dataclasses import dataclass, fields
from typing import Any, Mapping, Optional, Union

from .policies import MASK_POLICIES, build_mask_policy

GRAD_SCALES = ('none', 'inverse_keep')


@dataclass(frozen=True)
class SBPConfig:
    """The ``sbp=dict(...)`` keys common to SBP backbones and necks.

    Args:
        keep_ratio (float): fraction of feature-map rows whose gradients are
            computed in the backward pass, in (0, 1]. 1.0 is plain backprop.
            Default: 0.5.
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
        grad_scale (str): ``'none'`` (the paper's code) leaves parameter
            gradients as the sum over kept positions; ``'inverse_keep'``
            divides them by the realised keep fraction so that their
            expectation matches the dense gradient. Default: ``'none'``.
        recompute (bool | str): ``True`` stores only what cannot be
            recomputed cheaply (the inputs of k x k convolutions on the kept
            region) and recomputes the rest of each block in backward, on the
            kept region only: SBP combined with checkpointing. ``'all'``
            stores only each block's input (at the rows its convolutions'
            halos reach) and recomputes every layer of the block in backward:
            the choice for towers of equally wide k x k convs (dense heads),
            where every layer feeds a k x k conv; in bottlenecks, whose input
            is wider than their 3x3 conv's, ``True`` stores less. The same
            gradients either way. Default: False.
        exact_input_grad (bool): SBP on the parameters' gradients only: every
            layer's input gets the exact gradient of every row (computed from
            the weights, eval-mode BatchNorm scales and the ReLUs' signs, kept
            at one bit per element), the parameters learn on the kept rows.
            It stores what SBP stores (plus the sign bits), cuts no gradient
            path, and computes the input gradients densely in backward. Needs
            layers of convolutions, BatchNorm in eval mode (``norm_eval=True``,
            the COCO practice), residual adds and ReLUs. Default: False.
    """

    keep_ratio: float = 0.5
    sampling: str = 'grid'
    per_image: bool = False
    grid_cell: int = 2
    grad_scale: str = 'none'
    recompute: Union[bool, str] = False
    exact_input_grad: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.keep_ratio, bool) or not isinstance(self.keep_ratio, (int, float)):
            raise TypeError(f'sbp.keep_ratio must be a number in (0, 1], got {self.keep_ratio!r}')
        if not 0.0 < float(self.keep_ratio) <= 1.0:
            raise ValueError(f'sbp.keep_ratio must be in (0, 1], got {self.keep_ratio}')
        if not isinstance(self.sampling, str) or self.sampling not in MASK_POLICIES:
            build_mask_policy(self.sampling)  # raises, naming the registered policies
        if not isinstance(self.per_image, bool):
            raise TypeError(f'sbp.per_image must be True or False, got {self.per_image!r}')
        if isinstance(self.grid_cell, bool) or not isinstance(self.grid_cell, int) \
                or self.grid_cell < 1:
            raise ValueError(f'sbp.grid_cell must be a positive int, got {self.grid_cell!r}')
        if self.grad_scale not in GRAD_SCALES:
            raise ValueError(f'sbp.grad_scale must be one of {GRAD_SCALES}, '
                             f'got {self.grad_scale!r}')
        if not (isinstance(self.recompute, bool) or self.recompute == 'all'):
            raise ValueError(f"sbp.recompute must be True, False or 'all', got {self.recompute!r}")
        if not isinstance(self.exact_input_grad, bool):
            raise TypeError(f'sbp.exact_input_grad must be True or False, '
                            f'got {self.exact_input_grad!r}')

    @classmethod
    def from_dict(cls, cfg: Optional[Mapping[str, Any]], extra_keys: tuple = (),
                  owner: str = 'sbp') -> tuple['SBPConfig', dict]:
        """Split ``cfg`` into common settings and the owner's extra keys.

        Raises:
            KeyError: for a key that is neither common nor one of
                ``extra_keys``, naming the key and the allowed ones.
        """
        cfg = dict(cfg or {})
        common = {f.name for f in fields(cls)}
        unknown = sorted(set(cfg) - common - set(extra_keys))
        if unknown:
            allowed = sorted(common | set(extra_keys))
            raise KeyError(f'{owner}: unknown key(s) {unknown} in sbp=dict(...); '
                           f'allowed keys are {allowed}')
        extras = {k: cfg.pop(k) for k in list(cfg) if k in extra_keys}
        return cls(**cfg), extras
