"""Per-forward SBP state handed from an SBP module to its layers."""
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator, Tuple, Union

from torch import Tensor, nn

from .config import LayerConfig
from .masks import SBPIteration
from .program import SBPProgram


@dataclass(frozen=True)
class SBPState:
    """What an SBP layer needs from its module for one training forward.

    Args:
        iteration: the iteration's keep mask.
        stride: stride of the layer's input map.
    """

    iteration: SBPIteration
    stride: int

    def run(self, program: SBPProgram, x: Tensor,
            cfg: LayerConfig) -> Union[Tensor, Tuple[Tensor, ...]]:
        """Run ``program`` on ``x`` with the layer settings ``cfg``."""
        return program(x, self.iteration, self.stride, recompute=cfg.recompute,
                       grad_scale=cfg.grad_scale, exact_input_grad=cfg.exact_input_grad)


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
