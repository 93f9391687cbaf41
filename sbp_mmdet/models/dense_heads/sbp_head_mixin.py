"""What SBP dense heads share: one program per FPN level, each with its stride's mask."""
from typing import List, Optional, Tuple

from torch import Tensor

from ...sbp import SBPIteration, SBPModuleMixin, SBPProgram, Unit
from ...sbp.layer import cached_program
from ...sbp.module import layer_state


class SBPDenseHeadMixin(SBPModuleMixin):
    """A dense head whose tower, shared across FPN levels, trains with SBP.

    The head follows the mask of the ``SBPFeatures`` it receives (an SBP
    neck's output): each level runs ``sbp_program()`` with the mask at its own
    stride; levels coarser than the base mask run densely (``forward_single``).
    A subclass declares ``build_sbp_program()``, whose outputs are those of
    ``forward_single`` in order; ``__init__`` takes the head's arguments plus
    ``sbp`` (keys: the layer keys of ``LayerConfig`` and ``dense_outputs``;
    the mask keys belong to the backbone, whose mask the head follows) and
    builds the program once (``cached_program``), so that unsupported layers
    fail at build time. With
    ``exact_input_grad=True`` the head's SBP is on its weight gradients only:
    the neck gets the exact gradient of every row, so the head cuts no
    gradient path into the FPN's top-down path and the backbone. With
    ``dense_outputs=True`` (default False) the program's output layers (the
    classification and regression convs) run densely, learning from every
    row, and SBP covers the tower only (``SBPProgram.split_outputs``).
    """

    def __init__(self, *args, sbp: Optional[dict] = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        extras = self.init_sbp(sbp, draws_mask=False, extra_keys=('dense_outputs',))
        self.sbp_dense_outputs = extras.get('dense_outputs', False)
        if not isinstance(self.sbp_dense_outputs, bool):
            raise TypeError(f'{self.sbp_name}: sbp.dense_outputs must be True or False, got '
                            f'{self.sbp_dense_outputs!r}')
        program, _, _ = self._sbp_split_program()  # fail at build time on unsupported layers
        if self.sbp_cfg.exact_input_grad:
            program.check_exact_input_grad(modes=False)

    def build_sbp_program(self) -> SBPProgram:
        """The head's tower and output convs as one program."""
        raise NotImplementedError

    def sbp_program(self) -> SBPProgram:
        """The head's program (``build_sbp_program``), built once."""
        return self._sbp_split_program()[2]

    def check_sbp_modes(self) -> None:
        self._sbp_split_program()[0].check_modes(self.sbp_cfg.exact_input_grad)

    def forward(self, x: Tuple[Tensor, ...]) -> Tuple[List[Tensor], ...]:
        if not self.sbp_training():
            return super().forward(x)
        features = self.sbp_follow(x)
        self.sbp_iteration = features.iteration
        program, dense_units, _ = self._sbp_split_program()
        outs = [self._sbp_level(feat, stride, features.iteration, program, dense_units)
                for feat, stride in zip(features, features.strides)]
        return tuple(map(list, zip(*outs)))

    def _sbp_split_program(self) -> Tuple[SBPProgram, Tuple[Unit, ...], SBPProgram]:
        """The program SBP runs, the output units run densely after it (none
        unless ``dense_outputs``) and the whole program: built once."""
        return cached_program(self, self._build_split_program)

    def _build_split_program(self) -> Tuple[SBPProgram, Tuple[Unit, ...], SBPProgram]:
        program = self.build_sbp_program()
        trunk, dense_units = program.split_outputs() if self.sbp_dense_outputs else (program, ())
        return trunk, dense_units, program

    def _sbp_level(self, x: Tensor, stride: int, iteration: SBPIteration,
                   program: SBPProgram, dense_units: Tuple[Unit, ...]) -> tuple:
        state = layer_state(iteration, stride, program)
        if state is None:
            return self.forward_single(x)
        outs = state.run(program, x, self.sbp_cfg)
        if not dense_units:
            return outs
        values = dict(zip(program.outputs, outs if isinstance(outs, tuple) else (outs,)))
        return tuple(unit.mix.forward(values[unit.source]) for unit in dense_units)
