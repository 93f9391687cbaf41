"""RPN head with Stochastic Backpropagation."""
from mmdet.models.dense_heads import RPNHead
from mmdet.registry import MODELS

from ...sbp import SBPProgram, conv_unit, relu
from ..layers import conv_module_unit
from .sbp_head_mixin import SBPDenseHeadMixin


@MODELS.register_module()
class RPNHeadSBP(SBPDenseHeadMixin, RPNHead):
    """``RPNHead`` whose conv tower trains with SBP on every level the mask covers.

    Same arguments and ``state_dict`` as mmdet's ``RPNHead``, identical
    outputs. Put it behind an SBP neck (``FPNSBP``).

    Args:
        sbp (dict, optional): ``grad_scale``, ``recompute`` (``'all'``
            stores only each level's input and recomputes the tower in
            backward), ``exact_input_grad`` (see ``LayerConfig``; with it the
            neck gets every row's gradient), ``dense_outputs`` (True: the
            classification and regression convs run densely, SBP on the
            tower only). The head follows the backbone's mask: the mask keys
            (``keep_ratio``, ``sampling``, ``per_image``, ``grid_cell``) are
            the backbone's, and refused here. Default: None.
        *args, **kwargs: the arguments of ``mmdet.models.RPNHead``, positional ones in
            its order (``sbp`` is keyword-only).
    """

    def build_sbp_program(self) -> SBPProgram:
        where = self.sbp_name
        if self.num_convs > 1:
            units = [conv_module_unit(m, f'conv{i}', f'conv{i - 1}' if i else 'input',
                                      f'{where}.rpn_conv.{i}')
                     for i, m in enumerate(self.rpn_conv)]
            units[-1] = units[-1].with_tail(relu())
        else:
            units = [conv_unit('conv0', 'input', self.rpn_conv, relu_after=True,
                               where=f'{where}.rpn_conv')]
        last = units[-1].name
        units += [conv_unit('cls', last, self.rpn_cls, where=f'{where}.rpn_cls'),
                  conv_unit('reg', last, self.rpn_reg, where=f'{where}.rpn_reg')]
        return SBPProgram(units, outputs=('cls', 'reg'), where=where)
