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
    logits, loss = model.logits(x), model(x, y)[1]
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


def test_rotary_tables_are_made_on_the_device_with_nothing_from_the_host():
    """A forward pass on a GPU must not copy the RoPE tables from the host (a copy from pageable memory waits for
    the device): on the meta device, no op of rope_cos_sin makes a CPU tensor, or a tensor from host data."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from conftest import HostWaits
    from model import rope_cos_sin
    made_on_host = []

    class OnHost(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if any(isinstance(t, torch.Tensor) and t.device.type == "cpu" for t in torch.utils._pytree.tree_leaves(out)):
                made_on_host.append(str(func))
            return out

    for scaling in (None, dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                original_max_position_embeddings=8), dict(rope_type="dynamic", factor=2.0,
                                                                          original_max_position_embeddings=8)):
        config = GPTConfig(n_embd=32, n_head=2, pos="rope", rope_scaling=scaling)
        with OnHost(), HostWaits() as waits:
            cos, sin = rope_cos_sin(config, 16, torch.device("meta"), torch.bfloat16)
        assert cos.device.type == "meta" and cos.dtype == torch.float32 and cos.shape == (16, config.head_dim)
        assert made_on_host == [] and waits.seen == [], (scaling, made_on_host, waits.seen)


# --- casts only ever go up: float32 is the floor, float64 stays float64 ----------------------

def test_rmsnorm_and_rotary_positions_of_a_float64_model_stay_float64():
    from model import RMSNorm, apply_rope, rope_cos_sin
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 5, 32, generator=g, dtype=torch.float64) * 7 + 1 / 3
    norm = RMSNorm(32, 1e-5).double()
    with torch.no_grad():
        norm.weight.copy_(torch.rand(32, generator=g, dtype=torch.float64) + 0.5)
    expected = h / torch.sqrt((h ** 2).mean(-1, keepdim=True) + 1e-5) * norm.weight  # float64 throughout
    assert norm(h).dtype == torch.float64 and torch.allclose(norm(h), expected, rtol=1e-13, atol=0)
    # rotary: pair (x_j, x_{j+d/2}) at position p turns by p * theta^(-2j/d), computed here in float64
    config = GPTConfig(n_embd=32, n_head=2, pos="rope")
    T, d = 12, config.head_dim
    q = torch.randn(2, 2, T, d, generator=g, dtype=torch.float64)
    angle = torch.arange(T, dtype=torch.float64)[:, None] * 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    x1, x2 = q[..., :d // 2], q[..., d // 2:]
    expected = torch.cat((x1 * angle.cos() - x2 * angle.sin(), x2 * angle.cos() + x1 * angle.sin()), dim=-1)
    got = apply_rope(q, *rope_cos_sin(config, T, "cpu", q.dtype))
    assert got.dtype == torch.float64 and torch.allclose(got, expected, rtol=0, atol=1e-12)
    # a whole float64 LLaMA-style model: float64 logits and per-sample losses
    llama = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=32, norm="rmsnorm", pos="rope",
                          mlp="swiglu", bias=False)).double()
    x, y = padded_batch([16, 4])
    logits, loss = llama.logits(x), llama(x, y)[1]
    assert logits.dtype == loss.dtype == torch.float64


# --- the optimizer: which parameters are decayed ---------------------------------------------

@pytest.mark.parametrize("decay", ["matrices", "all"])
def test_weight_decay_reaches_the_parameters_it_names(decay):
    """With zero gradients AdamW's step is the decay alone, p <- p * (1 - lr * wd): computed here per parameter."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=32))
    opt = model.configure_optimizer(0.5, 0.1, (0.9, 0.999), "cpu", decay)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for name, p in model.named_parameters():
        decayed = decay == "all" or p.dim() >= 2  # matrices: Linear/Embedding weights, not biases or norm gains
        assert torch.allclose(p, before[name] * (0.95 if decayed else 1.0), rtol=1e-6, atol=0), name
    assert any(p.dim() < 2 for p in model.parameters())  # biases and gains exist, so the two modes differ


def test_decay_all_is_the_official_optimizer():
    """--decay_params all: the steps of torch.optim.AdamW(model.parameters(), lr) with torch's defaults
    (betas 0.9, 0.999, weight decay 0.01), as the official code builds it."""
    torch.manual_seed(0)
    # float64: where the two kernels differ (fused on CUDA), the same steps round differently (Adam amplifies the
    # rounding of gradient entries near eps); in float64 they agree
    ours = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=32)).double()
    official = GPT(ours.config).double()
    official.load_state_dict(ours.state_dict())
    opts = [ours.configure_optimizer(0.01, 1e-3, (0.9, 0.999), "cpu", "all"),
            torch.optim.AdamW(official.parameters(), lr=1e-3)]
    x, y = padded_batch([16, 9])
    for _ in range(3):
        for m, opt in zip((ours, official), opts):
            m(x, y)[1].mean().backward()
            opt.step()
            opt.zero_grad()
    for (name, a), b in zip(ours.named_parameters(), official.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-7), name
    with pytest.raises(ValueError, match="matrices or all"):
        ours.configure_optimizer(0.01, 1e-3, (0.9, 0.999), "cpu", "biases")


# --- building from a state dict (loading): no initialisation, no second copy -------------------------------

@pytest.mark.parametrize("tied", [True, False])
def test_from_state_dict_holds_the_given_tensors_and_reties_the_head(tied):
    torch.manual_seed(0)
    config = GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=32, tie_embeddings=tied)
    sd = {k: v.to(torch.bfloat16) for k, v in GPT(config).state_dict().items()}
    if tied:
        del sd["lm_head.weight"]  # a tied head may be left out (Hugging Face files do)
    model = GPT.from_state_dict(config, sd)
    for name, p in model.named_parameters():
        assert p.data_ptr() == sd[name].data_ptr() and p.dtype == torch.bfloat16, name  # the tensors themselves
    assert (model.lm_head.weight is model.transformer.wte.weight) == tied
    with pytest.raises(RuntimeError, match="Missing key"):
        GPT.from_state_dict(config, {k: v for k, v in sd.items() if "ln_f" not in k})
    with pytest.raises(RuntimeError, match="size mismatch"):
        GPT.from_state_dict(config, dict(sd, **{"transformer.ln_f.weight": torch.ones(3)}))
