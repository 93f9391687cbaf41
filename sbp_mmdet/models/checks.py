"""Checks that need a whole detector config, not one module's."""
from typing import Any, Mapping, Optional

from mmdet.registry import MODELS

from ..sbp import SBPConfig
from .necks import FPNSBP
from .sbp_types import SBP_BACKBONES, is_sbp_backbone, no_sbp_backbone_message, type_name

# The settings of an FPNSBP behind an SBP backbone that must equal the backbone's:
# the neck uses the backbone's mask.
SHARED_KEYS = ('keep_ratio', 'sampling', 'per_image')


def _is(module_cfg: Any, name: str) -> bool:
    module_type = module_cfg.get('type') if isinstance(module_cfg, Mapping) else None
    return type_name(module_type) == name


def neck_disagreement(key: str, neck_value: Any, backbone_value: Any) -> str:
    """The message for an FPNSBP setting that differs from its backbone's."""
    return (f'FPNSBP: sbp.{key}={neck_value!r} disagrees with the backbone '
            f"({backbone_value!r}); the neck uses the backbone's mask: drop the key or make "
            'them equal')


def sbp_model_problem(model_cfg: Mapping) -> Optional[str]:
    """What in a detector config makes its SBP backbone and neck disagree.

    Also refused: an ``sbp`` key on a backbone that is not an SBP module, and
    an ``FPNSBP`` (without ``sbp.own_mask``) behind such a backbone; the
    message names the backbone and lists the SBP backbones.

    An ``FPNSBP`` neck behind an SBP backbone (``ResNetSBP`` etc.) uses the backbone's
    mask, so a ``keep_ratio``, ``sampling`` or ``per_image`` given in the neck's ``sbp`` must
    equal the backbone's (defaults applied). Without this check the
    disagreement surfaces at the first training forward. Bad ``sbp`` settings
    of either module (what building it would refuse) are reported too.

    Args:
        model_cfg (Mapping): the ``model`` section of a config.

    Returns:
        str, optional: the problem, None when there is none (or the detector
        has no SBP backbone + ``FPNSBP`` pair).
    """
    backbone, neck = model_cfg.get('backbone'), model_cfg.get('neck')
    problem = _dense_backbone_problem(backbone, neck)
    backbone_name = type_name(backbone.get('type')) if isinstance(backbone, Mapping) else None
    if problem is not None or not (backbone_name in SBP_BACKBONES.values()
                                   and _is(neck, 'FPNSBP')):
        return problem
    neck_sbp = neck.get('sbp') or {}
    try:
        backbone_sbp, _ = SBPConfig.from_dict(
            backbone.get('sbp'), MODELS.get(backbone_name).sbp_extra_keys, backbone_name)
        SBPConfig.from_dict(neck_sbp, FPNSBP.sbp_extra_keys, 'FPNSBP')
    except (KeyError, TypeError, ValueError) as err:  # what building the modules would raise
        return str(err.args[0])
    for key in SHARED_KEYS:
        if key in neck_sbp and neck_sbp[key] != getattr(backbone_sbp, key):
            return neck_disagreement(key, neck_sbp[key], getattr(backbone_sbp, key))
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
