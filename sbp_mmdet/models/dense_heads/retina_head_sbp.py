"""RetinaNet head with Stochastic Backpropagation."""
from mmdet.models.dense_heads import RetinaHead
from mmdet.registry import MODELS

from ...sbp import SBPProgram, conv_unit
from ..layers import conv_module_unit
from .sbp_head_mixin import SBPDenseHeadMixin


@MODELS.register_module()
class RetinaHeadSBP(SBPDenseHeadMixin, RetinaHead):
    """``RetinaHead`` whose cls and reg towers train with SBP on every level the
    mask covers.

    Same arguments and ``state_dict`` as mmdet's ``RetinaHead``, identical
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
        *args, **kwargs: the arguments of ``mmdet.models.RetinaHead``, positional ones in
            its order (``sbp`` is keyword-only).
    """

    def build_sbp_program(self) -> SBPProgram:
        units = []
        for branch, convs, out in (('cls', self.cls_convs, self.retina_cls),
                                   ('reg', self.reg_convs, self.retina_reg)):
            source = 'input'
            for i, module in enumerate(convs):
                name = f'{branch}_convs.{i}'
                units.append(conv_module_unit(module, name, source, f'{self.sbp_name}.{name}'))
                source = name
            units.append(conv_unit(branch, source, out, where=f'{self.sbp_name}.retina_{branch}'))
        return SBPProgram(units, outputs=('cls', 'reg'), where=self.sbp_name)
