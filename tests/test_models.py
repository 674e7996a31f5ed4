import copy

import pytest
import torch
from torch import nn

from medseg_core.models import (
    MODELS,
    AttentionGate,
    AttentionUNet,
    ImprovedUNet,
    LesionClassifier,
    UNet,
    build_model,
)
from medseg_core.models.blocks import crop_to, pad_to_multiple

SMALL = (4, 8, 16)  # three levels keep every test fast
SEGMENTERS = ["unet", "unet_bn", "improved_unet", "attention_unet"]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def keras_unet_params(in_channels: int, widths: tuple[int, ...]) -> int:
    """Parameter count of the Keras nuclei U-Net, from its layer list."""
    conv = lambda cin, cout, k: cin * cout * k * k + cout  # noqa: E731
    total, prev = 0, in_channels
    for w in widths:
        total += conv(prev, w, 3) + conv(w, w, 3)
        prev = w
    for deep, w in zip(widths[:0:-1], widths[-2::-1]):
        total += conv(deep, w, 2) + conv(2 * w, w, 3) + conv(w, w, 3)
    return total + conv(widths[0], 1, 1)


def test_unet_matches_keras_parameter_count():
    model = build_model(
        {
            "name": "unet",
            "in_channels": 3,
            "widths": [16, 32, 64, 128, 256],
            "dropout": [0.1, 0.1, 0.2, 0.2, 0.3],
        }
    )
    assert n_params(model) == 1_941_105
    assert n_params(model) == keras_unet_params(3, (16, 32, 64, 128, 256))
    assert n_params(UNet(in_channels=1, widths=SMALL)) == keras_unet_params(1, SMALL)
    dropouts = [m.p for m in model.modules() if isinstance(m, nn.Dropout)]
    assert dropouts == [0.1, 0.1, 0.2, 0.2, 0.3, 0.2, 0.2, 0.1, 0.1]


def test_unet_norm_variants():
    assert not any(isinstance(m, nn.BatchNorm2d) for m in build_model({"name": "unet"}).modules())
    bn = build_model({"name": "unet_bn", "widths": SMALL})
    assert sum(isinstance(m, nn.BatchNorm2d) for m in bn.modules()) == 4 * len(SMALL) - 2
    inst = UNet(widths=SMALL, norm="instance")
    assert any(isinstance(m, nn.InstanceNorm2d) for m in inst.modules())
    # "none" is no norm, as None is: convs keep their bias, and the same minimum size
    plain, none = UNet(widths=SMALL), UNet(widths=SMALL, norm="none")
    assert [k for k, _ in plain.named_parameters()] == [k for k, _ in none.named_parameters()]
    assert plain.min_size == none.min_size
    with pytest.raises(ValueError, match="norm"):
        UNet(norm="group")
    with pytest.raises(ValueError, match="dropout"):
        UNet(widths=SMALL, dropout=(0.1, 0.2))


@pytest.mark.parametrize("name", SEGMENTERS)
@pytest.mark.parametrize("size", [(97, 131), (16, 16), (1, 3)])
def test_segmenters_accept_any_size(name, size):
    model = build_model({"name": name, "widths": SMALL, "in_channels": 2, "out_channels": 3})
    model.train()
    out = model(torch.randn(2, 2, *size))
    outs = out if isinstance(out, list) else [out]
    for o in outs:
        assert o.shape == (2, 3, *size)
        assert torch.isfinite(o).all()


def test_pad_and_crop():
    x = torch.arange(2 * 5 * 7, dtype=torch.float32).reshape(1, 2, 5, 7)
    padded, size = pad_to_multiple(x, 4)
    assert padded.shape == (1, 2, 8, 8) and size == (5, 7)
    assert torch.equal(crop_to(padded, size), x)
    assert torch.equal(padded[..., 5, :7], x[..., 3, :])  # reflect: row 5 mirrors row 3
    tiny, _ = pad_to_multiple(torch.ones(1, 1, 1, 2), 8)  # too small to reflect
    assert tiny.shape == (1, 1, 8, 8) and torch.equal(tiny, torch.ones_like(tiny))
    zeros, _ = pad_to_multiple(torch.ones(1, 1, 3, 3), 4, mode="zeros", min_size=8)
    assert zeros.shape == (1, 1, 8, 8) and zeros.sum() == 9
    same, _ = pad_to_multiple(x[..., :4, :4], 4)
    assert same.shape == (1, 2, 4, 4)


def test_improved_unet_deep_supervision():
    model = ImprovedUNet(widths=(4, 8, 16, 32), dropout=0.0, deep_supervision=True, seg_levels=3)
    x = torch.randn(2, 3, 37, 45)
    model.train()
    outs = model(x)
    assert isinstance(outs, list) and len(outs) == 3
    assert all(o.shape == (2, 1, 37, 45) for o in outs)
    # the aux heads are distinct outputs, not copies of the main one
    assert not torch.allclose(outs[0], outs[1]) and not torch.allclose(outs[1], outs[2])
    model.deep_supervision = False
    assert torch.allclose(model(x), outs[0], atol=1e-6)
    model.deep_supervision = True
    model.eval()
    main = model(x)
    assert isinstance(main, torch.Tensor) and main.shape == (2, 1, 37, 45)
    assert isinstance(ImprovedUNet(widths=SMALL, seg_levels=1, deep_supervision=True)(x), list)
    with pytest.raises(ValueError, match="seg_levels"):
        ImprovedUNet(widths=SMALL, seg_levels=3)


def test_improved_unet_structure_follows_paper():
    model = ImprovedUNet()
    assert any(isinstance(m, nn.InstanceNorm2d) for m in model.modules())
    slopes = {m.negative_slope for m in model.modules() if isinstance(m, nn.LeakyReLU)}
    assert slopes == {0.01}
    assert {m.p for m in model.modules() if isinstance(m, nn.Dropout2d)} == {0.3}
    strides = [m.stride for m in model.down]
    assert strides == [(1, 1)] + [(2, 2)] * 4
    assert len(model.seg) == 3


def test_improved_unet_backward_through_all_heads():
    model = ImprovedUNet(widths=SMALL, deep_supervision=True, seg_levels=2).train()
    outs = model(torch.randn(2, 3, 20, 20))
    sum(o.mean() for o in outs).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_attention_gate_coefficients():
    gate = AttentionGate(x_channels=4, g_channels=8, inter_channels=2)
    x, g = torch.randn(2, 4, 16, 16), torch.randn(2, 8, 8, 8)
    alpha = gate.coefficients(x, g)
    assert alpha.shape == (2, 1, 16, 16)
    assert (alpha >= 0).all() and (alpha <= 1).all()
    assert gate(x, g).shape == x.shape
    model = AttentionUNet(widths=SMALL)
    assert len(model.gates) == len(SMALL) - 1


def test_classifier_uses_image_and_mask():
    model = LesionClassifier(widths=(4, 8, 16), num_classes=3).eval()
    image = torch.randn(2, 3, 33, 47)
    mask = torch.zeros(2, 1, 33, 47)
    mask[:, :, 10:20, 10:30] = 1
    logits = model(image, mask)
    assert logits.shape == (2, 3)
    other_mask = torch.zeros_like(mask)  # empty mask: defined, and a different answer
    empty_logits = model(image, other_mask)
    assert torch.isfinite(empty_logits).all()
    assert not torch.allclose(logits, empty_logits)
    assert torch.allclose(model(image, mask[:, 0]), logits)  # (B, H, W) mask accepted
    assert model(torch.randn(1, 3, 1, 1), torch.ones(1, 1, 1, 1)).shape == (1, 3)
    with pytest.raises(ValueError, match="mask shape"):
        model(image, mask[..., :10])


def test_classifier_parameter_head_size():
    model = LesionClassifier(widths=(4, 8), num_classes=5)
    assert model.fc.in_features == 2 * 8 + 1 and model.fc.out_features == 5
    assert LesionClassifier(widths=(4, 8), mask_pooling=False).fc.in_features == 8


def test_build_model_registry():
    assert set(MODELS) == {"unet", "unet_bn", "improved_unet", "attention_unet", "classifier"}
    cfg = {"name": "unet", "widths": [4, 8], "dropout": [0.0, 0.1]}
    before = copy.deepcopy(cfg)
    model = build_model(cfg)
    assert cfg == before
    assert isinstance(model, UNet)
    assert isinstance(build_model({"name": "unet_bn", "widths": SMALL}), UNet)
    assert isinstance(
        build_model({"name": "improved_unet", "widths": SMALL, "seg_levels": 2}), ImprovedUNet
    )
    assert isinstance(build_model({"name": "attention_unet", "widths": SMALL}), AttentionUNet)
    assert isinstance(build_model({"name": "classifier", "widths": [4]}), LesionClassifier)
    with pytest.raises(ValueError, match="attention_unet") as err:
        build_model({"name": "segformer"})
    assert "unet_bn" in str(err.value)
    with pytest.raises(ValueError, match="name"):
        build_model({"widths": SMALL})
    with pytest.raises(TypeError, match="unet"):
        build_model({"name": "unet", "depth_multiplier": 2})


@pytest.mark.parametrize("name", [*SEGMENTERS, "classifier"])
def test_channels_last_and_bf16_autocast(name):
    model = (
        build_model({"name": name, "widths": SMALL}).eval().to(memory_format=torch.channels_last)
    )
    x = torch.randn(2, 3, 29, 35).to(memory_format=torch.channels_last)
    args = (x, (torch.rand(2, 1, 29, 35) > 0.5).float()) if name == "classifier" else (x,)
    with torch.no_grad():
        reference = model(*args)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(*args)
    assert out.shape == reference.shape
    assert torch.isfinite(out.float()).all()
    # bf16 has ~3 significant digits; the outputs must still agree roughly
    assert torch.allclose(out.float(), reference, atol=0.25, rtol=0.1)


@pytest.mark.parametrize("name", SEGMENTERS)
def test_segmenters_train_step_reduces_loss(name):
    torch.manual_seed(0)
    model = build_model({"name": name, "widths": SMALL}).train()
    x = torch.randn(2, 3, 16, 16)
    y = (x[:, :1] > 0).float()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]
