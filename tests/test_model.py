"""model.py: the per-sample loss against a manual loop, padding, and the forward pass."""

import math

import pytest
import torch

from model import GPT, GPTConfig, IGNORE_INDEX, per_sample_cross_entropy


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32)).eval()


def padded_batch(lengths, T=16, V=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(V, (len(lengths), T), generator=g)
    y = torch.randint(V, (len(lengths), T), generator=g)
    for row, n in enumerate(lengths):
        y[row, n:] = IGNORE_INDEX
    return x, y


def test_per_sample_loss_equals_a_manual_loop_with_padding(model):
    x, y = padded_batch([16, 5, 1, 11])
    logits, loss = model(x, y)
    assert loss.shape == (4,)
    for b in range(4):
        terms = [-torch.log_softmax(logits[b, t].double(), dim=-1)[y[b, t]].item()
                 for t in range(16) if y[b, t] != IGNORE_INDEX]
        assert loss[b].item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)


def test_sample_without_targets_has_zero_loss_and_no_nan_gradient(model):
    x, y = padded_batch([0, 7])
    _, loss = model(x, y)
    assert loss[0].item() == 0.0 and math.isfinite(loss[1].item())
    loss.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.zero_grad(set_to_none=True)


def test_padding_inputs_do_not_change_the_loss(model):
    x, y = padded_batch([6, 9])
    x2 = x.clone()
    x2[0, 6:] = 0  # different tokens at padded positions: causal attention never looks ahead
    x2[1, 9:] = 3
    assert torch.allclose(model(x, y)[1], model(x2, y)[1], atol=1e-6)


def test_loss_of_a_sample_does_not_depend_on_its_batch(model):
    x, y = padded_batch([16, 3, 12])
    together = model(x, y)[1]
    alone = torch.cat([model(x[i:i + 1], y[i:i + 1])[1] for i in range(3)])
    assert torch.allclose(together, alone, atol=1e-6)


def test_per_sample_cross_entropy_on_known_logits():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]]]))
    loss = per_sample_cross_entropy(logits, torch.tensor([[0, 1]]))
    assert loss.item() == pytest.approx((-math.log(0.5) - math.log(0.8)) / 2, rel=1e-6)


def test_generate_and_inference_logits(model):
    idx = torch.zeros((2, 3), dtype=torch.long)
    logits, loss = model(idx)
    assert logits.shape == (2, 1, 64) and loss is None
    out = model.generate(idx, 5, top_k=10)
    assert out.shape == (2, 8) and torch.equal(out[:, :3], idx)


def test_weight_tying_and_param_count(model):
    assert model.lm_head.weight is model.transformer.wte.weight
    n = sum(p.numel() for p in model.parameters())
    assert model.num_params(non_embedding=False) == n
    assert model.num_params() == n - 16 * 32


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32, dropout=0.0)).train()
    x, y = padded_batch([16, 9])
    model(x, y)[1].sum().backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    model.grad_ckpt = True
    model(x, y)[1].sum().backward()
    for p, g in zip(model.parameters(), plain):
        assert torch.allclose(p.grad, g, atol=1e-6)
