"""mmengine's ``LoggerHook`` with the test metrics file written by one process."""
from typing import Dict, Optional

from mmengine.dist import is_main_process
from mmengine.hooks import LoggerHook
from mmengine.registry import HOOKS


@HOOKS.register_module()
class MainProcessLoggerHook(LoggerHook):
    """``LoggerHook`` whose ``{timestamp}.json`` of test metrics only the main
    process writes.

    mmengine 0.10.7 dumps it after a test epoch on every rank, into the same
    path (the ranks share the timestamp): two ranks writing at once can leave
    one JSON document overwritten by a shorter one, which is no JSON at all
    (``tools/dist_test.sh`` did, now and then). The metrics are the same on
    every rank; the other ranks skip the dump. Arguments: those of
    ``LoggerHook``.
    """

    def after_test_epoch(self, runner, metrics: Optional[Dict[str, float]] = None) -> None:
        if is_main_process():
            super().after_test_epoch(runner, metrics)


def use_main_process_logger(cfg) -> None:
    """Swap mmengine's ``LoggerHook`` of ``cfg.default_hooks`` for ``MainProcessLoggerHook``
    (a config with another logger hook is left as it is)."""
    logger = cfg.get('default_hooks', {}).get('logger')
    mmengine_types = ('LoggerHook', 'mmengine.LoggerHook', LoggerHook)
    if logger is not None and logger.get('type') in mmengine_types:
        logger.type = 'MainProcessLoggerHook'
