"""mmdet's Swin Transformer with Stochastic Backpropagation."""
from contextlib import contextmanager
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
import torch.utils.checkpoint as cp
from mmdet.models.backbones.swin import ShiftWindowMSA, SwinBlock, SwinTransformer, WindowMSA
from mmdet.models.layers import PatchMerging
from mmdet.registry import MODELS
from torch import Tensor, nn

from ...sbp import (Add, ChannelsLast, DropPath, IdentityMix, LinearMix, SBPBackboneMixin,
                    SBPLayerMixin, SBPProgram, UnfoldMix, Unit)
from ...sbp.module import stage_switches, warn_with_cp_without_recompute

HWShape = Tuple[int, int]


def token_map(x: Tensor, hw_shape: Sequence[int]) -> Tensor:
    """The ``(B, C, H, W)`` view of ``(B, H * W, C)`` tokens (no copy)."""
    return x.view(x.shape[0], *hw_shape, x.shape[2]).permute(0, 3, 1, 2)


def map_tokens(x: Tensor) -> Tensor:
    """The ``(B, H * W, C)`` tokens of a ``(B, C, H, W)`` map (a view of a
    channels-last map)."""
    return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, x.shape[1])


class _SBPTokenLayerMixin(SBPLayerMixin):
    """An SBP layer on ``(B, H * W, C)`` tokens, called as ``forward(x, hw_shape)``.

    ``SBPLayerMixin.forward`` runs the program on its input as it comes; a
    token layer's program runs on the ``(B, C, H, W)`` view of the tokens
    (whose rows the mask keeps), which needs ``hw_shape``, and the layer
    returns what its mmdet class returns (tokens; ``PatchMerging`` also the
    output shape). Hence this one forward override: densely it is the
    mixin's (the mmdet class's forward), with ``sbp_state`` set it is
    ``sbp_token_forward``, which runs ``sbp_program()`` with ``sbp_state``
    and ``sbp_cfg``.
    """

    def sbp_token_forward(self, x: Tensor, hw_shape: HWShape):
        """The layer's SBP forward on tokens ``x`` of grid ``hw_shape``."""
        raise NotImplementedError

    def forward(self, x: Tensor, hw_shape: HWShape):
        if self.sbp_state is None:
            return super().forward(x, hw_shape)
        return self.sbp_token_forward(x, hw_shape)


def _no_dropout(module: nn.Module, where: str, rate: str) -> None:
    """Refuse an element-wise dropout that draws (its re-run on kept rows would
    draw other numbers); ``rate``: the argument that sets it."""
    if isinstance(module, nn.Dropout) and module.p > 0:
        raise TypeError(f'{where}: SBP does not support element-wise dropout (p={module.p}); '
                        f"set {rate}=0 (mmdet's Swin configs do) or run the stage densely "
                        '(sbp.stages)')


class _KeptQueryAttention(torch.autograd.Function):
    """``WindowMSA`` (QKV projection, window attention, output projection)
    whose backward reads the output gradient at the kept queries only.

    Forward is mmdet's ``WindowMSA.forward`` itself (its intermediates read by
    forward hooks). It stores the input windows and the keys and values in
    full (every query of a window reads them), the queries, the attention
    probabilities and the output projection's input at the kept queries only.
    The gradient it gives is exact where the output gradient at dropped
    queries is zero, as in an SBP block, whose MLP units pass no gradient to
    dropped rows.
    """

    @staticmethod
    def forward(ctx, msa: WindowMSA, keep: Tensor, mask: Optional[Tensor], x: Tensor,
                *params: Optional[Tensor]) -> Tensor:
        seen = {}
        hooks = [msa.qkv.register_forward_hook(lambda m, a, out: seen.update(qkv=out)),
                 msa.softmax.register_forward_hook(lambda m, a, out: seen.update(probs=out)),
                 msa.proj.register_forward_hook(lambda m, a, out: seen.update(heads=a[0]))]
        try:
            out = WindowMSA.forward(msa, x, mask)
        finally:
            for hook in hooks:
                hook.remove()
        windows, tokens, channels = x.shape
        qkv = seen['qkv'].view(windows * tokens, 3, channels)
        kept = torch.nonzero(keep.flatten()).flatten().to(x.device)
        probs = seen['probs'].transpose(1, 2).reshape(windows * tokens, msa.num_heads, tokens)
        ctx.msa, ctx.kept, ctx.shape, ctx.input_dtype = msa, kept, x.shape, x.dtype
        ctx.save_for_backward(x, qkv[:, 1:].contiguous(), qkv[kept, 0], probs[kept],
                              seen['heads'].reshape(windows * tokens, channels)[kept])
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        msa, kept, (windows, tokens, channels) = ctx.msa, ctx.kept, ctx.shape
        # in fp32 at least (under autocast, the stored rows are half precision)
        dtype = torch.promote_types(ctx.saved_tensors[1].dtype, torch.float32)
        x, kv, q, probs, heads = (t.to(dtype) for t in ctx.saved_tensors)
        heads_num = msa.num_heads
        dim = channels // heads_num

        def full(rows: Tensor, shape: Sequence[int]) -> Tensor:
            """``rows`` at the kept tokens, zero at the others, as ``shape``."""
            out = rows.new_zeros(windows * tokens, *rows.shape[1:])
            return out.index_copy_(0, kept, rows).view(*shape)

        grad = grad_out.reshape(-1, channels)[kept].to(dtype)
        proj_w = msa.proj.weight
        grad_proj_w = grad.t().mm(heads).to(proj_w.dtype)
        grad_proj_b = None if msa.proj.bias is None else grad.sum(0).to(proj_w.dtype)
        grad_heads = full(grad.mm(proj_w.to(dtype)), (windows, tokens, heads_num, dim))
        grad_heads = grad_heads.transpose(1, 2)  # (B', h, N, d)
        probs = full(probs, (windows, tokens, heads_num, tokens)).transpose(1, 2)
        q = full(q, (windows, tokens, heads_num, dim)).transpose(1, 2) * msa.scale
        k, v = kv.view(windows, tokens, 2, heads_num, dim).permute(2, 0, 3, 1, 4)
        grad_v = probs.transpose(-2, -1) @ grad_heads
        grad_probs = grad_heads @ v.transpose(-2, -1)
        grad_scores = probs * (grad_probs - (grad_probs * probs).sum(-1, keepdim=True))
        grad_q = (grad_scores @ k) * msa.scale
        grad_k = grad_scores.transpose(-2, -1) @ q
        table = msa.relative_position_bias_table
        grad_table = torch.zeros_like(table, dtype=dtype).index_add_(
            0, msa.relative_position_index.view(-1),
            grad_scores.sum(0).permute(1, 2, 0).reshape(-1, heads_num)).to(table.dtype)
        grad_qkv = torch.stack([grad_q, grad_k, grad_v]).permute(1, 3, 0, 2, 4)
        grad_qkv = grad_qkv.reshape(windows * tokens, 3 * channels)
        qkv_w = msa.qkv.weight
        grad_x = grad_qkv.mm(qkv_w.to(dtype)).view(ctx.shape).to(ctx.input_dtype)
        grad_qkv_w = grad_qkv.t().mm(x.reshape(-1, channels)).to(qkv_w.dtype)
        grad_qkv_b = None if msa.qkv.bias is None else grad_qkv.sum(0).to(qkv_w.dtype)
        return (None, None, None, grad_x, grad_qkv_w, grad_qkv_b, grad_table, grad_proj_w,
                grad_proj_b)


class SBPWindowMSA(WindowMSA):
    """``WindowMSA`` that, while ``sbp_keep`` (the kept queries, ``(B', N)``
    in window layout) is set, runs as ``_KeptQueryAttention``."""

    sbp_keep: Optional[Tensor] = None

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        if self.sbp_keep is None:
            return super().forward(x, mask)
        return _KeptQueryAttention.apply(self, self.sbp_keep, mask, x, self.qkv.weight,
                                         self.qkv.bias, self.relative_position_bias_table,
                                         self.proj.weight, self.proj.bias)


def window_keep(attn: ShiftWindowMSA, rows: Tensor, batch: int, hw_shape: HWShape) -> Tensor:
    """The kept tokens of a ``(H, W)`` grid whose kept rows are ``rows``
    (``(R,)`` or ``(B, R)``), in ``attn``'s window layout ``(B * nW, N)``: padded
    and shifted as its queries are (padding is never kept)."""
    height, width = hw_shape
    size = attn.window_size
    keep = torch.zeros(batch, height + (-height) % size, width + (-width) % size, 1,
                       dtype=torch.bool)
    rows = rows.expand(batch, -1) if rows.dim() == 1 else rows
    keep[:, :height, :width] = torch.zeros(batch, height, dtype=torch.bool).scatter_(
        1, rows, True)[:, :, None, None]
    if attn.shift_size > 0:
        keep = torch.roll(keep, shifts=(-attn.shift_size, -attn.shift_size), dims=(1, 2))
    return attn.window_partition(keep).view(-1, size * size)


@contextmanager
def _kept_queries(msa: SBPWindowMSA, keep: Optional[Tensor]) -> Iterator[None]:
    """Run ``msa`` on the kept queries ``keep`` (None: densely) while inside."""
    msa.sbp_keep = keep
    try:
        yield
    finally:
        msa.sbp_keep = None


def kept_query_attention(block: nn.Module, where: str) -> None:
    """Make the window attention of SBP block ``block`` an ``SBPWindowMSA``,
    in place (same parameters and ``state_dict`` keys).

    It is no SBP layer (``adopt``): it runs no program and gets no state from
    the backbone; its block hands it the kept queries for one call.

    Raises:
        TypeError: for another attention class, or attention dropout, naming
            ``where``.
    """
    msa = block.attn.w_msa
    if type(msa) is not WindowMSA:
        raise TypeError(f'{where}.attn.w_msa: SBP attention supports mmdet\'s WindowMSA, got '
                        f'{type(msa).__qualname__}; set sbp.attention=False')
    _no_dropout(msa.attn_drop, f'{where}.attn', 'attn_drop_rate (or sbp.attention=False)')
    msa.__class__ = SBPWindowMSA


class SBPSwinBlock(_SBPTokenLayerMixin, SwinBlock):
    """``SwinBlock`` whose MLP branch runs with SBP; the attention branch
    (``norm1``, shifted-window attention, DropPath, residual add) computes
    densely.

    The MLP branch is three SBP units on the token map: ``norm2`` (nothing
    stored: re-run from the kept rows of its input), ``fc1`` and GELU, ``fc2``,
    layer scale, DropPath and the residual add. It stores its input and the
    outputs of ``fc1`` and ``fc2`` (the latter only under DropPath) at the
    kept rows. With ``sbp.recompute`` the block stores its input alone, as
    mmdet's checkpointing does, and re-runs in backward (the MLP's backward
    on the kept rows); its ``with_cp`` checkpoints it only where it runs
    densely (mmdet's forward).

    With its window attention made an ``SBPWindowMSA``
    (``kept_query_attention``), the attention stores its queries, attention
    probabilities and output projection input at the kept rows only
    (``_KeptQueryAttention``): the MLP units pass no gradient to dropped rows,
    so dropped queries get none either, and the gradients are those of the
    dense attention.
    """

    def build_sbp_program(self) -> SBPProgram:
        where, ffn = self.sbp_where, self.ffn
        if ffn.num_fcs != 2 or not ffn.add_identity:
            raise TypeError(f'{where}: SBP supports the FFN of two linear layers with its '
                            'residual add (num_fcs=2, add_identity=True)')
        (fc1, act, drop1), fc2, drop2 = ffn.layers
        for drop in (drop1, drop2):
            _no_dropout(drop, f'{where}.ffn', 'drop_rate')
        tail = () if isinstance(ffn.gamma2, nn.Identity) else (ChannelsLast(ffn.gamma2),)
        if getattr(ffn.dropout_layer, 'drop_prob', 0.0) > 0:
            tail += (DropPath(ffn.dropout_layer),)
        return SBPProgram([
            Unit('norm2', 'input', IdentityMix(), (ChannelsLast(self.norm2),)),
            Unit('fc1', 'norm2', LinearMix(fc1, where=f'{where}.ffn.layers.0.0'),
                 (ChannelsLast(act),)),
            Unit('fc2', 'fc1', LinearMix(fc2, where=f'{where}.ffn.layers.1'),
                 tail + (Add('input'),)),
        ], where=where)

    def sbp_token_forward(self, x: Tensor, hw_shape: HWShape) -> Tensor:
        state, program, cfg = self.sbp_state, self.sbp_program(), self.sbp_cfg
        keep = None
        if isinstance(self.attn.w_msa, SBPWindowMSA):
            rows = state.iteration.kept_rows(state.stride, hw_shape[0])
            keep = window_keep(self.attn, rows, x.shape[0], hw_shape)

        def block(x: Tensor) -> Tensor:  # also re-run by checkpointing, once sbp_state is unset
            with _kept_queries(self.attn.w_msa, keep):
                x = self.attn(self.norm1(x), hw_shape) + x  # as SwinBlock: attn + identity
            return map_tokens(state.run(program, token_map(x, hw_shape), cfg))

        if cfg.recompute and x.requires_grad:
            return cp.checkpoint(block, x, use_reentrant=True)  # mmdet's checkpointing mode
        return block(x)


class SBPPatchMerging(_SBPTokenLayerMixin, PatchMerging):
    """``PatchMerging`` (2x2 patches, stride 2, corner padding) as two SBP
    units: the 2x2 unfold and LayerNorm, the reduction ``Linear``. It stores
    its input's rows under the kept output rows (two per kept row) and nothing
    else: backward re-runs the unfold and the norm from them (dense, it stores
    the norm's input and output, twice the input)."""

    def build_sbp_program(self) -> SBPProgram:
        where, sampler = self.sbp_where, self.sampler
        if (sampler.kernel_size, sampler.stride, sampler.dilation, sampler.padding) != (
                (2, 2), (2, 2), (1, 1), (0, 0)) or (
                self.adap_padding is not None and self.adap_padding.padding != 'corner'):
            raise TypeError(f'{where}: SBP supports 2x2 patch merging with stride 2 and corner '
                            "padding (mmdet's Swin); set sbp.downsample=False for others")
        tail = (ChannelsLast(self.norm),) if self.norm is not None else ()
        return SBPProgram([
            Unit('sampler', 'input', UnfoldMix(2), tail),
            Unit('reduction', 'sampler', LinearMix(self.reduction, where=f'{where}.reduction')),
        ], where=where)

    def sbp_token_forward(self, x: Tensor, hw_shape: HWShape) -> Tuple[Tensor, HWShape]:
        x = token_map(x, hw_shape)
        if self.adap_padding is not None:  # pads bottom and right to even sizes
            x = self.adap_padding(x)
        out = self.sbp_state.run(self.sbp_program(), x, self.sbp_cfg)
        return map_tokens(out), tuple(out.shape[2:])


@MODELS.register_module()
class SwinTransformerSBP(SBPBackboneMixin, SwinTransformer):
    """mmdet's Swin Transformer whose blocks train with Stochastic Backpropagation.

    A drop-in replacement for mmdet's ``SwinTransformer`` (swap
    ``type='SwinTransformer'`` for ``type='SwinTransformerSBP'``): same
    arguments, same ``state_dict`` keys (mmdet's Swin checkpoints load),
    identical outputs (bit for bit, with the same random DropPath draws). In
    training, the chosen stages compute the gradients of their blocks' MLP
    branches on the kept rows of the stage's ``(H, W)`` token grid only
    (``SBPSwinBlock``), their window attention stores what its backward reads
    at the kept queries only (the gradients of the dense attention), and the
    patch merging layers in front of SBP stages run as SBP units
    (``SBPPatchMerging``). The mask is the detector's base mask, at each
    stage's stride. SBP is off in eval mode and under ``torch.no_grad()``.
    The modules keep their parameters and ``state_dict`` keys; only their
    class is swapped for an SBP subclass (``sbp_adopt``). The patch embedding
    and the output norms run densely.

    Args:
        sbp (dict, optional): SBP settings. Keys: ``keep_ratio``,
            ``sampling``, ``per_image``, ``grid_cell``, ``grad_scale``,
            ``recompute`` (as ``ResNetSBP``; on a block: store its input
            alone and re-run it in backward; the blocks' ``with_cp``
            checkpoints only the blocks that run densely),
            ``exact_input_grad`` (refused: no BatchNorm convolutions),
            ``overrides`` (per-stage layer keys, the stages named ``stage0``,
            ``stage1``, ...; the patch merging in front of stage ``i``,
            mmdet's ``stages[i - 1].downsample``, takes stage ``i``'s),
            ``stages`` (Sequence[bool]) or ``blocks``
            (Sequence[Sequence[bool]]): SBP per stage or per block (default:
            every stage but the last, skipping frozen stages, the paper's
            practice), ``downsample`` (bool, default True): run the patch
            merging in front of an SBP stage with SBP, and ``attention``
            (bool, default True): the window attention of SBP blocks stores
            its queries, attention probabilities and output projection input
            at the kept rows only (False: what mmdet's stores).
        *args, **kwargs: the arguments of mmdet's ``SwinTransformer``,
            positional ones in its order (``sbp`` is keyword-only);
            ``drop_rate`` (and ``attn_drop_rate`` with ``sbp.attention``)
            must be 0 where SBP is on (element-wise dropout).

    Raises:
        ValueError: for a bad ``sbp`` value. KeyError: for an unknown key.
        TypeError: for layers SBP cannot run (dropout, other patch merging,
            ``exact_input_grad``), naming the layer.
    """

    def __init__(self, *args, sbp: Optional[dict] = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        extra = self.init_sbp(sbp, draws_mask=True,
                              groups=[f'stage{i}' for i in range(len(self.stages))],
                              extra_keys=('stages', 'blocks', 'downsample', 'attention'))
        patch_stride = self.patch_embed.projection.stride[0]
        self.stage_strides = [patch_stride]
        for stage in self.stages[:-1]:
            self.stage_strides.append(self.stage_strides[-1] * stage.downsample.sampler.stride[0])
        depths = [len(stage.blocks) for stage in self.stages]
        self.sbp_blocks = stage_switches(self.sbp_name, depths, self.frozen_stages,
                                         extra.get('stages'), extra.get('blocks'))
        for key in ('downsample', 'attention'):
            if not isinstance(extra.get(key, True), bool):
                raise ValueError(f'{self.sbp_name}: sbp.{key} must be True or False, '
                                 f'got {extra[key]!r}')
        self.sbp_downsample = extra.get('downsample', True)
        self.sbp_attention = extra.get('attention', True)
        self.sbp_layer_inputs = self._adopt_sbp_layers()
        warn_with_cp_without_recompute(self)
        sbp_strides = [self.stage_strides[i] for i, s in enumerate(self.sbp_blocks) if any(s)]
        self.sbp_base_stride = max(sbp_strides, default=patch_stride)

    def _adopt_sbp_layers(self) -> List[Tuple[nn.Module, int]]:
        """Make the blocks and patch merging layers that run with SBP SBP
        layers (``sbp_adopt``); their ``(layer, input stride)``."""
        layers = []
        for i, switches in enumerate(self.sbp_blocks):
            group = f'stage{i}'
            # the patch merging in front of stage i ends stage i - 1 (frozen with it)
            if self.sbp_downsample and switches[0] and i > max(self.frozen_stages, 0):
                merging = self.sbp_adopt(self.stages[i - 1].downsample, (SBPPatchMerging,),
                                         f'stages.{i - 1}.downsample', group)
                layers.append((merging, self.stage_strides[i - 1]))
            for j, (block, on) in enumerate(zip(self.stages[i].blocks, switches)):
                if on:
                    self.sbp_adopt(block, (SBPSwinBlock,), f'stages.{i}.blocks.{j}', group)
                    if self.sbp_attention:
                        kept_query_attention(block, block.sbp_where)
                    layers.append((block, self.stage_strides[i]))
        return layers
