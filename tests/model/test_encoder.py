"""ResNet encoder against torchvision's ResNets; projection head layout; SimCLR forward."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from model.encoder import ResNetEncoder
from model.simclr import ProjectionHead, SimCLR


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _meta_shapes(build) -> dict[str, tuple[int, ...]]:
    """State-dict shapes of a model built on the meta device (no memory, no initialisation cost)."""
    with torch.device("meta"):
        return _shapes(build())


def _layer1_side(enc: nn.Module, side: int) -> tuple[int, int]:
    out = {}
    handle = enc.layer1.register_forward_hook(lambda m, i, o: out.__setitem__("shape", o.shape))
    with torch.no_grad():
        enc.eval()(torch.randn(2, 3, side, side))
    handle.remove()
    return tuple(out["shape"][-2:])


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_width_one_matches_torchvision_parameters_and_outputs(arch):
    ref = getattr(torchvision.models, arch)(weights=None)
    enc = ResNetEncoder(arch, width=1)
    ref_shapes = {k: s for k, s in _shapes(ref).items() if not k.startswith("fc.")}
    assert _shapes(enc) == ref_shapes  # same names (buffers included), same shapes
    assert ({k for k, _ in enc.named_parameters()}
            == {k for k, _ in ref.named_parameters() if not k.startswith("fc.")})
    # torchvision's weights load strictly, and the forward pass is torchvision's minus the
    # classifier
    with torch.no_grad():  # non-trivial BN statistics so eval mode exercises them
        for m in ref.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    enc.load_state_dict({k: v for k, v in ref.state_dict().items() if not k.startswith("fc.")},
                        strict=True)
    ref.fc = nn.Identity()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        got, want = enc.eval()(x), ref.eval()(x)
    assert got.shape == (2, enc.feat_dim) == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50", "resnet101"])
def test_feat_dim_is_torchvision_classifier_input(arch):
    with torch.device("meta"):
        enc, ref = ResNetEncoder(arch, width=1), getattr(torchvision.models, arch)(weights=None)
    assert enc.feat_dim == ref.fc.in_features == (512 if arch in ("resnet18", "resnet34") else 2048)
    assert _shapes(enc) == {k: s for k, s in _shapes(ref).items() if not k.startswith("fc.")}


@pytest.mark.parametrize("arch,expansion", [("resnet18", 1), ("resnet50", 4)])
def test_half_width_halves_every_channel_count(arch, expansion):
    fs = _meta_shapes(lambda: ResNetEncoder(arch, width=1))
    hs = _meta_shapes(lambda: ResNetEncoder(arch, width=0.5))
    assert fs.keys() == hs.keys()
    for k, shape in fs.items():
        if k.endswith("num_batches_tracked"):
            continue
        if k == "conv1.weight":  # the input's 3 colour channels stay
            assert hs[k] == (shape[0] // 2, 3, *shape[2:])
        else:
            assert hs[k] == tuple(d // 2 for d in shape[:2]) + shape[2:], k
    half = ResNetEncoder(arch, width=0.5)
    assert half.feat_dim == 512 * expansion // 2
    with torch.no_grad():
        assert half.eval()(torch.randn(2, 3, 32, 32)).shape == (2, half.feat_dim)


def test_resnet18_half_width_has_256_features():
    assert ResNetEncoder("resnet18", width=0.5).feat_dim == 256


@pytest.mark.parametrize("small_stem,side", [(True, 32), (False, 8)])
def test_small_stem_keeps_the_input_resolution(small_stem, side):
    enc = ResNetEncoder("resnet18", width=0.25, small_stem=small_stem)
    assert _layer1_side(enc, 32) == (side, side)
    if small_stem:
        assert enc.conv1.kernel_size == (3, 3) and enc.conv1.stride == (1, 1)
        assert isinstance(enc.maxpool, nn.Identity)


def test_small_stem_with_pool_halves_the_resolution():
    enc = ResNetEncoder("resnet18", width=0.25, small_stem=True, stem_pool=True)
    assert _layer1_side(enc, 32) == (16, 16)
    assert isinstance(enc.maxpool, nn.MaxPool2d) and enc.conv1.stride == (1, 1)


@pytest.mark.parametrize("kwargs", [dict(arch="resnet19"), dict(arch="vit_b_16"),
                                    dict(arch="resnet18", width=0),
                                    dict(arch="resnet18", width=-0.5)])
def test_bad_arguments_raise(kwargs):
    arch = kwargs.pop("arch")
    with pytest.raises(ValueError):
        ResNetEncoder(arch, **kwargs)


@pytest.mark.parametrize("layers", [2, 3])
def test_projection_head_layout(layers):
    head = ProjectionHead(32, 48, 16, layers=layers)
    mods = list(head)
    assert len(mods) == 3 * (layers - 1) + 1
    dim = 32
    for i in range(layers - 1):  # Linear -> BN -> ReLU blocks
        lin, bn, act = mods[3 * i: 3 * i + 3]
        assert isinstance(lin, nn.Linear) and (lin.in_features, lin.out_features) == (dim, 48)
        assert lin.bias is None  # the BN that follows makes a bias redundant
        assert isinstance(bn, nn.BatchNorm1d) and bn.num_features == 48
        assert isinstance(act, nn.ReLU)
        dim = 48
    last = mods[-1]
    assert isinstance(last, nn.Linear) and (last.in_features, last.out_features) == (dim, 16)
    x = torch.randn(5, 32)
    out = head.train()(x)
    assert out.shape == (5, 16)
    # oracle: the same maths written out by hand (training-mode BN uses the batch statistics)
    h = x
    for i in range(layers - 1):
        h = h @ mods[3 * i].weight.T
        h = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + mods[3 * i + 1].eps)
        h = torch.relu(h * mods[3 * i + 1].weight + mods[3 * i + 1].bias)
    torch.testing.assert_close(out, h @ last.weight.T + last.bias, rtol=1e-4, atol=1e-5)


def test_projection_head_needs_a_layer():
    assert [type(m) for m in ProjectionHead(8, 8, 4, layers=1)] == [nn.Linear]
    with pytest.raises(ValueError):
        ProjectionHead(8, 8, 4, layers=0)


@pytest.mark.parametrize("head_hidden,head_layers", [(0, 2), (64, 3)])
def test_simclr_forward_returns_h_and_z(head_hidden, head_layers):
    model = SimCLR("resnet18", width=0.25, small_stem=True, head_hidden=head_hidden, head_out=32,
                   head_layers=head_layers)
    F = model.encoder.feat_dim
    assert F == 128
    assert model.head[0].out_features == (head_hidden or F)
    x = torch.randn(4, 3, 32, 32)
    h, z = model(x)
    assert h.shape == (4, F) and z.shape == (4, 32)
    with torch.no_grad():  # h is the encoder's output and z the head applied to it
        model.eval()
        h, z = model(x)
        torch.testing.assert_close(h, model.encoder(x))
        torch.testing.assert_close(z, model.head(h))


def test_simclr_gradients_reach_the_encoder():
    model = SimCLR("resnet18", width=0.25, small_stem=True, head_out=8)
    _, z = model(torch.randn(4, 3, 16, 16))
    z.pow(2).sum().backward()
    assert (model.encoder.conv1.weight.grad is not None
            and model.encoder.conv1.weight.grad.abs().sum() > 0)


def test_channels_last_model_matches_contiguous():
    model = SimCLR("resnet18", width=0.25, small_stem=True, head_out=16).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        h_ref, z_ref = model(x)
        cl = model.to(memory_format=torch.channels_last)
        assert cl.encoder.conv1.weight.is_contiguous(memory_format=torch.channels_last)
        h, z = cl(x.contiguous(memory_format=torch.channels_last))
    assert h.shape == h_ref.shape and z.shape == z_ref.shape
    torch.testing.assert_close(h, h_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(z, z_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("small_stem,side", [(False, 64), (True, 32)])
def test_cuda_bf16_channels_last_forward_and_backward_match_fp32_cpu(small_stem, side):
    """The training arrangement on a GPU (bf16 autocast, channels_last) against fp32 on the CPU."""
    model = SimCLR("resnet18", width=0.5, small_stem=small_stem, head_out=32)
    # batch statistics of 8 images would amplify bf16 rounding; eval BN is a plain affine
    model.eval()
    x = torch.randn(8, 3, side, side)
    h_ref, z_ref = model(x)
    gpu = SimCLR("resnet18", width=0.5, small_stem=small_stem, head_out=32)
    gpu.load_state_dict(model.state_dict())
    gpu = gpu.cuda().to(memory_format=torch.channels_last).eval()
    xg = x.cuda().contiguous(memory_format=torch.channels_last).requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        h, z = gpu(xg)
    z.float().square().sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()
    for got, want in ((h, h_ref), (z, z_ref)):
        err = (got.float().cpu() - want).norm() / want.norm()
        assert err < 3e-2, f"relative error {err:.3g}"


def test_official_head_ends_in_linear_without_bias_then_batchnorm_without_shift():
    """model.head_out_bn: the official code's last layer (Dense(use_bias=False) + BatchNorm with
    center=False): the shift is a zero that never trains, conversions to cross-process BN keep it
    frozen, and LARS's groups leave it out."""
    from model.global_batchnorm import convert_to_global_bn
    from train.lars import LARS, lars_param_groups

    model = SimCLR("resnet18", width=0.125, small_stem=True, head_out=16, head_out_bn=True)
    lin, bn = model.head[-2], model.head[-1]
    assert isinstance(lin, nn.Linear) and lin.bias is None and isinstance(bn, nn.BatchNorm1d)
    assert bn.weight.requires_grad and not bn.bias.requires_grad
    in_groups = {id(p) for g in lars_param_groups(model, 1e-6) for p in g["params"]}
    assert id(bn.bias) not in in_groups and id(bn.weight) in in_groups
    opt = LARS(lars_param_groups(model, 1e-6), lr=1.0)
    _, z = model(torch.randn(8, 3, 16, 16))
    (z[:, 0] * torch.arange(8.0)).sum().backward()
    opt.step()
    assert torch.equal(bn.bias, torch.zeros(16)) and not torch.equal(bn.weight, torch.ones(16))
    # per-feature standardisation times the scale: mean 0 over the batch in train mode
    _, z = model(torch.randn(8, 3, 16, 16))
    assert z.mean(0).abs().max() < 1e-5
    g = convert_to_global_bn(model, torch.device("cpu"))
    assert not g.head[-1].bias.requires_grad and g.head[-1].weight.requires_grad
    s = nn.SyncBatchNorm.convert_sync_batchnorm(SimCLR("resnet18", width=0.125, head_out=16,
                                                       head_out_bn=True))
    assert not s.head[-1].bias.requires_grad
    v1 = SimCLR("resnet18", width=0.125, head_out=16)
    assert isinstance(v1.head[-1], nn.Linear) and v1.head[-1].bias is not None
