"""Fixtures shared by the test modules."""
from pathlib import Path

import pytest
from mmengine.config import Config

from sbp_mmdet.datasets import generate_synthetic_coco

REPO = Path(__file__).resolve().parents[1]
TINY_DATA_CFG = Config.fromfile(
    str(REPO / 'configs' / 'synthetic' / 'faster-rcnn_r18_fpn_synthetic-tiny.py'))


@pytest.fixture(scope='module')
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding the tiny dataset where the tiny configs expect it."""
    root = tmp_path_factory.mktemp('workspace')
    generate_synthetic_coco(str(root / TINY_DATA_CFG.data_root), num_train=8, num_val=4,
                            img_size=TINY_DATA_CFG.img_scale[0], progress=False)
    return root
