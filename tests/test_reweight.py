"""reweight.py against hand-computed weights, limits and invariances."""

import math

import pytest
import torch

import reweight


def hand_softmax(losses, tau):
    e = [math.exp(l / tau) for l in losses]
    return [v / sum(e) for v in e]


def test_erm_is_uniform():
    w = reweight.weights(torch.tensor([3.0, 1.0, 2.0, 9.0]), "erm")
    assert torch.equal(w, torch.full((4,), 0.25))


@pytest.mark.parametrize("tau", [0.5, 1.0, 3.0])
def test_irdro_matches_hand_computed_softmax(tau):
    losses = [2.0, 3.5, 1.0, 2.5, 4.0]
    w = reweight.weights(torch.tensor(losses), "irdro", tau=tau)
    assert w.tolist() == pytest.approx(hand_softmax(losses, tau), rel=1e-6)


def test_irdro_limits():
    losses = torch.tensor([2.0, 3.0, 1.0, 2.9])
    assert reweight.irdro(losses, 1e6).tolist() == pytest.approx([0.25] * 4, abs=1e-6)  # tau -> inf: ERM
    assert reweight.irdro(losses, 1e-4).tolist() == [0.0, 1.0, 0.0, 0.0]  # tau -> 0: argmax


def test_irdro_is_monotone_in_the_loss():
    losses = torch.tensor([0.3, 2.0, 1.1, 5.0, 4.2])
    w = reweight.irdro(losses, 1.0)
    assert torch.equal(torch.argsort(w), torch.argsort(losses))


def test_irdro_huge_and_infinite_losses_stay_finite():
    d = 2.0 ** -7  # exactly representable next to 1e4 in float32
    w = reweight.irdro(torch.tensor([1e4, 1e4 - d, 0.0]), 1e-3)
    assert torch.isfinite(w).all() and w.sum().item() == pytest.approx(1.0)
    assert w.tolist() == pytest.approx(hand_softmax([0.0, -d, -1e4], 1e-3), rel=1e-4)
    w = reweight.irdro(torch.tensor([math.inf, 1.0, math.inf, 3.0]), 1.0)
    assert w.tolist() == [0.5, 0.0, 0.5, 0.0]
    assert reweight.tilted_loss(torch.tensor([1e4, 1e4, 0.0]), 1e-3).item() == pytest.approx(1e4)


@pytest.mark.parametrize("tau", [0.0, -1.0, math.inf, math.nan])
def test_irdro_rejects_bad_tau(tau):
    with pytest.raises(ValueError, match="tau"):
        reweight.weights(torch.tensor([1.0, 2.0]), "irdro", tau=tau)


@pytest.mark.parametrize("tau", [1e6, 1e30, 1e300, 1.7e308])
def test_tilted_loss_tends_to_the_mean_for_a_huge_tau_and_stays_finite(tau):
    losses = torch.tensor([2.0, 3.5, 1.0, 2.5])  # float32 losses, as training logs them: tau overflows float32
    assert reweight.tilted_loss(losses, tau).item() == pytest.approx(2.25, rel=1e-6)
    assert reweight.tilted_loss(torch.tensor([math.inf, 1.0]), tau).item() == math.inf  # an infinite max: inf, no NaN


def test_tilted_loss_is_the_log_mean_exp_between_mean_and_max():
    losses = [2.0, 3.5, 1.0, 2.5]
    for tau in (0.01, 0.3, 1.0, 10.0, 1e4):
        expected = tau * math.log(sum(math.exp(l / tau) for l in losses) / len(losses))
        got = reweight.tilted_loss(torch.tensor(losses), tau).item()
        assert got == pytest.approx(expected, rel=1e-6)
        assert sum(losses) / len(losses) <= got <= max(losses)


def test_midrank_hand_example():
    losses = torch.tensor([5.0, 1.0, 4.0, 2.0, 3.0, 0.0, 7.0, 6.0])
    # ranks high -> low: 7 (i6), 6 (i7) skipped; 5 (i0), 4 (i2), 3 (i4), 2 (i3) kept; 1, 0 dropped
    w = reweight.weights(losses, "midrank", skip=0.25, keep=0.5)
    assert w.tolist() == [0.25, 0.0, 0.25, 0.25, 0.25, 0.0, 0.0, 0.0]


def official_midrank(losses, frac, portion):
    """A transcription of the official batch_training.py: c = int(frac * B), the mean of the sorted losses
    [portion * c : (portion + 1) * c] -> as weights; None where that slice is empty (the official mean is NaN)."""
    B = len(losses)
    capacity = int(frac * B)
    ranked = sorted(range(B), key=lambda i: -losses[i])  # distinct losses: no ties
    band = ranked[portion * capacity:(portion + 1) * capacity]
    if not band:
        return None
    return [1.0 / len(band) if i in band else 0.0 for i in range(B)]


FRACS = [0.05, 0.1, 0.125, 0.15, 0.2, 0.25, 0.29, 0.3, 1 / 3, 0.5, 0.7, 1.0]


def test_midrank_frac_portion_is_the_official_rule_exactly():
    """12 fracs x 9 portions x n = 1..64: 6,912 settings (--skip P*F --keep F gives other ranks in 1,632)."""
    g = torch.Generator().manual_seed(0)
    for n in range(1, 65):
        losses = torch.randperm(n, generator=g).double()
        for frac in FRACS:
            for portion in range(9):
                expected = official_midrank(losses.tolist(), frac, portion)
                if expected is None:
                    with pytest.raises(ValueError, match="frac"):
                        reweight.weights(losses, "midrank", frac=frac, portion=portion)
                    continue
                w = reweight.weights(losses, "midrank", frac=frac, portion=portion)
                assert w.tolist() == expected, (n, frac, portion)


def test_midrank_frac_portion_where_skip_keep_cannot_follow():
    losses = torch.arange(20.0).flip(0)  # rank r is index r
    w = reweight.weights(losses, "midrank", frac=0.125, portion=3)
    assert w.nonzero().squeeze(1).tolist() == [6, 7]  # c = 2: ranks 6, 7
    assert reweight.weights(losses, "midrank", skip=0.375, keep=0.125).nonzero().squeeze(1).tolist() == [7, 8]
    assert reweight.midrank_counts(100, frac=0.29) == (0, 28)  # int(0.29 * 100) = 28 in floating point, as official
    assert reweight.midrank_counts(20, frac=0.3, portion=3) == (18, 2)  # the band is cut at n, as the slice is
    assert torch.equal(reweight.weights(losses, "midrank", frac=1.0, portion=0), reweight.erm(losses))


@pytest.mark.parametrize("frac,portion", [(0.0, 0), (1.5, 0), (0.125, -1), (0.125, 0.5), (0.04, 0), (0.25, 4)])
def test_midrank_rejects_bad_frac_portion(frac, portion):
    with pytest.raises(ValueError, match="frac"):
        reweight.weights(torch.rand(20), "midrank", frac=frac, portion=portion)


def test_midrank_full_keep_is_erm_and_counts_are_exact():
    losses = torch.rand(100)
    assert torch.allclose(reweight.midrank(losses, 0.0, 1.0), reweight.erm(losses))
    assert reweight.midrank_counts(100, 0.29, 0.29) == (29, 29)  # no float truncation to 28
    for skip, keep in [(0.1, 0.3), (0.5, 0.5), (0.0, 0.07)]:
        w = reweight.midrank(losses, skip, keep)
        assert (w > 0).sum().item() == math.floor(keep * 100 + 1e-9)
        assert w.sum().item() == pytest.approx(1.0)


@pytest.mark.parametrize("skip,keep", [(0.0, 0.0), (0.0, 0.05), (0.6, 0.6), (-0.1, 0.5), (0.2, 1.5)])
def test_midrank_rejects_bad_fractions(skip, keep):
    with pytest.raises(ValueError):
        reweight.midrank(torch.rand(10), skip, keep)


@pytest.mark.parametrize("method", reweight.METHODS)
def test_weights_are_a_distribution_and_permutation_equivariant(method):
    torch.manual_seed(0)
    losses, ref = torch.rand(32) * 5, torch.rand(32) * 5  # ref: a reference model's losses, for the methods taking them
    perm = torch.randperm(32)
    w = reweight.weights(losses, method, tau=0.7, skip=0.25, keep=0.5, ref_losses=ref)
    assert (w >= 0).all() and w.sum().item() == pytest.approx(1.0, abs=1e-6)
    if method != "random":  # a random draw, seeded by the pool's order: another order, another (uniform) draw
        w_perm = reweight.weights(losses[perm], method, tau=0.7, skip=0.25, keep=0.5, ref_losses=ref[perm])
        assert torch.allclose(w_perm, w[perm])


def test_unknown_method():
    with pytest.raises(ValueError, match="unknown method"):
        reweight.weights(torch.rand(3), "focal")


@pytest.mark.parametrize("tau", [0.05, 1.0, 30.0])
def test_a_declared_score_is_the_methods_own_softmax(tau):
    """train.py streams a method with a .score as softmax(score): that must be the method itself."""
    torch.manual_seed(0)
    losses, ref = torch.rand(64) * 8, torch.rand(64) * 8
    streamable = [name for name in reweight.METHODS if hasattr(reweight.method(name)[0], "score")]
    assert streamable == ["erm", "irdro", "excess_irdro"]
    for name in streamable:
        fn, hp = reweight.method(name, tau=tau, skip=0.1, keep=0.5, ref_losses=ref)
        assert torch.allclose(torch.softmax(fn.score(losses, **hp), dim=0), fn(losses, **hp), rtol=1e-5, atol=1e-8)


def test_weights_never_downcast():
    losses = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    assert reweight.weights(losses, "irdro", tau=1.0).dtype == torch.float64
    assert reweight.weights(losses.to(torch.bfloat16), "irdro", tau=1.0).dtype == torch.float32


# --- properties, over many random inputs (hypothesis) ---------------------------------

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import assume, given, settings, strategies as st  # noqa: E402

loss_lists = st.lists(st.floats(0, 1e4, allow_nan=False, width=32), min_size=1, max_size=64)


@settings(max_examples=300, deadline=None)
@given(loss_lists, st.floats(1e-3, 1e3), st.sampled_from(reweight.METHODS), st.floats(0, 1), st.floats(0, 1),
       st.randoms(use_true_random=False))
def test_weights_are_finite_nonnegative_sum_to_one_and_equivariant(losses, tau, method, skip, keep, rnd):
    n = len(losses)
    if method in ("midrank", "random", "rholoss"):
        assume(skip + keep <= 1 and math.floor(keep * n + 1e-9) >= 1)
    l = torch.tensor(losses)
    # a reference's losses that follow their samples and tie where the losses tie: l - l/2 = l/2, exactly
    w = reweight.weights(l, method, tau=tau, skip=skip, keep=keep, ref_losses=l / 2)
    assert torch.isfinite(w).all() and (w >= 0).all()
    assert w.sum().item() == pytest.approx(1.0, abs=1e-5)
    perm = list(range(n))
    rnd.shuffle(perm)
    wp = reweight.weights(l[perm], method, tau=tau, skip=skip, keep=keep, ref_losses=l[perm] / 2)
    if method == "random":  # another order draws anew: the same count, the same 1/k
        assert torch.equal(wp.sort().values, w.sort().values)
    elif len(set(losses)) == n:  # ties may be broken either way; otherwise exactly equivariant
        assert torch.allclose(wp, w[perm], atol=1e-6)
    else:
        assert torch.allclose(wp.sort().values, w.sort().values, atol=1e-6)
    if method in ("midrank", "rholoss"):  # rholoss: the top floor(keep * n), none skipped
        n_skip = math.floor(skip * n + 1e-9) if method == "midrank" else 0
        assert (w > 0).sum().item() == min(math.floor(keep * n + 1e-9), n - n_skip)


@settings(max_examples=300, deadline=None)
@given(loss_lists, st.floats(1e-3, 1e3))
def test_irdro_is_monotone(losses, tau):
    l = torch.tensor(losses)
    w = reweight.irdro(l, tau)
    order = torch.argsort(l)
    assert (w[order].diff() >= -1e-7).all()  # a higher loss never gets a smaller weight


def test_the_files_a_reader_learns_from_keep_their_budgets():
    """reweight.py under 100 lines (every method in five minutes), train.py at most 400, prepare_data.py at most 450,
    no function over 80."""
    import ast
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    assert len((root / "reweight.py").read_text().splitlines()) < 100
    assert len((root / "train.py").read_text().splitlines()) <= 400
    assert len((root / "prepare_data.py").read_text().splitlines()) <= 450
    for path in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert node.end_lineno - node.lineno < 80, f"{path.name}: {node.name} is over 80 lines"


def test_the_projects_modules_import_no_circle():
    """Files lower in the flow never import higher ones: no circle among the top-level modules' imports (those
    inside functions too), e.g. reweight.py imports reweight_followup.py, which imports nothing of it."""
    import ast
    from pathlib import Path
    files = {p.stem: p for p in Path(__file__).resolve().parent.parent.glob("*.py")}
    imports = {}
    for name, path in files.items():
        found = set()
        for n in ast.walk(ast.parse(path.read_text())):
            found |= {a.name for a in n.names} if isinstance(n, ast.Import) else set()
            found |= {n.module} if isinstance(n, ast.ImportFrom) and n.module and not n.level else set()
        imports[name] = {m.split(".")[0] for m in found} & files.keys() - {name}
    done = set()

    def visit(name, path):  # depth first; a module met again on the current path closes a circle
        assert name not in path, "import circle: " + " -> ".join([*path[path.index(name):], name])
        if name not in done:
            for m in sorted(imports[name]):
                visit(m, [*path, name])
            done.add(name)
    for name in sorted(files):
        visit(name, [])
