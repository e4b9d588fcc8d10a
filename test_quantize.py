"""
Tests for quantize.py, weight-only int8: numbers worked by hand, then the tiny model's logits and greedy tokens.
(sample.py and eval.py --quantize=int8 end to end: test_sample.py, test_eval.py.)

    python -m pytest -q test_quantize.py
"""
import pytest
import torch
import torch.nn as nn

import quantize
from conftest import span, tiny_cfg
from neo import NEO
from quantize import Int8Linear, quantize_int8, quantize_per_channel


@pytest.mark.parametrize("kernel", [True, False])
def test_int8_linear_by_hand(kernel, monkeypatch):
    """Three rows: scale = max|row| / 127, q = round(w / scale); an all-zero row gets scale 1. Worked by hand:
        row 0   1.27  -0.634  0.5   0        scale 0.01    q  127  -63  50    0
        row 1   0.254 -0.1    0.05 -0.0254   scale 0.002   q  127  -50  25  -13
        row 2   0      0      0     0        scale 1       q    0    0   0    0
    and x = (1, 2, 3, 4): y = (127 - 126 + 150) * 0.01 = 1.51, (127 - 100 + 75 - 52) * 0.002 = 0.1, 0.
    kernel=False: the dequantising matmul used where torch has no _weight_int8pack_mm gives the same."""
    w = torch.tensor([[1.27, -0.634, 0.5, 0.0], [0.254, -0.1, 0.05, -0.0254], [0.0, 0.0, 0.0, 0.0]])
    q, s = quantize_per_channel(w)
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    assert q.tolist() == [[127, -63, 50, 0], [127, -50, 25, -13], [0, 0, 0, 0]]
    assert torch.allclose(s, torch.tensor([0.01, 0.002, 1.0]), rtol=1e-6, atol=0)
    if not kernel:
        monkeypatch.setattr(quantize, "_NO_KERNEL", {("cpu", torch.float32)})
    lin = Int8Linear(q, s)
    y = lin(torch.tensor([[[1.0, 2.0, 3.0, 4.0]]]))  # (B, L, K): the model's shape
    assert y.shape == (1, 1, 3) and torch.allclose(y[0, 0], torch.tensor([1.51, 0.1, 0.0]), atol=1e-6)
    assert (("cpu", torch.float32) in quantize._NO_KERNEL) == (not kernel)


def test_quantized_tiny_model_stays_close():
    """The tiny model (3 layers, tied head) after quantize_int8: every Linear and the embedding int8, the tie kept,
    and the logits within 4% (relative RMS) of float32. Why 4%: rounding to a step s = max|row|/127 errs by at
    most s/2, RMS s/sqrt(12); with max|row| ~ 3 sigma for these rows of 64-128 normal weights that is
    3 / (127 sqrt(12)) ~ 0.7% of a weight matrix's RMS. A token's logits pass through 23 quantised matrices
    (the embedding, 7 per layer, the head); if each one's error reached the logits undamped and independently,
    sqrt(23) x 0.7% ~ 3.4%. Measured: ~1.4%."""
    torch.manual_seed(0)
    cfg = tiny_cfg()
    model = NEO(cfg).eval()
    ids = torch.tensor([[1, 2] + span(cfg, 2, 3) + [3, 4, 5, 6] + list(range(10, 40))])
    img = [torch.randn(3, 64, 96)]
    n_params = model.num_params()
    with torch.no_grad():
        ref, _ = model(ids, img)
        line = quantize_int8(model)
        got, _ = model(ids, img)
    assert line.startswith("int8: 28 Linear layers")  # 3 layers x 9 (q k v o, q/k hw, gate up down) + lm_head
    assert not any(isinstance(m, (nn.Linear, nn.Embedding)) for m in model.modules())
    assert model.lm_head.weight is model.embed_tokens.weight and model.lm_head.weight.dtype == torch.int8
    assert model.num_params() == n_params
    err = ((got - ref).norm() / ref.norm()).item()
    assert 1e-4 < err < 0.04, err  # not the float model, and close to it


def test_quantized_greedy_tokens_agree():
    """On a sharpened tiny model greedy decoding with an image gives the float32 tokens, also after the quantised
    model is cast to bf16 (sample.py's --dtype=auto casts after quantising). Weights x3, not test_neo's x5: there
    some steps' top two logits differ by ~0.0015, a tie any rounding decides; here the smallest lead over the 12
    steps is ~0.11, twice the largest logit change int8 makes (~0.05)."""
    torch.manual_seed(0)
    cfg = tiny_cfg()
    model = NEO(cfg).eval()
    for p in model.parameters():
        p.data.mul_(3.0) if p.dim() > 1 else None
    ids = torch.tensor([[1, 2] + span(cfg, 2, 3) + [3, 4]])
    img = [torch.randn(3, 64, 96)]
    ref = model.generate(ids, img, max_new_tokens=12)
    with torch.no_grad():  # the premise above: every step's top logit leads clearly
        top2 = model(torch.cat((ids, ref), 1), img)[0][0, -13:-1].topk(2, -1).values
    assert (top2[:, 0] - top2[:, 1]).min() > 0.1 and len(set(ref[0].tolist())) > 1  # and not a constant stream
    quantize_int8(model)
    assert model.generate(ids, img, max_new_tokens=12).tolist() == ref.tolist()
    model.to(torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.int8 and model.lm_head.scales.dtype == torch.bfloat16
    assert model.generate(ids, [img[0].bfloat16()], max_new_tokens=12).tolist() == ref.tolist()
