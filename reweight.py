"""
Hard-sample reweighting: per-sample losses of one pool -> weights (Chen et al., arXiv 2402.14270).

A step sees a pool of n samples with losses l_1..l_n (the whole effective batch) and minimises sum_i w_i l_i, w
from the *detached* losses, >= 0, summing to 1: the one definition of every weight that reaches the gradient. A
method is `name(losses, <hyperparameters>) -> weights` plus its name in METHODS, its hyperparameters the train.py
flags of the same names (`ref_losses`: a reference model's losses of the same samples, --ref_model, reference.py).
Softmax weights w_i = exp(s_i) / sum_j exp(s_j) may set `.score = s` (streamed, ERM's cost)."""

import inspect
import math

import torch

import reweight_followup as followup  # beyond the paper: Sow et al.'s weightings, a random control, RHO-LOSS

METHODS = ("erm", "midrank", "irdro") + followup.METHODS  # the paper's, then those beyond it


def erm(losses):
    """Empirical risk minimisation, the baseline:  w_i = 1/n."""
    return torch.full_like(losses, 1.0 / losses.numel())


erm.score = torch.zeros_like  # softmax(0, ..., 0) = 1/n


def midrank_counts(n, skip=None, keep=None, frac=None, portion=0):
    """(s, k): MidRanking keeps the sorted ranks [s, s + k) of n samples. From (skip, keep): s = floor(skip*n),
    k = floor(keep*n) (the epsilon makes 0.29*100 -> 29). From frac, when given, the official rule exactly:
    c = int(frac*n) in floating point (0.29*100 -> 28), ranks [portion*c, (portion+1)*c), cut at n."""
    if frac is not None:
        c = int(frac * n)
        if not (0 < frac <= 1 and portion == int(portion) >= 0 and 0 <= portion * c < n and c > 0):
            raise ValueError(f"midrank needs 0 < frac <= 1, a whole portion >= 0 and a rank [portion*c, (portion+1)*c) "
                             f"below n={n}, c = int(frac*n): got {frac=} {portion=} (c={c}): raise --frac or the batch")
        return int(portion) * c, min(c, n - int(portion) * c)
    if skip is None or keep is None or not (0 <= skip <= 1 and 0 <= keep <= 1 and skip + keep <= 1 + 1e-9):
        raise ValueError(f"midrank needs 0 <= skip, keep <= 1 and skip + keep <= 1 (or frac), got {skip=} {keep=}")
    n_skip, n_keep = math.floor(skip * n + 1e-9), math.floor(keep * n + 1e-9)
    if n_keep < 1:
        raise ValueError(f"midrank keeps floor({keep} * {n}) = 0 samples of {n}: raise --keep or the batch")
    return n_skip, min(n_keep, n - n_skip)


def midrank(losses, skip=None, keep=None, frac=None, portion=0):
    """MidRanking: sort losses from high to low, skip the top `skip` fraction (likely noise or too hard to
    learn), keep the next `keep` fraction with uniform weight, drop the rest (or frac, portion: see above):

        w_i = 1/k  if  s <= rank(l_i) < s + k,  else 0,   (s, k) = midrank_counts(n, ...)

    rank 0 is the highest loss, ties by position. skip=0 (portion=0) is hardest-only ("MaxRanking"), skip=0,
    keep=1 (frac=1, portion=0) is ERM. No streaming form: a rank needs the whole pool."""
    n_skip, n_keep = midrank_counts(losses.numel(), skip, keep, frac, portion)
    order = torch.sort(losses, descending=True, stable=True).indices
    w = torch.zeros_like(losses)
    w[order[n_skip:n_skip + n_keep]] = 1.0 / n_keep
    return w


def irdro(losses, tau):
    """Instance-reweighted distributionally robust optimisation: w solves the inner max of

        min_theta  max_{w in simplex}  sum_i w_i l_i(theta) - tau * KL(w || uniform),

    in closed form w = softmax(l / tau), w_i = exp(l_i/tau) / sum_j exp(l_j/tau): harder samples weigh more,
    tau -> inf gives ERM, tau -> 0 all weight on the largest loss. Gradient (Danskin): sum_i w_i grad l_i, w
    detached. The max is subtracted first (no overflow at l = 1e4, tau = 1e-3); infinite losses share the weight."""
    if not (math.isfinite(tau) and tau > 0):
        raise ValueError(f"IR-DRO needs a finite tau > 0, got tau={tau}")
    top = losses.max()
    if torch.isinf(top):
        return (losses == top).to(losses.dtype) / (losses == top).sum()
    return torch.softmax((losses - top) / tau, dim=0)


irdro.score = lambda losses, tau: losses / tau  # w = softmax(l / tau)


def tilted_loss(losses, tau):
    """The inner max's value, the tilted loss tau * log((1/n) sum_i exp(l_i/tau)), in [mean(l), max(l)]; logged. As
    max(l) + tau * log1p(mean(expm1((l - max) / tau))) in float64: finite for any tau (at 1e300, its limit mean(l))."""
    losses = losses.double()
    top = losses.max()  # the max's own term is exactly 0, an infinite max's too
    return top + tau * torch.log1p(torch.expm1(torch.where(losses == top, 0.0, (losses - top) / tau)).mean())


def method(name, **hparams):
    """(the weight function `name` as defined now, the entries of `hparams` it takes, by argument name)."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}: choose one of {', '.join(METHODS)}")
    fn = globals()[name] if name in globals() else getattr(followup, name)
    return fn, {k: hparams[k] for k in list(inspect.signature(fn).parameters)[1:] if k in hparams}


def weights(losses, name, **hparams):
    """Weights (n,) of the per-sample losses (n,) of one pool, by method name (float32 or float64)."""
    fn, hp = method(name, **hparams)
    return fn(losses.detach().to(torch.promote_types(losses.dtype, torch.float32)), **hp)
