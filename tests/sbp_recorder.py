"""A hook for subprocess tests: records what every rank trained on, per iteration.

Configs load it with ``custom_imports=dict(imports=['sbp_recorder'])`` (the tests
put this folder on ``PYTHONPATH``).
"""
import json
import os.path as osp

from mmengine.hooks import Hook
from mmengine.registry import HOOKS

from sbp_mmdet.hooks import SBPHook


@HOOKS.register_module()
class SBPRecorderHook(Hook):
    """Appends ``{"iter", "loss", "mask"}`` per training iteration to
    ``<work_dir>/record_rank<rank>.jsonl``; ``mask`` is the backbone's base
    keep mask as a string of 0/1."""

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        (module, *_) = SBPHook.sbp_modules(runner.model)
        mask = ''.join(str(int(k)) for k in module.sbp_iteration.base_mask.flatten().tolist())
        record = dict(iter=runner.iter + 1, loss=float(outputs['loss']), mask=mask)
        with open(osp.join(runner.work_dir, f'record_rank{runner.rank}.jsonl'), 'a') as f:
            f.write(json.dumps(record) + '\n')
