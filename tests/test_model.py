"""model.py: the per-sample loss against a manual loop, padding, and the forward pass."""

import json
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


# --- Hugging Face checkpoints: logits parity on tiny random models built offline -------------

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

HF_CONFIGS = {
    "gpt2": lambda: transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=32, vocab_size=101),
    "opt-125m-like": lambda: transformers.OPTConfig(hidden_size=32, num_hidden_layers=2, ffn_dim=48,
                                                    num_attention_heads=4, max_position_embeddings=32,
                                                    vocab_size=101, word_embed_proj_dim=32),
    "opt-350m-like": lambda: transformers.OPTConfig(hidden_size=32, num_hidden_layers=2, ffn_dim=48,
                                                    num_attention_heads=4, max_position_embeddings=32,
                                                    vocab_size=101, word_embed_proj_dim=16,
                                                    do_layer_norm_before=False),
    "llama-mha": lambda: transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                                  num_attention_heads=4, vocab_size=101, max_position_embeddings=64),
    "llama-gqa-tied": lambda: transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                                       num_attention_heads=4, num_key_value_heads=2, vocab_size=101,
                                                       max_position_embeddings=64, tie_word_embeddings=True),
    "llama3-rope-bias-head_dim": lambda: transformers.LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
        head_dim=12, attention_bias=True, vocab_size=101, max_position_embeddings=64, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8}),
    "llama-linear-rope": lambda: transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                                          num_attention_heads=2, vocab_size=101,
                                                          max_position_embeddings=64,
                                                          rope_scaling={"rope_type": "linear", "factor": 4.0}),
}
AUTO = {"gpt2": transformers.GPT2LMHeadModel, "opt": transformers.OPTForCausalLM, "llama": transformers.LlamaForCausalLM}


def tiny_hf_model(name, seed=0):
    """A random HF model whose weights are large enough that any mapping error shows in the logits."""
    torch.manual_seed(seed)
    config = HF_CONFIGS[name]()
    model = AUTO[config.model_type](config).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in pname or "ln_" in pname else 0.2 * torch.randn_like(p))
    return model


def tokens(V=101, B=3, T=20, seed=1):
    return torch.randint(V, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_logits_and_losses_match_transformers(name, tmp_path):
    hf = tiny_hf_model(name)
    hf.save_pretrained(tmp_path)
    ours = GPT.from_pretrained(tmp_path).eval()
    x = tokens()
    y = torch.roll(x, -1, dims=1)
    y[1, 12:] = IGNORE_INDEX
    with torch.no_grad():
        expected = hf(x).logits
        logits, loss = ours(x, y)
    assert expected.abs().max() > 1.0  # the test has teeth: logits far from uniform
    assert (logits - expected).abs().max().item() <= 1e-4
    # per-sample losses against a loss computed from transformers' logits
    tok = torch.nn.functional.cross_entropy(expected.transpose(1, 2), y, ignore_index=IGNORE_INDEX, reduction="none")
    assert torch.allclose(loss, tok.sum(1) / (y != IGNORE_INDEX).sum(1), atol=1e-5)


@pytest.mark.parametrize("name", ["opt-350m-like", "llama3-rope-bias-head_dim", "gpt2"])
def test_export_round_trip_gives_the_same_logits_in_transformers(name, tmp_path):
    hf = tiny_hf_model(name)
    hf.save_pretrained(tmp_path / "in")
    GPT.from_pretrained(tmp_path / "in").save_pretrained(tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    x = tokens()
    with torch.no_grad():
        assert (back(x).logits - hf(x).logits).abs().max().item() <= 1e-5


def rewrite_keys(folder, fn):
    sd = load_file(folder / "model.safetensors")
    save_file({fn(k): v for k, v in sd.items()}, str(folder / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("layout", ["bare-prefix", "sharded-safetensors", "bin", "sharded-bin"])
def test_checkpoint_layouts(layout, tmp_path):
    name = "opt-125m-like" if layout == "bare-prefix" else "llama-gqa-tied"
    hf = tiny_hf_model(name)
    if layout == "bare-prefix":  # old OPT hub files: "decoder.*" without "model."
        hf.save_pretrained(tmp_path)
        rewrite_keys(tmp_path, lambda k: k.removeprefix("model."))
    elif layout == "sharded-safetensors":
        hf.save_pretrained(tmp_path, max_shard_size="20KB")
        assert (tmp_path / "model.safetensors.index.json").exists()
    else:
        hf.config.save_pretrained(tmp_path)
        sd = hf.state_dict()
        if layout == "bin":
            torch.save(sd, tmp_path / "pytorch_model.bin")
        else:
            keys = sorted(sd)
            shards = {"pytorch_model-00001-of-00002.bin": keys[:len(keys) // 2],
                      "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2:]}
            for f, ks in shards.items():
                torch.save({k: sd[k] for k in ks}, tmp_path / f)
            (tmp_path / "pytorch_model.bin.index.json").write_text(
                json.dumps({"weight_map": {k: f for f, ks in shards.items() for k in ks}}))
    ours = GPT.from_pretrained(tmp_path).eval()
    x = tokens()
    with torch.no_grad():
        assert (ours(x, torch.zeros_like(x))[0] - hf(x).logits).abs().max().item() <= 1e-4


def test_bad_checkpoints_give_clear_errors(tmp_path):
    hf = tiny_hf_model("llama-mha")
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for change, message in [({"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}}, "yarn"),
                            ({"model_type": "bert"}, "model_type"),
                            ({"num_hidden_layers": 3}, "missing"),
                            ({"intermediate_size": 40}, "shape")]:
        (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(ValueError, match=message):
            GPT.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="local folder"):
        GPT.from_pretrained(tmp_path / "nope")


def test_scratch_model_exports_as_gpt2(tmp_path):
    torch.manual_seed(0)
    ours = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32)).eval()
    ours.save_pretrained(tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    x = tokens(V=64, T=16)
    with torch.no_grad():
        assert (back(x).logits - ours(x, torch.zeros_like(x))[0]).abs().max().item() <= 1e-5


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
