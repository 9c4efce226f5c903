"""hf.py: logits parity with transformers on tiny random checkpoints built offline, export round trips,
checkpoint layouts and downloads, clear errors on bad checkpoints, and the export of trained weights with the
tokenizer of the data, special-token ids and dtype; lm-evaluation-harness on the exports of train.py runs."""

import gzip
import importlib.metadata
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hf as hf_module
import prepare_data
import tokenization
import train
from hf import export, load_pretrained, save_pretrained
from model import GPT, GPTConfig, IGNORE_INDEX

ROOT = Path(__file__).resolve().parent.parent

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
        logits, loss = ours.logits(x), ours(x, y)[1]
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


@pytest.mark.parametrize("layout", ["bare-prefix", "sharded-safetensors", "bin", "sharded-bin", "legacy-bin"])
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
        if layout in ("bin", "legacy-bin"):  # legacy: torch < 1.6's format, which cannot be mapped (mmap)
            torch.save(sd, tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=layout == "bin")
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
        assert (ours.logits(x) - hf(x).logits).abs().max().item() <= 1e-4
    assert (ours.lm_head.weight is ours.transformer.wte.weight) == ours.config.tie_embeddings


# --- memory: a checkpoint is loaded once ------------------------------------------------------------------------

LOAD_MEMORY_SCRIPT = """import sys
sys.path.insert(0, {root!r})
import torch
import hf, runtime  # (what train.py has imported when it loads: torch.distributed and its checkpoint code)
def status(key):  # bytes. Not ru_maxrss: Linux carries the parent's peak over into the child (fork, exec)
    return int(next(line for line in open("/proc/self/status") if line.startswith(key)).split()[1]) * 1024
hf.load_pretrained({warm!r}, dtype=torch.float32)  # torch's imports on a first meta-device build, ~70 MB once
before = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # VmHWM (the peak RSS) starts again from here
model = hf.load_pretrained({folder!r}, dtype=torch.float32)
assert {{p.dtype for p in model.parameters()}} == {{torch.float32}}
print(status("VmHWM") - before, sum(p.numel() * p.element_size() for p in model.parameters()))
"""


@pytest.fixture(scope="module")
def big_llama(tmp_path_factory):
    """A random LLaMA of 42M parameters (169 MB in float32): 12 layers, so that no tensor is more than 5% of it."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=12,
                                      num_attention_heads=8, vocab_size=4096, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config)
    folders = {layout: tmp_path_factory.mktemp(layout) for layout in ("sharded-float32", "bfloat16", "bin")}
    model.save_pretrained(folders["sharded-float32"], max_shard_size="50MB")
    model.to(torch.bfloat16).save_pretrained(folders["bfloat16"])
    model.config.save_pretrained(folders["bin"])
    torch.save(model.float().state_dict(), folders["bin"] / "pytorch_model.bin")
    tiny_hf_model("llama-mha").save_pretrained(folders.setdefault("warm", tmp_path_factory.mktemp("warm")))
    return folders


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/status")
@pytest.mark.parametrize("layout", ["sharded-float32", "bfloat16", "bin"])
def test_loading_a_checkpoint_holds_its_weights_once(layout, big_llama):
    """Peak memory while loading (as float32): the weights once, plus the pages of one group of tensors as they are
    read. Building a random float32 model and then copying the whole checkpoint into it took 2.7x the weights here
    (1.9x from bfloat16 files)."""
    script = LOAD_MEMORY_SCRIPT.format(root=str(ROOT), warm=str(big_llama["warm"]), folder=str(big_llama[layout]))
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    growth, weights = map(int, p.stdout.split()[-2:])
    assert weights == 42_152_448 * 4
    # besides 1.1x the weights: one group read (at most the embedding's 8 MiB, in the stored dtype: its pages stay
    # mapped while it is copied) and 8 MiB of library code first paged in (4-6 MiB measured)
    allowance = 4096 * 512 * {"bfloat16": 2}.get(layout, 4) + 8 * 2**20
    assert growth <= 1.1 * weights + allowance, (growth / weights, layout)


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


@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
def test_a_weight_file_cut_short_names_the_file_and_the_fix(weights, tmp_path):
    hf = tiny_hf_model("llama-mha")
    hf.save_pretrained(tmp_path)
    if weights == "pytorch_model.bin":
        torch.save(load_file(tmp_path / "model.safetensors"), tmp_path / weights)
        (tmp_path / "model.safetensors").unlink()
    whole = (tmp_path / weights).read_bytes()
    for cut in (whole[:-100], whole[:50]):  # the data cut short, or the header itself
        (tmp_path / weights).write_bytes(cut)
        with pytest.raises(ValueError) as e:
            load_pretrained(tmp_path)
        assert str(e.value).startswith(f"{tmp_path / weights} is cut short or damaged (") and \
            str(e.value).endswith("): download or copy the checkpoint again") and "\n" not in str(e.value)
    (tmp_path / "config.json").write_text('{"model_type": "llama",')
    with pytest.raises(ValueError, match=f"^{tmp_path / 'config.json'} is damaged .*: download or copy"):
        load_pretrained(tmp_path)


def test_pretrained_cut_short_is_one_line_from_train_py(tiny_llama_ckpt, tiny_llama_data, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_llama_ckpt, folder)
    (folder / "model.safetensors").write_bytes((tiny_llama_ckpt / "model.safetensors").read_bytes()[:-1000])
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--pretrained", str(folder), "--data",
                        str(tiny_llama_data), "--device", "cpu", "--out_dir", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith(f"train.py: error: {folder / 'model.safetensors'} is cut short or damaged "
                               "(SafetensorError: ") and lines[0].endswith("download or copy the checkpoint again")
    assert not (tmp_path / "o").exists()


def test_scratch_model_exports_as_gpt2(tmp_path):
    torch.manual_seed(0)
    ours = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32)).eval()
    save_pretrained(ours, tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    x = tokens(V=64, T=16)
    with torch.no_grad():
        assert (back(x).logits - ours.logits(x)).abs().max().item() <= 1e-5


def test_export_without_a_tokenizer_folder_writes_the_model_only(tmp_path, capsys):
    torch.manual_seed(0)
    ours = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32)).eval()  # tied head
    export(ours.config, ours.state_dict(), tmp_path / "hf")
    assert capsys.readouterr().out == f"exported {tmp_path / 'hf'}\n"
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json", "model.safetensors"]
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    x = tokens(V=64, T=16)
    with torch.no_grad():
        assert (back(x).logits - ours.logits(x)).abs().max().item() <= 1e-5


# --- the export's tokenizer, special-token ids and dtype -------------------------------------------------------

def varied_text():
    """Text that exercises every branch of GPT-2's pre-tokenizer and byte map: a Shakespeare scene, contractions,
    digits, runs of spaces and newlines, tabs, control bytes, accents, CJK, emoji and the special token."""
    with gzip.open(prepare_data.EMBEDDED_CORPUS, "rt", encoding="utf-8") as f:
        scene = json.loads(next(f))["text"][:3000]
    return (scene + " I'm sure they'll've DON'T 3.14159 1,000,000\n\n\n   x\t\ty\r\n\x00\x07\x1b[0m "
            "naïve café Ünïcödé — “quotes” 日本語のテキスト 한국어 🎉👍🏽 e\u0301 <|endoftext|>tail  ")


def scratch_model(block_size=16):
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=block_size, vocab_size=50304, n_layer=1, n_head=2, n_embd=32)).eval()


def test_scratch_export_has_gpt2s_tokenizer_with_tiktokens_ids(tmp_path, monkeypatch):
    ours = scratch_model()
    out = tmp_path / "hf"
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "cache"))
    export(ours.config, ours.state_dict(), out, tokenizer="gpt2")
    # transformers' TikTokenConverter made it from the ranks file, which is gone, and tiktoken cached no copy of it
    assert {f.name for f in tmp_path.iterdir()} == {"hf"} and not (out / "gpt2.tiktoken").exists()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok("Hello world").input_ids == [15496, 995]  # GPT-2's ids, as published
    text = varied_text()
    enc = tokenization.gpt2_encoding()
    assert tok(text).input_ids == enc.encode(text, allowed_special="all")
    assert tok.decode(tok(text).input_ids) == text
    assert tok.bos_token_id == tok.eos_token_id == enc.eot_token == 50256
    assert tok.model_max_length == ours.config.block_size
    # the vocabulary and document start that prepare_data fingerprints: data made with "gpt2" matches the export
    assert tokenization.load_tokenizer(out).fingerprint == tokenization.load_tokenizer("gpt2").fingerprint
    config = transformers.AutoConfig.from_pretrained(out)
    assert config.bos_token_id == config.eos_token_id == 50256


def llama_source(tiny_llama_ckpt, folder, files=(), config_template=None, **config_ids):
    """A copy of the tiny LLaMA checkpoint (the session fixture stays as it is) with more tokenizer files (chat
    templates), a chat template in its tokenizer_config.json, or other special-token ids in its config.json."""
    shutil.copytree(tiny_llama_ckpt, folder)
    for name, text in dict(files).items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    if config_template:
        cfg = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps(dict(cfg, chat_template=config_template)))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, **config_ids)))
    return folder


TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}" \
           "assistant:{% endif %}"
TOOL_TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} {% endfor %}"


@pytest.mark.parametrize("where", ["chat_template.jinja", "tokenizer_config.json", "additional_chat_templates"])
def test_export_keeps_the_checkpoints_tokenizer_and_chat_template(where, tiny_llama_ckpt, tmp_path, capsys):
    src = llama_source(tiny_llama_ckpt, tmp_path / "src", **{
        "chat_template.jinja": dict(files={"chat_template.jinja": TEMPLATE}),
        "tokenizer_config.json": dict(config_template=TEMPLATE),  # as older checkpoints have it
        "additional_chat_templates": dict(files={"chat_template.jinja": TEMPLATE,  # named templates (transformers 5)
                                                 "additional_chat_templates/tool_use.jinja": TOOL_TEMPLATE})}[where])
    ours = load_pretrained(src).eval()
    torch.manual_seed(0)
    with torch.no_grad():  # "training": weights far from the checkpoint's, so that a stale export shows
        for p in ours.parameters():
            p.add_(0.2 * torch.randn_like(p))
    out = tmp_path / "out"
    export(ours.config, ours.state_dict(), out, tokenizer=src)
    assert capsys.readouterr().out == f"exported {out}\n"
    before, after = transformers.AutoTokenizer.from_pretrained(src), transformers.AutoTokenizer.from_pretrained(out)
    assert after.chat_template == before.chat_template
    assert TEMPLATE in (before.chat_template.values() if isinstance(before.chat_template, dict) else
                        [before.chat_template])
    chat = [{"role": "user", "content": "Which play?"}, {"role": "assistant", "content": "Hamlet."},
            {"role": "user", "content": "Who is the king?"}]
    for kw in [dict(add_generation_prompt=False), dict(add_generation_prompt=True)] + (
            [dict(chat_template="tool_use")] if where == "additional_chat_templates" else []):
        assert after.apply_chat_template(chat, tokenize=False, **kw) == before.apply_chat_template(chat, tokenize=False,
                                                                                                  **kw)
    text = "The king's crown, 1603. <sep> </s>"
    assert after(text).input_ids == before(text).input_ids
    assert tokenization.load_tokenizer(out).fingerprint == tokenization.load_tokenizer(src).fingerprint
    # the raw vocabulary for tools other than transformers, and the model's generation settings
    assert (out / "tokenizer.model").read_bytes() == (src / "tokenizer.model").read_bytes()
    assert (out / "generation_config.json").read_bytes() == (src / "generation_config.json").read_bytes()
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    x = tokens(V=800)
    with torch.no_grad():
        expected = ours.logits(x)
        assert expected.abs().max() > 1.0
        assert (back(x).logits - expected).abs().max().item() <= 1e-4


def test_export_carries_the_checkpoints_special_token_ids(tiny_llama_ckpt, tmp_path):
    # Llama-3 style: ids that are ordinary tokens where transformers falls back to bos 1 / eos 2
    src = llama_source(tiny_llama_ckpt, tmp_path / "src", bos_token_id=700, eos_token_id=[701, 702], pad_token_id=703)
    (src / "generation_config.json").unlink()  # transformers then derives the generation ids from config.json
    ours = load_pretrained(src)
    export(ours.config, ours.state_dict(), tmp_path / "out", tokenizer=src)
    before = transformers.AutoConfig.from_pretrained(src)
    after = transformers.AutoConfig.from_pretrained(tmp_path / "out")
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(after, key) == getattr(before, key)
    generation = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").generation_config
    assert (generation.bos_token_id, generation.eos_token_id) == (700, [701, 702])


def test_export_config_says_the_weights_dtype(tmp_path):
    ours = scratch_model()
    export(ours.config, ours.state_dict(), tmp_path / "f32")
    config = json.loads((tmp_path / "f32" / "config.json").read_text())
    assert config["dtype"] == config["torch_dtype"] == "float32"
    assert transformers.AutoConfig.from_pretrained(tmp_path / "f32").dtype == torch.float32
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "f32", dtype="auto")  # lm-eval's default
    assert {p.dtype for p in back.parameters()} == {torch.float32}
    save_pretrained(ours.to(torch.bfloat16), tmp_path / "bf16")  # what is written is what the weights are
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype="auto")
    assert {p.dtype for p in back.parameters()} == {torch.bfloat16}


def test_scratch_run_on_checkpoint_tokenized_data_exports_that_tokenizer(tiny_flags, tiny_llama_data,
                                                                       tiny_llama_ckpt, tmp_path, capsys):
    meta = json.loads((tiny_llama_data / "meta.json").read_text())
    assert meta["tokenizer_source"] == str(tiny_llama_ckpt.resolve())
    flags = [f if f != str(tiny_flags[1]) else str(tiny_llama_data) for f in tiny_flags]
    train.main(flags + ["--max_iters", "1", "--out_dir", str(tmp_path / "run")])
    out = tmp_path / "run" / "hf"
    assert tokenization.load_tokenizer(out).fingerprint == meta["tokenizer_fingerprint"]
    config, src = transformers.AutoConfig.from_pretrained(out), transformers.AutoConfig.from_pretrained(tiny_llama_ckpt)
    assert config.model_type == "gpt2" and (config.bos_token_id, config.eos_token_id) == (src.bos_token_id,
                                                                                             src.eos_token_id)
    # a tokenizer source that is gone: the model is still exported, with a note saying what to do
    ours = scratch_model()
    capsys.readouterr()
    export(ours.config, ours.state_dict(), tmp_path / "gone", tokenizer=tmp_path / "moved_away")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no tokenizer" in err and "moved_away" in err and "save_pretrained" in err
    assert sorted(p.name for p in (tmp_path / "gone").iterdir()) == ["config.json", "model.safetensors"]


# --- hub downloads: one weight format ------------------------------------------------------------------------

TOKENIZER_AND_CONFIG = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                        "special_tokens_map.json", "tokenizer.model", "chat_template.jinja"}
ELSE = {"README.md", "flax_model.msgpack", "tf_model.h5", "original/consolidated.00.pth"}


@pytest.mark.parametrize("weights, expected", [
    ({"model.safetensors", "pytorch_model.bin"}, {"model.safetensors"}),
    ({"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json",
      "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin", "pytorch_model.bin.index.json"},
     {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json",
      "pytorch_model.bin.index.json"}),  # (an index is a small json: harmless, weight_files prefers safetensors)
    ({"pytorch_model.bin"}, {"pytorch_model.bin"}),
    ({"pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin", "pytorch_model.bin.index.json"},
     {"pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin", "pytorch_model.bin.index.json"}),
])
def test_hub_download_takes_safetensors_else_bin(weights, expected, tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects
    listing = sorted(TOKENIZER_AND_CONFIG | ELSE | weights)
    calls = []

    def snapshot_download(repo_id, allow_patterns=None, **kw):  # the hub's own pattern matching, no network
        calls.append(repo_id)
        for f in filter_repo_objects(listing, allow_patterns=allow_patterns):
            (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / f).write_text("x")
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo_id, **kw: listing)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    assert hf_module.checkpoint_folder("org/model") == tmp_path and calls == ["org/model"]
    got = {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()}
    assert got == TOKENIZER_AND_CONFIG | expected


def test_hub_download_offline_asks_the_cache(tmp_path, monkeypatch):
    import huggingface_hub

    def offline(*a, **kw):
        raise huggingface_hub.errors.OfflineModeIsEnabled("offline")

    asked = []
    monkeypatch.setattr(huggingface_hub, "list_repo_files", offline)
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo_id, allow_patterns=None, **kw: asked.append(allow_patterns) or str(tmp_path))
    assert hf_module.checkpoint_folder("org/model") == tmp_path and len(asked) == 1
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(FileNotFoundError, match="local folder"):
        hf_module.checkpoint_folder("org/model")


# --- the evaluation commands of the docs, with lm-evaluation-harness on a local task ------------------------------

def readme_pretrained_section():  # docs/pretrained.md (linked from the README): a --pretrained run, its evaluation
    page = (ROOT / "docs" / "pretrained.md").read_text()
    return page[page.index("## Continual training of OPT"):]


def test_readme_installs_lm_eval_with_its_hf_extra():
    """Plain lm-eval lacks accelerate, which its hf model needs: the [hf] extra brings it (lm-eval's metadata)."""
    section = readme_pretrained_section()
    assert 'pip install "lm-eval[hf]"' in section
    requires = importlib.metadata.requires("lm_eval")
    assert any(r.startswith("accelerate") and 'extra == "hf"' in r for r in requires)
    assert not any(r.startswith("accelerate") and "extra" not in r for r in requires)
    assert "lm-eval[hf]" in (ROOT / "requirements-test.txt").read_text()


def readme_lm_eval_command(pretrained, task_dir):
    """The README's first lm_eval command, on `pretrained`, with its hub tasks swapped for a local one."""
    command = next(c for c in re.split(r"\n(?=\S)", readme_pretrained_section().replace("\\\n", " "))
                   if c.startswith("lm_eval "))
    words = command.split()
    assert words[:4] == ["lm_eval", "--model", "hf", "--model_args"] and words[4] == "pretrained=out/irdro-tau1.0/hf"
    words[4] = f"pretrained={pretrained}"
    words[words.index("--tasks") + 1] = "tiny_choice"
    return words + ["--include_path", str(task_dir), "--device", "cpu", "--limit", "4"]


TASK = """task: tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
"""
QUESTIONS = [("The king wore a", [" crown", " sword"], 0), ("Night follows", [" day", " love"], 0),
             ("The queen of", [" hearts", " blood"], 0), ("Sweet is", [" life", " death"], 1)]


def lm_eval_task(folder):
    """A multiple-choice task over a local jsonl: lm-eval's built-in tasks download from the hub."""
    folder.mkdir()
    with open(folder / "tiny.jsonl", "w") as f:
        for q, choices, label in QUESTIONS:
            f.write(json.dumps({"question": q, "choices": choices, "label": label}) + "\n")
    (folder / "tiny.yaml").write_text(TASK.format(data=folder / "tiny.jsonl"))
    return folder


def our_loglikelihood(model, encode, context, continuation):
    """log p(continuation | context) from our own model and the data's tokenizer, split as lm-eval splits a
    pair: the context's trailing whitespace goes to the continuation, the whole text is tokenized at once."""
    ids, n = encode(context + continuation), len(encode(context.rstrip()))
    x = torch.tensor([ids])
    with torch.no_grad():
        logp = torch.log_softmax(model.eval().logits(x)[0].double(), dim=-1)
    return sum(logp[i - 1, ids[i]].item() for i in range(n, len(ids)))


@pytest.mark.parametrize("run", ["scratch", "pretrained"])
def test_readme_lm_eval_runs_on_the_exports(run, tiny_flags, tiny_llama_ckpt, tiny_llama_data, tmp_path):
    """(a) the README's first run, python train.py --method irdro --tau 1.0, tiny; (b) a --pretrained run of a
    checkpoint with a chat template, evaluated with --apply_chat_template. lm-eval's log-likelihoods must be our
    model's on the data's tokenizer: the export's weights and tokenizer are what was trained."""
    flags = tiny_flags + ["--method", "irdro", "--tau", "1.0", "--max_iters", "2", "--out_dir", str(tmp_path / "run")]
    if run == "scratch":
        encode = tokenization.gpt2_encoding().encode_ordinary
        extra = []
    else:
        src = llama_source(tiny_llama_ckpt, tmp_path / "src", files={"chat_template.jinja": TEMPLATE})
        flags += ["--pretrained", str(src), "--data", str(tiny_llama_data)]  # (the later --data wins)
        tok = transformers.AutoTokenizer.from_pretrained(src)
        encode = tok.encode  # with its bos, as lm-eval encodes
        extra = ["--apply_chat_template"]
    model = train.main(flags)["model"]
    command = readme_lm_eval_command(tmp_path / "run" / "hf", lm_eval_task(tmp_path / "task"))
    command[0] = str(Path(sys.executable).with_name("lm_eval"))  # the lm_eval of this environment
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    p = subprocess.run(command + extra + ["--output_path", str(tmp_path / "results"), "--log_samples"],
                       capture_output=True, text=True, env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    (results,) = (tmp_path / "results").rglob("results_*.json")
    acc = json.loads(results.read_text())["results"]["tiny_choice"]["acc,none"]
    assert math.isfinite(acc) and 0 <= acc <= 1
    (samples,) = (tmp_path / "results").rglob("samples_tiny_choice_*.jsonl")
    records = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(records) == len(QUESTIONS)
    for r in records:
        for args, resp in zip(r["arguments"].values(), r["resps"]):
            context, continuation = args["arg_0"], args["arg_1"]
            if run == "pretrained":  # the checkpoint's chat template reached lm-eval through the export
                assert context == tok.apply_chat_template([{"role": "user", "content": r["doc"]["question"]}],
                                                          tokenize=False, add_generation_prompt=True)
            ll = float(resp[0][0])
            assert math.isfinite(ll)
            assert ll == pytest.approx(our_loglikelihood(model, encode, context, continuation), abs=1e-3)
