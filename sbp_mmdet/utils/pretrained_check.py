"""Fail fast, naming the file, when a config's pretrained weights are not on disk.

mmengine loads ``init_cfg=dict(type='Pretrained', checkpoint=...)`` weights
after it has built the Runner, the dataloaders and the model, and a missing
local file then surfaces as a bare ``FileNotFoundError`` inside the weight
initialisation. Remote checkpoints (``https://``, ``torchvision://``, ...) are
left to mmengine, which downloads them.
"""
import os.path as osp
from typing import Any, Iterator, List, Tuple


class PretrainedNotFoundError(FileNotFoundError):
    """A local checkpoint named by a ``Pretrained`` init_cfg does not exist."""


def _pretrained_checkpoints(node: Any, key: str) -> Iterator[Tuple[str, str]]:
    """``(config key, checkpoint)`` of every ``Pretrained`` init_cfg below ``node``."""
    if isinstance(node, dict):
        if node.get('type') == 'Pretrained' and isinstance(node.get('checkpoint'), str):
            yield f'{key}.checkpoint', node['checkpoint']
        for name, value in node.items():
            yield from _pretrained_checkpoints(value, f'{key}.{name}')
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            yield from _pretrained_checkpoints(value, f'{key}[{i}]')


def missing_pretrained_weights(model_cfg: dict) -> List[Tuple[str, str]]:
    """``(config key, path)`` of the local pretrained checkpoints that do not exist."""
    return [(key, path) for key, path in _pretrained_checkpoints(model_cfg, 'model')
            if '://' not in path and not osp.isfile(path)]


def check_pretrained_weights(model_cfg: dict) -> None:
    """Raise when ``model_cfg`` asks for local pretrained weights that are missing.

    Raises:
        PretrainedNotFoundError: naming each missing file and its config key.
    """
    missing = missing_pretrained_weights(model_cfg)
    if missing:
        lines = '\n'.join(f'  {key} = {path!r}' for key, path in missing)
        raise PretrainedNotFoundError(
            f'pretrained weights not found:\n{lines}\nMake or download them, or point the '
            'key elsewhere with --cfg-options KEY=PATH (configs/synthetic/*-finetune.py load '
            'the backbone that `python tools/pretrain_synthetic_backbone.py` makes).')
