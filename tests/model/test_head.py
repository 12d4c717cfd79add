"""The projection head as a setting (the paper's Sec. 4.2, Fig. 8): none, linear, non-linear;
widths and parameter counts against closed forms, forward/backward, the features g(h) that
linear evaluation reads, older configs, and the one-line errors."""

from __future__ import annotations

import pytest
import torch
import yaml
from torch import nn

from model.simclr import SimCLR, build_simclr
from train.config import ConfigError, build_config, config_to_dict, load_config

F_DIM = 64  # ResNet-18 at width 1/8: 512 / 8 features
SMALL = dict(arch="resnet18", width=0.125, small_stem=True)


def _head_params(layers: int, feat: int, hidden: int, out: int, out_bn: bool) -> int:
    """Closed form: each hidden block is Linear without bias (in x hidden) and BN (2 x hidden);
    the last layer is Linear with bias (in x out + out) or, with out_bn, Linear without bias and BN
    (its frozen shift counted: it is a parameter, a zero that never trains)."""
    if layers == 0:
        return 0
    n, dim = 0, feat
    for _ in range(layers - 1):
        n += dim * hidden + 2 * hidden
        dim = hidden
    return n + dim * out + (2 * out if out_bn else out)


# (head_layers, head_hidden, head_out, head_out_bn, kind)
VARIANTS = [
    (0, 0, 128, False, "none"),  # head_out is unused: the loss sees h
    (1, 0, 16, False, "linear"),
    (1, 0, 16, True, "linear"),
    (2, 0, 16, False, "non-linear"),  # hidden 0 = the encoder's width
    (2, 48, 16, True, "non-linear"),
    (3, 32, 24, False, "non-linear"),
]


@pytest.mark.parametrize("layers,hidden,out,out_bn,kind", VARIANTS)
def test_each_head_builds_with_its_width_parameters_and_gradients(layers, hidden, out, out_bn,
                                                                  kind):
    torch.manual_seed(0)
    model = SimCLR(**SMALL, head_hidden=hidden, head_out=out, head_layers=layers,
                   head_out_bn=out_bn)
    assert model.encoder.feat_dim == F_DIM and model.head_kind == kind
    width = F_DIM if layers == 0 else out
    assert model.proj_dim == width
    enc = sum(p.numel() for p in model.encoder.parameters())
    total = sum(p.numel() for p in model.parameters())
    assert total - enc == _head_params(layers, F_DIM, hidden or F_DIM, out, out_bn)
    linears = [m for m in model.head.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == layers
    if layers == 0:
        assert isinstance(model.head, nn.Identity)

    x = torch.randn(6, 3, 16, 16)
    h, z = model.train()(x)
    assert h.shape == (6, F_DIM) and z.shape == (6, width)
    if layers == 0:
        assert z is h  # no head: the loss sees h itself
    (z * torch.linspace(-1, 1, width)).sum().backward()
    assert model.encoder.conv1.weight.grad.abs().sum() > 0
    for lin in linears:
        assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("layers", [0, 1, 2])
def test_features_g_are_the_head_applied_to_h(layers):
    """`features("g")` (what `linear_eval --features g` runs) against the two modules called by
    hand, in eval mode; `features("h")` is the encoder; with no head g(h) = h."""
    torch.manual_seed(1)
    model = SimCLR(**SMALL, head_out=16, head_layers=layers).eval()
    if layers == 2:  # non-trivial BN statistics, so eval mode exercises them
        with torch.no_grad():
            model.head[1].running_mean.uniform_(-0.5, 0.5)
            model.head[1].running_var.uniform_(0.5, 2.0)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        h = model.encoder(x)
        want = h
        for m in model.head.children():  # g by hand, layer by layer
            want = m(want)
        g = model.features("g")(x)
        assert model.features("h") is model.encoder
    torch.testing.assert_close(g, want)
    if layers:
        assert g.shape == (4, 16) and h.shape == (4, F_DIM)
    else:
        assert torch.equal(g, h)
    with pytest.raises(ValueError, match="'h' or 'g'"):
        model.features("z")


def test_recipes_and_older_configs_build_todays_two_layer_head():
    """A recipe that leaves head_layers out and a config.yaml as older versions wrote it (every
    key, head_layers >= 1) build the same model as before: a 2-layer MLP with the same names and
    shapes, so their checkpoints load strictly."""
    recipe = load_config("train/configs/cifar10_resnet18.yaml").model
    assert recipe.head_layers == 2 and recipe.head_out_bn
    older = yaml.safe_load("""
model: {arch: resnet18, width: 0.125, small_stem: true, stem_pool: false, head_hidden: 0,
        head_out: 16, head_layers: 2, head_out_bn: true, channels_last: true, compile: false}
""")
    cfg = build_config(older)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in build_simclr(cfg.model).state_dict().items()
                  if k.startswith("head.")}
    want = {"head.0.weight": (64, 64), "head.1.weight": (64,), "head.1.bias": (64,),
            "head.1.running_mean": (64,), "head.1.running_var": (64,),
            "head.1.num_batches_tracked": (), "head.3.weight": (16, 64),
            "head.4.weight": (16,), "head.4.bias": (16,), "head.4.running_mean": (16,),
            "head.4.running_var": (16,), "head.4.num_batches_tracked": ()}
    assert shapes == want
    # and a run with no head writes a config that reads back as no head
    none = build_config(config_to_dict(load_config(None, ["--model.head_layers=0"])))
    assert none.model.head_layers == 0


@pytest.mark.parametrize("overrides,key,fix", [
    (["--model.head_layers=0", "--model.head_out_bn=true"], "model.head_out_bn",
     "set model.head_out_bn=false or model.head_layers >= 1"),
    (["--model.head_layers=0", "--model.head_hidden=256"], "model.head_hidden",
     "set model.head_hidden=0 or model.head_layers >= 2"),
    (["--model.head_layers=-1"], "model.head_layers", ">= 0"),
])
def test_a_head_setting_that_cannot_apply_is_a_one_line_error(overrides, key, fix):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    msg = str(info.value)
    assert "\n" not in msg and f"'{key}'" in msg and fix in msg, msg
    if key != "model.head_layers":  # the model refuses the same settings when built directly
        with pytest.raises(ValueError, match=key):
            SimCLR(**SMALL, head_layers=0, head_out_bn="out_bn" in key,
                   head_hidden=256 if "hidden" in key else 0)
