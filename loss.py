"""
The per-sample loss of a language model: l_i = mean next-token cross-entropy over the counted targets of
sample i, computed from the final hidden states and the output head without ever building the logits.

Why: with a large vocabulary the logits are most of a training step's memory. At Llama-3's 128256 tokens and
8 x 2048 tokens per micro-batch, one float32 copy of them is 8.4 GB, and the plain form (logits, a float32
softmax saved for the backward, its gradient) holds three: more than a 1B model's weights, gradients and
AdamW state together. Here the tokens go through the head in chunks: a chunk's logits live only while its
log-sum-exp is taken, and are recomputed, one chunk at a time, in the backward. What is kept is what the
backward cannot do without: the hidden states (B*T x C, C << V) and one float32 log-sum-exp per token.

The backward takes any upstream gradient per token, so a different weight w_i per sample (the whole point of
reweighting: grad = sum_i w_i grad l_i) is honoured exactly; tests/test_loss.py checks it against the
full-logits form below in float64.
"""

import torch
from torch.nn import functional as F

IGNORE_INDEX = -1  # target value of positions that do not count (padding; prompt tokens of instruction data)


def per_sample_cross_entropy(logits, targets):
    """The plain form, from full (B, T, V) logits and (B, T) targets -> (B,) mean cross-entropy over each row's
    counted targets. A row with no counted target gets loss 0 (not 0/0 = NaN); it then contributes nothing."""
    B, T, V = logits.shape
    # the softmax in float32 at least: bf16 logits go up, float64 ones stay (casts only ever go up)
    logits = logits.reshape(B * T, V).to(torch.promote_types(logits.dtype, torch.float32))
    tok = F.cross_entropy(logits, targets.reshape(B * T), ignore_index=IGNORE_INDEX, reduction="none")
    return per_sample_mean(tok.view(B, T), targets)


def per_sample_mean(token_losses, targets):
    """(B, T) token losses (0 where not counted) -> (B,) their mean over each row's counted targets."""
    return token_losses.sum(dim=1) / (targets != IGNORE_INDEX).sum(dim=1).clamp(min=1)


def chunked_per_sample_cross_entropy(h, weight, targets, bias=None, chunk=1024):
    """(B, T, C) final hidden states, the head's (V, C) weight (and bias), (B, T) targets -> (B,) per-sample
    losses, equal to per_sample_cross_entropy(h @ weight.T + bias, targets) but never holding more than
    `chunk` tokens' logits. Under autocast the head's matmuls run in the autocast dtype, as F.linear would."""
    B, T, C = h.shape
    device = h.device.type
    compute = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
    tok = TokenCrossEntropy.apply(h.reshape(B * T, C), weight, bias, targets.reshape(B * T), chunk, compute)
    return per_sample_mean(tok.view(B, T), targets)


class TokenCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy of logits = h @ W.T + b, chunk by chunk over the tokens, in both passes.

    For one token with logits z, softmax p and target y, loss = logsumexp(z) - z_y, so
        d loss / d z = p - onehot(y),    d loss / d h = (p - onehot(y)) W,    d loss / d W = (p - onehot(y))^T h,
    each scaled by the token's upstream gradient g (w_i / count_i for sample i's tokens, 0 for ignored ones).
    The softmax is taken in float32 at least, whatever the matmuls run in."""

    @staticmethod
    def forward(ctx, h, weight, bias, targets, chunk, compute):
        acc = torch.promote_types(compute, torch.float32)  # float32, or float64 for a float64 model
        counted = targets != IGNORE_INDEX
        lse = torch.empty(len(h), dtype=acc, device=h.device)  # log-sum-exp per token: all the backward keeps
        tok = torch.zeros(len(h), dtype=acc, device=h.device)
        w = weight.to(compute)
        with torch.autocast(h.device.type, enabled=False):  # the dtypes are chosen here, explicitly
            for s in range(0, len(h), chunk):
                z = logits(h[s:s + chunk], w, bias, acc)
                y = targets[s:s + chunk].clamp(min=0)  # ignored targets pick any logit: zeroed below
                picked = z.gather(1, y[:, None]).squeeze(1)
                lse[s:s + chunk] = logsumexp_(z)  # overwrites z: one chunk of logits is all the forward holds
                tok[s:s + chunk] = (lse[s:s + chunk] - picked) * counted[s:s + chunk]
                del z  # before the next chunk's logits are made, not after
        ctx.save_for_backward(h, weight, bias, targets, lse)
        ctx.chunk, ctx.compute = chunk, compute
        return tok

    @staticmethod
    def backward(ctx, grad_tok):
        h, weight, bias, targets, lse = ctx.saved_tensors
        acc, chunk = lse.dtype, ctx.chunk
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight, dtype=acc) if ctx.needs_input_grad[1] else None  # summed over chunks
        grad_b = torch.zeros_like(bias, dtype=acc) if bias is not None and ctx.needs_input_grad[2] else None
        g_tok = grad_tok.to(acc) * (targets != IGNORE_INDEX)
        w = weight.to(ctx.compute)
        with torch.autocast(h.device.type, enabled=False):
            for s in range(0, len(h), chunk):
                hc = h[s:s + chunk]
                dz = logits(hc, w, bias, acc).sub_(lse[s:s + chunk, None]).exp_()  # softmax p, in place
                rows = torch.arange(len(hc), device=h.device)
                dz[rows, targets[s:s + chunk].clamp(min=0)] -= 1  # p - onehot(y)
                dz.mul_(g_tok[s:s + chunk, None])  # ignored tokens: 0
                if grad_b is not None:
                    grad_b += dz.sum(dim=0)
                dz = dz.to(w.dtype)
                if grad_h is not None:
                    grad_h[s:s + chunk] = dz @ w
                if grad_w is not None and dz.dtype == acc:  # summed in place: no (V, C) temporary per chunk
                    grad_w.addmm_(dz.t(), hc.to(acc))
                elif grad_w is not None:  # bf16 matmul, summed in float32
                    grad_w += (dz.t() @ hc.to(w.dtype)).to(acc)
                del dz
        return (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None, None)


def logits(h, w, bias, acc):
    """One chunk's logits h @ w.T (+ bias): the matmul in w's dtype, the result (and the bias, added in place) in
    the accumulation dtype `acc`."""
    z = (h.to(w.dtype) @ w.t()).to(acc)
    return z if bias is None else z.add_(bias)


def logsumexp_(z):
    """Each row's log-sum-exp, max-shifted so that exp never overflows, computed in z itself (left holding
    exp(z - max)): torch.logsumexp would allocate a temporary the size of z."""
    top = z.amax(dim=1, keepdim=True)
    return z.sub_(top).exp_().sum(dim=1).log_().add_(top.squeeze(1))
