"""fluxlab.attention on the CPU: stock-equal outputs, recorded fallbacks, the dense-grad fix, kernel naming."""

import pytest
import torch

from fluxlab import attention, models


@pytest.fixture(autouse=True)
def _fresh():
    attention.reset_counters()


def _inputs(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    img_ids = torch.zeros(16, 3)
    img_ids[:, 1], img_ids[:, 2] = torch.arange(4).repeat_interleave(4), torch.arange(4).repeat(4)
    return dict(hidden_states=torch.randn(1, 16, 64, generator=g), encoder_hidden_states=torch.randn(1, 7, 32, generator=g),
                pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.5]), img_ids=img_ids,
                txt_ids=torch.zeros(7, 3), guidance=torch.tensor([3.5]), return_dict=False)


def test_installed_processor_matches_stock_forward_and_backward():
    stock = models.build_transformer("tiny", "cpu", torch.float32, seed=3)
    ours = models.build_transformer("tiny", "cpu", torch.float32, seed=3)
    assert attention.install(ours, backend="auto") == 4            # 2 double + 2 single blocks
    kw = _inputs(stock)
    a, b = stock(**kw)[0], ours(**kw)[0]
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    a.square().mean().backward()
    b.square().mean().backward()
    for (n, p), q in zip(stock.named_parameters(), ours.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=n)
    assert attention.counters() == {"attention.math": 4}            # one call per block, counted


def test_unavailable_backend_falls_back_and_says_why():
    q = torch.randn(1, 5, 2, 8)
    out = attention.sdpa(q, q, q, backend="cudnn")
    ref = torch.nn.functional.scaled_dot_product_attention(*(q.transpose(1, 2),) * 3).transpose(1, 2)
    torch.testing.assert_close(out, ref)
    assert "CUDA" in attention.fallbacks()["cudnn"]
    with pytest.raises(ValueError, match="attention_backend"):
        attention.sdpa(q, q, q, backend="cudnnn")


def test_autocast_casts_inputs_like_sdpa_does():
    q = torch.randn(1, 5, 2, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention.sdpa(q, q, q)
        ref = torch.nn.functional.scaled_dot_product_attention(*(q.transpose(1, 2),) * 3).transpose(1, 2)
    assert out.dtype == ref.dtype == torch.bfloat16


def test_dense_grad_hands_on_a_contiguous_gradient():
    # The layout FLUX's single block produces: a slice of a wider gradient (see the module docstring).
    x = torch.randn(1, 6, 2, 4, requires_grad=True)
    seen = []
    x.register_hook(lambda g: seen.append(g.is_contiguous()))
    wide = torch.randn(1, 6, 20)
    y = attention._DenseGrad.apply(x).flatten(2)                    # [1, 6, 8]
    torch.autograd.backward(y, wide[..., :8])                       # a non-contiguous grad_out
    assert seen == [True]
    torch.testing.assert_close(x.grad.flatten(2), wide[..., :8])


def test_kernel_names_are_classified():
    names = ["void pytorch_flash::flash_fwd_kernel<...>", "cudnn_generated_fort_native_sdpa_sm90_flash_fprop",
             "fmha_cutlassF_bf16_aligned_64x128_rf_sm80", "nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT"]
    assert attention.classify_kernels(names) == {"flash", "cudnn", "efficient"}
    assert attention.classify_kernels(names[3:]) == set()
