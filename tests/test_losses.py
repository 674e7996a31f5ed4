import copy
import math

import pytest
import torch
import torch.nn.functional as F

from medseg_core.losses import (
    DeepSupervisionLoss,
    DiceLoss,
    bce_loss,
    build_loss,
    deep_supervision_weights,
    soft_dice_loss,
)


def _target(b=2, h=4, w=4):
    t = torch.zeros(b, 1, h, w)
    t[:, :, :2, :2] = 1  # 4 of 16 pixels
    return t


def test_bce_matches_formula():
    torch.manual_seed(0)
    logits = torch.randn(2, 1, 5, 6)
    target = (torch.rand(2, 1, 5, 6) > 0.5).float()
    p = torch.sigmoid(logits)
    expected = -(target * p.log() + (1 - target) * (1 - p).log()).mean()
    assert torch.allclose(bce_loss(logits, target), expected, atol=1e-6)
    weighted = -(3 * target * p.log() + (1 - target) * (1 - p).log()).mean()
    assert torch.allclose(bce_loss(logits, target, pos_weight=3.0), weighted, atol=1e-6)


def test_soft_dice_hand_computed():
    # p = 0.5 everywhere: intersection 2, sum(p) 8, sum(t) 4 -> dice (4 + 1) / (12 + 1)
    loss = soft_dice_loss(torch.zeros(1, 1, 4, 4), _target(1))
    assert loss.item() == pytest.approx(1 - 5 / 13, abs=1e-6)
    loss0 = soft_dice_loss(torch.zeros(1, 1, 4, 4), _target(1), smooth=0.0)
    assert loss0.item() == pytest.approx(1 - 4 / 12, abs=1e-6)


def test_soft_dice_extremes_and_empty_target():
    target = _target()
    perfect = (target * 2 - 1) * 50
    assert soft_dice_loss(perfect, target).item() == pytest.approx(0.0, abs=1e-4)
    # inverted: no overlap, |p| = 12, |t| = 4 -> dice = smooth / (16 + smooth)
    assert soft_dice_loss(-perfect, target).item() == pytest.approx(1 - 1 / 17, abs=1e-4)
    empty = torch.zeros_like(target)
    assert soft_dice_loss(torch.full_like(target, -50.0), empty).item() == pytest.approx(
        0.0, abs=1e-4
    )
    assert soft_dice_loss(torch.full_like(target, 50.0), empty).item() > 0.9
    logits = torch.zeros_like(target, requires_grad=True)
    soft_dice_loss(logits, empty).backward()
    assert torch.isfinite(logits.grad).all()


def test_soft_dice_is_per_image_mean():
    target = torch.zeros(2, 1, 4, 4)
    target[0, :, :2] = 1
    target[1, :, :1, :1] = 1  # a tiny lesion
    logits = torch.where(target > 0, 50.0, -50.0)
    logits[1] = -50.0  # miss the tiny lesion entirely
    # per image: dice 1 and (0 + 1) / (1 + 1) = 0.5 -> loss 1 - 0.75
    assert soft_dice_loss(logits, target).item() == pytest.approx(0.25, abs=1e-4)


def test_batch_dice_weighs_pixels_not_images():
    target = torch.zeros(2, 1, 4, 4)
    target[0, :, :2] = 1  # 8 pixels
    target[1, :, :1, :1] = 1  # a tiny lesion, 1 pixel
    logits = torch.where(target > 0, 50.0, -50.0)
    logits[1] = -50.0  # miss the tiny lesion entirely
    # over the batch: intersection 8, |p| 8, |t| 9 -> dice (16 + 1) / (17 + 1)
    assert soft_dice_loss(logits, target, batch_dice=True).item() == pytest.approx(
        1 - 17 / 18, abs=1e-4)
    assert soft_dice_loss(logits, target).item() == pytest.approx(0.25, abs=1e-4)
    built = build_loss({"name": "dice_bce", "bce_weight": 0.0, "batch_dice": True})
    assert built(logits, target).item() == pytest.approx(1 - 17 / 18, abs=1e-4)
    assert build_loss({"name": "dice", "batch_dice": True})(logits, target).item() == \
        pytest.approx(1 - 17 / 18, abs=1e-4)
    with pytest.raises(ValueError, match="batch_dice.*true or false"):
        build_loss({"name": "dice", "batch_dice": "yes"})


def test_dice_bce_combination_and_target_shapes():
    torch.manual_seed(1)
    logits = torch.randn(2, 1, 8, 8)
    target = (torch.rand(2, 1, 8, 8) > 0.7).float()
    loss = build_loss({"name": "dice_bce", "dice_weight": 2.0, "bce_weight": 0.5})
    expected = 2.0 * soft_dice_loss(logits, target) + 0.5 * bce_loss(logits, target)
    assert torch.allclose(loss(logits, target), expected)
    assert torch.allclose(loss(logits, target[:, 0]), expected)  # (B, H, W) target
    with pytest.raises(ValueError, match="shape"):
        loss(logits, target[:1])


def test_losses_in_float32_for_bf16_logits():
    logits = torch.randn(2, 1, 8, 8).to(torch.bfloat16)
    out = build_loss({"name": "dice_bce"})(logits, _target(2, 8, 8))
    assert out.dtype == torch.float32 and torch.isfinite(out)


def test_deep_supervision_weights_halve_and_normalise():
    w = deep_supervision_weights(3)
    assert w == pytest.approx([4 / 7, 2 / 7, 1 / 7])
    assert sum(deep_supervision_weights(5)) == pytest.approx(1.0)


def test_deep_supervision_loss_on_lists():
    torch.manual_seed(2)
    target = _target(2, 8, 8)
    outs = [torch.randn(2, 1, 8, 8) for _ in range(3)]
    base = DiceLoss()
    parts = [base(o, target) for o in outs]
    default = build_loss({"name": "dice"})
    assert torch.allclose(
        default(outs, target), sum(w * p for w, p in zip([4 / 7, 2 / 7, 1 / 7], parts))
    )
    assert torch.allclose(default(outs[0], target), parts[0])  # a Tensor is not weighted
    custom = build_loss({"name": "dice", "deep_supervision_weights": [1, 1, 0]})
    assert torch.allclose(custom(outs, target), (parts[0] + parts[1]) / 2)
    with pytest.raises(ValueError, match="weights"):
        DeepSupervisionLoss(base, [1.0])(outs, target)
    for bad in ([1.0, -0.5, 0.0], [1.0, math.nan, 0.0]):  # a negative weight rewards a worse
        with pytest.raises(ValueError, match="finite and >= 0"):  # output: unbounded below
            DeepSupervisionLoss(base, bad)(outs, target)
    low_res = torch.randn(2, 1, 4, 4)  # a coarser aux output gets a nearest-downsampled target
    assert torch.isfinite(default([outs[0], low_res], target))


def test_build_loss_validation():
    cfg = {
        "name": "dice_bce",
        "dice_weight": 1.0,
        "bce_weight": 1.0,
        "deep_supervision_weights": None,
    }
    before = copy.deepcopy(cfg)
    build_loss(cfg)
    assert cfg == before
    with pytest.raises(ValueError, match="dice_bce"):
        build_loss({"name": "focal"})
    with pytest.raises(ValueError, match="gamma"):
        build_loss({"name": "dice", "gamma": 2})


def test_cross_entropy_options():
    torch.manual_seed(3)
    logits = torch.randn(6, 3)
    labels = torch.tensor([0, 1, 2, 2, 1, 0])
    plain = build_loss({"name": "ce"})
    assert torch.allclose(plain(logits, labels), F.cross_entropy(logits, labels))
    weighted = build_loss({"name": "ce", "class_weights": [1.0, 2.0, 0.5]})
    expected = F.cross_entropy(logits, labels, weight=torch.tensor([1.0, 2.0, 0.5]))
    assert torch.allclose(weighted(logits, labels), expected)
    smooth = build_loss({"name": "ce", "label_smoothing": 0.1})
    assert torch.allclose(
        smooth(logits, labels), F.cross_entropy(logits, labels, label_smoothing=0.1)
    )
    assert not math.isclose(smooth(logits, labels).item(), plain(logits, labels).item())
    unknown = torch.tensor([0, -1, 2, 2, -1, 0])  # -1 labels are ignored
    keep = unknown >= 0
    assert torch.allclose(plain(logits, unknown), F.cross_entropy(logits[keep], unknown[keep]))
    # a batch with no labelled sample: zero loss and gradients (PyTorch's mean gives 0/0 = NaN)
    logits.requires_grad_(True)
    none = plain(logits, torch.full((6,), -1))
    none.backward()
    assert none.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))
