"""
One compact GPT for GPT-2, OPT and the LLaMA family, whose forward pass returns a loss *per sample*.

Why per sample: hard-sample reweighting (reweight.py) needs one loss l_i for each sample i of the
batch, l_i = mean next-token cross-entropy over that sample's counted target positions, so that the
training step can minimise sum_i w_i * l_i instead of the plain mean. Targets equal to -1 are not
counted (padding; prompt tokens in instruction data). The loss comes straight from the final hidden states,
chunk by chunk (loss.py), so that the (B, T, V) logits are never built. This file knows nothing about reweighting.

The families differ in a handful of switches (GPTConfig): LayerNorm or RMSNorm, learned positions or
rotary ones (RoPE), GELU / ReLU / SwiGLU MLP, grouped key-value heads, biases, pre- or post-norm, a tied
or untied head. hf.py maps Hugging Face checkpoints onto these names and back, as data.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

from loss import IGNORE_INDEX, chunked_per_sample_cross_entropy, per_sample_cross_entropy  # noqa: F401


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
    """x / sqrt(mean(x^2) + eps) * weight, computed in float32 at least as LLaMA does (bf16 would lose it)."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        h = x.to(torch.promote_types(x.dtype, torch.float32))  # casts only ever go up: float64 stays
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def make_norm(config, dim):
    if config.norm == "rmsnorm":
        return RMSNorm(dim, config.norm_eps)
    return nn.LayerNorm(dim, eps=config.norm_eps, bias=config.bias)


def rope_inv_freq(config, seq_len, dtype=torch.float32, device=None):
    """Rotary frequencies theta^(-2j/d), j < d/2, with the checkpoint's scaling variant applied (in float32 as
    Hugging Face does, or in float64 for a float64 model), made on `device`."""
    d, base, s = config.head_dim, config.rope_theta, config.rope_scaling or {}
    kind = s.get("rope_type", s.get("type", "default"))
    if kind == "dynamic" and seq_len > s["original_max_position_embeddings"]:
        # NTK-aware: grow the base once the sequence outruns the trained context
        base *= (s["factor"] * seq_len / s["original_max_position_embeddings"] - (s["factor"] - 1)) ** (d / (d - 2))
    inv_freq = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).to(dtype) / d)
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


def rope_cos_sin(config, T, device, dtype=torch.float32):
    """cos, sin of shape (T, head_dim) in `dtype` (float32 at least), frequencies repeated over the two halves.
    Made on the device in each forward pass, not cached: a few element-wise kernels over T x head_dim (fused into
    the graph under torch.compile), with no host-to-device copy to wait for and no cache for the compiler to guard."""
    dtype = torch.promote_types(dtype, torch.float32)
    inv_freq = rope_inv_freq(config, T, dtype, device)
    angles = torch.outer(torch.arange(T, device=device, dtype=dtype), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate pairs (x_j, x_{j+d/2}) by position-dependent angles: the "rotate half" layout of HF
    LLaMA checkpoints, whose q/k weights are stored permuted for it."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x.to(cos.dtype) * cos + rotated.to(cos.dtype) * sin).to(x.dtype)  # cos: float32 at least


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


class OutputHead(nn.Linear):
    """The output layer. Without targets: logits. With targets: the per-sample loss straight from the hidden
    states, chunk by chunk (loss.py), so that training and evaluation never hold the (B, T, V) logits; being
    the head's own forward, it is also where FSDP gathers the head's weight (runtime.shard_or_move)."""

    def forward(self, x, targets=None, chunk=0):
        if targets is None:
            return super().forward(x)
        return chunked_per_sample_cross_entropy(x, self.weight, targets, self.bias, chunk)


# tokens per chunk of the loss by default: about 2^25 logits, 128 MB in float32 (261 tokens at Llama-3's
# 128256-token vocabulary, one chunk for a character vocabulary)
LOGITS_PER_CHUNK = 2 ** 25


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.grad_ckpt = False  # activation checkpointing: recompute each block in the backward pass
        C = config
        self.loss_chunk = max(1, LOGITS_PER_CHUNK // C.vocab_size)  # 0: the plain loss from full logits
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
        self.lm_head = OutputHead(C.embd_dim, C.vocab_size, bias=False)
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

        With targets (B, T): loss = the per-sample loss, shape (B,), and logits None: they are never built
        (loss.py). With loss_chunk = 0, the plain way instead: logits (B, T, V) and the loss from them.
        Without targets: the last position's logits, (B, 1, V), and loss None (generation)."""
        x = self.hidden(idx)
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None
        if not self.loss_chunk:
            logits = self.lm_head(x)
            return logits, per_sample_cross_entropy(logits, targets)
        return None, self.lm_head(x, targets, self.loss_chunk)

    def logits(self, idx):
        """Every position's logits (B, T, V): for parity tests and analysis, not for training."""
        return self.lm_head(self.hidden(idx))

    def hidden(self, idx):
        """(B, T) token ids -> the final hidden states (B, T, embd_dim) that the output head reads."""
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
            rope = rope_cos_sin(self.config, T, idx.device, x.dtype)
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
        return x

    def configure_optimizer(self, weight_decay, learning_rate, betas, device_type, decay="matrices", optim="adamw"):
        """AdamW. decay="matrices": weight decay on matrices only (weights of Linear/Embedding), not on biases or
        norm gains, as nanoGPT; decay="all": on every parameter, as torch.optim.AdamW(model.parameters()) does
        (the official code). The two groups stay either way, so that checkpoints of both load alike.

        optim="adamw8bit" keeps the two moments in 8 bits (torchao's AdamW8bit: 16 -> ~10 bytes per parameter).
        bfloat16 weights are updated with stochastic rounding (torchao): rounded to nearest, an update below half
        a bf16 step (lr 2e-6 on a weight of 0.02) is lost every time; rounded up with the probability of the
        remainder, it is kept in expectation. Both compute the step in float32, as torch's AdamW does."""
        if decay not in ("matrices", "all"):
            raise ValueError(f"unknown decay {decay!r}: choose matrices or all")
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": weight_decay if decay == "all" else 0.0},
        ]
        bf16 = params[0].dtype == torch.bfloat16
        if optim == "adamw" and not bf16:
            # fused: one kernel for all parameters instead of several per parameter (CUDA), and on CPU no temporaries
            # the size of a parameter (the unfused step makes two, 0.5 GB for a 128k x 512 token table)
            return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type in ("cuda", "cpu"))
        import torchao.optim  # optional (cli.check names the pip command)
        kind = dict(adamw=torchao.optim._AdamW, adamw8bit=torchao.optim.AdamW8bit)[optim]
        return kind(groups, lr=learning_rate, betas=betas, bf16_stochastic_round=bf16)

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

    @classmethod
    def from_state_dict(cls, config, state_dict):
        """GPT(config) holding the tensors of `state_dict` themselves (their dtype too): built on the meta device,
        so there is no initialisation to overwrite and no second copy of the weights. A tied head may be left out."""
        with torch.device("meta"):
            model = cls(config)
        if config.tie_embeddings and "transformer.wte.weight" in state_dict:
            state_dict = {"lm_head.weight": state_dict["transformer.wte.weight"], **state_dict}
        model.load_state_dict(state_dict, assign=True)  # strict: a missing, unexpected or misshapen tensor fails
        if config.tie_embeddings:  # assign gave wte and the head parameters of their own: one again
            model.lm_head.weight = model.transformer.wte.weight
        # the state dict covers every parameter and persistent buffer; the model has no other (nothing on meta)
        assert not any(t.is_meta for t in (*model.parameters(), *model.buffers()))
        return model
