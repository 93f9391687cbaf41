"""Building blocks of the SBP benchmarks: variants, synthetic batches, one measured run."""
import contextlib
import copy
import platform
import resource
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
from mmengine.config import Config
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from .amp import cpu_autocast_fallbacks
from .exact_tools import ACT_CKPT, apply_exact_tools, observe_selective_saves
from .hooks import SBPHook
from .models.sbp_types import SBP_BACKBONES
from .sbp import SavedTensorMeter
from .variants import Variant

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


class OpCounter(TorchDispatchMode):
    """Counts the aten operators dispatched inside the ``with`` block: a device-independent
    proxy for the kernel launches of a step on a GPU (each op is at least one launch; the
    CPU's own kernels and mmcv's ops outside the dispatcher are not counted)."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.total += 1
        return func(*args, **(kwargs or {}))


def precision(variant: Variant, device: str) -> str:
    """``'fp32'``, or the autocast dtype of an ``amp`` variant on ``device``: fp16 on
    CUDA, bf16 on the CPU (with ``cpu_autocast_fallbacks``: the RPN's proposal step and
    RoIAlign in fp32, as the CUDA path effectively runs them)."""
    if not variant.amp:
        return 'fp32'
    return 'fp16' if device.startswith('cuda') else 'bf16'


def is_reference(variant: Variant) -> bool:
    """Plain backprop without any memory saver: the reference of its precision."""
    return not variant.sbp and set(variant.tokens) <= {'amp'}


def variant_model(model_cfg: dict, variant: Variant) -> dict:
    """A copy of ``model_cfg`` (with SBP modules) with ``variant``'s model options.

    Every variant starts from the config with the backbone's ``with_cp`` and
    ``sbp.recompute`` off (the COCO configs turn recompute on: ``sbp@0.5`` and
    ``sbp@0.5:recompute`` are two rows) and a random init (no weights are downloaded).
    A dense variant runs mmdet's own modules (the SBP types swapped back, their ``sbp``
    dropped): the benchmark's reference.
    """
    cfg = copy.deepcopy(model_cfg)
    backbone = cfg['backbone']
    backbone.update(with_cp=False, init_cfg=None)
    if isinstance(backbone.get('sbp'), dict):
        backbone['sbp'] = dict(backbone['sbp'], recompute=False)
    for key, value in variant.model_options().items():
        *path, leaf = key.split('.')
        node = cfg
        for name in path:
            if not isinstance(node.get(name), dict):
                node[name] = {}
            node = node[name]
        node[leaf] = value
    if not variant.sbp:
        for part in ('backbone', 'neck', 'rpn_head', 'bbox_head'):
            sub = cfg.get(part)
            if isinstance(sub, dict) and sub.get('type') in SBP_TYPES:
                sub['type'] = SBP_TYPES[sub['type']]
                sub.pop('sbp', None)
    return cfg


def random_init(model_cfg: dict) -> dict:
    """A copy of ``model_cfg`` whose backbone starts from a random init (no
    weights are downloaded): the model as a config's own options set it."""
    cfg = copy.deepcopy(model_cfg)
    cfg['backbone']['init_cfg'] = None
    return cfg


@dataclass
class Measurement:
    """What one variant measured.

    ``backward_gflop`` is the compute of one backward pass, device independent:
    the FLOPs of its convolutions and matrix products (recomputed forward
    convolutions included) as ``torch.utils.flop_counter`` counts them (see
    ``FlopMeter``). Ops outside PyTorch's dispatcher (mmcv's RoIAlign, NMS)
    and elementwise ops are not counted. ``ops`` is the number of aten operators one
    training step (forward and backward, recompute included) dispatches (``OpCounter``) once
    its mask layout has been seen (SBP memoises its row bookkeeping per layout,
    ``sbp_mmdet.sbp.index_cache``: the steady state of training, where grid masks take a few
    layouts per image height: a second step on the first one's masks);
    ``first_layout_ops`` is the count of the first step, whose masks are new.
    """

    variant: str
    precision: str
    saved_mib: float
    saved_by_component_mib: Dict[str, float]
    backward_gflop: float
    ops: Optional[int] = None
    first_layout_ops: Optional[int] = None
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


@dataclass
class Step:
    """One variant ready to train: its model (exact tools switched on), batch and step."""

    variant: Variant
    model: torch.nn.Module
    train_loss: Callable[[], torch.Tensor]
    autocast: Callable[[], contextlib.AbstractContextManager]
    device: str

    def loss(self) -> torch.Tensor:
        """The training forward, as every step runs it."""
        with cpu_autocast_fallbacks(self.model), self.autocast():
            return self.train_loss()

    def run(self) -> float:
        """One timed training step (forward and backward): seconds. The gradients are freed
        after it, so that steps built side by side hold their parameters only."""
        self.model.zero_grad(set_to_none=True)
        t0 = _now(self.device)
        self.loss().backward()
        seconds = _now(self.device) - t0
        self.model.zero_grad(set_to_none=True)
        return seconds


def build_step(config: Config, variant: Variant, batch_size: int, height: int, width: int,
               device: str, seed: int = 0, part: str = 'detector',
               model_cfg: Optional[dict] = None) -> Step:
    """The ``Step`` of ``variant`` (see ``measure_variant`` for the arguments): the model
    built from ``variant_model`` (or ``model_cfg``), the exact tools of its options applied
    as mmengine's Runner applies them (``sbp_mmdet.exact_tools``), a synthetic batch."""
    if part not in PARTS:
        raise ValueError(f'part must be one of {PARTS}, got {part!r}')
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    register_all_modules()
    torch.manual_seed(seed)
    model = MODELS.build(model_cfg or variant_model(config.model, variant)).to(device)
    model.init_weights()
    model.train()
    apply_exact_tools(model, variant.options)
    num_classes = _num_classes(config.model)
    data = detector_batch(model, batch_size, height, width, num_classes, seed)
    data = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in data.items()}
    data['data_samples'] = [s.to(device) for s in data['data_samples']]
    dtype = {'fp16': torch.float16, 'bf16': torch.bfloat16}.get(precision(variant, device))
    return Step(variant, model, _train_loss(model, data, part),
                lambda: torch.autocast(device.split(':')[0], dtype=dtype,
                                       enabled=dtype is not None), device)


def measure_variant(config: Config, variant: Variant, batch_size: int, height: int, width: int,
                    steps: int, warmup: int, device: str, seed: int = 0,
                    on_step=None, part: str = 'detector',
                    model_cfg: Optional[dict] = None, count_ops: bool = True) -> Measurement:
    """Build the detector as ``variant`` and measure saved bytes, backward FLOPs,
    dispatched operators and step times.

    ``model_cfg`` is the model to build instead of ``variant_model(config.model,
    variant)``, for settings written as config options (``sbp_fit.py``'s
    candidates); the variant then gives the name and the precision only.

    ``part`` is what each step trains (``PARTS``): ``'detector'``, the whole
    detector on its losses, or ``'backbone_neck'``, the backbone and neck alone
    on the sum of the neck's outputs (where SBP acts, without the heads' costs).

    ``count_ops=False`` skips the second step that counts the steady state's operators
    (``ops`` and ``first_layout_ops`` are then None).

    Raises:
        RuntimeError: with mmengine's activation checkpointing, a trainable parameter got no
            gradient (its reentrant checkpoint of a module whose inputs need none).
    """
    step = build_step(config, variant, batch_size, height, width, device, seed, part,
                      model_cfg)
    model = step.model
    meter = SavedTensorMeter(model, model_components(model))
    with OpCounter() as first_layout_ops:
        with meter.measure(), observe_selective_saves(meter.count):
            loss = step.loss()
        forward_rss_mib = _max_rss_mib()  # before any backward: the forward-only peak
        with FlopMeter() as flops:
            loss.backward()
    del loss
    if part == 'detector' and ACT_CKPT in variant.options:
        check_gradients(model, variant.name)
    ops = None
    if count_ops:
        rewind_masks(model)  # the same masks again: the steady state's operator count
        with OpCounter() as steady_ops:
            step.run()
        ops = steady_ops.total
    result = Measurement(variant.name, precision(variant, device), meter.mebibytes,
                         {k: v / 2**20 for k, v in meter.by_component.items()},
                         flops.total / 1e9, ops, first_layout_ops.total if count_ops else None)
    if device.startswith('cuda'):
        torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + steps if steps else 0):
        model.zero_grad(set_to_none=True)
        t0 = _now(device)
        loss = step.loss()
        t1 = _now(device)
        loss.backward()
        t2 = _now(device)
        if i >= warmup:
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


def rewind_masks(model: torch.nn.Module) -> None:
    """Make the next training step of ``model``'s SBP modules draw the masks of the step
    just run (each mask sampler one step back)."""
    for module in SBPHook.sbp_modules(model):
        module.mask_sampler.step = max(module.mask_sampler.step - 1, 0)


def check_gradients(model: torch.nn.Module, name: str) -> None:
    """Raise if a parameter that trains got no gradient in the step just run (SBP may leave
    some without one at tiny sizes: checked for activation checkpointing only)."""
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    if missing:
        raise RuntimeError(
            f'{name}: {len(missing)} trainable parameters got no gradient (first: '
            f'{missing[0]}). mmengine\'s activation_checkpointing uses torch\'s reentrant '
            'checkpoint: a module whose inputs need no gradient (after a frozen stage, or '
            'given a tuple) gets none; name modules after the first trainable stage.')


def interleaved_step_times(steps: Sequence[Step], timed: int, warmup: int,
                           on_round: Optional[Callable[[], None]] = None
                           ) -> List[List[float]]:
    """Step times of each of ``steps``, run round robin one step at a time (``warmup``
    rounds untimed, then ``timed`` rounds), so that the machine's load hits them alike."""
    times: List[List[float]] = [[] for _ in steps]
    for round_ in range(warmup + timed):
        for step, mine in zip(steps, times):
            seconds = step.run()
            if round_ >= warmup:
                mine.append(seconds)
        if on_round is not None:
            on_round()
    return times


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
