"""Distributed runs through mmengine's Runner: data parallel training on CPU
processes, and a clean end for any distributed run."""
import gc
from typing import TYPE_CHECKING, Optional, Sequence

from mmengine.model import MMDistributedDataParallel
from mmengine.registry import MODEL_WRAPPERS
from torch import nn

if TYPE_CHECKING:
    from mmengine.runner import Runner


@MODEL_WRAPPERS.register_module()
class CPUDistributedDataParallel(MMDistributedDataParallel):
    """``MMDistributedDataParallel`` for models that live on the CPU.

    mmengine 0.10's ``Runner.wrap_model`` passes ``device_ids=[LOCAL_RANK]`` to
    every ``DistributedDataParallel`` it builds, which torch refuses for CPU
    modules. Select this wrapper for CPU runs (with the gloo backend); GPU
    runs keep mmengine's defaults::

        model_wrapper_cfg = dict(type='CPUDistributedDataParallel')
        env_cfg = dict(dist_cfg=dict(backend='gloo'))

    Args:
        module (nn.Module): the model, on the CPU.
        device_ids: ignored (CPU modules take none).
        **kwargs: the arguments of ``MMDistributedDataParallel``.
    """

    def __init__(self, module: nn.Module, device_ids: Optional[Sequence[int]] = None,
                 **kwargs) -> None:
        params = list(module.parameters())
        if params and params[0].device.type != 'cpu':
            raise ValueError('CPUDistributedDataParallel wraps CPU models; on GPUs use '
                             "mmengine's default MMDistributedDataParallel")
        super().__init__(module=module, device_ids=None, **kwargs)


def setup_cpu_distributed(cfg) -> bool:
    """Prepare ``cfg`` for a CPU run started by ``torch.distributed.run``.

    mmengine's ``init_dist`` calls ``torch.cuda.set_device``, which a CPU
    build of torch lacks. When the launcher is ``pytorch`` and no GPU is
    present, this starts the gloo process group itself (the Runner then
    skips ``init_dist``) and selects ``CPUDistributedDataParallel``.
    GPU runs are left to mmengine's defaults.

    Returns:
        bool: whether the CPU set-up was applied.
    """
    import torch
    import torch.distributed as dist
    if cfg.get('launcher', 'none') != 'pytorch' or torch.cuda.is_available():
        return False
    backend = cfg.get('env_cfg', {}).get('dist_cfg', {}).get('backend', 'gloo')
    if backend == 'nccl':
        backend = 'gloo'  # the standard configs ask for nccl; CPUs speak gloo
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    cfg.env_cfg.setdefault('dist_cfg', {})['backend'] = backend
    if not cfg.get('model_wrapper_cfg'):
        cfg.model_wrapper_cfg = dict(type='CPUDistributedDataParallel')
    return True


def close_distributed(runner: 'Runner') -> None:
    """End a distributed run cleanly: wait for every rank, drop the runner's
    DDP wrapper, destroy the default process group.

    mmengine's Runner leaves the process group alive after ``train()`` and
    ``test()``, and the DDP wrapper (``runner.model``) keeps it referenced. A
    gloo group that is still alive when the interpreter shuts down can abort
    its process (``terminate called without an active exception``, SIGABRT)
    once a peer has closed its connections, which turns a finished run into a
    failed one for the launcher (seen on a loaded 2-core machine). Destroying
    the group is not enough while the wrapper lives, so the wrapper goes
    first. Call this as the last step of a tool; the runner's model is gone
    afterwards. It does nothing outside a distributed run.

    Args:
        runner: the mmengine Runner that has finished its work.
    """
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.barrier()  # no rank closes its connections while another still needs them
    runner.model = None
    gc.collect()  # the Runner and its hooks form reference cycles
    dist.destroy_process_group()
