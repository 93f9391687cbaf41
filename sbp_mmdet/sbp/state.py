"""Per-forward SBP state handed from a parent module to its SBP layers."""
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator, Tuple

from torch import Tensor, nn

from .config import SBPConfig
from .masks import SBPIteration
from .program import SBPProgram


@dataclass(frozen=True)
class SBPState:
    """What an SBP layer needs for one training forward.

    Args:
        iteration: the iteration's keep mask.
        stride: stride of the layer's input map.
        cfg: the SBP settings (recompute, grad_scale, exact_input_grad).
    """

    iteration: SBPIteration
    stride: int
    cfg: SBPConfig

    def run(self, program: SBPProgram, x: Tensor, recompute: bool = False) -> Tensor:
        """Run ``program`` on ``x``; ``recompute=True`` (a layer's ``with_cp``)
        recomputes at least as much as ``cfg.recompute=True``."""
        return program(x, self.iteration, self.stride, recompute=self.cfg.recompute or recompute,
                       grad_scale=self.cfg.grad_scale,
                       exact_input_grad=self.cfg.exact_input_grad)


@contextmanager
def sbp_states(assignments: Iterable[Tuple[nn.Module, SBPState]]) -> Iterator[None]:
    """Give each module its ``sbp_state`` for the duration of one forward."""
    assignments = list(assignments)
    for module, state in assignments:
        module.sbp_state = state
    try:
        yield
    finally:
        for module, _ in assignments:
            module.sbp_state = None
