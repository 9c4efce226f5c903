"""
Beyond the paper: the follow-up weightings of Sow et al. (ICLR 2025, arXiv 2502.06733), an exact random control
for MidRanking and two weightings against a reference model. Each is one function of the pool's detached losses
(and, for the last two, a reference model's losses of the same samples), like the paper's methods in
reweight.py, which lists them in its METHODS: train.py trains them exactly as it trains those. This file imports
nothing of reweight.py (which imports it), so the two never form an import circle.

Plain IR-DRO is monotone in the loss, so the highest losses (often noise) weigh most. The follow-up maps the
pool's losses linearly onto [-1, 1],

    x_i = 2 (l_i - min_j l_j) / (max_j l_j - min_j l_j) - 1,

shapes them with a strategy f and takes  w = softmax(f(x) / tau)  (the paper's r is our tau):

    linupper:   f(x) = min(x + 1, 1)   losses above the pool's midrange all weigh the same: no reward for extremes
    quadratic:  f(x) = 1 - x^2         the middle of the range weighs most, both ends least ("peaked" in the
                                       official code of the paper, defined there but never called)
    extremes:   f(x) = |x|             both ends weigh most

x depends on the whole pool (its min and max), so none of them has a streaming form: train.py scores the pool
first, as for MidRanking. A pool of equal losses has no range: x = 0, uniform weights.

Against a reference model (RHO-LOSS, Mindermann et al., ICML 2022): no weighting of the losses alone tells a corrupt
document (a high loss for any model) from a hard, learnable one. A method that takes `ref_losses`, the losses of
the same samples under a frozen reference model trained on clean held-out data (train.py --ref_model,
reference.py), weighs the reducible loss l_i - l_ref,i instead: what training on sample i can still remove.

    rholoss:       the top floor(keep * n) samples by l_i - l_ref,i, 1/k each (RHO-LOSS's selection)
    excess_irdro:  w = softmax((l - l_ref) / tau), IR-DRO on the reducible loss (streamed, as IR-DRO is)
"""

import hashlib
import math

import torch

METHODS = ("linupper", "quadratic", "extremes", "random", "rholoss", "excess_irdro")  # reweight.METHODS ends with them


def unit_range(losses):
    """x_i = 2 (l_i - min l) / (max l - min l) - 1, in [-1, 1]; all 0 when every loss is the same."""
    lo, hi = losses.min(), losses.max()
    if not hi > lo:
        return torch.zeros_like(losses)
    return 2 * (losses - lo) / (hi - lo) - 1


def check_tau(tau):
    if not (tau > 0 and tau != float("inf")):
        raise ValueError(f"the follow-up weightings need a finite tau > 0, got tau={tau}")


def linupper(losses, tau):
    """w = softmax(min(x + 1, 1) / tau): the lower half of the range is down-weighted, the upper half flat."""
    check_tau(tau)
    return torch.softmax(torch.clamp(unit_range(losses) + 1, max=1) / tau, dim=0)


def quadratic(losses, tau):
    """w = softmax((1 - x^2) / tau): mid-range losses weigh most, the easiest and the hardest least."""
    check_tau(tau)
    return torch.softmax((1 - unit_range(losses) ** 2) / tau, dim=0)


def extremes(losses, tau):
    """w = softmax(|x| / tau): the easiest and the hardest samples weigh most."""
    check_tau(tau)
    return torch.softmax(unit_range(losses).abs() / tau, dim=0)


def kept_count(method, keep, n):
    """k = floor(keep * n), MidRanking's count at skip=0 (a test holds it to reweight.midrank_counts), at least 1."""
    n_keep = math.floor(keep * n + 1e-9)
    if not (0 <= keep <= 1 and n_keep >= 1):
        raise ValueError(f"{method} keeps floor({keep} * {n}) = {n_keep} samples of {n}: needs 0 <= keep <= 1 and "
                         "at least one sample: raise --keep or the batch")
    return n_keep


def random(losses, keep):
    """The control for MidRanking: k = floor(keep * n) samples of the same pool, chosen uniformly at random,
    1/k each, the rest 0. Same count as MidRanking, no ranking. The choice is seeded by the pool's loss order
    (which sample ranks where), so it is the same on every torchrun rank, on resume and under any
    micro-batching (a last-bit change of a loss leaves the order alone), and a new draw at every step."""
    n = losses.numel()
    n_keep = kept_count("random", keep, n)
    order = torch.sort(losses, descending=True, stable=True).indices.cpu().numpy()
    seed = int.from_bytes(hashlib.sha256(order.tobytes()).digest()[:8], "little")
    chosen = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:n_keep]
    w = torch.zeros_like(losses)
    w[chosen.to(losses.device)] = 1.0 / n_keep
    return w


def reducible(losses, ref_losses):
    """l_i - l_ref,i, in the losses' dtype (a float32 reference does not cast a float64 step down)."""
    return losses - ref_losses.to(losses.dtype)


def rholoss(losses, keep, ref_losses):
    """RHO-LOSS's selection: the k = floor(keep * n) samples of the largest reducible loss l_i - l_ref,i, 1/k each, the
    rest 0; ties by position (a stable sort, as MidRanking's). A corrupt document, hard for the reference too, has a
    small reducible loss; one the reference has learnt and the model not yet, a large one."""
    n_keep = kept_count("rholoss", keep, losses.numel())
    order = torch.sort(reducible(losses, ref_losses), descending=True, stable=True).indices
    w = torch.zeros_like(losses)
    w[order[:n_keep]] = 1.0 / n_keep
    return w


def excess_irdro(losses, tau, ref_losses):
    """IR-DRO on the reducible loss: w = softmax((l - l_ref) / tau), the KL-regularised worst case over the excess of
    the loss over the reference's. A softmax of per-sample scores: train.py streams it, micro-batch by micro-batch."""
    check_tau(tau)
    return torch.softmax(reducible(losses, ref_losses) / tau, dim=0)


excess_irdro.score = lambda losses, tau, ref_losses: reducible(losses, ref_losses) / tau
