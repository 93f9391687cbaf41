"""Keep mmengine's INFO logs (weight-init reports, dataset loading) off the console.

Building a detector outside a Runner logs one multi-line INFO record per
parameter from ``init_weights`` (hundreds of lines for a ResNet-50 detector).
pycocotools prints four lines per annotation file it loads. Analysis tools
that only want their progress and results on the console run that part
inside :func:`mmengine_logs_to_file`.
"""
import contextlib
import logging
import os
import os.path as osp
from contextlib import contextmanager
from typing import Iterator, Optional

from mmengine.logging import MMLogger
from mmengine.logging.logger import MMFormatter


@contextmanager
def mmengine_logs_to_file(log_file: Optional[str],
                          console_level: int = logging.WARNING) -> Iterator[None]:
    """Within the block, mmengine's current logger prints only records of
    ``console_level`` and above to the console, and writes every record to
    ``log_file`` (appended; its folder is created; None: nowhere), where what
    the block prints to ``sys.stdout`` (pycocotools' messages) goes too.

    Example:
        >>> with mmengine_logs_to_file('outputs/x/build.log'):  # doctest: +SKIP
        ...     model = MODELS.build(cfg.model)
        ...     model.init_weights()
    """
    logger = MMLogger.get_current_instance()
    consoles = [h for h in logger.handlers
                if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]
    levels = [h.level for h in consoles]
    for handler in consoles:
        handler.setLevel(max(handler.level, console_level))
    file_handler = None
    if log_file is not None:
        os.makedirs(osp.dirname(osp.abspath(log_file)), exist_ok=True)
        file_handler = logging.FileHandler(log_file, 'a')
        file_handler.setFormatter(MMFormatter(color=False, datefmt='%Y/%m/%d %H:%M:%S'))
        file_handler.setLevel(logging.DEBUG)
        logger.addHandler(file_handler)
    try:
        with contextlib.redirect_stdout(file_handler.stream if file_handler is not None
                                        else open(os.devnull, 'w')):
            yield
    finally:
        for handler, level in zip(consoles, levels):
            handler.setLevel(level)
        if file_handler is not None:
            logger.removeHandler(file_handler)
            file_handler.close()
