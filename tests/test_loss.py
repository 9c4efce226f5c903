"""loss.py: the chunked per-sample cross-entropy equals the full-logits one (losses and every gradient, float64,
under per-sample weights), never builds the logits, and works under bf16 autocast and torch.compile."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from loss import IGNORE_INDEX, TokenCrossEntropy, chunked_per_sample_cross_entropy, per_sample_cross_entropy
from model import GPT, GPTConfig

V = 97  # a vocabulary no chunk size divides


def batch(B=4, T=16, seed=0):
    """Tokens, targets with padding (a short row, an empty row) and random per-sample weights."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randint(V, (B, T), generator=g), torch.randint(V, (B, T), generator=g)
    y[1, 5:] = IGNORE_INDEX
    y[2, :] = IGNORE_INDEX  # no counted target: loss 0, no NaN anywhere
    y[3, ::3] = IGNORE_INDEX  # holes, as prompt tokens of instruction data leave
    return x, y, torch.rand(B, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("bias", [False, True])
def test_token_losses_and_gradients_equal_the_full_logits_in_float64(bias):
    g = torch.Generator().manual_seed(1)
    h = torch.randn(4, 16, 8, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(V, 8, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(V, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    _, y, w = batch()
    inputs = [t for t in (h, W, b) if t is not None]
    full = per_sample_cross_entropy(h @ W.t() + (b if bias else 0), y)
    grads_full = torch.autograd.grad((w * full).sum(), inputs)
    for chunk in (1, 5, 16, 64, 1000):  # one token at a time, uneven chunks, one row, all of it, more than all
        ours = chunked_per_sample_cross_entropy(h, W, y, b, chunk)
        assert torch.allclose(ours, full, rtol=0, atol=1e-12) and ours[2] == 0
        for got, want in zip(torch.autograd.grad((w * ours).sum(), inputs), grads_full):
            assert torch.allclose(got, want, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(lambda h, W: TokenCrossEntropy.apply(h.reshape(-1, 8), W, None, y.reshape(-1),
                                                                        7, torch.float64), (h, W))


def tiny(tie, **kw):
    torch.manual_seed(0)
    config = GPTConfig(block_size=16, vocab_size=V, n_layer=2, n_head=2, n_embd=32, tie_embeddings=tie, **kw)
    return GPT(config)


def step_grads(model, x, y, w, chunk, ctx=None):
    """Per-sample losses and the gradient of sum_i w_i l_i, with the loss chunked (chunk > 0) or from full logits."""
    model.zero_grad(set_to_none=True)
    model.loss_chunk = chunk
    with ctx or torch.autocast("cpu", enabled=False):
        loss = model(x, y)[1]
    (w.to(loss.dtype) * loss).sum().backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("tie,family", [(True, {}), (False, {}),
                                        (False, dict(norm="rmsnorm", pos="rope", mlp="swiglu", bias=False))])
def test_every_parameter_gradient_equals_the_full_logits_step_in_float64(tie, family):
    model = tiny(tie, **family).double()
    x, y, w = batch()
    loss_full, grads_full = step_grads(model, x, y, w, chunk=0)
    loss, grads = step_grads(model, x, y, w, chunk=5)
    assert torch.allclose(loss, loss_full, rtol=0, atol=1e-12)
    assert grads.keys() == grads_full.keys() and len(grads) > 5
    for name in grads:
        assert torch.allclose(grads[name], grads_full[name], rtol=0, atol=1e-12), name


def test_bf16_autocast_is_within_bf16_rounding_of_the_full_logits_step():
    """Both under bf16 autocast: the head's matmuls in bf16, the softmax in float32. They differ only by where bf16
    rounds (the chunked backward rounds each chunk's weight gradient before summing in float32): within 2% of each
    gradient's largest entry, and losses within 1e-2, as bf16's 8 bits of mantissa allow."""
    model = tiny(False)
    x, y, w = batch()
    ctx = torch.autocast("cpu", dtype=torch.bfloat16)
    loss_full, grads_full = step_grads(model, x, y, w, chunk=0, ctx=ctx)
    loss, grads = step_grads(model, x, y, w, chunk=5, ctx=ctx)
    assert loss.dtype == torch.float32 and torch.allclose(loss, loss_full, atol=1e-2)
    for name in grads:
        assert (grads[name] - grads_full[name]).abs().max() <= 0.02 * grads_full[name].abs().max() + 1e-6, name


class LogitsSeen(TorchDispatchMode):
    """Records the most tokens' worth of logits that any operation makes, forward and backward: the largest
    tensor with a vocabulary-sized dimension, the head's (V, C) weight and its gradient aside."""

    def __init__(self, weight_shape):
        super().__init__()
        self.weight_shapes, self.tokens = {tuple(weight_shape), tuple(weight_shape)[::-1]}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and V in t.shape and tuple(t.shape) not in self.weight_shapes:
                self.tokens = max(self.tokens, t.numel() // V)
        return out


def test_no_tensor_of_the_logits_size_exists_in_a_training_step_or_an_evaluation():
    model = tiny(False)
    x, y, w = batch(B=8, T=16)
    model.loss_chunk = 16
    for train in (True, False):
        with LogitsSeen(model.lm_head.weight.shape) as seen, torch.set_grad_enabled(train):
            loss = model(x, y)[1]
            if train:
                (w.float() * loss).sum().backward()
        assert 0 < seen.tokens <= 16  # one chunk's logits at a time: 1/8 of the batch's 8 * 16 tokens
    with LogitsSeen(model.lm_head.weight.shape) as seen:
        model.loss_chunk = 0
        model(x, y)[1].sum().backward()
    assert seen.tokens == 8 * 16  # the test has teeth: the full form does build them


def test_torch_compile_gives_the_eager_losses_and_gradients():
    model = tiny(False)
    x, y, w = batch()
    loss, grads = step_grads(model, x, y, w, chunk=5)
    compiled = torch.compile(model)
    for _ in range(2):  # the second call runs the compiled graph as it is
        model.zero_grad(set_to_none=True)
        got = compiled(x, y)[1]
        (w.float() * got).sum().backward()
        assert torch.allclose(got, loss, atol=1e-5)
        for name, p in model.named_parameters():
            assert torch.allclose(p.grad, grads[name], atol=1e-5), name
