"""Keep masks: ratios, replication across strides, randomness under a seed."""
import pytest
import torch

from sbp_mmdet.sbp import MASK_POLICIES, MaskConfig, RowMaskSampler, SBPIteration, parse_sbp
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
    sampler = RowMaskSampler(MaskConfig(keep_ratio=0.3, sampling='random'), seed=1)
    for _ in range(5):
        assert sampler.sample(50).sum().item() == 15


def test_masks_are_reproducible_under_a_seed_and_change_between_iterations():
    cfg = MaskConfig(keep_ratio=0.5, sampling='random')
    a, b = RowMaskSampler(cfg, seed=7), RowMaskSampler(cfg, seed=7)
    seq_a = [a.sample(64) for _ in range(4)]
    seq_b = [b.sample(64) for _ in range(4)]
    assert all(torch.equal(x, y) for x, y in zip(seq_a, seq_b))
    assert not all(torch.equal(seq_a[0], m) for m in seq_a[1:])
    other = RowMaskSampler(cfg, seed=8).sample(64)
    assert not torch.equal(other, seq_a[0])


def test_grid_offsets_vary_between_iterations():
    # period 2 cells of 2 rows: 4 possible offsets, all drawn over 40 iterations
    sampler = RowMaskSampler(MaskConfig(keep_ratio=0.5, grid_cell=2), seed=3)
    assert len({tuple(sampler.sample(10).tolist()) for _ in range(40)}) == 4


def test_sampler_state_restores_the_mask_sequence():
    cfg = MaskConfig(keep_ratio=0.5, sampling='random')
    first = RowMaskSampler(cfg, seed=5)
    first.sample(32)
    state = first.state_dict()
    expected = [first.sample(32) for _ in range(3)]
    resumed = RowMaskSampler(cfg, seed=0)
    resumed.load_state_dict(state)
    assert all(torch.equal(e, resumed.sample(32)) for e in expected)


@pytest.mark.parametrize('image_height', [64, 61, 33, 17, 1])
def test_finer_strides_replicate_the_base_mask(image_height):
    sampler = RowMaskSampler(MaskConfig(keep_ratio=0.5, sampling='random'), seed=2)
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
    (dict(sampling='checkerboard'),
     "sampling must be one of the registered mask policies \\['grid', 'objects', .*'random'\\], "
     "got 'checkerboard'"),
    (dict(grad_scale='sqrt'), 'grad_scale must be one of'),
    (dict(recompute='yes'), "recompute must be True, False or 'all'"),
])
def test_bad_settings_name_the_key_and_allowed_values(cfg, error):
    with pytest.raises((ValueError, TypeError), match=error):
        parse_sbp(cfg, 'ResNetSBP', draws_mask=True)


def test_unknown_keys_are_refused_with_the_allowed_ones():
    with pytest.raises(KeyError, match="unknown key\\(s\\) \\['keep'\\].*allowed keys"):
        parse_sbp(dict(keep=0.5), 'ResNetSBP', draws_mask=True)


@pytest.mark.parametrize('cell', [1, 2, 4])
def test_grid_cells_keep_consecutive_rows(cell):
    sampler = RowMaskSampler(MaskConfig(keep_ratio=0.5, grid_cell=cell), seed=0)
    mask = sampler.sample(64)
    assert mask.float().mean().item() == pytest.approx(0.5, abs=cell / 64)
    runs = torch.diff(torch.nonzero(torch.diff(mask.int())).flatten())
    assert (runs == cell).all()  # inner runs of kept/dropped rows are one cell long


def test_grid_cell_must_be_a_positive_int():
    with pytest.raises(ValueError, match='grid_cell must be a positive int'):
        MaskConfig(grid_cell=0)


def request(policy_rank=0, per_image=True, keep_ratio=0.5, num_rows=13, step=0, cell=2,
            boxes=None, world_size=2):
    from sbp_mmdet.sbp import MaskRequest
    shared = torch.Generator().manual_seed(1000 + step)
    own = torch.Generator().manual_seed(2000 + 7 * policy_rank + step)
    return MaskRequest(num_rows, 16, keep_ratio, 3, per_image, cell, own, shared, policy_rank,
                       world_size, boxes)


@pytest.mark.parametrize('sampling', ['grid', 'random'])
@pytest.mark.parametrize('keep_ratio', [0.25, 0.5, 0.75])
@pytest.mark.parametrize('num_rows', [13, 16, 1])
def test_per_image_masks_keep_the_same_count_in_every_image(sampling, keep_ratio, num_rows):
    sampler = RowMaskSampler(MaskConfig(keep_ratio=keep_ratio, sampling=sampling,
                                        per_image=True), seed=4)
    draws = [sampler.sample(num_rows, batch_size=3) for _ in range(20)]
    assert all(m.shape == (3, num_rows) and m.dtype == torch.bool for m in draws)
    assert all(len(set(m.sum(dim=1).tolist())) == 1 for m in draws)
    assert any(not torch.equal(m[0], m[1]) for m in draws) or num_rows == 1


def test_per_image_grid_masks_are_grids_with_their_own_offsets():
    for step in range(10):
        masks = MASK_POLICIES['grid']().draw(request(step=step, num_rows=16))
        for mask in masks:  # 16 rows: cells of 2 rows, every other cell kept, no fill needed
            offset = next(o for o in range(4) if torch.equal(mask, grid_row_mask(16, 0.5, o, 2)))
            assert 0 <= offset < 4


@pytest.mark.parametrize('keep_ratio', [0.5, 0.25, 0.75])
@pytest.mark.parametrize('per_image', [False, True])
def test_ranks_draw_complementary_grid_offsets(keep_ratio, per_image):
    """Rank r shifts the shared offset by r cells: at keep 0.5 two ranks never
    draw the same mask and keep every row exactly once; with as many ranks as
    the grid period every row is kept by some rank."""
    period = {0.5: 2, 0.25: 4, 0.75: 4}[keep_ratio]
    for step in range(20):
        masks = [MASK_POLICIES['grid']().draw(request(rank, per_image, keep_ratio, 16, step,
                                                      world_size=period))
                 for rank in range(period)]
        assert torch.stack(masks).any(dim=0).all()
        if keep_ratio == 0.5:
            assert torch.equal(masks[0], ~masks[1])
        if keep_ratio == 0.25:
            assert torch.equal(torch.stack(masks).sum(dim=0), torch.ones_like(masks[0],
                                                                              dtype=torch.long))


def test_samplers_of_two_ranks_take_complementary_offsets_and_restore_them():
    cfg = MaskConfig(keep_ratio=0.5, sampling='grid')
    ranks = [RowMaskSampler(cfg, seed=0) for _ in range(2)]
    for rank, sampler in enumerate(ranks):
        sampler.set_seed(11, rank=rank, world_size=2)
    draws = [[sampler.sample(10) for _ in range(30)] for sampler in ranks]
    assert all(torch.equal(a, ~b) for a, b in zip(*draws))
    assert len({tuple(m.tolist()) for m in draws[0]}) == 4  # the offset still varies
    resumed = RowMaskSampler(cfg, seed=0)
    resumed.set_seed(0, rank=1, world_size=2)
    ranks[1].step = 12
    resumed.load_state_dict(ranks[1].state_dict())
    assert all(torch.equal(resumed.sample(10), m) for m in draws[1][12:])


def test_objects_policy_keeps_rows_covering_boxes_first():
    boxes = [torch.tensor([[0., 40., 10., 70.]]),  # rows 2-4 at stride 16
             torch.tensor([[5., 150., 9., 160.], [0., 0., 4., 15.]]),  # rows 9 and 0
             torch.zeros(0, 4)]
    for step in range(10):
        masks = MASK_POLICIES['objects']().draw(request(boxes=boxes, step=step))
        assert masks.sum(dim=1).tolist() == [6, 6, 6]  # round(0.5 * 13)
        assert masks[0, 2:5].all() and masks[1, [0, 9]].all()
    shared = MASK_POLICIES['objects']().draw(request(boxes=boxes, per_image=False))
    assert shared.shape == (1, 13) and shared[0, [0, 2, 3, 4, 9]].all()


def test_objects_policy_without_boxes_says_how_to_get_them():
    sampler = RowMaskSampler(MaskConfig(sampling='objects', per_image=True), seed=0)
    with pytest.raises(ValueError, match="needs the batch's ground-truth boxes.*SBPHook"):
        sampler.sample(10, batch_size=2)


def test_a_policy_with_unequal_counts_per_image_is_refused_naming_it():
    from sbp_mmdet.sbp import MaskPolicy, register_mask_policy

    @register_mask_policy('test_unequal')
    class Unequal(MaskPolicy):
        def draw(self, request):
            masks = torch.zeros(request.num_masks, request.num_rows, dtype=torch.bool)
            masks[0, 0] = True
            return masks

    try:
        sampler = RowMaskSampler(MaskConfig(sampling='test_unequal', per_image=True), seed=0)
        with pytest.raises(ValueError, match="'test_unequal' kept \\[1, 0\\] rows per image"):
            sampler.sample(10, batch_size=2)
        with pytest.raises(KeyError, match="'test_unequal' is already registered"):
            register_mask_policy('test_unequal')(Unequal)
    finally:
        del MASK_POLICIES['test_unequal']


def test_per_image_must_be_a_bool():
    with pytest.raises(TypeError, match='sbp.per_image must be True or False'):
        MaskConfig(per_image='yes')
