"""Config loading shared by tools/train.py and tools/test.py."""
import os.path as osp
from typing import Optional

from mmengine.config import Config


def load_tool_config(config: str, launcher: str, cfg_options: Optional[dict],
                     work_dir: Optional[str]) -> Config:
    """``config`` with ``--cfg-options``, the launcher and the work dir applied.

    The work dir defaults to ``./work_dirs/<config name>`` as in mmdet's tools.
    """
    cfg = Config.fromfile(config)
    cfg.launcher = launcher
    if cfg_options is not None:
        cfg.merge_from_dict(cfg_options)
    if work_dir is not None:
        cfg.work_dir = work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(config))[0])
    return cfg
