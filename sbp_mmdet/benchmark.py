"""Building blocks of the SBP benchmarks: variants, synthetic batches, one measured run."""
import copy
import platform
import resource
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

import torch
from mmengine.config import Config
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from .amp import cpu_autocast_fallbacks
from .models.sbp_types import SBP_BACKBONES
from .sbp import SavedTensorMeter

# What a benchmark step trains: the whole detector, or its backbone and neck alone.
PARTS = ('detector', 'backbone_neck')
# /proc/cpuinfo flags of the CPU's bf16 arithmetic (the vector and matrix instructions).
BF16_CPU_FLAGS = ('avx512_bf16', 'amx_bf16')

# SBP module type -> its dense type (the dense variant of a benchmark).
SBP_TYPES = {**{sbp: dense for dense, sbp in SBP_BACKBONES.items()}, 'FPNSBP': 'FPN',
             'RPNHeadSBP': 'RPNHead', 'RetinaHeadSBP': 'RetinaHead',
             'ConvNeXtSBP': 'mmpretrain.ConvNeXt'}  # mmdet configs name it with its scope


class FlopMeter(TorchDispatchMode):
    """Counts the FLOPs of the ops run inside the ``with`` block, with the
    formulas of ``torch.utils.flop_counter`` (convolutions, their backward,
    matrix products). Unlike ``FlopCounterMode`` it tracks no modules, whose
    gradient hooks break ``torch.autograd.grad`` calls made inside a backward
    (the SBP program's tail re-runs make them)."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


@dataclass(frozen=True)
class Variant:
    """One way to train the same detector.

    Args:
        name: label in tables, e.g. ``'sbp@0.5+recompute'``.
        keep_ratio: SBP keep ratio, or None for the dense modules.
        with_cp: mmdet's gradient checkpointing in the backbone.
        recompute: SBP's recompute switch.
        amp: mixed precision: ``torch.autocast`` in fp16 on CUDA, in bf16 on
            the CPU (with ``cpu_autocast_fallbacks``: the RPN's proposal step
            and RoIAlign in fp32, as the CUDA path effectively runs them).
        exact_input_grad: ``sbp.exact_input_grad`` on every SBP module.
    """

    name: str
    keep_ratio: Optional[float] = None
    with_cp: bool = False
    recompute: bool = False
    amp: bool = False
    exact_input_grad: bool = False

    @classmethod
    def parse(cls, name: str) -> 'Variant':
        """``dense``, ``with_cp``, ``amp`` (dense in mixed precision) or ``sbp@R``, each
        with ``+cp``/``+recompute``/``+amp`` flags, e.g. ``sbp@0.5+cp+amp``, and
        ``sbp@R`` with ``+exact`` (``exact_input_grad``)."""
        head, *flags = name.split('+')
        unknown = set(flags) - {'cp', 'recompute', 'amp', 'exact'}
        if unknown:
            raise ValueError(f'unknown variant flag(s) {sorted(unknown)} in {name!r}')
        keep = None
        if head.startswith('sbp@'):
            keep = float(head[4:])
        elif head == 'with_cp':
            flags.append('cp')
        elif head == 'amp':
            flags.append('amp')
        elif head != 'dense':
            raise ValueError(f'unknown variant {name!r}: use dense, with_cp, amp or sbp@R[+cp]'
                             '[+recompute][+amp][+exact]')
        if 'exact' in flags and keep is None:
            raise ValueError(f'variant {name!r}: +exact applies to sbp@R variants only')
        return cls(name, keep, 'cp' in flags, 'recompute' in flags, 'amp' in flags,
                   'exact' in flags)

    @property
    def is_dense(self) -> bool:
        """Plain backprop without checkpointing: the reference of its precision."""
        return self.keep_ratio is None and not self.with_cp

    def precision(self, device: str) -> str:
        """``'fp32'``, or the autocast dtype on ``device`` (``'fp16'``/``'bf16'``)."""
        if not self.amp:
            return 'fp32'
        return 'fp16' if device.startswith('cuda') else 'bf16'

    def apply(self, model_cfg: dict) -> dict:
        """A copy of ``model_cfg`` (with SBP modules) turned into this variant."""
        cfg = copy.deepcopy(model_cfg)
        for part in ('backbone', 'neck', 'rpn_head', 'bbox_head'):
            sub = cfg.get(part)
            if not isinstance(sub, dict):
                continue
            if self.keep_ratio is None:
                if sub.get('type') in SBP_TYPES:
                    sub['type'] = SBP_TYPES[sub['type']]
                    sub.pop('sbp', None)
            elif part == 'backbone':
                # with_cp checkpoints the dense blocks; SBP blocks recompute by sbp.recompute
                sub['sbp'] = dict(sub.get('sbp') or {}, keep_ratio=self.keep_ratio,
                                  recompute=self.recompute or self.with_cp)
            if self.exact_input_grad and sub.get('type') in SBP_TYPES:
                sub['sbp'] = dict(sub.get('sbp') or {}, exact_input_grad=True)
            if part == 'backbone':
                sub['with_cp'] = self.with_cp
                sub['init_cfg'] = None  # random init: no weights are downloaded
        return cfg


@dataclass
class Measurement:
    """What one variant measured.

    ``backward_gflop`` is the compute of one backward pass, device independent:
    the FLOPs of its convolutions and matrix products (recomputed forward
    convolutions included) as ``torch.utils.flop_counter`` counts them (see
    ``FlopMeter``). Ops outside PyTorch's dispatcher (mmcv's RoIAlign, NMS)
    and elementwise ops are not counted.
    """

    variant: str
    precision: str
    saved_mib: float
    saved_by_component_mib: Dict[str, float]
    backward_gflop: float
    forward_s: List[float] = field(default_factory=list)
    backward_s: List[float] = field(default_factory=list)
    step_s: List[float] = field(default_factory=list)
    peak_mib: Optional[float] = None
    peak_kind: str = ''

    def summary(self) -> dict:
        out = asdict(self)
        for key in ('forward_s', 'backward_s', 'step_s'):
            values = out.pop(key)
            out[key.replace('_s', '_median_s')] = statistics.median(values) if values else None
            out[key.replace('_s', '_spread_s')] = (max(values) - min(values)) if values else None
        return out


def detector_batch(model, batch_size: int, height: int, width: int, num_classes: int,
                   seed: int = 0) -> dict:
    """A preprocessed synthetic batch (random images and boxes, and instance
    masks for a model with a mask head) for ``model``."""
    from mmdet.testing import demo_mm_inputs
    torch.manual_seed(seed)
    with_mask = getattr(getattr(model, 'roi_head', None), 'with_mask', False)
    packed = demo_mm_inputs(batch_size=batch_size, image_shapes=[(3, height, width)] * batch_size,
                            num_items=[8] * batch_size, num_classes=num_classes,
                            with_mask=with_mask)
    return model.data_preprocessor(packed, True)


def model_components(model) -> Dict[str, torch.nn.Module]:
    names = ('backbone', 'neck', 'rpn_head', 'roi_head', 'bbox_head')
    return {n: getattr(model, n) for n in names
            if isinstance(getattr(model, n, None), torch.nn.Module)}


def measure_variant(config: Config, variant: Variant, batch_size: int, height: int, width: int,
                    steps: int, warmup: int, device: str, seed: int = 0,
                    on_step=None, part: str = 'detector') -> Measurement:
    """Build the detector as ``variant`` and measure saved bytes, backward FLOPs
    and step times.

    ``part`` is what each step trains (``PARTS``): ``'detector'``, the whole
    detector on its losses, or ``'backbone_neck'``, the backbone and neck alone
    on the sum of the neck's outputs (where SBP acts, without the heads' costs).
    """
    if part not in PARTS:
        raise ValueError(f'part must be one of {PARTS}, got {part!r}')
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    register_all_modules()
    torch.manual_seed(seed)
    model = MODELS.build(variant.apply(config.model)).to(device)
    model.init_weights()
    model.train()
    num_classes = _num_classes(config.model)
    data = detector_batch(model, batch_size, height, width, num_classes, seed)
    data = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in data.items()}
    data['data_samples'] = [s.to(device) for s in data['data_samples']]
    precision = variant.precision(device)
    dtype = {'fp16': torch.float16, 'bf16': torch.bfloat16}.get(precision)
    autocast = torch.autocast(device.split(':')[0], dtype=dtype, enabled=dtype is not None)

    meter = SavedTensorMeter(model, model_components(model))
    train_loss = _train_loss(model, data, part)
    with meter.measure(), cpu_autocast_fallbacks(model), autocast:
        loss = train_loss()
    forward_rss_mib = _max_rss_mib()  # before any backward: the forward-only peak
    with FlopMeter() as flops:
        loss.backward()
    del loss
    result = Measurement(variant.name, precision, meter.mebibytes,
                         {k: v / 2**20 for k, v in meter.by_component.items()},
                         flops.total / 1e9)
    if device.startswith('cuda'):
        torch.cuda.reset_peak_memory_stats()
    for step in range(warmup + steps if steps else 0):
        model.zero_grad(set_to_none=True)
        t0 = _now(device)
        with cpu_autocast_fallbacks(model), autocast:
            loss = train_loss()
        t1 = _now(device)
        loss.backward()
        t2 = _now(device)
        if step >= warmup:
            result.forward_s.append(t1 - t0)
            result.backward_s.append(t2 - t1)
            result.step_s.append(t2 - t0)
        if on_step is not None:
            on_step()
    if device.startswith('cuda'):
        result.peak_mib = torch.cuda.max_memory_allocated() / 2**20
        result.peak_kind = 'torch.cuda.max_memory_allocated'
    else:
        result.peak_mib = _max_rss_mib() if steps else forward_rss_mib
        result.peak_kind = ('process max RSS (this variant in its own process'
                            + (', forward only)' if not steps else ')'))
    return result


def _train_loss(model, data: dict, part: str):
    """The scalar that one step of ``part`` backpropagates (see ``measure_variant``)."""
    if part == 'backbone_neck':
        # a sum saves nothing for backward: the bytes and time are the modules' own
        return lambda: sum(f.float().sum() for f in model.extract_feat(data['inputs']))
    return lambda: sum(v.sum() for k, v in _flat_losses(model(**data, mode='loss'))
                       if 'loss' in k)


def _flat_losses(losses: dict):
    for key, value in losses.items():
        if isinstance(value, (list, tuple)):
            for v in value:
                yield key, v
        else:
            yield key, value


def _num_classes(model_cfg) -> int:
    for head in ('roi_head', 'bbox_head'):
        sub = model_cfg.get(head)
        if head == 'roi_head' and sub is not None:
            return sub['bbox_head']['num_classes']
        if sub is not None:
            return sub['num_classes']
    return 80


def _max_rss_mib() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _now(device: str) -> float:
    if device.startswith('cuda'):
        torch.cuda.synchronize()
    return time.perf_counter()


def describe_cpu(cpuinfo: str) -> str:
    """The CPU's model name and its bf16 arithmetic, from ``/proc/cpuinfo`` text.

    Half-precision step times on the CPU depend on it: without AVX512-BF16 or
    AMX, bf16 convolutions are emulated and run slower than fp32 ones, so the
    benchmarks record it with every table.
    """
    fields = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(':')
        if sep and key.strip() not in fields:
            fields[key.strip()] = value.strip()
    name = fields.get('model name') or platform.processor() or platform.machine()
    if 'flags' not in fields:
        return f'{name}, bf16 arithmetic: unknown'
    found = [flag for flag in BF16_CPU_FLAGS if flag in fields['flags'].split()]
    return f"{name}, bf16 arithmetic: {' '.join(found) if found else 'none'}"


def device_name(device: str) -> str:
    """The GPU's name, or the CPU's ``describe_cpu`` (from /proc/cpuinfo where it exists)."""
    if device.startswith('cuda'):
        return torch.cuda.get_device_name()
    try:
        with open('/proc/cpuinfo') as f:
            return describe_cpu(f.read())
    except OSError:
        return describe_cpu('')
