"""The backbone's stems: ViTDet's patch projection, and the same with a convolutional branch beside it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vglaw import create_model, get_config
from vglaw.vision import PatchConvEmbed, ViTDetBackbone
from vglaw.weights import WeightImportError, load_vit_weights


def _backbone(stem: str, **kwargs) -> ViTDetBackbone:
    torch.manual_seed(0)
    args = {"image_size": 64, "embed_dim": 32, "depth": 2, "num_heads": 2, "window_size": 2, "global_blocks": (1,)}
    return ViTDetBackbone(**(args | kwargs), drop_path=0.0, stem=stem).eval()


def test_patch_conv_stem_is_the_documented_sum() -> None:
    """The patch projection plus log2(16) = 4 stride-2 3x3 convolutions widening to C (each with a channel
    LayerNorm and GELU) and a linear map, written out with torch.nn.functional from the stem's own tensors."""
    stem = PatchConvEmbed(image_size=64, patch_size=16, embed_dim=128)
    convs = [m for m in stem.convs if isinstance(m, torch.nn.Conv2d)]
    norms = [m for m in stem.convs if m.__class__.__name__ == "LayerNorm2d"]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding) for c in convs] == [
        (3, 16, (3, 3), (2, 2), (1, 1)),
        (16, 32, (3, 3), (2, 2), (1, 1)),
        (32, 64, (3, 3), (2, 2), (1, 1)),
        (64, 128, (3, 3), (2, 2), (1, 1)),
    ]
    assert (stem.out.in_features, stem.out.out_features) == (128, 128)
    images = torch.randn(2, 3, 64, 64)
    x = images
    for conv, norm in zip(convs, norms, strict=True):
        x = F.conv2d(x, conv.weight, stride=2, padding=1)
        x = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), norm.weight, norm.bias, norm.eps).permute(0, 3, 1, 2)
        x = F.gelu(x)
    branch = F.linear(x.permute(0, 2, 3, 1), stem.out.weight, stem.out.bias)
    patches = F.conv2d(images, stem.patch.proj.weight, stem.patch.proj.bias, stride=16).permute(0, 2, 3, 1)
    torch.testing.assert_close(stem(images), patches + branch)


@pytest.mark.parametrize("stem", ["patch", "patch+conv"])
def test_both_stems_give_one_token_per_16_px(stem: str) -> None:
    backbone = _backbone(stem)
    assert backbone(torch.randn(2, 3, 64, 64)).shape == (2, 32, 4, 4)


def test_patch_conv_tokens_shift_with_the_image_by_whole_patches() -> None:
    """Stride 16 exactly: shifting the image 16 px right shifts every token away from the border one cell."""
    stem = PatchConvEmbed(image_size=128, patch_size=16, embed_dim=32).eval()
    images = torch.randn(1, 3, 128, 128)
    shifted = torch.roll(images, shifts=16, dims=3)
    with torch.no_grad():
        tokens, moved = stem(images), stem(shifted)  # [1, 8, 8, C]
    # Columns 2..6 of the shifted image's tokens see only pixels that the roll moved intact (a token's
    # receptive field reaches less than 16 px past its patch), away from the wrapped-around column.
    torch.testing.assert_close(moved[:, :, 2:7], tokens[:, :, 1:6], rtol=1e-5, atol=1e-5)


def test_stem_is_validated_and_reaches_the_model() -> None:
    model = create_model("tiny", vocab_size=64, stem="patch+conv")
    assert isinstance(model.visual.patch_embed, PatchConvEmbed)
    assert get_config("tiny").vision.stem == "patch" and get_config("base").vision.stem == "patch"
    with pytest.raises(ValueError, match=r"stem must be one of patch, patch\+conv, got 'conv'"):
        get_config("tiny", stem="conv")
    with pytest.raises(ValueError, match="patch_size 12 is not a power of 2"):
        get_config("tiny", stem="patch+conv", patch_size=12, image_size=96)


def test_both_branches_learn_with_the_model() -> None:
    model = create_model("tiny", vocab_size=64, stem="patch+conv")
    out = model(torch.randn(2, 3, 128, 128), torch.randint(5, 60, (2, 6)), torch.ones(2, 6, dtype=torch.long))
    (out.boxes.sum() + out.mask_logits.sum()).backward()
    for param in (model.visual.patch_embed.convs[0].weight, model.visual.patch_embed.patch.proj.weight):
        assert param.grad is not None and param.grad.abs().sum() > 0


def test_pretrained_vit_weights_refuse_a_patch_conv_stem() -> None:
    """A ViT checkpoint holds a patch projection only: loading one into a patch+conv backbone says why it cannot."""
    checkpoint = _backbone("patch").state_dict()
    load_vit_weights(_backbone("patch"), checkpoint)  # the same checkpoint fits the patch stem
    with pytest.raises(WeightImportError, match=r"stem is patch\+conv"):
        load_vit_weights(_backbone("patch+conv"), checkpoint)
