"""
Hard-sample reweighting: per-sample losses of one pool -> weights (Chen et al., arXiv 2402.14270).

A training step sees a pool of n samples with losses l_1..l_n (the whole effective batch) and minimises
sum_i w_i * l_i, with weights computed from the *detached* losses, >= 0 and summing to 1 (the scale of a
plain mean). This file is the one definition of every weight that reaches the gradient.

Adding a method is one function `name(losses, <hyperparameters>) -> weights` and its name in METHODS; its
hyperparameters are the train.py flags of the same names. A method whose weights are a softmax of a per-sample
score, w_i = exp(s_i) / sum_j exp(s_j), may set `.score = s`: train.py then streams it at ERM's cost.
"""

import inspect
import math

import torch

METHODS = ("erm", "midrank", "irdro")


def erm(losses):
    """Empirical risk minimisation, the baseline:  w_i = 1/n."""
    return torch.full_like(losses, 1.0 / losses.numel())


erm.score = torch.zeros_like  # softmax(0, ..., 0) = 1/n


def midrank_counts(n, skip, keep):
    """How many of n samples MidRanking skips and keeps: floor(skip*n), floor(keep*n) (the epsilon makes
    0.29*100 -> 29). The official (frac, portion), ranks [portion*c, (portion+1)*c) with c = int(frac*n),
    is skip = portion*frac, keep = frac."""
    if not (0 <= skip <= 1 and 0 <= keep <= 1 and skip + keep <= 1 + 1e-9):
        raise ValueError(f"midrank needs 0 <= skip, keep <= 1 and skip + keep <= 1, got {skip=} {keep=}")
    n_skip, n_keep = math.floor(skip * n + 1e-9), math.floor(keep * n + 1e-9)
    if n_keep < 1:
        raise ValueError(f"midrank keeps floor({keep} * {n}) = 0 samples of {n}: raise --keep or the batch")
    return n_skip, min(n_keep, n - n_skip)


def midrank(losses, skip, keep):
    """MidRanking: sort losses from high to low, skip the top `skip` fraction (likely noise or too
    hard to learn), keep the next `keep` fraction with uniform weight, drop the rest:

        w_i = 1/k  if  s <= rank(l_i) < s + k,  else 0,   s = floor(skip*n), k = floor(keep*n)

    rank 0 is the highest loss; ties are broken by position. skip=0 is hardest-only ("MaxRanking")
    and skip=0, keep=1 is ERM. No streaming form: a rank needs the whole pool."""
    n_skip, n_keep = midrank_counts(losses.numel(), skip, keep)
    order = torch.sort(losses, descending=True, stable=True).indices
    w = torch.zeros_like(losses)
    w[order[n_skip:n_skip + n_keep]] = 1.0 / n_keep
    return w


def irdro(losses, tau):
    """Instance-reweighted distributionally robust optimisation. The weights solve the inner max of

        min_theta  max_{w in simplex}  sum_i w_i l_i(theta) - tau * KL(w || uniform),

    whose closed form is w = softmax(l / tau):  w_i = exp(l_i/tau) / sum_j exp(l_j/tau).
    Harder samples weigh more; tau -> inf gives ERM, tau -> 0 all weight on the largest loss
    (smaller tau = more weight on the hardest). By Danskin's theorem the gradient of the min-max
    objective is sum_i w_i grad l_i with w detached. The max is subtracted first (no overflow at
    l = 1e4, tau = 1e-3); infinite losses (the tau -> 0 limit) share the weight."""
    if not (math.isfinite(tau) and tau > 0):
        raise ValueError(f"IR-DRO needs a finite tau > 0, got tau={tau}")
    top = losses.max()
    if torch.isinf(top):
        return (losses == top).to(losses.dtype) / (losses == top).sum()
    return torch.softmax((losses - top) / tau, dim=0)


irdro.score = lambda losses, tau: losses / tau  # w = softmax(l / tau)


def tilted_loss(losses, tau):
    """The value of the inner max, the tilted loss  tau * log( (1/n) sum_i exp(l_i/tau) ),
    between mean(l) (tau -> inf) and max(l) (tau -> 0). Logged, not optimised directly."""
    return tau * (torch.logsumexp(losses / tau, dim=0) - math.log(losses.numel()))


def method(name, **hparams):
    """(the weight function `name` as defined now, the entries of `hparams` it takes, by argument name)."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}: choose one of {', '.join(METHODS)}")
    fn = globals()[name]
    return fn, {k: hparams[k] for k in list(inspect.signature(fn).parameters)[1:] if k in hparams}


def weights(losses, name, **hparams):
    """Weights (n,) of the per-sample losses (n,) of one pool, by method name (float32 or float64)."""
    fn, hp = method(name, **hparams)
    return fn(losses.detach().to(torch.promote_types(losses.dtype, torch.float32)), **hp)


def effective_sample_size(w):
    """1 / sum_i w_i^2: n for uniform weights, 1 when one sample has all the weight."""
    return 1.0 / float((w.double() ** 2).sum())
