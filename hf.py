"""
Checkpoint conversion between Hugging Face GPT-2 / OPT / LLaMA model folders and our GPT (model.py).

Not a second model: each family is declared as data, a name map from our parameter names to the
checkpoint's, plus a config.json <-> GPTConfig conversion. transformers is not needed to load or save weights
(the tests use it to compare logits), only to save a checkpoint's tokenizer beside an export. At the bottom, the
public functions: checkpoint_folder, load_pretrained, save_pretrained and export (trained weights -> a folder
for transformers and lm-evaluation-harness, tokenizer included).
"""

import functools
import json
import os
import shutil
import sys
from pathlib import Path
from unittest import mock

import torch

import prepare_data
import tokenization
import runtime
from model import GPT, GPTConfig, rope_inv_freq


# -----------------------------------------------------------------------------
# Hugging Face checkpoint <-> our names. Each family is a list of (our name, HF name(s), transposed?);
# several HF names are concatenated along dim 0 (q/k/v -> c_attn, gate/up -> c_fc). HF names are
# those of the base model; "model." / "transformer." prefixes are stripped on load.

HF_PREFIX = {"gpt2": "transformer.", "opt": "model.", "llama": "model."}

NAME_MAPS = {
    "gpt2": {  # GPT-2's Conv1D weights are stored (in, out): transposed
        "transformer.wte.weight": "wte.weight",
        "transformer.wpe.weight": "wpe.weight",
        "transformer.h.{i}.ln_1.weight": "h.{i}.ln_1.weight",
        "transformer.h.{i}.ln_1.bias": "h.{i}.ln_1.bias",
        "transformer.h.{i}.attn.c_attn.weight": "h.{i}.attn.c_attn.weight^T",
        "transformer.h.{i}.attn.c_attn.bias": "h.{i}.attn.c_attn.bias",
        "transformer.h.{i}.attn.c_proj.weight": "h.{i}.attn.c_proj.weight^T",
        "transformer.h.{i}.attn.c_proj.bias": "h.{i}.attn.c_proj.bias",
        "transformer.h.{i}.ln_2.weight": "h.{i}.ln_2.weight",
        "transformer.h.{i}.ln_2.bias": "h.{i}.ln_2.bias",
        "transformer.h.{i}.mlp.c_fc.weight": "h.{i}.mlp.c_fc.weight^T",
        "transformer.h.{i}.mlp.c_fc.bias": "h.{i}.mlp.c_fc.bias",
        "transformer.h.{i}.mlp.c_proj.weight": "h.{i}.mlp.c_proj.weight^T",
        "transformer.h.{i}.mlp.c_proj.bias": "h.{i}.mlp.c_proj.bias",
        "transformer.ln_f.weight": "ln_f.weight",
        "transformer.ln_f.bias": "ln_f.bias",
        "lm_head.weight": "lm_head.weight",
    },
    "opt": {  # pre-attention norm is self_attn_layer_norm, pre-MLP norm is the layer's final_layer_norm
        "transformer.wte.weight": "decoder.embed_tokens.weight",
        "transformer.wpe.weight": "decoder.embed_positions.weight",
        "transformer.project_in.weight": "decoder.project_in.weight",
        "transformer.project_out.weight": "decoder.project_out.weight",
        "transformer.h.{i}.ln_1.weight": "decoder.layers.{i}.self_attn_layer_norm.weight",
        "transformer.h.{i}.ln_1.bias": "decoder.layers.{i}.self_attn_layer_norm.bias",
        "transformer.h.{i}.attn.c_attn.weight": "decoder.layers.{i}.self_attn.{q,k,v}_proj.weight",
        "transformer.h.{i}.attn.c_attn.bias": "decoder.layers.{i}.self_attn.{q,k,v}_proj.bias",
        "transformer.h.{i}.attn.c_proj.weight": "decoder.layers.{i}.self_attn.out_proj.weight",
        "transformer.h.{i}.attn.c_proj.bias": "decoder.layers.{i}.self_attn.out_proj.bias",
        "transformer.h.{i}.ln_2.weight": "decoder.layers.{i}.final_layer_norm.weight",
        "transformer.h.{i}.ln_2.bias": "decoder.layers.{i}.final_layer_norm.bias",
        "transformer.h.{i}.mlp.c_fc.weight": "decoder.layers.{i}.fc1.weight",
        "transformer.h.{i}.mlp.c_fc.bias": "decoder.layers.{i}.fc1.bias",
        "transformer.h.{i}.mlp.c_proj.weight": "decoder.layers.{i}.fc2.weight",
        "transformer.h.{i}.mlp.c_proj.bias": "decoder.layers.{i}.fc2.bias",
        "transformer.ln_f.weight": "decoder.final_layer_norm.weight",
        "transformer.ln_f.bias": "decoder.final_layer_norm.bias",
        "lm_head.weight": "lm_head.weight",
    },
    "llama": {
        "transformer.wte.weight": "embed_tokens.weight",
        "transformer.h.{i}.ln_1.weight": "layers.{i}.input_layernorm.weight",
        "transformer.h.{i}.attn.c_attn.weight": "layers.{i}.self_attn.{q,k,v}_proj.weight",
        "transformer.h.{i}.attn.c_attn.bias": "layers.{i}.self_attn.{q,k,v}_proj.bias",
        "transformer.h.{i}.attn.c_proj.weight": "layers.{i}.self_attn.o_proj.weight",
        "transformer.h.{i}.attn.c_proj.bias": "layers.{i}.self_attn.o_proj.bias",
        "transformer.h.{i}.ln_2.weight": "layers.{i}.post_attention_layernorm.weight",
        "transformer.h.{i}.mlp.c_fc.weight": "layers.{i}.mlp.{gate,up}_proj.weight",
        "transformer.h.{i}.mlp.c_fc.bias": "layers.{i}.mlp.{gate,up}_proj.bias",
        "transformer.h.{i}.mlp.c_proj.weight": "layers.{i}.mlp.down_proj.weight",
        "transformer.h.{i}.mlp.c_proj.bias": "layers.{i}.mlp.down_proj.bias",
        "transformer.ln_f.weight": "norm.weight",
        "lm_head.weight": "lm_head.weight",
    },
}


def name_map(config):
    """Expand the family's map over layers: [(our name, [HF names], transposed)]."""
    out = []
    for ours, hf in NAME_MAPS[config.family].items():
        transpose = hf.endswith("^T")
        hf = hf.removesuffix("^T")
        for i in range(config.n_layer) if "{i}" in ours else [None]:
            o, h = ours.replace("{i}", str(i)), hf.replace("{i}", str(i))
            if "{" in h:  # "{q,k,v}" -> three names, concatenated in that order
                pre, rest = h.split("{", 1)
                alts, post = rest.split("}", 1)
                names = [pre + a + post for a in alts.split(",")]
            else:
                names = [h]
            out.append((o, names, transpose))
    return out


def split_sizes(config, name):
    """Row sizes of the HF tensors concatenated into one of ours (inverse of the '{a,b}' names)."""
    if "c_attn" in name:
        return [config.n_head * config.head_dim] + 2 * [config.n_kv_head * config.head_dim]
    return [config.mlp_hidden, config.mlp_hidden]  # gate, up


def strip_prefix(key):
    """'model.decoder.x' / 'transformer.h.0.x' -> base-model names; lm_head stays as it is."""
    for prefix in ("model.", "transformer."):
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


# -----------------------------------------------------------------------------
# config.json <-> GPTConfig

def config_from_hf(hf):
    """config.json (a dict) -> GPTConfig."""
    kind = hf.get("model_type")
    if kind == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"unsupported GPT-2 activation {act!r}: only the tanh-approximated GELU is built in")
        return GPTConfig(family="gpt2", block_size=hf["n_positions"], vocab_size=hf["vocab_size"],
                         n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"],
                         mlp_hidden=hf.get("n_inner"), norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                         tie_embeddings=hf.get("tie_word_embeddings", True))
    if kind == "opt":
        if hf.get("activation_function", "relu") != "relu" or not hf.get("layer_norm_elementwise_affine", True):
            raise ValueError("unsupported OPT variant: only ReLU and affine LayerNorms are built in")
        prenorm = hf.get("do_layer_norm_before", True)
        if prenorm and hf.get("_remove_final_layer_norm", False):
            raise ValueError("unsupported OPT variant: pre-norm without a final LayerNorm")
        return GPTConfig(family="opt", block_size=hf["max_position_embeddings"], vocab_size=hf["vocab_size"],
                         n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"],
                         n_embd=hf["hidden_size"], mlp_hidden=hf["ffn_dim"], mlp="relu",
                         bias=hf.get("enable_bias", True), prenorm=prenorm, pos_offset=2,
                         embd_dim=hf.get("word_embed_proj_dim") or hf["hidden_size"],
                         tie_embeddings=hf.get("tie_word_embeddings", True))
    if kind == "llama":
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported LLaMA activation {hf['hidden_act']!r}: only SwiGLU (silu) is built in")
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", None) or hf.get("rope_theta", 10000.0)
        if rope.get("rope_type", rope.get("type", "default")) == "default":
            rope = None
        elif "original_max_position_embeddings" not in rope:
            rope["original_max_position_embeddings"] = hf["max_position_embeddings"]
        config = GPTConfig(family="llama", block_size=hf["max_position_embeddings"], vocab_size=hf["vocab_size"],
                           n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"],
                           n_embd=hf["hidden_size"], n_kv_head=hf.get("num_key_value_heads"),
                           head_dim=hf.get("head_dim"), mlp="swiglu", mlp_hidden=hf["intermediate_size"],
                           bias=hf.get("mlp_bias", False), attn_bias=hf.get("attention_bias", False),
                           norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6), pos="rope",
                           rope_theta=theta, rope_scaling=rope, tie_embeddings=hf.get("tie_word_embeddings", False))
        rope_inv_freq(config, 1)  # an unsupported scaling fails here, at load time
        return config
    raise ValueError(f"unsupported model_type {kind!r} in config.json: gpt2, opt and llama are built in")


def config_to_hf(c):
    """GPTConfig -> config.json (a dict) of the family's transformers class."""
    if c.family == "gpt2":
        if not c.bias or c.mlp != "gelu" or c.norm != "layernorm" or c.pos != "learned":
            raise ValueError("only GPT-2-shaped models (biases, GELU, LayerNorm, learned positions) export as gpt2")
        return dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=c.vocab_size,
                    n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head,
                    n_inner=c.mlp_hidden, activation_function="gelu_new", layer_norm_epsilon=c.norm_eps,
                    tie_word_embeddings=c.tie_embeddings, bos_token_id=50256, eos_token_id=50256)
    if c.family == "opt":
        return dict(model_type="opt", architectures=["OPTForCausalLM"], vocab_size=c.vocab_size,
                    max_position_embeddings=c.block_size, hidden_size=c.n_embd, num_hidden_layers=c.n_layer,
                    num_attention_heads=c.n_head, ffn_dim=c.mlp_hidden, activation_function="relu",
                    do_layer_norm_before=c.prenorm, word_embed_proj_dim=c.embd_dim, enable_bias=c.bias,
                    tie_word_embeddings=c.tie_embeddings, bos_token_id=2, eos_token_id=2, pad_token_id=1)
    rope = dict(c.rope_scaling or {"rope_type": "default"}, rope_theta=c.rope_theta)
    return dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=c.vocab_size,
                max_position_embeddings=c.block_size, hidden_size=c.n_embd, intermediate_size=c.mlp_hidden,
                num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.n_kv_head,
                head_dim=c.head_dim, hidden_act="silu", rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta,
                rope_parameters=rope, rope_scaling=c.rope_scaling, attention_bias=c.attn_bias,
                mlp_bias=c.bias, tie_word_embeddings=c.tie_embeddings)


# -----------------------------------------------------------------------------
# checkpoint files, loading and saving

# besides one copy of the weights, what a hub checkpoint's folder needs: config.json and generation_config.json,
# and its tokenizer, whatever files that is (tokenizer.json, tokenizer.model, vocab.json + merges.txt, tiktoken
# ranks, chat templates, ...)
HUB_FILES = ["*.json", "*.model", "*.txt", "*.tiktoken", "*.jinja"]


def checkpoint_folder(name_or_dir):
    """A local folder as it is; a hub name is downloaded when online: its config and tokenizer files and its
    weights, as safetensors where it has them, else as pytorch_model.bin (weight_files' order, never both)."""
    path = Path(name_or_dir).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} has no config.json: point at a Hugging Face model folder")
        return path
    try:
        import huggingface_hub
        try:  # legacy checkpoints (Sheared-LLaMA) have only pytorch_model.bin; most have safetensors (or both)
            files = set(huggingface_hub.list_repo_files(str(name_or_dir)))
            legacy = not files & {"model.safetensors", "model.safetensors.index.json"}
        except Exception:  # offline: snapshot_download answers from the local cache, whichever weights it holds
            legacy = False
        weights = "pytorch_model*.bin" if legacy else "model*.safetensors"
        return Path(huggingface_hub.snapshot_download(str(name_or_dir), allow_patterns=HUB_FILES + [weights]))
    except Exception as e:
        raise FileNotFoundError(f"cannot find {name_or_dir!r} locally or download it ({type(e).__name__}); "
                                f"offline, download the checkpoint elsewhere and pass its local folder") from e


def read_json(path):
    try:
        return json.loads(path.read_text())
    except ValueError as e:  # json's message says where in the file, not which file
        raise ValueError(f"{path} is damaged ({e}): download or copy the checkpoint again") from None


def weight_files(folder):
    """{stored tensor name: its file} of a checkpoint folder: (sharded) safetensors, else (sharded)
    pytorch_model.bin."""
    for stem in ("model.safetensors", "pytorch_model.bin"):
        index = folder / f"{stem}.index.json"
        if index.exists():  # sharded: the index maps every tensor to its shard
            return {k: folder / f for k, f in read_json(index)["weight_map"].items()}
        if (folder / stem).exists():
            return dict.fromkeys(mapped(folder / stem), folder / stem)
    raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin (or a sharded index) in {folder}")


def mapped(file):
    """A weight file's tensors as views of the file mapped into memory (mmap): a tensor's bytes are read when it is
    used, and the mapping goes with the last view, so a loader that keeps none of them holds one group's pages at a
    time, not the file."""
    try:
        if file.suffix == ".safetensors":
            from safetensors import safe_open
            with safe_open(str(file), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}
        try:
            return torch.load(file, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError:  # saved by torch < 1.6, not a zip file: no mmap; read whole, once (twice the memory)
            return legacy_bin(file)
    except Exception as e:  # a download or copy cut short: the library's message names neither the file nor a fix
        why = str(e).splitlines()[0].split(". ")[0][:120] if str(e) else ""
        raise ValueError(f"{file} is cut short or damaged ({type(e).__name__}: {why}): download or copy the "
                         "checkpoint again") from None


@functools.lru_cache(maxsize=1)  # emptied by load_pretrained once it has what it needs
def legacy_bin(file):
    return torch.load(file, map_location="cpu", weights_only=True)


def read_tensors(files, names):
    """The tensors `names` (stored names) of a checkpoint's {name: file}, each file mapped once for them."""
    out = {}
    for file in dict.fromkeys(files[n] for n in names):
        tensors = mapped(file)
        out.update((n, tensors[n]) for n in names if files[n] == file)
    return [out[n] for n in names]


def load_pretrained(name_or_dir, dtype=None):
    """Load an HF GPT-2 / OPT / LLaMA-family checkpoint (a local folder or, online, a hub name) with
    our own code: config.json -> GPTConfig, weights renamed by the family's name map. The weights
    keep their stored dtype unless `dtype` is given.

    Memory: the weights once, in `dtype`, plus one group of tensors (q/k/v, gate/up) as read. The model is
    built on the meta device (no random initialisation to overwrite) and given the converted tensors
    themselves; the checkpoint's tensors are read a group at a time and dropped once converted."""
    folder = checkpoint_folder(name_or_dir)
    config = config_from_hf(read_json(folder / "config.json"))
    files = weight_files(folder)
    stored = {strip_prefix(k): k for k in files}  # base-model name -> the name in the file
    with torch.device("meta"):  # the names and shapes of our parameters, no memory
        ours = GPT(config).state_dict()
    loaded = {}
    for name, hf_names, transpose in name_map(config):
        if name not in ours or (name == "lm_head.weight" and config.tie_embeddings):
            continue  # a module this config does not have, or the head tied to wte
        missing = [h for h in hf_names if h not in stored]
        if missing:
            raise ValueError(f"{folder}: weight {missing[0]!r} missing: not a {config.family} checkpoint "
                             f"matching its config.json, or a damaged one")
        parts = read_tensors(files, [stored[h] for h in hf_names])  # views of the files: nothing read yet
        shape = torch.cat([p.to("meta") for p in parts], dim=0).shape  # (on meta: the shape alone)
        shape = shape[::-1] if transpose else shape
        if shape != ours[name].shape:
            raise ValueError(f"{folder}: {hf_names[0]} has shape {tuple(shape)}, "
                             f"config.json implies {tuple(ours[name].shape)}")
        dtype = dtype or parts[0].dtype  # (unless given: the stored dtype of the first tensor, for all of them)
        # the parts read and converted straight into the tensor we keep: no temporary (a freed temporary of this
        # size is not reused by the next aligned allocation, so each would cost memory)
        t = torch.empty(shape, dtype=dtype)
        for rows, part in zip((t.t() if transpose else t).split([len(p) for p in parts]), parts):
            rows.copy_(part)
        loaded[name] = t
        del parts, t
    legacy_bin.cache_clear()
    return GPT.from_state_dict(config, loaded)


def save_pretrained(model, out_dir, special_ids=None):
    """Write config.json + model.safetensors in Hugging Face's layout, loadable by
    transformers.AutoModelForCausalLM (and so by lm-evaluation-harness). special_ids: bos/eos/pad_token_id
    for config.json, instead of the family's defaults (GPT-2's 50256, OPT's 2/2/1, none for LLaMA)."""
    from safetensors.torch import save_file
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config, ours = model.config, model.state_dict()
    sd = {}
    for name, hf_names, transpose in name_map(config):
        if name not in ours or (name == "lm_head.weight" and config.tie_embeddings):
            continue
        t = ours[name].t() if transpose else ours[name]
        sizes = split_sizes(config, name) if len(hf_names) > 1 else [t.shape[0]]
        for hf_name, part in zip(hf_names, t.split(sizes, dim=0)):
            sd[HF_PREFIX[config.family] + hf_name if hf_name != "lm_head.weight" else hf_name] = \
                part.contiguous().clone()
    save_file(sd, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    # the stored precision (float32 after training: bf16 would round lr-2e-6 updates away), under the key that
    # transformers 5 reads and writes (dtype) and the one transformers 4 reads (torch_dtype); dtype="auto"
    # (lm-eval's default) then loads the weights as they are
    dtype = str(next(iter(sd.values())).dtype).removeprefix("torch.")
    hf_config = dict(config_to_hf(config), dtype=dtype, torch_dtype=dtype, **(special_ids or {}))
    (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")


# -----------------------------------------------------------------------------
# the export's tokenizer: GPT-2's (converted from tiktoken's ranks by transformers) or the tokenizer of a checkpoint

def write_gpt2_tokenizer(out_dir, max_length):
    """GPT-2's tokenizer.json and tokenizer_config.json, made offline by transformers' TikTokenConverter from the
    ranks that prepare_data tokenized with (it recovers the merges from the rank order): the same ids as tiktoken.
    -> the special-token ids for config.json (<|endoftext|> = 50256 is both bos and eos)."""
    from transformers import GPT2TokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter
    eot = "<|endoftext|>"
    # the converter reads a plain ranks file with tiktoken.load (a local path: no network, no blobfile): ours,
    # unzipped for the moment of the conversion; TIKTOKEN_CACHE_DIR="": tiktoken keeps no copy of it in its cache
    ranks = Path(out_dir) / "gpt2.tiktoken"
    ranks.write_bytes(tokenization.gpt2_ranks_text())
    try:
        with mock.patch.dict(os.environ, TIKTOKEN_CACHE_DIR=""):
            # the special token under both of its argument names: transformers 5's extra_, 4's additional_
            tok = TikTokenConverter(vocab_file=str(ranks), pattern=tokenization.gpt2_pattern(),
                                    extra_special_tokens=[eot], additional_special_tokens=[eot]).converted()
    finally:
        ranks.unlink()
    # no bos is added and no prefix space, as in GPT-2 and prepare_data (a document's <|endoftext|> is data)
    GPT2TokenizerFast(tokenizer_object=tok, bos_token=eot, eos_token=eot, unk_token=eot, add_prefix_space=False,
                      model_max_length=max_length).save_pretrained(out_dir)
    return dict(bos_token_id=tok.token_to_id(eot), eos_token_id=tok.token_to_id(eot))


# raw vocabularies that transformers 5 no longer writes beside tokenizer.json, but other tools read
VOCAB_FILES = ("tokenizer.model", "vocab.json", "merges.txt")
SPECIAL_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def save_tokenizer(source, out_dir):
    """The tokenizer of a checkpoint folder or hub name, saved into out_dir by transformers itself (so that
    whatever it has comes along: tokenizer.json, chat template, added tokens), plus a local folder's raw
    vocabulary and generation_config.json. -> its special-token ids for config.json: the source's
    config.json ids (Llama-3's bos 128000, not transformers' fallback 1), else the tokenizer's."""
    tok, config = tokenization.auto_tokenizer(str(source))
    tok.save_pretrained(out_dir)
    folder = Path(source)
    for name in (*VOCAB_FILES, "generation_config.json") if folder.is_dir() else ():
        if (folder / name).exists() and not (out_dir / name).exists():
            shutil.copy(folder / name, out_dir / name)
    ids = {k: config.get(k) if config.get(k) is not None else getattr(tok, k) for k in SPECIAL_IDS}
    return {k: v for k, v in ids.items() if v is not None}


def export(config, state_dict, out_dir, tokenizer=None):
    """Trained weights (a state dict of GPT(config)) as a Hugging Face folder with the tokenizer the data was
    made with, ready for transformers and lm-evaluation-harness (`lm_eval --model hf --model_args
    pretrained=OUT_DIR`). tokenizer: "gpt2" (GPT-2's, converted from the vendored ranks), a checkpoint folder or
    hub name (its own tokenizer), or None (the weights alone)."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")  # written there, then moved in file by file: a failure (a full
    shutil.rmtree(tmp, ignore_errors=True)  # disk: one line, runtime.writing) leaves no partial file in out_dir
    with runtime.writing(out_dir, tmp):
        tmp.mkdir(parents=True)
        model = GPT.from_state_dict(config, state_dict)  # no initialisation: the weights are `state_dict`'s
        special_ids = None
        if tokenizer == "gpt2":
            special_ids = write_gpt2_tokenizer(tmp, config.block_size)
        elif tokenizer is not None:
            try:
                special_ids = save_tokenizer(tokenizer, tmp)
            except prepare_data.DataError as e:  # after training: the model still goes out, with a way to finish it
                print(f"export: no tokenizer in {out_dir}: the data's tokenizer {str(tokenizer)!r} does not load "
                      f"({type(e.__cause__ or e).__name__}); "
                      "save it there with AutoTokenizer.from_pretrained(ITS_FOLDER).save_pretrained(...)",
                      file=sys.stderr)
        save_pretrained(model, tmp, special_ids)
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in tmp.iterdir():
        os.replace(f, out_dir / f.name)
    tmp.rmdir()
    print(f"exported {out_dir}")
