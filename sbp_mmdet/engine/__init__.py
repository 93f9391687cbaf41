from .cpu_ddp import CPUDistributedDataParallel, close_distributed, setup_cpu_distributed
from .logger_hook import MainProcessLoggerHook, use_main_process_logger

__all__ = ['CPUDistributedDataParallel', 'setup_cpu_distributed', 'close_distributed',
           'MainProcessLoggerHook', 'use_main_process_logger']
