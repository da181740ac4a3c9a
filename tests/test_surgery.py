import copy

import torch
from torch import nn

from lowrank_fm.surgery import find_layers, fold_batchnorm, name_filter, set_module, trace_conv_bn_pairs
from lowrank_fm.zoo.networks import ResNetSmall


def _randomise_bn(model):
    gen = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=gen))
            module.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            module.weight.data.copy_(torch.randn(n, generator=gen))
            module.bias.data.copy_(torch.randn(n, generator=gen))
    return model


def test_fold_batchnorm_keeps_outputs_and_removes_bn():
    torch.manual_seed(0)
    model = _randomise_bn(ResNetSmall((8, 16), blocks=1)).eval()
    x = torch.randn(3, 1, 16, 16)
    expected = model(x)
    folded = copy.deepcopy(model)
    pairs = fold_batchnorm(folded, x)
    # stem, block convs and the projection shortcut: every BN of this model follows a conv
    assert len(pairs) == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert ("stages.1.0.shortcut.0", "stages.1.0.shortcut.1") in pairs
    torch.testing.assert_close(folded(x), expected, rtol=1e-4, atol=1e-5)


def test_bn_not_fed_by_a_conv_is_not_paired():
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)).eval()
    pairs = trace_conv_bn_pairs(model, torch.randn(1, 2, 6, 6))
    assert pairs == [("3", "4")]


def test_shared_conv_is_never_folded():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            return self.bn(self.conv(self.conv(x)))

    assert trace_conv_bn_pairs(Shared().eval(), torch.randn(1, 3, 4, 4)) == []


def test_find_set_and_filter_by_qualified_name():
    model = ResNetSmall((8, 16), blocks=1)
    layers = find_layers(model)
    assert "stem.0" in layers and "fc" in layers and "stages.1.0.shortcut.0" in layers
    set_module(model, "stages.0.0.conv1", nn.Identity())
    assert isinstance(model.stages[0][0].conv1, nn.Identity)
    keep = name_filter(["stages.1"], ["stages.1.0.shortcut"])
    assert keep("stages.1.0.conv1") and not keep("stages.1.0.shortcut.0") and not keep("stem.0")
    assert not keep("stages.10.conv")  # a prefix matches whole name components only
