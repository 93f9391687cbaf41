from .cpu_ddp import CPUDistributedDataParallel, setup_cpu_distributed

__all__ = ['CPUDistributedDataParallel', 'setup_cpu_distributed']
