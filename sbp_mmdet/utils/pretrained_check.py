"""Fail fast, naming the file, when a config's pretrained weights are missing or altered.

mmengine loads ``init_cfg=dict(type='Pretrained', checkpoint=...)`` weights
after it has built the Runner, the dataloaders and the model, and a missing
local file then surfaces as a bare ``FileNotFoundError`` inside the weight
initialisation. Remote checkpoints (``https://``, ``torchvision://``, ...) are
left to mmengine, which downloads them.

A local checkpoint whose name ends in ``-<hex>.pth`` (torch.hub's and the
OpenMMLab model zoos' convention: the first 8 or more hex digits of the file's
sha256) is checked against that digest, so that every machine starts from
the same weights (the shipped synthetic backbone, for one).
"""
import hashlib
import os.path as osp
import re
from typing import Any, Iterator, List, Optional, Tuple

DIGEST_IN_NAME = re.compile(r'-([0-9a-f]{8,64})\.pth$')
"""A checkpoint name that carries the leading hex digits of its sha256."""


class PretrainedWeightsError(Exception):
    """A config's local pretrained weights cannot be used as they are."""


class PretrainedNotFoundError(PretrainedWeightsError, FileNotFoundError):
    """A local checkpoint named by a ``Pretrained`` init_cfg does not exist."""


class PretrainedDigestError(PretrainedWeightsError, ValueError):
    """A local checkpoint's sha256 does not begin with the digest in its name."""


def file_sha256(path: str) -> str:
    """The sha256 of the file at ``path``, in hex."""
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def expected_digest(path: str) -> Optional[str]:
    """The digest prefix that ``path``'s name carries (``name-<hex>.pth``), if any."""
    match = DIGEST_IN_NAME.search(osp.basename(path))
    return match.group(1) if match else None


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


def local_pretrained_weights(model_cfg: dict) -> List[Tuple[str, str]]:
    """``(config key, path)`` of the local pretrained checkpoints ``model_cfg`` names."""
    return [(key, path) for key, path in _pretrained_checkpoints(model_cfg, 'model')
            if '://' not in path]


def missing_pretrained_weights(model_cfg: dict) -> List[Tuple[str, str]]:
    """``(config key, path)`` of the local pretrained checkpoints that do not exist."""
    return [(key, path) for key, path in local_pretrained_weights(model_cfg)
            if not osp.isfile(path)]


def check_pretrained_weights(model_cfg: dict) -> None:
    """Raise when ``model_cfg`` asks for local pretrained weights that are missing, or
    whose sha256 differs from the digest their name carries.

    Raises:
        PretrainedNotFoundError: naming each missing file and its config key.
        PretrainedDigestError: naming the altered file, its config key and both digests.
    """
    missing = missing_pretrained_weights(model_cfg)
    if missing:
        lines = '\n'.join(f'  {key} = {path!r}' for key, path in missing)
        raise PretrainedNotFoundError(
            f'pretrained weights not found:\n{lines}\nMake or download them, or point the '
            'key elsewhere with --cfg-options KEY=PATH (configs/synthetic/*-finetune.py load '
            'the synthetic backbone shipped in configs/synthetic/weights/; '
            '`python tools/pretrain_synthetic_backbone.py` remakes one).')
    for key, path in local_pretrained_weights(model_cfg):
        expected = expected_digest(path)
        if expected is None:
            continue
        actual = file_sha256(path)
        if not actual.startswith(expected):
            raise PretrainedDigestError(
                f'{key} = {path!r}: its sha256 is {actual}, but its name says it begins '
                f'with {expected}. The file was altered or is another checkpoint: restore it '
                '(git checkout -- PATH for a shipped one) or rename it after its digest.')
