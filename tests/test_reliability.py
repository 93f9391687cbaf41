"""Reliability on the tiny synthetic set: bad data stops training with the file and the
problem named.

Each test works in a temporary folder where the tiny config finds its data
(``data/synthetic_coco_tiny/``); ``tools/train.py`` runs as a subprocess there, as a
user runs it (see ``test_tools.py``).
"""
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest
from mmengine.config import Config

import sbp_mmdet  # noqa: F401
from sbp_mmdet.datasets import generate_synthetic_coco
from sbp_mmdet.utils import AnnotationFileError, check_dataset

REPO = Path(__file__).resolve().parents[1]
TINY_SBP = REPO / 'configs' / 'synthetic' / 'faster-rcnn_r18_fpn_sbp_synthetic-tiny.py'
TINY_CFG = Config.fromfile(str(TINY_SBP))


@pytest.fixture(scope='module')
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding the tiny dataset where the tiny config expects it."""
    root = tmp_path_factory.mktemp('reliability')
    generate_synthetic_coco(str(root / TINY_CFG.data_root), num_train=8, num_val=4,
                            img_size=TINY_CFG.img_scale[0], progress=False)
    return root


@pytest.fixture
def workspace_copy(workspace: Path, tmp_path: Path) -> Path:
    """``tmp_path`` with a copy of the tiny dataset, for one test to damage."""
    shutil.copytree(workspace / 'data', tmp_path / 'data')
    return tmp_path


def train_command(work_dir: Path, max_iters: int, *args: str) -> List[str]:
    """``tools/train.py`` on the tiny SBP config: seeded and deterministic, a
    checkpoint and an unsmoothed loss log every iteration, no validation."""
    return [sys.executable, str(REPO / 'tools' / 'train.py'), str(TINY_SBP),
            '--work-dir', str(work_dir), *args, '--cfg-options',
            f'train_cfg.max_iters={max_iters}', 'randomness.seed=0',
            'randomness.deterministic=True', 'default_hooks.checkpoint.interval=1',
            'log_processor.window_size=1', 'val_cfg=None', 'val_dataloader=None',
            'val_evaluator=None']


TRAIN_ANNOTATIONS = 'annotations/instances_train2017.json'


@pytest.mark.parametrize('edit,problem', [
    (lambda coco: '{"images": [', 'not valid JSON'),
    (lambda coco: json.dumps(coco['images']), 'the top level is a JSON list'),
    (lambda coco: json.dumps(dict(coco, images=None)), 'no "images" list'),
    (lambda coco: json.dumps(dict(coco, images=[], annotations=[])), '"images" is empty'),
], ids=['not-json', 'json-list', 'no-images-key', 'no-image'])
def test_bad_annotation_file_is_named_with_its_problem(workspace_copy: Path,
                                                       monkeypatch: pytest.MonkeyPatch, edit,
                                                       problem: str) -> None:
    annotations = workspace_copy / TINY_CFG.data_root / TRAIN_ANNOTATIONS
    annotations.write_text(edit(json.loads(annotations.read_text())))
    monkeypatch.chdir(workspace_copy)
    with pytest.raises(AnnotationFileError) as error:
        check_dataset(TINY_CFG, ['train_dataloader', 'val_dataloader'])
    message = str(error.value)
    assert f'{TINY_CFG.data_root}{TRAIN_ANNOTATIONS} (train_dataloader)' in message
    assert problem in message


def test_train_with_an_empty_dataset_stops_before_training(workspace_copy: Path) -> None:
    """Without the check, mmengine fails with 'need at least one array to concatenate'."""
    annotations = workspace_copy / TINY_CFG.data_root / TRAIN_ANNOTATIONS
    coco = json.loads(annotations.read_text())
    annotations.write_text(json.dumps(dict(coco, images=[], annotations=[])))
    proc = subprocess.run(train_command(workspace_copy / 'work_dirs' / 'empty', 4),
                          cwd=workspace_copy, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert (f'Annotation file {TINY_CFG.data_root}{TRAIN_ANNOTATIONS} (train_dataloader): '
            '"images" is empty') in proc.stderr
    assert not (workspace_copy / 'work_dirs').exists()  # stopped before the Runner


def test_train_with_a_corrupt_image_names_the_image(workspace_copy: Path) -> None:
    image = Path(TINY_CFG.data_root, 'train2017', '000000000003.png')
    (workspace_copy / image).write_bytes(b'not an image' * 100)
    proc = subprocess.run(train_command(workspace_copy / 'work_dirs' / 'corrupt', 4),
                          cwd=workspace_copy, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert f'failed to load image: {image}' in proc.stderr
