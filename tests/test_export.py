"""TorchScript and ONNX export of an approximated model: parity with the eager model, and timing."""

import pytest
import torch
from torch import nn

from lowrank_fm.export import export_and_check, export_onnx, onnx_available, relative_difference
from lowrank_fm.layers import ConvChain, ConvFactor


def _factorized_model():
    torch.manual_seed(0)
    chain = ConvChain.from_factors([ConvFactor(torch.randn(4, 8, 3, 3), None, padding=(1, 1)),
                                    ConvFactor(torch.randn(16, 4, 1, 1), torch.randn(16))])
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), chain, nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(16, 5)).eval()


def test_relative_difference_is_max_deviation_over_output_scale():
    a = torch.tensor([[2.0, -4.0], [1.0, 0.0]])
    b = torch.tensor([[2.0, -3.0], [1.5, 0.0]])
    assert relative_difference(a, b) == pytest.approx(1.0 / 4.0)
    assert relative_difference(a, a.numpy()) == 0.0
    with pytest.raises(ValueError, match="differ in shape"):
        relative_difference(a, b[:1])


def test_torchscript_and_onnx_forms_match_the_eager_model(tmp_path):
    model = _factorized_model()
    x = torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    result = export_and_check(model, x, tmp_path, repeats=3, warmup=1)
    assert result["torchscript"]["parity"] and result["torchscript"]["max_rel_diff"] < 1e-4
    assert (tmp_path / "model.torchscript.pt").is_file()
    # the saved TorchScript file reproduces an independent eager forward on other inputs
    other = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert relative_difference(model(other), torch.jit.load(str(tmp_path / "model.torchscript.pt"))(other)) < 1e-5
    assert result["eager"]["ms"] > 0 and result["torchscript"]["ms"] > 0
    if onnx_available():
        assert "skipped" in result["onnx"]
    else:
        assert result["onnx"]["parity"] and result["onnx"]["max_rel_diff"] < 1e-4 and result["onnx"]["ms"] > 0


@pytest.mark.skipif(onnx_available() is not None, reason=str(onnx_available()))
def test_onnx_has_a_dynamic_batch(tmp_path):
    import numpy as np
    import onnxruntime as ort

    model = _factorized_model()
    path = export_onnx(model, torch.randn(2, 3, 12, 12), tmp_path / "m.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 3, 12, 12, generator=torch.Generator().manual_seed(3))
    out = session.run(None, {"images": x.numpy().astype(np.float32)})[0]
    with torch.no_grad():
        assert out.shape == (5, 5) and relative_difference(model(x), out) < 1e-4


class _SlowOriginal(nn.Module):
    """A conv + BatchNorm model that sleeps 30 ms per forward (an original of known, larger cost)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)

    def forward(self, x):
        import time

        time.sleep(0.03)
        return self.bn(self.conv(x))


def test_export_times_the_folded_original_in_the_same_rounds(tmp_path):
    original = _SlowOriginal().eval()
    x = torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    result = export_and_check(_factorized_model(), x, tmp_path, rounds=5, warmup=1, original=original, min_seconds=0)
    assert result["rounds"] == 5
    assert result["original_eager"]["folded_batchnorm"] == 1 and result["original_eager"]["ms"] >= 30.0
    assert isinstance(original.bn, nn.BatchNorm2d)  # the caller's model keeps its BatchNorm
    for form in ("eager", "torchscript"):
        entry = result[form]
        assert entry["speedup_min"] <= entry["speedup_vs_original"] <= entry["speedup_max"]
        assert entry["speedup_vs_original"] > 3.0  # 30 ms against a small model of about a millisecond
