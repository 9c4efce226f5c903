"""hf.py: logits parity with transformers on tiny random checkpoints built offline, export round trips,
checkpoint layouts, clear errors on bad checkpoints, and the export of trained weights with the tokenizer."""

import json
import shutil

import pytest
import torch

from hf import TOKENIZER_FILES, export, load_pretrained, save_pretrained
from model import GPT, GPTConfig, IGNORE_INDEX

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
    ours = load_pretrained(tmp_path).eval()
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
    save_pretrained(load_pretrained(tmp_path / "in"), tmp_path / "out")
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
    ours = load_pretrained(tmp_path).eval()
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
            load_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="local folder"):
        load_pretrained(tmp_path / "nope")


def test_scratch_model_exports_as_gpt2(tmp_path):
    torch.manual_seed(0)
    ours = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32)).eval()
    save_pretrained(ours, tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    x = tokens(V=64, T=16)
    with torch.no_grad():
        assert (back(x).logits - ours(x, torch.zeros_like(x))[0]).abs().max().item() <= 1e-5


def test_export_of_trained_weights_loads_in_transformers_with_the_tokenizer(tiny_llama_ckpt, tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    shutil.copytree(tiny_llama_ckpt, src)  # a copy: the session fixture is shared
    (src / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    (src / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    ours = load_pretrained(src).eval()
    torch.manual_seed(0)
    with torch.no_grad():  # "training": weights far from the checkpoint's, so that a stale export shows
        for p in ours.parameters():
            p.add_(0.2 * torch.randn_like(p))
    export(ours.config, ours.state_dict(), out, tokenizer_folder=src)
    assert capsys.readouterr().out == f"exported {out}\n"
    present = [f for f in TOKENIZER_FILES if (src / f).exists()]
    assert {"tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
            "chat_template.jinja"} <= set(present)
    assert sorted(p.name for p in out.iterdir()) == sorted(present + ["config.json", "model.safetensors"])
    assert all((out / f).read_bytes() == (src / f).read_bytes() for f in present)
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    x = tokens(V=800)
    with torch.no_grad():
        expected = ours(x, torch.zeros_like(x))[0]
        assert expected.abs().max() > 1.0
        assert (back(x).logits - expected).abs().max().item() <= 1e-4
    text = "The king's crown, 1603."
    assert transformers.AutoTokenizer.from_pretrained(out)(text).input_ids == \
        transformers.AutoTokenizer.from_pretrained(src)(text).input_ids


def test_export_without_a_tokenizer_folder_writes_the_model_only(tmp_path, capsys):
    torch.manual_seed(0)
    ours = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32)).eval()  # tied head
    export(ours.config, ours.state_dict(), tmp_path / "hf")
    assert capsys.readouterr().out == f"exported {tmp_path / 'hf'}\n"
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json", "model.safetensors"]
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    x = tokens(V=64, T=16)
    with torch.no_grad():
        assert (back(x).logits - ours(x, torch.zeros_like(x))[0]).abs().max().item() <= 1e-5
