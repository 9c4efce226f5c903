"""reweight_followup.py: the follow-up weightings against an independent numpy transcription of their formulas,
hand-computed cases, the random control's count, determinism and uniformity, and the methods against a reference
model's losses (rholoss, excess_irdro) against hand-computed weights."""

import math

import numpy as np
import pytest
import torch

import reweight
import reweight_followup as fu

LOSSES = [2.0, 3.0, 2.5, 6.0, 3.5, 2.2, 4.0, 2.8]
STRATEGIES = {  # x -> f(x), transcribed from Sow et al.'s definitions
    "linupper": lambda x: np.minimum(x + 1, 1),
    "quadratic": lambda x: 1 - x ** 2,
    "extremes": lambda x: np.abs(x),
}


def reference(losses, strategy, tau):
    l = np.asarray(losses, dtype=np.float64)
    x = 2 * (l - l.min()) / (l.max() - l.min()) - 1 if l.max() > l.min() else np.zeros_like(l)
    f = STRATEGIES[strategy](x) / tau
    e = np.exp(f - f.max())
    return e / e.sum()


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
@pytest.mark.parametrize("tau", [0.1, 0.5, 1.0, 3.0])
def test_each_strategy_is_its_formula(strategy, tau):
    rng = np.random.default_rng(0)
    for losses in (LOSSES, rng.gamma(3, 1, 37), rng.normal(5, 0.01, 5), [1.0, 1.0, 1.0]):
        w = getattr(fu, strategy)(torch.tensor(losses, dtype=torch.float64), tau)
        assert w.dtype == torch.float64 and torch.allclose(w, torch.from_numpy(reference(losses, strategy, tau)))
        assert abs(float(w.sum()) - 1) < 1e-12 and (w > 0).all()


def test_hand_computed_shapes():
    # losses 0, 1, 2 -> x = -1, 0, 1
    l = torch.tensor([0.0, 1.0, 2.0])
    z = lambda *f: torch.softmax(torch.tensor(f), 0)  # noqa: E731
    assert torch.allclose(fu.linupper(l, 1.0), z(0.0, 1.0, 1.0))  # the top half flat
    assert torch.allclose(fu.quadratic(l, 1.0), z(0.0, 1.0, 0.0))  # the middle most
    assert torch.allclose(fu.extremes(l, 1.0), z(1.0, 0.0, 1.0))  # both ends most
    # unlike IR-DRO, the outlier (6.0) does not get the most weight from quadratic or linupper
    w = fu.quadratic(torch.tensor(LOSSES), 1.0)
    assert int(w.argmax()) != 3 and float(w[3]) == pytest.approx(float(w.min()))
    # invariant to shifting and scaling the losses: only their place in the pool's range counts
    assert torch.allclose(fu.extremes(torch.tensor(LOSSES) * 7 + 3, 0.5), fu.extremes(torch.tensor(LOSSES), 0.5))


@pytest.mark.parametrize("tau", [0.0, -1.0, math.inf, math.nan])
def test_tau_must_be_finite_and_positive(tau):
    with pytest.raises(ValueError, match="tau"):
        fu.quadratic(torch.tensor(LOSSES), tau)


def test_random_keeps_k_at_1_over_k_and_is_a_function_of_the_pool():
    l = torch.tensor(LOSSES)
    w = fu.random(l, 0.5)
    assert (w > 0).sum() == 4 and torch.allclose(w[w > 0], torch.full((4,), 0.25)) and float(w.sum()) == 1.0
    assert torch.equal(fu.random(l, 0.5), w)  # the same pool, the same choice
    assert torch.equal(fu.random(l + 1e-6, 0.5), w)  # a last-bit change of the losses (another micro-batching)
    assert torch.equal(fu.random(l.double(), 0.5).float(), w)
    with pytest.raises(ValueError, match="keep"):
        fu.random(l, 0.01)  # floor(0.01 * 8) = 0, as for MidRanking


@pytest.mark.parametrize("keep", [0.01, 0.1, 0.29, 0.5, 0.7, 1.0])
def test_random_keeps_midrankings_count(keep):
    # random counts on its own (it imports nothing of reweight.py): the count must stay MidRanking's at skip=0
    for n in (1, 7, 8, 100, 333):
        if math.floor(keep * n + 1e-9) < 1:
            continue
        kept = int((fu.random(torch.rand(n), keep) > 0).sum())
        assert kept == reweight.midrank_counts(n, 0.0, keep)[1] == int((reweight.midrank(torch.rand(n), 0.0, keep) > 0).sum())


def test_random_is_uniform_and_blind_to_the_ranking():
    # over many pools: every position, and every loss rank, is kept with probability k/n
    rng = np.random.default_rng(1)
    n, keep, trials = 16, 0.25, 4000
    by_position, by_rank = np.zeros(n), np.zeros(n)
    for _ in range(trials):
        l = torch.from_numpy(rng.gamma(3, 1, n))
        kept = (fu.random(l, keep) > 0).numpy()
        by_position += kept
        by_rank += kept[np.argsort(-l.numpy(), kind="stable")]
    expected, sd = trials * keep, math.sqrt(trials * keep * (1 - keep))
    assert np.abs(by_position - expected).max() < 4.5 * sd
    assert np.abs(by_rank - expected).max() < 4.5 * sd  # unlike MidRanking, the hardest are not singled out


# --- against a reference model: the reducible loss l - l_ref ---------------------------------------

def test_rholoss_keeps_the_largest_reducible_losses_by_hand():
    l = torch.tensor([2.0, 3.0, 2.5, 6.0])
    ref = torch.tensor([1.0, 2.9, 0.5, 5.5])  # reducible: 1.0, 0.1, 2.0, 0.5
    assert fu.rholoss(l, 0.5, ref).tolist() == [0.5, 0.0, 0.5, 0.0]  # samples 2 and 0; by the loss: 3 and 1
    assert fu.rholoss(l, 0.25, ref).tolist() == [0.0, 0.0, 1.0, 0.0]
    assert fu.rholoss(l, 1.0, ref).tolist() == [0.25] * 4  # keep 1: ERM
    # ties by position (a stable sort): equal reducible losses keep the earlier samples
    assert fu.rholoss(torch.tensor([1.0, 2.0, 3.0]), 2 / 3, torch.tensor([0.0, 1.0, 2.0])).tolist() == [0.5, 0.5, 0.0]
    # a reference of equal losses changes no ranking: MidRanking's hardest floor(keep * n) (skip 0)
    g = torch.from_numpy(np.random.default_rng(0).gamma(3, 1, 37))
    assert torch.equal(fu.rholoss(g, 0.3, torch.full((37,), 2.0)), reweight.midrank(g, 0.0, 0.3))
    with pytest.raises(ValueError, match="keep"):
        fu.rholoss(l, 0.1, ref)  # floor(0.1 * 4) = 0


def test_excess_irdro_is_irdro_of_the_reducible_loss_by_hand():
    l, ref = torch.tensor([1.0, 2.0, 4.0]), torch.tensor([0.5, 2.0, 4.5])  # reducible: 0.5, 0, -0.5
    e = [math.exp(0.5 / 0.5), 1.0, math.exp(-0.5 / 0.5)]
    assert fu.excess_irdro(l, 0.5, ref).tolist() == pytest.approx([v / sum(e) for v in e], rel=1e-6)
    assert torch.allclose(fu.excess_irdro(l, 0.5, torch.zeros(3)), reweight.irdro(l, 0.5))  # no reference: IR-DRO
    assert torch.allclose(fu.excess_irdro(l, 0.5, ref + 7), fu.excess_irdro(l, 0.5, ref))  # a constant shift: none
    l50, r50 = torch.rand(50) * 8, torch.rand(50) * 3
    for tau in (0.05, 1.0, 30.0):  # the streamed form train.py trains: softmax of the score
        assert torch.allclose(torch.softmax(fu.excess_irdro.score(l50, tau, r50), 0), fu.excess_irdro(l50, tau, r50),
                              rtol=1e-5, atol=1e-8)
    with pytest.raises(ValueError, match="tau"):
        fu.excess_irdro(l, 0.0, ref)


def test_the_reference_methods_take_ref_losses_by_name_and_never_cast_down():
    import reference
    assert [m for m in reweight.METHODS if reference.takes(m)] == ["rholoss", "excess_irdro"]
    l, ref = torch.tensor([1.0, 2.0, 4.0, 3.0], dtype=torch.float64), torch.tensor([0.5, 2.0, 1.0, 3.0])
    fn, hp = reweight.method("rholoss", tau=1.0, keep=0.5, ref_losses=ref)
    assert fn is fu.rholoss and set(hp) == {"keep", "ref_losses"}
    assert set(reweight.method("irdro", tau=1.0, keep=0.5, ref_losses=ref)[1]) == {"tau"}  # not passed where not named
    for name in ("rholoss", "excess_irdro"):  # a float32 reference does not cast a float64 step down
        assert reweight.weights(l, name, tau=1.0, keep=0.5, ref_losses=ref).dtype == torch.float64
    assert reweight.weights(l, "rholoss", keep=0.5, ref_losses=ref).tolist() == [0.5, 0.0, 0.5, 0.0]  # 0.5 0 3 0
