"""
One compact GPT for GPT-2, OPT and the LLaMA family, whose forward pass returns a loss *per sample*.

Why per sample: hard-sample reweighting (reweight.py) needs one loss l_i for each sample i of the
batch, l_i = mean next-token cross-entropy over that sample's counted target positions, so that the
training step can minimise sum_i w_i * l_i instead of the plain mean. Targets equal to -1 are not
counted (padding; prompt tokens in instruction data). This file knows nothing about reweighting.

The families differ in a handful of switches (GPTConfig): LayerNorm or RMSNorm, learned positions or
rotary ones (RoPE), GELU / ReLU / SwiGLU MLP, grouped key-value heads, biases, pre- or post-norm, a tied
or untied head. The bottom of the file maps Hugging Face checkpoints onto these names and back, as data.
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn import functional as F

IGNORE_INDEX = -1  # target value of positions that do not count


@dataclass
class GPTConfig:
    block_size: int = 128     # longest sequence the model is used with
    vocab_size: int = 50304   # GPT-2's 50257 padded up to a multiple of 64 for faster matmuls
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True         # biases in the MLP and LayerNorms (GPT-2, OPT: yes; LLaMA: no)
    # --- switches for pretrained families; the defaults are GPT-2 ---
    family: str = "gpt2"      # checkpoint naming: gpt2, opt or llama
    attn_bias: bool = None    # biases in the attention projections (None: same as bias)
    n_kv_head: int = None     # key/value heads, < n_head for grouped-query attention (None: n_head)
    head_dim: int = None      # None: n_embd // n_head
    mlp: str = "gelu"         # gelu (tanh approximation), relu or swiglu
    mlp_hidden: int = None    # None: 4 * n_embd
    norm: str = "layernorm"   # layernorm or rmsnorm
    norm_eps: float = 1e-5
    prenorm: bool = True      # x + f(norm(x)); False: norm(x + f(x)) and no final norm (opt-350m)
    pos: str = "learned"      # learned (a table) or rope
    pos_offset: int = 0       # learned: position p uses row p + pos_offset (OPT: 2)
    rope_theta: float = 10000.0
    rope_scaling: dict = None  # {"rope_type": linear | dynamic | llama3, "factor": ..., ...}
    embd_dim: int = None      # token embedding width when it differs from n_embd (opt-350m: 512)
    tie_embeddings: bool = True

    def __post_init__(self):
        self.attn_bias = self.bias if self.attn_bias is None else self.attn_bias
        self.n_kv_head = self.n_kv_head or self.n_head
        self.head_dim = self.head_dim or self.n_embd // self.n_head
        self.mlp_hidden = self.mlp_hidden or 4 * self.n_embd
        self.embd_dim = self.embd_dim or self.n_embd


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in float32 as LLaMA does (bf16 would lose it)."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def make_norm(config, dim):
    if config.norm == "rmsnorm":
        return RMSNorm(dim, config.norm_eps)
    return nn.LayerNorm(dim, eps=config.norm_eps, bias=config.bias)


def rope_inv_freq(config, seq_len):
    """Rotary frequencies theta^(-2j/d), j < d/2, with the checkpoint's scaling variant applied."""
    d, base, s = config.head_dim, config.rope_theta, config.rope_scaling or {}
    kind = s.get("rope_type", s.get("type", "default"))
    if kind == "dynamic" and seq_len > s["original_max_position_embeddings"]:
        # NTK-aware: grow the base once the sequence outruns the trained context
        base *= (s["factor"] * seq_len / s["original_max_position_embeddings"] - (s["factor"] - 1)) ** (d / (d - 2))
    inv_freq = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d)
    if kind == "linear":  # position interpolation: positions / factor
        inv_freq = inv_freq / s["factor"]
    elif kind == "llama3":  # long wavelengths slowed by factor, short ones kept, a smooth band between
        old, lo, hi = s["original_max_position_embeddings"], s["low_freq_factor"], s["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        smooth = ((old / wavelen - lo) / (hi - lo)).clamp(0, 1)
        inv_freq = (1 - smooth) * inv_freq / s["factor"] + smooth * inv_freq
    elif kind not in ("default", "dynamic"):
        raise ValueError(f"unsupported RoPE scaling {kind!r}: supported are linear, dynamic and llama3")
    return inv_freq


def rope_cos_sin(config, T, device):
    """cos, sin of shape (T, head_dim) in float32, frequencies repeated over the two halves."""
    inv_freq = rope_inv_freq(config, T).to(device)
    angles = torch.outer(torch.arange(T, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate pairs (x_j, x_{j+d/2}) by position-dependent angles: the "rotate half" layout of HF
    LLaMA checkpoints, whose q/k weights are stored permuted for it."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.dropout = config.dropout
        # q, k and v in one matmul; k and v have n_kv_head heads each (grouped-query attention)
        self.c_attn = nn.Linear(config.n_embd, (config.n_head + 2 * config.n_kv_head) * config.head_dim,
                                bias=config.attn_bias)
        self.c_proj = nn.Linear(config.n_head * config.head_dim, config.n_embd, bias=config.attn_bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, rope=None):
        B, T, _ = x.size()
        q, k, v = self.c_attn(x).split([self.n_head * self.head_dim] + 2 * [self.n_kv_head * self.head_dim], dim=2)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, n_head, T, head_dim)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        # fused attention kernel (flash / memory-efficient where available); kv head j serves
        # query heads j*r .. (j+1)*r-1
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=True, enable_gqa=self.n_kv_head != self.n_head)
        y = y.transpose(1, 2).contiguous().view(B, T, self.n_head * self.head_dim)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.kind = config.mlp
        # SwiGLU: down(silu(gate(x)) * up(x)); gate and up share one matmul, as q, k, v do
        width = 2 * config.mlp_hidden if config.mlp == "swiglu" else config.mlp_hidden
        self.c_fc = nn.Linear(config.n_embd, width, bias=config.bias)
        self.c_proj = nn.Linear(config.mlp_hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        h = self.c_fc(x)
        if self.kind == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        elif self.kind == "relu":
            h = F.relu(h)
        else:
            h = F.gelu(h, approximate="tanh")  # GPT-2's GELU
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    """Pre-norm: x + attn(norm(x)), then x + mlp(norm(x)). Post-norm: norm(x + attn(x)), ..."""

    def __init__(self, config):
        super().__init__()
        self.prenorm = config.prenorm
        self.ln_1 = make_norm(config, config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config, config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, rope=None):
        if self.prenorm:
            x = x + self.attn(self.ln_1(x), rope)
            return x + self.mlp(self.ln_2(x))
        x = self.ln_1(x + self.attn(x, rope))
        return self.ln_2(x + self.mlp(x))


def per_sample_cross_entropy(logits, targets):
    """(B, T, V) logits, (B, T) targets -> (B,) mean cross-entropy over each row's counted targets.

    A row with no counted target gets loss 0 (not 0/0 = NaN); it then contributes nothing."""
    B, T, V = logits.shape
    tok = F.cross_entropy(logits.reshape(B * T, V).float(), targets.reshape(B * T),
                          ignore_index=IGNORE_INDEX, reduction="none").view(B, T)
    count = (targets != IGNORE_INDEX).sum(dim=1)
    return tok.sum(dim=1) / count.clamp(min=1)


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.grad_ckpt = False  # activation checkpointing: recompute each block in the backward pass
        C = config
        # (the registration order fixes the order of the random initialisation: keep it stable)
        self.transformer = nn.ModuleDict(dict(wte=nn.Embedding(C.vocab_size, C.embd_dim)))
        if C.pos == "learned":
            self.transformer.wpe = nn.Embedding(C.block_size + C.pos_offset, C.n_embd)
        self.transformer.drop = nn.Dropout(C.dropout)
        self.transformer.h = nn.ModuleList([Block(C) for _ in range(C.n_layer)])
        if C.prenorm:  # post-norm blocks already end in a norm
            self.transformer.ln_f = make_norm(C, C.n_embd)
        if C.embd_dim != C.n_embd:  # opt-350m embeds in 512 dims and works in 1024
            self.transformer.project_in = nn.Linear(C.embd_dim, C.n_embd, bias=False)
            self.transformer.project_out = nn.Linear(C.n_embd, C.embd_dim, bias=False)
        self.lm_head = nn.Linear(C.embd_dim, C.vocab_size, bias=False)
        if C.tie_embeddings:
            self.transformer.wte.weight = self.lm_head.weight  # weight tying, as GPT-2
        self.apply(self._init_weights)
        # GPT-2's scaled init of the residual projections: keeps the residual stream's variance
        # from growing with depth
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * C.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding=True):
        """Parameter count; the position table is left out by default, as in the scaling-law papers
        (the token table is counted because it is tied to the output head)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        return n

    def forward(self, idx, targets=None):
        """idx: (B, T) token ids. Returns (logits, loss).

        With targets (B, T): logits (B, T, V) and loss = per-sample loss of shape (B,).
        Without: logits of the last position only, (B, 1, V), and loss None (generation)."""
        B, T = idx.size()
        assert T <= self.config.block_size, f"sequence of {T} exceeds block_size {self.config.block_size}"
        tr = self.transformer
        x = tr.wte(idx)
        if "project_in" in tr:
            x = tr.project_in(x)
        rope = None
        if self.config.pos == "learned":
            x = x + tr.wpe(torch.arange(self.config.pos_offset, T + self.config.pos_offset, device=idx.device))
        else:
            rope = rope_cos_sin(self.config, T, idx.device)
        x = tr.drop(x)
        for block in tr.h:
            if self.grad_ckpt and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, rope, use_reentrant=False)
            else:
                x = block(x, rope)
        if "ln_f" in tr:
            x = tr.ln_f(x)
        if "project_out" in tr:
            x = tr.project_out(x)
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None
        logits = self.lm_head(x)
        return logits, per_sample_cross_entropy(logits, targets)

    def configure_optimizer(self, weight_decay, learning_rate, betas, device_type):
        """AdamW; decay only matrices (weights of Linear/Embedding), not biases or norm gains."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        # the fused CUDA kernel is one launch for all parameters instead of several per parameter
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=(device_type == "cuda"))

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None):
        """Sample max_new_tokens continuations of idx (B, T) autoregressively."""
        for _ in range(max_new_tokens):
            idx_cond = idx[:, -self.config.block_size:]
            logits, _ = self(idx_cond)
            logits = logits[:, -1, :] / temperature
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            idx_next = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx

    # --- Hugging Face checkpoints: see the name maps below ---

    @classmethod
    def from_pretrained(cls, name_or_dir, dtype=None):
        """Load an HF GPT-2 / OPT / LLaMA-family checkpoint (a local folder or, online, a hub name) with
        our own code: config.json -> GPTConfig, weights renamed by the family's name map. The weights
        keep their stored dtype unless `dtype` is given."""
        folder = checkpoint_folder(name_or_dir)
        hf = json.loads((folder / "config.json").read_text())
        config = config_from_hf(hf)
        sd = {strip_prefix(k): v for k, v in read_weights(folder).items()}
        model = cls(config)
        ours = model.state_dict()
        loaded = {}
        for name, hf_names, transpose in name_map(config):
            if name not in ours or (name == "lm_head.weight" and config.tie_embeddings):
                continue  # a module this config does not have, or the head tied to wte
            missing = [h for h in hf_names if h not in sd]
            if missing:
                raise ValueError(f"{folder}: weight {missing[0]!r} missing: not a {config.family} checkpoint "
                                 f"matching its config.json, or a damaged one")
            t = torch.cat([sd[h] for h in hf_names], dim=0) if len(hf_names) > 1 else sd[hf_names[0]]
            t = t.t() if transpose else t
            if t.shape != ours[name].shape:
                raise ValueError(f"{folder}: {hf_names[0]} has shape {tuple(t.shape)}, "
                                 f"config.json implies {tuple(ours[name].shape)}")
            loaded[name] = t
        model.load_state_dict(loaded, strict=not config.tie_embeddings)  # tied: lm_head is wte
        model.to(dtype or next(iter(loaded.values())).dtype)
        return model

    def save_pretrained(self, out_dir):
        """Write config.json + model.safetensors in Hugging Face's layout, loadable by
        transformers.AutoModelForCausalLM (and so by lm-evaluation-harness)."""
        from safetensors.torch import save_file
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        ours = self.state_dict()
        sd = {}
        for name, hf_names, transpose in name_map(self.config):
            if name not in ours or (name == "lm_head.weight" and self.config.tie_embeddings):
                continue
            t = ours[name].t() if transpose else ours[name]
            sizes = split_sizes(self.config, name) if len(hf_names) > 1 else [t.shape[0]]
            for hf_name, part in zip(hf_names, t.split(sizes, dim=0)):
                sd[HF_PREFIX[self.config.family] + hf_name if hf_name != "lm_head.weight" else hf_name] = \
                    part.contiguous().clone()
        save_file(sd, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
        (out_dir / "config.json").write_text(json.dumps(config_to_hf(self.config), indent=2) + "\n")


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


def checkpoint_folder(name_or_dir):
    """A local folder as it is; a hub name is downloaded (config, weights, tokenizer files) when online."""
    path = Path(name_or_dir).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} has no config.json: point at a Hugging Face model folder")
        return path
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(str(name_or_dir), allow_patterns=[
            "*.json", "*.safetensors", "tokenizer.model", "merges.txt", "vocab.json"]))
    except Exception as e:
        raise FileNotFoundError(f"cannot find {name_or_dir!r} locally or download it ({type(e).__name__}); "
                                f"offline, download the checkpoint elsewhere and pass its local folder") from e


def read_weights(folder):
    """All tensors of a checkpoint folder: (sharded) safetensors, else (sharded) pytorch_model.bin."""
    from safetensors.torch import load_file
    for stem, load in (("model.safetensors", load_file),
                       ("pytorch_model.bin", lambda f: torch.load(f, map_location="cpu", weights_only=True))):
        index = folder / f"{stem}.index.json"
        if index.exists():  # sharded: the index maps every tensor to its shard
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (folder / stem).exists():
            files = [stem]
        else:
            continue
        sd = {}
        for f in files:
            sd.update(load(str(folder / f)))
        return sd
    raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin (or a sharded index) in {folder}")
