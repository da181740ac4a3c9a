"""Weight-only truncated SVD against independent computations."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowrank_fm import approximate
from lowrank_fm.methods import LayerContext, get_method


@pytest.mark.parametrize("kernel,stride,padding,dilation", [(3, 1, 1, 1), ((3, 1), 2, (1, 2), 2), (1, 1, 0, 1)])
def test_truncated_svd_equals_the_dense_conv_of_the_best_rank_r_kernel(kernel, stride, padding, dilation):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 10, kernel, stride=stride, padding=padding, dilation=dilation).double()
    method, ctx = get_method("svd"), LayerContext("c", conv, 1)
    x = torch.randn(2, 6, 11, 9, dtype=torch.float64)
    rank = 3
    w = conv.weight.detach().reshape(10, -1).numpy()
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    best = torch.from_numpy((u[:, :rank] * s[:rank]) @ vt[:rank]).reshape(conv.weight.shape)
    expected = F.conv2d(x, best, conv.bias, stride=stride, padding=padding, dilation=dilation)
    torch.testing.assert_close(method.build(ctx, rank)(x), expected, rtol=1e-10, atol=1e-10)
    # Eckart-Young: the kernel error is the discarded singular values
    assert float(np.linalg.norm(w - best.reshape(10, -1).numpy())) == pytest.approx(np.sqrt((s[rank:] ** 2).sum()))
    np.testing.assert_allclose(method.spectrum(ctx), s ** 2, rtol=1e-10)


def test_a_matrix_of_known_rank_is_recovered_and_above_break_even_is_kept(vgg_digits, digits):
    torch.manual_seed(1)
    linear = nn.Linear(40, 30).double()
    with torch.no_grad():
        linear.weight.copy_(torch.randn(30, 4, dtype=torch.float64) @ torch.randn(4, 40, dtype=torch.float64))
    ctx = LayerContext("fc", linear, 1)
    method = get_method("svd")
    assert np.count_nonzero(method.spectrum(ctx) > 1e-12) == 4
    x = torch.randn(5, 40, dtype=torch.float64)
    torch.testing.assert_close(method.build(ctx, 4)(x), linear(x), rtol=1e-10, atol=1e-10)
    # through the pipeline: at energy 1.0 every rank is full, above break-even, so every layer is kept
    loader = [digits.train[i][0][None] for i in range(8)]
    _, report = approximate(vgg_digits, loader, method="svd", energy=1.0, n_images=8, progress=False,
                            speed_gate=False)
    assert all(l.status == "kept" for l in report.layers)
    assert any("would not reduce MACs" in (l.reason or "") for l in report.layers)
