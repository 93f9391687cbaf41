"""Fixtures shared by the test modules (helpers: ``sbp_builders``, ``sbp_reference``)."""
from pathlib import Path

import pytest

from sbp_mmdet.datasets import generate_synthetic_coco

from sbp_builders import TINY_DATA_CFG


@pytest.fixture(scope='module')
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding the tiny dataset where the tiny configs expect it."""
    root = tmp_path_factory.mktemp('workspace')
    generate_synthetic_coco(str(root / TINY_DATA_CFG.data_root), num_train=8, num_val=4,
                            img_size=TINY_DATA_CFG.img_scale[0], progress=False)
    return root
