"""Row bookkeeping is memoised by value, bounded, and keeps SBP's operator count near dense's."""
from pathlib import Path

import pytest
import torch
from mmengine.config import Config

from sbp_mmdet.benchmark import OpCounter, measure_variant
from sbp_mmdet.sbp import index_cache
from sbp_mmdet.sbp.index_cache import memoised, row_key, same_rows, to_device
from sbp_mmdet.sbp.rows import Packed, RowGeometry
from sbp_mmdet.variants import parse_variant

REPO = Path(__file__).resolve().parents[1]


def test_memoised_results_are_keyed_by_the_rows_values():
    calls = []

    @memoised
    def shifted(rows, by):
        calls.append(by)
        return rows + by

    first = shifted(torch.tensor([1, 4, 5]), 2)
    assert shifted(torch.tensor([1, 4, 5]), 2) is first  # equal values: one computation
    assert torch.equal(shifted(torch.tensor([1, 4, 5]), 3), torch.tensor([4, 7, 8]))
    assert torch.equal(shifted(torch.tensor([1, 4]), 2), torch.tensor([3, 6]))
    assert shifted(torch.tensor([[1, 4, 5]]), 2) is not first  # another shape
    assert shifted(torch.tensor([1, 4, 5], dtype=torch.int32), 2) is not first  # another dtype
    assert calls == [2, 3, 2, 2, 2]


def test_memoised_cache_is_bounded_least_recently_used_first(monkeypatch):
    monkeypatch.setattr(index_cache, 'CACHE_SIZE', 3)

    @memoised
    def double(rows):
        return rows * 2

    kept = double(torch.tensor([0]))
    for i in range(1, 5):
        double(torch.tensor([i]))
        double(torch.tensor([0]))  # used again: stays
    assert len(double.cache) == 3
    assert double(torch.tensor([0])) is kept
    assert row_key(torch.tensor([1])) not in {key[0] for key in double.cache}


def test_same_rows_compares_values_shapes_and_per_image_rows():
    assert same_rows(torch.tensor([0, 2]), torch.tensor([0, 2]))
    assert not same_rows(torch.tensor([0, 2]), torch.tensor([0, 3]))
    assert not same_rows(torch.tensor([0, 2]), torch.tensor([[0, 2]]))
    assert same_rows(torch.tensor([[0, 2], [1, 3]]), torch.tensor([[0, 2], [1, 3]]))
    assert not same_rows(torch.tensor([[0, 2], [1, 3]]), torch.tensor([[0, 2], [1, 2]]))


def test_row_key_refuses_values_that_are_not_rows():
    with pytest.raises(TypeError, match='index or mask tensor, got torch.float32'):
        row_key(torch.zeros(2))


def test_index_moves_to_a_device_once():
    """A memoised row tensor is copied to the device at its first use only ('meta' stands
    in for a GPU here: the copy path is the same)."""
    rows = torch.tensor([0, 2, 3])
    on_device = to_device(rows, torch.device('meta'))
    assert on_device.device.type == 'meta' and on_device.shape == rows.shape
    assert to_device(rows, torch.device('meta')) is on_device
    assert to_device(rows, torch.device('cpu')) is rows


def test_memoised_bookkeeping_gives_the_same_rows_as_computed_afresh():
    """Halos, bands and positions of a layout seen before equal a fresh computation
    (the memo's values, not stale ones from another layout)."""
    geom = RowGeometry(kernel=3, stride=2, padding=1, dilation=1)
    for out_rows in (torch.tensor([0, 1, 2, 4, 5, 6]), torch.tensor([1, 2, 3, 5, 6, 7]),
                     torch.tensor([0, 1, 2, 4, 5, 6])):
        rows = geom.input_rows(out_rows, 16)
        taps = (out_rows[:, None] * 2 + torch.tensor([-1, 0, 1])).flatten()
        assert torch.equal(rows, torch.unique(taps[(taps >= 0) & (taps < 16)]))
        bands = geom.bands(out_rows)
        assert [band.t for band in bands] == [3]
        assert torch.equal(bands[0].first_in, out_rows[::3] * 2 - 1)
        packed = Packed(torch.zeros(1, 1, len(rows), 1), rows, 16)
        assert torch.equal(packed.positions(rows), torch.arange(len(rows)))


def _operators(config: str, name: str) -> tuple:
    cfg = Config.fromfile(str(REPO / 'configs' / config))
    result = measure_variant(cfg, parse_variant(name, cfg.model), 2, 128, 192, 0, 0, 'cpu')
    return result.ops, result.first_layout_ops


@pytest.mark.parametrize('config', ['synthetic/faster-rcnn_r18_fpn_sbp_synthetic.py',
                                    'synthetic/retinanet_r18_fpn_sbp_synthetic-finetune.py'])
def test_a_step_on_masks_seen_before_dispatches_few_more_operators_than_dense(config):
    """The issue's bar: SBP's gathers and scatters must not multiply the operators a step
    dispatches (a GPU's kernel launches). Once a mask layout is known, its row bookkeeping
    is looked up, not recomputed."""
    dense, _ = _operators(config, 'dense')
    for name in ('sbp@0.5', 'sbp@0.75:recompute'):
        steady, first = _operators(config, name)
        assert steady < 1.5 * dense, (name, steady, dense)
        assert first > steady  # a new layout pays its bookkeeping once


def test_operator_counter_counts_every_dispatched_operator():
    with OpCounter() as ops:
        torch.ones(2).add(1).relu()
    assert ops.total == 3


def test_measuring_without_counting_operators_runs_one_step():
    """``count_ops=False`` (sbp_fit's candidates) measures bytes and FLOPs from the one step."""
    cfg = Config.fromfile(str(REPO / 'configs' / 'synthetic'
                              / 'faster-rcnn_r18_fpn_sbp_synthetic.py'))
    result = measure_variant(cfg, parse_variant('sbp@0.5', cfg.model), 1, 64, 96, 0, 0, 'cpu',
                             count_ops=False)
    assert result.ops is None and result.first_layout_ops is None
    assert result.saved_mib > 0 and result.backward_gflop > 0
