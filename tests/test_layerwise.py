"""The layer-wise pass, input patches and the activation that follows a layer."""

import pytest
import torch
from torch import nn

from lowrank_fm.layerwise import LayerwisePass, activation_after, trace
from lowrank_fm.patches import patches_at
from lowrank_fm.surgery import fold_batchnorm
from lowrank_fm.zoo import ResNetSmall, VGGSmall


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    model = ResNetSmall((8, 16), blocks=1).eval()
    fold_batchnorm(model, torch.randn(2, 1, 12, 12))
    return model


def test_pass_without_replacement_reproduces_the_model_in_memory_and_spilled(resnet):
    batches = [torch.randn(3, 1, 12, 12) for _ in range(4)]
    expected = [resnet(b) for b in batches]
    for budget in (1 << 30, 0):  # 0: every value spills to disk
        seen = []
        outputs = LayerwisePass(trace(resnet), batches, memory_budget=budget, progress=False).run(
            ["stages.1.0.conv1"], lambda name, module, inputs: seen.append((name, len(inputs), inputs[2].shape)))
        assert seen == [("stages.1.0.conv1", 4, torch.Size([3, 8, 12, 12]))]
        for got, want in zip(outputs, expected):
            torch.testing.assert_close(got, want)


def test_replacement_flows_downstream_and_layers_come_in_order(resnet):
    batches = [torch.randn(2, 1, 12, 12)]
    order = []

    def on_layer(name, module, inputs):
        order.append(name)
        if name == "fc":
            return nn.Linear(16, 10)  # a different head: its outputs must reach the pass's outputs
        return None

    targets = ["fc", "stem.0", "stages.0.0.conv2"]
    outputs = LayerwisePass(trace(resnet), batches, progress=False).run(targets, on_layer)
    assert order == ["stem.0", "stages.0.0.conv2", "fc"]  # network order, not the order given
    assert outputs[0].shape == (2, 10) and not torch.allclose(outputs[0], resnet(batches[0]))


def test_activation_after_follows_identity_to_relu_and_stops_at_a_sum(resnet):
    gm = trace(resnet)
    assert activation_after(gm, "stem.0") == "relu"
    assert activation_after(gm, "stages.0.0.conv1") == "relu"
    assert activation_after(gm, "stages.0.0.conv2") == "identity"  # added to the shortcut before its ReLU
    assert activation_after(gm, "stages.1.0.shortcut.0") == "identity"
    vgg = VGGSmall([4, "M"], image_size=8).eval()
    fold_batchnorm(vgg, torch.randn(1, 1, 8, 8))
    gm = trace(vgg)
    assert activation_after(gm, "features.0") == "relu" and activation_after(gm, "classifier.1") == "relu"
    assert activation_after(gm, "classifier.4") == "identity"


@pytest.mark.parametrize("kernel,stride,padding,dilation", [(3, 1, 1, 1), ((3, 1), 2, (1, 2), 2), (5, 2, 0, 1), (1, 1, 0, 1)])
def test_patches_times_weight_equal_the_conv_output(kernel, stride, padding, dilation):
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 5, kernel, stride=stride, padding=padding, dilation=dilation)
    x = torch.randn(4, 3, 11, 10)
    y = conv(x).detach()
    image = torch.tensor([0, 1, 3, 3, 2])
    position = torch.tensor([[0, 0], [1, 2], [y.shape[2] - 1, y.shape[3] - 1], [0, 1], [2, 0]])
    patches = patches_at(conv, x, image, position)
    got = patches @ conv.weight.detach().reshape(5, -1).T + conv.bias.detach()
    want = y[image, :, position[:, 0], position[:, 1]]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_patches_of_a_linear_layer_with_token_dimension():
    linear = nn.Linear(6, 4)
    x = torch.randn(2, 3, 6)
    rows = patches_at(linear, x, torch.tensor([1, 0]), torch.tensor([[2, 0], [0, 0]]))
    torch.testing.assert_close(rows, torch.stack([x[1, 2], x[0, 0]]))
