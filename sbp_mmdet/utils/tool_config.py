"""Config loading and Runner building shared by tools/train.py and tools/test.py."""
import os.path as osp
import traceback
from typing import Optional

from mmengine.config import Config
from mmengine.registry import RUNNERS
from mmengine.runner import Runner


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


def build_runner(cfg: Config, config: str) -> Runner:
    """The Runner of ``cfg`` (``runner_type`` if the config names one).

    mmengine logs the environment and the whole config (hundreds of lines)
    before it builds the model, so a build error would scroll by; it is
    printed with its traceback and then repeated on one line, last.

    Raises:
        SystemExit: the Runner (model, hooks, ...) could not be built.
    """
    try:
        return Runner.from_cfg(cfg) if 'runner_type' not in cfg else RUNNERS.build(cfg)
    except Exception as err:
        traceback.print_exc()
        raise SystemExit(f'\nCould not build the run: {type(err).__name__}: {err}\n'
                         f'(config: {config}; the traceback above)') from err
