"""Reads an accuracy study (``accuracy.json`` of ``tools/analysis_tools/sbp_accuracy.py``).

The study's ``summary`` gives, per variant, the paired difference to dense in points of bbox AP
(mean over the seeds both ran, and a 95 % Student-t interval). A setting's accuracy cost is
that of the study variant with the same gradients: tokens that do not change the gradients
(``variants.GRADIENT_NEUTRAL``: the exact tools and SBP's recompute) are left out of the
match (``amp`` is not: a study in fp32 has not measured it), so ``sbp@0.5:with_cp`` has the cost of
``sbp@0.5`` and ``with_cp`` or ``ecbe`` that of dense, 0 by construction.
"""
import json
import os
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from .variants import parse_variant

# The default study: Faster R-CNN R18-FPN (quarter width) fine-tuned on the synthetic
# benchmark, 5 seeds, evaluated on 1000 images.
DEFAULT_STUDY = os.path.join('docs', 'results', 'accuracy_finetune_w16_synthetic',
                             'accuracy.json')


@dataclass(frozen=True)
class AccuracyCost:
    """A setting's change of bbox AP to dense, in points: ``exact`` (0 by construction: the same
    gradients as dense), or the study's paired mean and 95 % interval (None: one seed)."""

    mean: float
    ci95: Optional[Tuple[float, float]]
    seeds: int
    exact: bool = False

    def label(self) -> str:
        if self.exact:
            return 'exact'
        if self.ci95 is None:
            return f'{self.mean:+.1f} ({self.seeds} seed)'
        return f'{self.mean:+.1f} [{self.ci95[0]:+.1f}, {self.ci95[1]:+.1f}]'


class AccuracyStudy:
    """The paired differences of one study, looked up by gradient-equivalent variant.

    Args:
        path: an ``accuracy.json`` with a ``summary`` (``sbp_accuracy.py``'s output).

    Raises:
        FileNotFoundError, ValueError: the file is missing or is not such a study.
    """

    def __init__(self, path: str) -> None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f'accuracy study {path!r} does not exist')
        with open(path) as f:
            study = json.load(f)
        if not isinstance(study, dict) or 'summary' not in study:
            raise ValueError(f'accuracy study {path}: no "summary" (expected the accuracy.json '
                             'of tools/analysis_tools/sbp_accuracy.py)')
        self.path = path
        self.config = study.get('config', '')
        self.costs: Dict[tuple, AccuracyCost] = {}
        for row in study['summary']:
            if row.get('paired_mean') is None:
                continue
            ci = row.get('paired_ci95')
            key = parse_variant(row['variant']).gradient_key()
            self.costs[key] = AccuracyCost(row['paired_mean'], tuple(ci) if ci else None,
                                           len(row.get('paired_seeds', [])))
        if (None, ()) not in self.costs:
            raise ValueError(f'accuracy study {path}: it has no dense runs')

    def cost(self, variant: str) -> Optional[AccuracyCost]:
        """The cost of ``variant`` (any grammar name); None where the study has no variant
        with its gradients."""
        key = parse_variant(variant).gradient_key()
        if key == (None, ()):
            return AccuracyCost(0.0, None, 0, exact=True)
        return self.costs.get(key)
