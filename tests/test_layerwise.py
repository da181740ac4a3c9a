"""The layer-wise pass, input patches and the activation that follows a layer."""

import pytest
import torch
from torch import nn

from lowrank_fm.layerwise import LayerwisePass, activation_after, trace
from lowrank_fm.patches import patches_at
from lowrank_fm.surgery import fold_batchnorm
from lowrank_fm.zoo.networks import ResNetSmall, VGGSmall


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


def test_reference_inputs_are_the_original_networks_even_after_an_upstream_replacement(resnet):
    batches = [torch.randn(2, 1, 12, 12), torch.randn(3, 1, 12, 12)]
    captured = {}
    handle = resnet.stages[1][0].conv1.register_forward_hook(lambda m, args, out: captured.setdefault("x", []).append(args[0]))
    for b in batches:
        resnet(b)
    handle.remove()
    seen = {}

    def on_layer(name, module, inputs, reference_inputs):
        seen[name] = ([inputs[i] for i in range(2)], [reference_inputs[i] for i in range(2)])
        if name == "stem.0":  # change the approximated network upstream
            return nn.Conv2d(1, module.out_channels, 3, padding=1)
        return None

    LayerwisePass(trace(resnet), batches, progress=False, with_reference=True).run(["stem.0", "stages.1.0.conv1"], on_layer)
    approx, reference = seen["stages.1.0.conv1"]
    for got, want, hat in zip(reference, captured["x"], approx):
        torch.testing.assert_close(got, want)
        assert not torch.allclose(hat, want)


def test_samples_from_maps_take_original_responses_at_distinct_drawn_positions():
    from lowrank_fm.samples import layer_data_from_maps

    torch.manual_seed(3)
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
    originals = [torch.randn(2, 3, 9, 8), torch.randn(3, 3, 9, 8)]
    approximated = [x + 0.1 * torch.randn_like(x) for x in originals]
    data = layer_data_from_maps("layer", conv, approximated, originals, n_fit=4, per_image=7, seed=0, activation="relu")
    assert data.inputs.shape == (5 * 7, 27) and data.targets.shape == (5 * 7, 4) and data.activation == "relu"
    assert data.inputs.dtype == torch.float32 and data.targets.dtype == torch.float64
    assert data.heldout.tolist() == [False] * 28 + [True] * 7  # the fifth image (ordinal 4) is held out
    outputs = torch.cat([conv(x) for x in originals]).detach().double()  # (5, 4, 5, 4): 20 positions per image
    maps_hat = torch.cat(approximated)
    for row in range(data.targets.shape[0]):
        image = row // 7
        matches = (outputs[image].permute(1, 2, 0).reshape(-1, 4) - data.targets[row]).abs().amax(1) < 1e-5
        assert int(matches.sum()) == 1  # the target is the original response at exactly one position
        flat = int(matches.nonzero())
        patch = patches_at(conv, maps_hat, torch.tensor([image]), torch.tensor([[flat // 4, flat % 4]]))
        torch.testing.assert_close(data.inputs[row], patch[0])  # inputs keep the network's float32
    for image in range(5):  # 7 distinct positions per image
        assert len({tuple(t.tolist()) for t in data.targets[image * 7:(image + 1) * 7]}) == 7
    again = layer_data_from_maps("layer", conv, approximated, originals, n_fit=4, per_image=7, seed=0, activation="relu")
    torch.testing.assert_close(again.targets, data.targets)  # seeded
    everything = layer_data_from_maps("layer", conv, approximated, originals, n_fit=4, per_image=99, seed=0, activation="relu")
    assert everything.inputs.shape[0] == 5 * 20  # capped at the grid


@pytest.mark.parametrize("kernel,stride,padding,dilation", [
    (3, 1, 1, 1), (3, 2, 0, 1), ((3, 5), (2, 1), (1, 2), 1), (3, 1, 2, 2), (1, 1, 0, 1), ((1, 3), 2, (0, 1), (1, 2))])
def test_patches_at_equal_the_unfolded_columns(kernel, stride, padding, dilation):
    import torch.nn.functional as F

    from lowrank_fm.patches import output_grid

    torch.manual_seed(5)
    conv = nn.Conv2d(3, 4, kernel, stride=stride, padding=padding, dilation=dilation)
    x = torch.randn(2, 3, 11, 10)
    out_h, out_w = output_grid(conv, x)
    image = torch.arange(2).repeat_interleave(out_h * out_w)
    flat = torch.arange(out_h * out_w).repeat(2)
    position = torch.stack([flat // out_w, flat % out_w], dim=1)
    columns = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
    expected = columns.permute(0, 2, 1).reshape(-1, columns.shape[1])  # every window, image-major
    torch.testing.assert_close(patches_at(conv, x, image, position), expected, rtol=0, atol=0)
    y = conv(x).detach().permute(0, 2, 3, 1).reshape(-1, 4)  # and they give the conv's responses
    torch.testing.assert_close(patches_at(conv, x, image, position) @ conv.weight.reshape(4, -1).T + conv.bias, y,
                               rtol=1e-5, atol=1e-5)


def test_only_values_read_across_target_layers_are_kept_for_every_batch(monkeypatch):
    """With a zero budget every kept value spills, one file per batch: the values inside a segment (BatchNorm
    folded away, ReLU, pools, flatten, dropout, the other convs and Linear layers) live for one batch only."""
    torch.manual_seed(0)
    vgg = VGGSmall([4, "M", 8, 8, "M"], image_size=8).eval()
    fold_batchnorm(vgg, torch.randn(2, 1, 8, 8))
    batches = [torch.randn(2, 1, 8, 8) for _ in range(3)]
    saved = []
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda value, path: (saved.append(path), real_save(value, path)))
    outputs = LayerwisePass(trace(vgg), batches, memory_budget=0, progress=False).run(
        ["features.0", "features.4"], lambda name, module, inputs: None)
    # kept: the input of features.4 and the logits (read by the output); the images are the batches themselves
    assert len(saved) == 2 * len(batches)
    for got, batch in zip(outputs, batches):
        torch.testing.assert_close(got, vgg(batch))


def test_a_model_that_returns_its_input_beside_a_replaced_layer():
    class Both(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3, padding=1)

        def forward(self, x):
            return x, self.conv(x).relu()

    model = Both().eval()
    batches = [torch.randn(2, 1, 5, 5), torch.randn(1, 1, 5, 5)]
    zero = nn.Conv2d(1, 2, 3, padding=1)
    nn.init.zeros_(zero.weight), nn.init.constant_(zero.bias, -1.0)
    outputs = LayerwisePass(trace(model), batches, memory_budget=0, progress=False).run(
        ["conv"], lambda name, module, inputs: zero)
    for (x, y), batch in zip(outputs, batches):
        assert x is batch and y.shape == (batch.shape[0], 2, 5, 5) and float(y.abs().max()) == 0.0


class _DownsampleBlock(nn.Module):
    """A torchvision-style block: the shortcut's 1x1 conv runs after conv2 in the graph."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.downsample = nn.Conv2d(3, 6, 1)

    def forward(self, x):
        out = self.conv2(torch.relu(self.conv1(x)))
        identity = self.downsample(x)
        return torch.relu(out + identity)


class _SelfSum(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return y + torch.relu(y)


def test_shortcut_partner_is_the_final_other_operand_of_the_sum(resnet):
    from lowrank_fm.layerwise import shortcut_partner

    gm = trace(resnet)
    every = ["stem.0", "stages.0.0.conv1", "stages.0.0.conv2", "stages.1.0.conv2", "stages.1.0.shortcut.0"]
    partner = shortcut_partner(gm, "stages.0.0.conv2", every)
    assert partner is not None and partner.name == "stages_0_0_shortcut"  # the identity shortcut's output
    assert shortcut_partner(gm, "stages.0.0.conv1", every) is None  # feeds a ReLU, not a sum
    assert shortcut_partner(gm, "stem.0", every) is None
    # the projection shortcut is still to be replaced when conv2 comes: its output is not final yet
    assert shortcut_partner(gm, "stages.1.0.conv2", every) is None
    assert shortcut_partner(gm, "stages.1.0.conv2", ["stages.1.0.conv2"]).op == "call_module"
    later = shortcut_partner(gm, "stages.1.0.shortcut.0", every)  # ... and it gets the shift of conv2's branch
    assert later is not None and later.name == "stages_1_0_bn2"  # (BatchNorm folded: an Identity after conv2)
    block = trace(_DownsampleBlock())
    assert shortcut_partner(block, "conv2", ["conv1", "conv2", "downsample"]) is None
    assert shortcut_partner(block, "downsample", ["conv1", "conv2", "downsample"]).name == "conv2"
    assert shortcut_partner(trace(_SelfSum()), "conv", ["conv"]) is None  # the other operand depends on the layer
    from lowrank_fm.layerwise import activation_after_sum

    assert activation_after_sum(gm, "stages.0.0.conv2") == "relu"  # the block's ReLU, after the sum
    assert activation_after_sum(gm, "stages.0.0.conv1") == "identity"  # feeds no sum
    assert activation_after_sum(trace(_SelfSum()), "conv") == "identity"  # y + relu(y) reaches the output


def test_shortcut_shift_is_the_original_minus_the_approximated_other_operand():
    """v - vhat against the block's input in two separately run networks (hooks), after an upstream change."""
    torch.manual_seed(4)
    model = ResNetSmall((8, 16), blocks=1).eval()
    fold_batchnorm(model, torch.randn(2, 1, 12, 12))
    changed = nn.Conv2d(1, 8, 3, padding=1)
    approximated = __import__("copy").deepcopy(model)
    approximated.stem[0] = changed
    batches = [torch.randn(2, 1, 12, 12), torch.randn(3, 1, 12, 12)]

    def block_inputs(network):
        seen = []
        handle = network.stages[0][0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
        with torch.no_grad():
            for b in batches:
                network(b)
        handle.remove()
        return seen

    hats = block_inputs(approximated)
    want = [v - vhat for v, vhat in zip(block_inputs(model), hats)]
    shifts, values = {}, {}

    def on_layer(name, module, inputs, reference_inputs, shortcut_shift, shortcut_value):
        assert (shortcut_shift is None) == (shortcut_value is None)
        shifts[name] = None if shortcut_shift is None else [shortcut_shift[i] for i in range(len(batches))]
        values[name] = None if shortcut_value is None else [shortcut_value[i] for i in range(len(batches))]
        return changed if name == "stem.0" else None

    LayerwisePass(trace(model), batches, progress=False, with_reference=True, shortcut_shifts=True).run(
        ["stem.0", "stages.0.0.conv1", "stages.0.0.conv2"], on_layer)
    assert shifts["stem.0"] is None and shifts["stages.0.0.conv1"] is None
    for got, expected in zip(shifts["stages.0.0.conv2"], want):
        assert float(expected.abs().amax()) > 0.1  # the upstream change reached the shortcut
        torch.testing.assert_close(got, expected)
    for got, expected in zip(values["stages.0.0.conv2"], hats):
        torch.testing.assert_close(got, expected)
    with pytest.raises(ValueError, match="with_reference"):
        LayerwisePass(trace(model), batches, shortcut_shifts=True)


def test_samples_from_maps_add_the_shortcut_shift_at_their_positions():
    from lowrank_fm.samples import layer_data_from_maps

    torch.manual_seed(6)
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
    originals = [torch.randn(2, 3, 9, 8), torch.randn(3, 3, 9, 8)]
    approximated = [x + 0.1 * torch.randn_like(x) for x in originals]
    shifts = [torch.randn(2, 4, 5, 4), torch.randn(3, 4, 5, 4)]
    options = dict(n_fit=4, per_image=20, seed=0, activation="identity")  # every position: rows in grid order
    plain = layer_data_from_maps("layer", conv, approximated, originals, **options)
    shifted = layer_data_from_maps("layer", conv, approximated, originals, **options, shortcut_shift=shifts)
    rows = torch.cat([s.permute(0, 2, 3, 1).reshape(-1, 4) for s in shifts]).double()
    torch.testing.assert_close(shifted.targets - plain.targets, rows)
    responses = torch.cat([conv(x).detach().permute(0, 2, 3, 1).reshape(-1, 4) for x in originals]).double()
    torch.testing.assert_close(shifted.targets, responses + rows, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shifted.inputs, plain.inputs)
