"""Checks that need a whole detector config, not one module's."""
import copy
from typing import Any, Mapping, Optional

import torch
from mmdet.registry import MODELS

from .sbp_types import is_sbp_backbone, no_sbp_backbone_message, type_name


def _is(module_cfg: Any, name: str) -> bool:
    module_type = module_cfg.get('type') if isinstance(module_cfg, Mapping) else None
    return type_name(module_type) == name


def sbp_model_problem(model_cfg: Mapping) -> Optional[str]:
    """What in a detector config stops its SBP backbone or neck from building or training.

    Refused: an ``sbp`` key on a backbone that is not an SBP module, and an
    ``FPNSBP`` (without ``sbp.own_mask``) behind such a backbone (the message
    names the backbone and lists the SBP backbones); an ``FPNSBP`` with
    ``sbp.own_mask=True`` behind an SBP backbone (the neck follows the
    backbone's mask); and whatever building the SBP backbone or neck refuses
    (an unknown key, a bad value, a mask key on the neck), so that
    ``tools/train.py`` stops before the runner is made.

    Args:
        model_cfg (Mapping): the ``model`` section of a config.

    Returns:
        str, optional: the problem, None when there is none.
    """
    backbone, neck = model_cfg.get('backbone'), model_cfg.get('neck')
    problem = _dense_backbone_problem(backbone, neck)
    if problem is not None:
        return problem
    sbp_backbone = isinstance(backbone, Mapping) and is_sbp_backbone(backbone.get('type'))
    neck_sbp = (neck.get('sbp') or {}) if _is(neck, 'FPNSBP') else {}
    if sbp_backbone and neck_sbp.get('own_mask', False):
        return ('FPNSBP: sbp.own_mask=True behind an SBP backbone, whose mask the neck '
                "follows: drop own_mask (and set the mask keys in the backbone's sbp)")
    for module_cfg in (backbone if sbp_backbone else None, neck if _is(neck, 'FPNSBP') else None):
        if module_cfg is not None:
            try:
                with torch.random.fork_rng(devices=[]):  # the runs' initial weights stay as seeded
                    MODELS.build(copy.deepcopy(dict(module_cfg)))
            except (KeyError, TypeError, ValueError) as err:  # what the runner would raise
                if 'required positional argument' not in str(err):  # a partial model config
                    return str(err.args[0])
    return None


def _dense_backbone_problem(backbone: Any, neck: Any) -> Optional[str]:
    """SBP asked of a backbone that is not an SBP module, if it is."""
    if not isinstance(backbone, Mapping) or is_sbp_backbone(backbone.get('type')):
        return None
    if 'sbp' in backbone:
        return no_sbp_backbone_message(backbone.get('type'), 'the config gives it an sbp key')
    if _is(neck, 'FPNSBP') and not (neck.get('sbp') or {}).get('own_mask', False):
        return no_sbp_backbone_message(
            backbone.get('type'), 'the FPNSBP neck follows the mask of an SBP backbone (or '
            'set its sbp.own_mask=True, or use FPN)')
    return None
