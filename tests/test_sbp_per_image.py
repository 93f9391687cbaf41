"""Per-image masks: exact forward, gradients equal to a per-image where/detach
reference for programs, whole backbones + necks and an SBP head."""
import pytest
import torch

from sbp_mmdet.sbp import SavedTensorMeter, SBPIteration

from sbp_builders import (basic, basic_program, bottleneck, bottleneck_program, build_detector,
                          faster_rcnn_cfg, fpn_output, fpn_program, preprocessed_batch,
                          small_faster_rcnn_cfg)
from sbp_reference import (add_reference_hooks, assert_grads_match, assert_same, compare,
                           head_hooks, reference_units, total_loss)

# two images, each keeping 5 of 10 base rows, in different places
PER_IMAGE = {
    'grid': [[True, False] * 5, [False, True] * 5],
    'random': [[True, True, False, True, False, False, False, True, True, False],
               [False, False, True, True, True, False, True, False, False, True]],
    'one_empty_band': [[False] * 5 + [True] * 5, [True] * 5 + [False] * 5],
}


@pytest.mark.parametrize('recompute', [False, True], ids=['store', 'recompute'])
@pytest.mark.parametrize('masks', list(PER_IMAGE), ids=list(PER_IMAGE))
@pytest.mark.parametrize('height', [32, 29, 1])
def test_exact_input_grad_with_per_image_masks_matches_its_reference(recompute, masks, height):
    assert_same(*compare(lambda: bottleneck(train=False), bottleneck_program,
                         (2, 16, height, 11), PER_IMAGE[masks], recompute=recompute,
                         exact_input_grad=True))


@pytest.mark.parametrize('train', [True, False], ids=['train_bn', 'eval_bn'])
@pytest.mark.parametrize('recompute', [False, True], ids=['store', 'recompute'])
@pytest.mark.parametrize('masks', list(PER_IMAGE), ids=list(PER_IMAGE))
@pytest.mark.parametrize('height', [32, 29, 3, 1])
def test_bottleneck_with_per_image_masks_matches_the_reference(train, recompute, masks, height):
    assert_same(*compare(lambda: bottleneck(train=train), bottleneck_program,
                         (2, 16, height, 11), PER_IMAGE[masks], recompute=recompute))


@pytest.mark.parametrize('recompute', [False, True], ids=['store', 'recompute'])
@pytest.mark.parametrize('masks', list(PER_IMAGE), ids=list(PER_IMAGE))
@pytest.mark.parametrize('height', [16, 13, 1])
def test_basic_block_with_per_image_masks_matches_the_reference(recompute, masks, height):
    assert_same(*compare(basic, basic_program, (2, 8, height, 7), PER_IMAGE[masks],
                         stride=8, recompute=recompute))


@pytest.mark.parametrize('masks', list(PER_IMAGE), ids=list(PER_IMAGE))
def test_conv_with_bias_and_per_image_masks_matches_the_reference(masks):
    assert_same(*compare(fpn_output, fpn_program, (2, 8, 19, 9), PER_IMAGE[masks]))


@pytest.mark.parametrize('height', [64, 61, 33, 17, 1])
def test_per_image_rows_keep_the_same_count_in_every_image_at_every_stride(height):
    it = SBPIteration(torch.tensor(PER_IMAGE['random']), base_stride=16)
    for stride in (1, 2, 4, 8, 16):
        map_height = -(-height // stride)
        rows = it.kept_rows(stride, map_height)
        assert rows.shape[0] == 2
        for image, mask in enumerate(it.base_mask):
            wanted = set(torch.nonzero(mask[(torch.arange(map_height) * stride) // 16]).flatten()
                         .tolist())
            assert wanted <= set(rows[image].tolist())  # the image's own rows, maybe more
            assert len(set(rows[image].tolist())) == rows.shape[1]


def test_per_image_masks_store_as_much_as_the_most_demanding_shared_mask():
    torch.manual_seed(0)
    modules = bottleneck(64, 16, stride=2)
    x = torch.randn(2, 64, 64, 32, requires_grad=True)

    def saved(masks):
        meter = SavedTensorMeter(modules)
        with meter.measure():
            bottleneck_program(modules)(x, SBPIteration(torch.tensor(masks), 16), 4)
        return meter.total_bytes

    # 16 base rows cover the 64 rows at stride 4; the second mask's bands have
    # a halo row above them at the top of the map, the first's do not
    first, second = [True, False] * 8, [False, True] * 8
    per_image = saved([first, second])
    # packed rows are rectangular: each image stores as many rows as the
    # image that needs most, as if that image's mask were shared
    assert min(saved(first), saved(second)) < per_image <= max(saved(first), saved(second))


def per_image_cfg(cfg, sampling):
    cfg.backbone.sbp.update(sampling=sampling, per_image=True)
    return cfg


@pytest.mark.parametrize('shapes', [
    [(96, 128)] * 2,
    [(37, 53), (61, 29)],  # padded to one size
    [(20, 28)] * 2,  # 1-row coarse levels
])
@pytest.mark.parametrize('sampling', ['grid', 'random'])
def test_detector_with_per_image_masks_is_exact_with_reference_gradients(shapes, sampling):
    sbp_model = build_detector(per_image_cfg(small_faster_rcnn_cfg(True), sampling))
    dense = build_detector(small_faster_rcnn_cfg(False))
    dense.load_state_dict(sbp_model.state_dict())
    data = preprocessed_batch(sbp_model, shapes)
    loss = total_loss(sbp_model, data)
    iteration = sbp_model.backbone.sbp_iteration
    assert iteration.per_image
    if iteration.base_mask.shape[1] >= 4:  # 2 base rows: the filled masks may coincide
        assert not torch.equal(iteration.base_mask[0], iteration.base_mask[1])
    height = data['inputs'].shape[2]
    units = reference_units(dense, sbp_model, iteration, [(0, 4), (1, 8), (2, 16), (3, 32)])
    add_reference_hooks(units, iteration, height)
    ref_loss = total_loss(dense, data)
    torch.testing.assert_close(loss, ref_loss)
    loss.backward()
    ref_loss.backward()
    assert_grads_match(sbp_model, dense)


@pytest.mark.parametrize('shapes', [[(96, 128)] * 2, [(37, 53), (61, 29)], [(20, 28)] * 2])
def test_rpn_head_with_per_image_masks_is_exact_with_reference_gradients(shapes):
    sbp_model = build_detector(per_image_cfg(faster_rcnn_cfg(True), 'random'))
    dense = build_detector(faster_rcnn_cfg(False))
    dense.load_state_dict(sbp_model.state_dict())
    data = preprocessed_batch(sbp_model, shapes)
    loss = total_loss(sbp_model, data)
    iteration = sbp_model.backbone.sbp_iteration
    assert iteration.per_image and sbp_model.rpn_head.sbp_iteration is iteration
    height = data['inputs'].shape[2]
    add_reference_hooks(reference_units(dense, sbp_model, iteration,
                                        [(0, 4), (1, 8), (2, 16), (3, 32)]), iteration, height)
    head_hooks(dense.rpn_head, iteration, height)
    ref_loss = total_loss(dense, data)
    assert torch.equal(loss, ref_loss)
    loss.backward()
    ref_loss.backward()
    assert_grads_match(sbp_model, dense)


def test_objects_policy_gets_the_boxes_from_the_detector_forward():
    from sbp_mmdet.hooks import feed_gt_boxes
    cfg = small_faster_rcnn_cfg(True)
    cfg.backbone.sbp.update(sampling='objects', per_image=True)
    model = build_detector(cfg)
    data = preprocessed_batch(model, [(96, 128), (64, 96)])
    with pytest.raises(ValueError, match="needs the batch's ground-truth boxes"):
        total_loss(model, data)
    handle = feed_gt_boxes(model, [model.backbone.mask_sampler])
    total_loss(model, data)
    iteration = model.backbone.sbp_iteration
    stride = iteration.base_stride
    for mask, sample in zip(iteration.base_mask, data['data_samples']):
        top = torch.arange(len(mask)) * stride
        boxes = sample.gt_instances.bboxes
        covered = ((top[:, None] < boxes[:, 3]) & (top[:, None] + stride > boxes[:, 1])).any(1)
        assert bool((mask <= covered).all() or (covered <= mask).all())  # boxes' rows first
    handle.remove()
    with pytest.raises(ValueError, match="needs the batch's ground-truth boxes"):
        total_loss(model, data)


@pytest.mark.parametrize('per_image', [False, True])
def test_reading_absent_rows_never_zeroes_the_stored_rows(per_image):
    from sbp_mmdet.sbp.rows import Packed
    stored = torch.tensor([0, 5, 6])
    wanted = torch.tensor([3, 5, 6])  # row 3 absent: its clamped position is 0
    if per_image:
        stored, wanted = stored.expand(2, -1), wanted.expand(2, -1)
    data = torch.ones(2, 1, 3, 2)
    packed = Packed(data, stored, height=8)
    taken = packed.take(wanted)
    assert taken[:, :, 0].eq(0).all() and taken[:, :, 1:].eq(1).all()
    assert data.eq(1).all()
