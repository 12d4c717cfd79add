"""The evaluation view's words (what export records) come from the steps the view runs: the same
parameters, so they cannot drift from the transform. The view's pixels are checked in
test_torchvision_loader.py (the official centre crop) and by the evaluation tests."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

import pipelines.eval_view as eval_view
from pipelines.spec import AugmentSpec


def test_words_name_each_step_of_the_view():
    small = eval_view.describe_eval_view(AugmentSpec(size=28))
    assert small == ("decode to 8-bit RGB (grayscale repeated to 3 channels, EXIF orientation "
                     "applied), resize the short side bilinearly (antialiased) to 28, crop the "
                     "centred 28x28, scale to [0, 1], subtract mean and divide by std per channel")
    large = eval_view.describe_eval_view(AugmentSpec(size=224))
    assert ("crop the centred square of 0.875 of the short side (offsets rounded up), resize it "
            "bicubically (no antialiasing) to 224x224, scale to [0, 1]") in large


def test_words_and_pixels_follow_the_same_parameters(monkeypatch):
    monkeypatch.setattr(eval_view, "EVAL_CROP_PROPORTION", 0.9)
    assert "square of 0.9 of the short side" in eval_view.describe_eval_view(AugmentSpec(size=64))
    img = torch.arange(3 * 50 * 73, dtype=torch.int64).remainder(251).to(torch.uint8)
    img = img.reshape(3, 50, 73)
    side, top, left = 45, 3, 14  # round(0.9 * 50); offsets (50 - 45 + 1) // 2, (73 - 45 + 1) // 2
    want = F.resize(img[:, top:top + side, left:left + side], [64, 64],
                    interpolation=v2.InterpolationMode.BICUBIC, antialias=False)
    assert torch.equal(eval_view.eval_resize(img, 64), want)


def test_a_step_without_words_is_an_error(monkeypatch):
    real = eval_view.eval_transform
    monkeypatch.setattr(eval_view, "eval_transform",
                        lambda spec: v2.Compose([*real(spec).transforms, v2.Grayscale(3)]))
    with pytest.raises(TypeError, match="Grayscale"):
        eval_view.describe_eval_view(AugmentSpec(size=28))
