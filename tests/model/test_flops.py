"""model.flops: counted FLOPs match closed forms (2 per multiply-add) for single layers and the
published ResNet-18 figure; peak lookup and MFU arithmetic.

Backward convention under test (what FlopCounterMode records for the ops autograd runs): one
weight-gradient product per layer, plus one input-gradient product where the layer's input
requires grad, each as costly as the forward product.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from model.flops import (
    StepFlops,
    count_flops,
    model_flops_utilisation,
    peak_flops,
    peak_flops_for_name,
    training_flops_per_image,
)
from model.simclr import SimCLR


def conv_macs(c_in: int, c_out: int, k: int, out_side: int) -> int:
    return out_side * out_side * c_out * c_in * k * k


def test_single_linear_layer():
    s, d_in, d_out = 4, 3 * 4 * 4, 5
    f = count_flops(nn.Sequential(nn.Flatten(), nn.Linear(d_in, d_out)), s)
    assert f.forward == 2 * d_in * d_out  # addmm: the bias add is not counted
    assert f.backward == 2 * d_in * d_out  # weight gradient only: the image needs no gradient


def test_two_linear_layers_second_gets_input_gradient():
    s, d_in, hidden, d_out = 4, 48, 16, 5
    f = count_flops(nn.Sequential(nn.Flatten(), nn.Linear(d_in, hidden),
                                  nn.Linear(hidden, d_out)), s)
    assert f.forward == 2 * (d_in * hidden + hidden * d_out)
    assert f.backward == 2 * d_in * hidden + 2 * (2 * hidden * d_out)


def test_single_conv_layer_strided():
    # ResNet's stem: 7x7, stride 2, padding 3, 224 -> 112
    f = count_flops(nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False), 224)
    macs = conv_macs(3, 64, 7, 112)
    assert macs == 118_013_952
    assert f.forward == 2 * macs
    assert f.backward == 2 * macs  # weight gradient only


def test_conv_stack_backward_is_about_twice_forward():
    s = 8
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1))
    f = count_flops(model, s)
    first, second = 2 * conv_macs(3, 8, 3, s), 2 * conv_macs(8, 4, 3, s)
    assert f.forward == first + second
    assert f.backward == first + 2 * second
    assert count_flops(model, s, backward=False) == StepFlops(first + second, 0.0)


def test_resnet18_forward_matches_published_macs():
    # torchvision lists ResNet-18 at 1.81 GFLOPS, counted as multiply-adds (1.82 GMACs by fvcore)
    f = count_flops(torchvision.models.resnet18(), 224, backward=False)
    assert f.forward / 2 == pytest.approx(1.82e9, rel=0.02)


def test_simclr_training_flops_per_image():
    model = SimCLR("resnet18", small_stem=True)
    f = count_flops(model, 32)
    stem = 2 * conv_macs(3, 64, 3, 32)  # the image's own gradient is never computed
    assert f.backward == pytest.approx(2 * f.forward - stem, rel=1e-9)
    assert training_flops_per_image(model, 32) == 2 * f.total
    assert training_flops_per_image(model, 32, views=1) == f.total


def test_counting_leaves_the_model_untouched():
    model = (SimCLR("resnet18", small_stem=True, head_hidden=64)
             .to(memory_format=torch.channels_last))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    wrapped = nn.Module()
    wrapped.module = model  # the DDP/Accelerate wrapper's attribute
    assert count_flops(wrapped, 32) == count_flops(model, 32)
    for k, v in model.state_dict().items():
        assert v.device.type == "cpu" and torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())


def test_bad_arguments():
    with pytest.raises(ValueError):
        count_flops(nn.Conv2d(3, 4, 3), 0)
    with pytest.raises(ValueError):
        training_flops_per_image(nn.Conv2d(3, 4, 3), 8, views=0)


def test_peak_flops_table():
    assert peak_flops("cpu", torch.bfloat16) is None
    assert peak_flops(torch.device("cpu"), torch.float32) is None
    assert peak_flops_for_name("NVIDIA H100 80GB HBM3", torch.bfloat16) == 989e12
    assert peak_flops_for_name("NVIDIA H100 80GB HBM3", torch.float16) == 989e12
    assert peak_flops_for_name("NVIDIA H100 80GB HBM3", "tf32") == 495e12
    assert peak_flops_for_name("NVIDIA H100 80GB HBM3", torch.float32) == 67e12
    assert peak_flops_for_name("NVIDIA H200", torch.bfloat16) == 989e12
    assert peak_flops_for_name("NVIDIA H100 PCIe", torch.bfloat16) == 756e12
    assert peak_flops_for_name("NVIDIA A100-SXM4-80GB", torch.bfloat16) == 312e12
    assert peak_flops_for_name("NVIDIA A100-SXM4-40GB", "tf32") == 156e12
    assert peak_flops_for_name("NVIDIA A100-PCIE-40GB", torch.float32) == 19.5e12
    assert peak_flops_for_name("Tesla T4", torch.bfloat16) is None
    assert peak_flops_for_name("NVIDIA H100 80GB HBM3", torch.float64) is None


@pytest.mark.gpu
def test_peak_flops_on_this_gpu():
    name = torch.cuda.get_device_name(0)
    assert peak_flops("cuda", torch.bfloat16) == peak_flops_for_name(name, torch.bfloat16)


def test_mfu_arithmetic():
    # 6.66 GFLOP per image at 50,000 images/s on an H100: 333 TFLOP/s of 989
    assert (model_flops_utilisation(6.66e9, 50_000, 989e12)
            == pytest.approx(6.66e9 * 50_000 / 989e12))
    assert model_flops_utilisation(6.66e9, 50_000, 989e12) == pytest.approx(0.3367, abs=1e-4)
    assert model_flops_utilisation(1e9, 1000, 1e12) == pytest.approx(1.0)
    assert model_flops_utilisation(1e9, 1000, None) is None
    with pytest.raises(ValueError):
        model_flops_utilisation(1e9, 1000, 0.0)
