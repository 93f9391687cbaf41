"""Boolean maps stored at one bit per element (ReLU masks kept for backward)."""
import torch
from torch import Tensor

_SHIFTS = tuple(range(8))


def pack_bits(mask: Tensor) -> Tensor:
    """``mask`` (bool, any shape) as ``uint8``, eight elements per byte."""
    flat = mask.reshape(-1)
    pad = -flat.numel() % 8
    if pad:
        flat = torch.cat((flat, flat.new_zeros(pad)))
    bits = flat.view(-1, 8).to(torch.uint8)
    packed = bits[:, 0].clone()
    for shift in _SHIFTS[1:]:
        packed |= bits[:, shift] << shift
    return packed


def unpack_bits(packed: Tensor, shape: torch.Size) -> Tensor:
    """The bool tensor of ``shape`` that ``pack_bits`` packed."""
    shifts = torch.tensor(_SHIFTS, dtype=torch.uint8, device=packed.device)
    bits = (packed[:, None] >> shifts) & 1
    return bits.view(-1)[:shape.numel()].view(shape).bool()
