"""Whole detectors under CPU autocast: the two mmcv ops without half-precision CPU kernels.

On CUDA, mmcv's NMS and RoIAlign run on fp16 inputs, and under autocast mmdet's
RPN decodes its boxes in fp32 anyway (``exp`` is on CUDA autocast's fp32 list,
so the decoded boxes are promoted). On the CPU both ops accept fp32 only
(``expected scalar type Float but found BFloat16``), so a two-stage detector
cannot run a training step under bf16 autocast there. ``cpu_autocast_fallbacks``
makes it run the way the CUDA path effectively does:

- the RPN's outputs are cast to fp32, so its proposal step (box decoding and
  NMS) and its losses run in fp32, as on CUDA;
- every ``mmcv.ops.RoIAlign`` pools fp32 copies of its half-precision inputs and
  returns the autocast dtype, as the CUDA kernel returns the features' dtype.

Everything else (backbone, neck, SBP units, heads' convolutions and FCs) runs
under autocast unchanged. The hooks act only on CPU tensors in half precision,
so they change nothing on CUDA or in fp32. They are for measuring and testing
mixed precision on machines without a GPU (``benchmark_sbp.py``'s AMP variants);
GPU training needs none of this.
"""
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from mmcv.ops import RoIAlign
from torch import nn

HALF = (torch.float16, torch.bfloat16)


def _is_cpu_half(value: Any) -> bool:
    return torch.is_tensor(value) and value.device.type == 'cpu' and value.dtype in HALF


def _to_fp32(value: Any) -> Any:
    """``value`` with its CPU half-precision tensors (also inside lists and tuples) in fp32."""
    if _is_cpu_half(value):
        return value.float()
    if isinstance(value, (list, tuple)):
        return type(value)(_to_fp32(v) for v in value)
    return value


def _outputs_to_fp32(module: nn.Module, args: tuple, output: Any) -> Any:
    return _to_fp32(output)


def _inputs_to_fp32(module: nn.Module, args: tuple) -> tuple:
    return _to_fp32(args)


def _output_to_autocast_dtype(module: nn.Module, args: tuple, output: Any) -> Any:
    if output.device.type == 'cpu' and torch.is_autocast_enabled('cpu'):
        return output.to(torch.get_autocast_dtype('cpu'))
    return output


@contextmanager
def cpu_autocast_fallbacks(model: nn.Module) -> Iterator[nn.Module]:
    """Let ``model`` train under CPU autocast (see the module docstring).

    Example:
        >>> with cpu_autocast_fallbacks(model), torch.autocast('cpu', torch.bfloat16):
        ...     losses = model(**data, mode='loss')
    """
    handles = []
    rpn_head = getattr(model, 'rpn_head', None)
    if isinstance(rpn_head, nn.Module):
        handles.append(rpn_head.register_forward_hook(_outputs_to_fp32))
    for module in model.modules():
        if isinstance(module, RoIAlign):
            handles.append(module.register_forward_pre_hook(_inputs_to_fp32))
            handles.append(module.register_forward_hook(_output_to_autocast_dtype))
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()
