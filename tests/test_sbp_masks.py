"""Keep masks: ratios, replication across strides, randomness under a seed."""
import pytest
import torch

from sbp_mmdet.sbp import RowMaskSampler, SBPConfig, SBPIteration
from sbp_mmdet.sbp.masks import grid_row_mask


@pytest.mark.parametrize('ratio,expected', [(0.25, 0.25), (0.5, 0.5), (0.75, 0.75), (1.0, 1.0)])
def test_grid_mask_realises_the_keep_ratio(ratio, expected):
    for offset in range(4):
        mask = grid_row_mask(40, ratio, offset)
        assert mask.float().mean().item() == pytest.approx(expected)


def test_grid_offset_moves_the_pattern():
    patterns = {tuple(grid_row_mask(8, 0.5, o).tolist()) for o in range(2)}
    assert len(patterns) == 2


def test_random_mask_keeps_exactly_round_r_times_rows():
    sampler = RowMaskSampler(SBPConfig(keep_ratio=0.3, sampling='random'), seed=1)
    for _ in range(5):
        assert sampler.sample(50).sum().item() == 15


def test_masks_are_reproducible_under_a_seed_and_change_between_iterations():
    cfg = SBPConfig(keep_ratio=0.5, sampling='random')
    a, b = RowMaskSampler(cfg, seed=7), RowMaskSampler(cfg, seed=7)
    seq_a = [a.sample(64) for _ in range(4)]
    seq_b = [b.sample(64) for _ in range(4)]
    assert all(torch.equal(x, y) for x, y in zip(seq_a, seq_b))
    assert not all(torch.equal(seq_a[0], m) for m in seq_a[1:])
    other = RowMaskSampler(cfg, seed=8).sample(64)
    assert not torch.equal(other, seq_a[0])


def test_grid_offsets_vary_between_iterations():
    # period 2 cells of 2 rows: 4 possible offsets, all drawn over 40 iterations
    sampler = RowMaskSampler(SBPConfig(keep_ratio=0.5, grid_cell=2), seed=3)
    assert len({tuple(sampler.sample(10).tolist()) for _ in range(40)}) == 4


def test_sampler_state_restores_the_mask_sequence():
    cfg = SBPConfig(keep_ratio=0.5, sampling='random')
    first = RowMaskSampler(cfg, seed=5)
    first.sample(32)
    state = first.state_dict()
    expected = [first.sample(32) for _ in range(3)]
    resumed = RowMaskSampler(cfg, seed=0)
    resumed.load_state_dict(state)
    assert all(torch.equal(e, resumed.sample(32)) for e in expected)


@pytest.mark.parametrize('image_height', [64, 61, 33, 17, 1])
def test_finer_strides_replicate_the_base_mask(image_height):
    sampler = RowMaskSampler(SBPConfig(keep_ratio=0.5, sampling='random'), seed=2)
    it = SBPIteration.sample(sampler, image_height, base_stride=16)
    height = image_height
    for stride in (2, 4, 8, 16):
        height = (height + 1) // 2  # stride-2 convs round up
        kept = set(it.kept_rows(stride, height).tolist())
        for row in range(height):
            assert (row in kept) == bool(it.base_mask[min(row * stride // 16,
                                                          len(it.base_mask) - 1)])


def test_strides_coarser_than_the_base_are_not_covered():
    it = SBPIteration(torch.tensor([True, False]), base_stride=16)
    assert it.covers(8) and it.covers(16) and not it.covers(32)
    with pytest.raises(ValueError, match='not covered'):
        it.kept_rows(32, 2)


@pytest.mark.parametrize('cfg,error', [
    (dict(keep_ratio=0.0), 'keep_ratio must be in \\(0, 1\\]'),
    (dict(keep_ratio=1.5), 'keep_ratio must be in \\(0, 1\\]'),
    (dict(keep_ratio=-0.2), 'keep_ratio must be in \\(0, 1\\]'),
    (dict(keep_ratio='half'), 'keep_ratio must be a number'),
    (dict(sampling='checkerboard'), "sampling must be one of \\('grid', 'random'\\)"),
    (dict(grad_scale='sqrt'), 'grad_scale must be one of'),
    (dict(recompute='yes'), 'recompute must be True or False'),
])
def test_bad_settings_name_the_key_and_allowed_values(cfg, error):
    with pytest.raises((ValueError, TypeError), match=error):
        SBPConfig.from_dict(cfg)


def test_unknown_keys_are_refused_with_the_allowed_ones():
    with pytest.raises(KeyError, match="unknown key\\(s\\) \\['keep'\\].*allowed keys"):
        SBPConfig.from_dict(dict(keep=0.5), owner='ResNetSBP')


@pytest.mark.parametrize('cell', [1, 2, 4])
def test_grid_cells_keep_consecutive_rows(cell):
    sampler = RowMaskSampler(SBPConfig(keep_ratio=0.5, grid_cell=cell), seed=0)
    mask = sampler.sample(64)
    assert mask.float().mean().item() == pytest.approx(0.5, abs=cell / 64)
    runs = torch.diff(torch.nonzero(torch.diff(mask.int())).flatten())
    assert (runs == cell).all()  # inner runs of kept/dropped rows are one cell long


def test_grid_cell_must_be_a_positive_int():
    with pytest.raises(ValueError, match='grid_cell must be a positive int'):
        SBPConfig(grid_cell=0)
