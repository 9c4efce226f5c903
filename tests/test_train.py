"""train.py: data sampling, exact whole-batch reweighting under gradient accumulation, logs, resume."""

import gc
import json
import math
import os
import shutil
import subprocess
import sys
import weakref
from contextlib import nullcontext

import numpy as np
import pytest
import torch

import reweight
import reweight_followup
import runtime
import train
from test_reweight_followup import reference as followup_reference
from model import GPT, GPTConfig

ROOT = train.Path(train.__file__).parent


def run(flags, tmp_path, name, *extra):
    return train.main(flags + ["--out_dir", str(tmp_path / name), *extra])


# --- data ---------------------------------------------------------------------

def test_samples_are_chunks_that_never_cross_a_document(tiny_data):
    for split in ("train", "val"):
        docs = np.load(tiny_data / f"{split}_docs.npz")
        offsets, ids = docs["offsets"], docs["ids"]
        data = train.load_split(tiny_data, split, block_size=8)
        start, end, doc = data["start"], data["end"], data["doc"]
        assert (end - start - 1 <= 8).all() and (end - start >= 2).all()
        d = np.searchsorted(ids, doc)  # ids are sorted within a split
        assert (start >= offsets[d]).all() and (end <= offsets[d + 1]).all()
        # consecutive chunks share one token (last input = next chunk's first), and every target is covered
        assert (end - start - 1).sum() == (np.diff(offsets) - 1).sum()


def test_step_samples_depend_on_seed_step_and_n_only():
    a = train.step_samples(7, 3, 8, 50)
    assert np.array_equal(a, train.step_samples(7, 3, 8, 50))
    assert not np.array_equal(a, train.step_samples(8, 3, 8, 50))
    # an epoch is a permutation: 50 samples of steps 0..4 (n=10) are all distinct
    epoch = np.concatenate([train.step_samples(7, k, 10, 50) for k in range(5)])
    assert sorted(epoch.tolist()) == list(range(50))


@pytest.mark.parametrize("n,n_samples", [(16, 50), (7, 30), (256, 1000), (10, 10)])
def test_a_step_holds_distinct_samples_and_an_epoch_all_but_the_leftover(n, n_samples):
    steps_per_epoch = n_samples // n
    for epoch in range(8):
        steps = [train.step_samples(5, epoch * steps_per_epoch + k, n, n_samples) for k in range(steps_per_epoch)]
        for samples in steps:
            assert len(samples) == n and len(set(samples.tolist())) == n
        used = set(np.concatenate(steps).tolist())  # every sample but the n_samples % n left over this epoch
        assert len(used) == steps_per_epoch * n and used <= set(range(n_samples))
    later = train.step_samples(5, steps_per_epoch, n, n_samples)  # each epoch its own permutation
    assert n_samples < 2 or not np.array_equal(later, train.step_samples(5, 0, n, n_samples))


# --- exact reweighting over the effective batch ------------------------------

def reference_grads(model, x, y, method, tau, skip, keep, ref_losses):
    """Gradient of sum_i w_i l_i with all samples in one batch and w computed here independently."""
    model.zero_grad(set_to_none=True)
    _, loss = model(x, y)
    l = loss.detach().double()
    reducible = l - ref_losses.double()  # against the reference model's losses (rholoss, excess_irdro)
    if method == "erm":
        w = torch.full_like(l, 1 / len(l))
    elif method in ("irdro", "excess_irdro"):
        e = torch.exp((l if method == "irdro" else reducible) / tau)
        w = e / e.sum()
    elif method in ("linupper", "quadratic", "extremes"):  # the numpy transcription of their formulas
        w = torch.from_numpy(followup_reference(l.numpy(), method, tau))
    elif method == "random":  # which samples is the method's own draw (tested in test_reweight_followup)
        w = reweight_followup.random(l, keep)
    else:  # midrank, or rholoss: the top of the reducible losses, none skipped
        by = l if method == "midrank" else reducible
        order = sorted(range(len(l)), key=lambda i: -by[i].item())
        s, k = int(skip * len(l)) if method == "midrank" else 0, int(keep * len(l))
        w = torch.zeros_like(l)
        w[order[s:s + k]] = 1 / k
    (loss * w.float()).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return grads, w.float()


def step_batch(n=8, seed=0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=32))
    x, y = torch.randint(64, (n, 16)), torch.randint(64, (n, 16))
    y[3, 5:] = -1
    return model, x, y


# small tau: the weights are far from uniform; ref_losses: a reference model's, spread enough to reorder the samples
HPARAMS = dict(tau=0.05, skip=0.25, keep=0.5, ref_losses=torch.tensor([0.06, 0.0, 0.1, 0.02, 0.14, 0.04, 0.12, 0.08]))


@pytest.mark.parametrize("method", reweight.METHODS)
def test_the_naive_step_is_the_gradient_of_the_weighted_loss(method):
    """train.naive_step, the oracle of every other form, against weights computed here independently."""
    model, x, y = step_batch()
    ref, w_ref = reference_grads(model, x, y, method, **HPARAMS)
    losses, w = train.naive_step(model, x, y, method, HPARAMS)
    assert torch.allclose(w, w_ref, atol=1e-6) and (w.max() > 0.2 or method == "erm")
    assert losses.grad_fn is None and w.grad_fn is None
    if method == "rholoss":  # the reference's losses reorder the samples: not the hardest by the loss alone
        assert not torch.equal(w, reweight.midrank(losses, 0.0, HPARAMS["keep"]))
    for p, g in zip(model.parameters(), ref):
        assert torch.allclose(p.grad, g, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("by_sample", [True, False])  # the last micro-batch's per-sample graphs, or none at all
@pytest.mark.parametrize("method", reweight.METHODS)
@pytest.mark.parametrize("micro", [8, 4, 2, 1])
def test_forward_backward_is_the_naive_step_in_float64(method, micro, by_sample, monkeypatch):
    monkeypatch.setattr(train, "BY_SAMPLE", by_sample)
    model, x, y = step_batch()
    model.double()
    l_ref, w_ref = train.naive_step(model, x, y, method, HPARAMS)
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    batches = [(x[i:i + micro], y[i:i + micro]) for i in range(0, 8, micro)]
    losses, w = train.forward_backward(model, batches, method, HPARAMS, nullcontext())
    assert losses.dtype == w.dtype == torch.float64
    assert torch.allclose(losses, l_ref, rtol=1e-13, atol=0) and torch.allclose(w, w_ref, rtol=1e-12, atol=1e-15)
    for p, g in zip(model.parameters(), ref):
        assert torch.allclose(p.grad, g, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("micro", [4, 2, 1])
def test_midrank_with_dropout_ranks_the_losses_it_backpropagates(micro):
    """Dropout 0.1: each pass draws its own masks. The losses that are ranked must be the ones whose gradient
    is taken: the step must equal the naive one, every micro-batch forwarded once with a graph, in order,
    w = midrank of those losses, (w * l).sum().backward() -- the same masks from the same seed."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32, dropout=0.1)).train()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(64, (8, 16), generator=g), torch.randint(64, (8, 16), generator=g)
    batches = [(x[i:i + micro], y[i:i + micro]) for i in range(0, 8, micro)]
    hparams = dict(skip=0.25, keep=0.5)

    torch.manual_seed(7)
    l = torch.cat([model(xb, yb)[1] for xb, yb in batches])
    w_ref = torch.zeros(8)
    w_ref[torch.argsort(l.detach(), descending=True)[2:6]] = 0.25  # ranks 2..5 of 8, computed here
    (w_ref * l).sum().backward()
    ref = [p.grad.clone() for p in model.parameters()]
    rng_after = torch.get_rng_state()
    model.zero_grad(set_to_none=True)

    torch.manual_seed(7)
    losses, w = train.forward_backward(model, batches, "midrank", hparams, nullcontext())
    assert torch.allclose(losses, l.detach(), rtol=0, atol=1e-6) and torch.equal(w, w_ref)
    assert_grads_equal([p.grad for p in model.parameters()], ref)
    assert torch.equal(torch.get_rng_state(), rng_after)  # one pass a micro-batch, as the naive step
    with torch.no_grad():  # the masks matter: without dropout the losses are others
        assert (model.eval()(x, y)[1] - losses).abs().max() > 1e-3


def test_midrank_under_torchrun_keeps_unevenly_over_the_ranks(tiny_flags, tmp_path):
    """2 processes: MidRanking keeps 4 of 8 samples, unevenly over the ranks, so one rank forwards more kept
    micro-batches than the other; under FSDP every pass is a collective, so none may hang. Dropout 0: FSDP takes
    the steps of one process; dropout 0.1 (the replayed route): FSDP takes the steps of DDP (same masks per rank)."""
    from test_distributed import assert_same_run, torchrun
    flags = tiny_flags + ["--method", "midrank", "--skip", "0.25", "--keep", "0.5", "--max_iters", "3",
                          "--warmup_iters", "0", "--eval_interval", "3", "--batch_size", "2"]
    train.main(flags + ["--grad_accum", "4", "--dropout", "0", "--out_dir", str(tmp_path / "one")])
    fsdp = runtime.FSDP_ON_CPU  # torch < 2.7: the DDP run only (FSDP2 runs on CPU from 2.7)
    for name, extra in [("fsdp0", ["--dropout", "0", "--fsdp"]), ("ddp1", ["--dropout", "0.1"]),
                        ("fsdp1", ["--dropout", "0.1", "--fsdp"])]:
        if "--fsdp" in extra and not fsdp:
            continue
        res = torchrun(flags + ["--grad_accum", "2", "--out_dir", str(tmp_path / name), *extra], timeout=120)
        assert res.returncode == 0, res.stderr[-3000:]
    assert any(sum(w > 0 for w in r["weight"][:4]) != 2 for r in read_jsonl(tmp_path / "one" / "weights.jsonl"))
    if fsdp:
        assert_same_run(tmp_path / "one", tmp_path / "fsdp0", atol=3e-5)
        assert_same_run(tmp_path / "ddp1", tmp_path / "fsdp1", atol=3e-5)


@pytest.mark.parametrize("method,dropout,by_sample,waits", [
    ("erm", 0.0, None, []), ("irdro", 0.0, None, []),  # streamed: nothing read until the loop reads the step
    ("midrank", 0.0, False, ["nonzero"]),  # which samples are kept, hence how many passes: the one read it needs
    ("midrank", 0.0, True, ["nonzero", "tolist"]),  # by_sample (one micro-batch): which graphs, on the host
    ("midrank", 0.1, None, ["nonzero", "tolist"]),  # under dropout: which micro-batches to forward again
    ("excess_irdro", 0.0, None, []), ("rholoss", 0.0, False, ["nonzero"])])  # against a reference: as irdro, midrank
def test_a_step_waits_for_the_device_only_where_the_method_must(method, dropout, by_sample, waits, monkeypatch):
    """The host-device waits of a step (tests/conftest.py HostWaits: reads, value-sized ops, copies of host data),
    counted in forward_backward and the optimizer step (clipped, AdamW); the loop then reads the losses and
    weights once. A GPU runs ahead of the host between them: a wait anywhere else would stall it every step."""
    from conftest import HostWaits
    monkeypatch.setattr(train, "BY_SAMPLE", by_sample)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32, dropout=dropout, pos="rope",
                          norm="rmsnorm", mlp="swiglu", bias=False)).train()
    optimizer = model.configure_optimizer(0.1, 1e-3, (0.9, 0.95), "cpu")
    scaler = torch.amp.GradScaler("cpu", enabled=False)  # bf16 and float32 need none (float16's reads its scale)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(64, (8, 16), generator=g), torch.randint(64, (8, 16), generator=g)
    micro = 8 if by_sample else 4  # by_sample takes a step of one micro-batch
    batches = [(x[i:i + micro], y[i:i + micro]) for i in range(0, 8, micro)]
    hparams = dict(tau=0.5, skip=0.25, keep=0.5, ref_losses=torch.rand(8, generator=g) * 4)  # left on the device
    for step in range(2):
        with HostWaits() as host:
            losses, w = train.forward_backward(model, batches, method, hparams, nullcontext(), scaler.scale)
            assert runtime.optimizer_step(optimizer, scaler, model.parameters(), grad_clip=1.0)
        optimizer.zero_grad(set_to_none=True)
        assert host.seen == waits, (step, host.seen)
        assert losses.shape == w.shape == (8,) and float(w.sum()) == pytest.approx(1)


@pytest.mark.parametrize("micro,n_micro", [(4, 2), (2, 4), (8, 1)])
def test_under_torch_compile_each_form_makes_its_graphs_in_its_first_step_only(micro, n_micro, monkeypatch):
    """torch.compile (dynamo's graph count; backend "eager": the graphs are dynamo's, whatever compiles them): a
    graph made after a method's first step is a recompile, seconds each on a GPU. The step's shapes are fixed: the
    kept count is the method's (MidRanking: floor(keep * n)), re-packed into the same passes every step, and
    by_sample's passes are of one sample. ERM: the training graph; IR-DRO: the same one; MidRanking: its scoring
    graph (no grad), and a pass of another size where the kept samples do not fill micro-batches."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32))
    compiled = torch.compile(model, backend="eager")
    made = {}
    for form in ("erm", "irdro", "midrank-plain", "midrank-bysample", "random-plain", "extremes-plain"):
        method, _, by_sample = form.partition("-")
        monkeypatch.setattr(train, "BY_SAMPLE", {"plain": False, "bysample": True}.get(by_sample))
        made[form] = []
        for step in range(6):
            g = torch.Generator().manual_seed(step)
            x, y = (torch.randint(64, (micro * n_micro, 16), generator=g) for _ in range(2))
            before = counters["stats"]["unique_graphs"]
            train.forward_backward(compiled, [(x[i:i + micro], y[i:i + micro]) for i in range(0, len(x), micro)],
                                   method, dict(tau=0.5, skip=0.25, keep=0.5), nullcontext())
            model.zero_grad(set_to_none=True)
            made[form].append(counters["stats"]["unique_graphs"] - before)
    assert made["erm"] == [1, 0, 0, 0, 0, 0] and made["irdro"] == [0] * 6, made
    for form in ("midrank-plain", "midrank-bysample", "random-plain", "extremes-plain"):
        assert made[form][0] <= 2 and made[form][1:] == [0] * 5, (form, made)


def test_under_torch_compile_a_kept_count_that_varies_makes_at_most_four_sizes_of_pass(monkeypatch):
    """A method keeping a different number of samples every step (as a rank's share of MidRanking's kept samples
    under torchrun does): its last re-packed pass is padded with weight-0 rows to a multiple of a quarter
    micro-batch, so the training passes come in at most 4 sizes (loss.py's chunk loop fixes each one's graph)."""
    from torch._dynamo.utils import counters

    def above_median(losses):  # 5..9 of 16 kept below, the rest dropped
        w = (losses >= losses.median()).to(losses.dtype) * (torch.arange(len(losses)) % 3 > 0)
        return w / w.sum()

    add_method(monkeypatch, "above_median", above_median)
    torch._dynamo.reset()
    counters.clear()
    model = tiny_model()
    compiled = torch.compile(model, backend="eager")
    sizes, kept = set(), set()
    model.register_forward_pre_hook(lambda module, args: sizes.add(len(args[0])) if torch.is_grad_enabled() else None)
    for step in range(12):
        x, y, losses, w, _ = micro_step(compiled, "above_median", {}, micro=8, n=16, seed=step)
        kept.add(int((w > 0).sum()))
        ref, w_ref = float64_reference(model, x, y, above_median)
        assert torch.allclose(w, w_ref) and all(torch.allclose(p.grad, g, rtol=1e-4, atol=1e-6)
                                                for p, g in zip(model.parameters(), ref))
    assert len(kept) >= 3 and 2 <= len(sizes) and sizes <= {2, 4, 6, 8}, (kept, sizes)
    assert counters["stats"]["unique_graphs"] <= 1 + len(sizes)  # scoring (no grad), and a graph a pass size


# --- reweight.py is the one definition of the weights: training follows it --------------------

def float64_reference(model, x, y, weight_fn):
    """The naive step in float64, whole batch in one pass: grad of sum_i w_i l_i, w = weight_fn(detached l)."""
    ref = GPT(model.config).double()
    ref.load_state_dict(model.state_dict())
    _, loss = ref(x, y)
    w = weight_fn(loss.detach())
    (w * loss).sum().backward()
    return [p.grad.float() for p in ref.parameters()], w.float()


def micro_step(model, method, hparams, micro=2, n=8, seed=0):
    """forward_backward on n samples split into micro-batches; -> (x, y, losses, w, grads)."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randint(64, (n, 16), generator=g), torch.randint(64, (n, 16), generator=g)
    model.zero_grad(set_to_none=True)
    batches = [(x[i:i + micro], y[i:i + micro]) for i in range(0, n, micro)]
    losses, w = train.forward_backward(model, batches, method, hparams, nullcontext())
    return x, y, losses, w, [p.grad.clone() for p in model.parameters()]


def tiny_model():
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=32))


def assert_grads_equal(grads, ref):
    for g, r in zip(grads, ref):
        assert torch.allclose(g, r, rtol=1e-4, atol=1e-6)


def test_replacing_reweight_irdro_changes_the_gradient(monkeypatch):
    """An IR-DRO step's gradient follows whatever reweight.irdro is, not a copy of it in train.py."""
    model = tiny_model()
    *_, grads_softmax = micro_step(model, "irdro", dict(tau=0.05), micro=2)

    def hardest_two(losses, tau):  # a different function of the losses: uniform on the two largest
        w = torch.zeros_like(losses)
        w[losses.topk(2).indices] = 0.5
        return w

    monkeypatch.setattr(reweight, "irdro", hardest_two)
    x, y, losses, w, grads = micro_step(model, "irdro", dict(tau=0.05), micro=2)
    ref, w_ref = float64_reference(model, x, y, lambda l: hardest_two(l, 0.05))
    assert torch.equal(w, hardest_two(losses, 0.05)) and torch.allclose(w, w_ref)
    assert_grads_equal(grads, ref)
    assert not all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads, grads_softmax))


def test_an_edited_method_whose_streaming_form_disagrees_fails_loudly(monkeypatch):
    def flattened(losses, tau):  # edited, but the old softmax shortcut is still attached
        return torch.softmax(losses / (10 * tau), dim=0)

    flattened.score = reweight.irdro.score
    train.cli.check_method("irdro", dict(tau=0.05), 8)  # the method as it is: agrees
    monkeypatch.setattr(reweight, "irdro", flattened)
    with pytest.raises(ValueError, match="disagrees"):
        train.cli.check_method("irdro", dict(tau=0.05), 8)


def add_method(monkeypatch, name, fn):
    monkeypatch.setattr(reweight, name, fn, raising=False)
    monkeypatch.setattr(reweight, "METHODS", reweight.METHODS + (name,))


def cube_root(losses, keep):
    """A new method, written as a learner would: w_i proportional to l_i^(1/3) on the top `keep` fraction."""
    w = losses.clamp(min=0) ** (1 / 3)
    w[losses < losses.quantile(1 - keep)] = 0
    return w / w.sum()


def sharpened(losses, tau):
    """A new method with a streaming form: softmax(2 l / tau)."""
    return torch.softmax(2 * losses / tau, dim=0)


sharpened.score = lambda losses, tau: 2 * losses / tau


@pytest.mark.parametrize("fn,hp", [(cube_root, dict(keep=0.5)), (sharpened, dict(tau=0.1))])
def test_a_method_added_in_reweight_trains_exactly_with_grad_accum_4(fn, hp, monkeypatch):
    add_method(monkeypatch, fn.__name__, fn)
    model = tiny_model()
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    x, y, losses, w, grads = micro_step(model, fn.__name__, dict(tau=0.1, skip=0.0, keep=0.5), micro=2)
    ref, w_ref = float64_reference(model, x, y, lambda l: fn(l, **hp))
    assert torch.allclose(w, w_ref, atol=1e-6) and w.max() > 0.2
    assert_grads_equal(grads, ref)
    # streamed (one forward a micro-batch) when the method has a .score; else scored first, then kept ones again
    assert (len(calls) == 4) == hasattr(fn, "score") and len(calls) >= 4


def test_a_method_added_in_reweight_runs_from_the_command_line(monkeypatch, tiny_flags, tmp_path):
    add_method(monkeypatch, "cube_root", cube_root)
    run(tiny_flags, tmp_path, "new", "--method", "cube_root", "--keep", "0.5", "--max_iters", "2",
        "--batch_size", "4", "--grad_accum", "2")
    for r in read_jsonl(tmp_path / "new" / "weights.jsonl"):
        assert np.allclose(r["weight"], cube_root(torch.tensor(r["loss"]), 0.5).numpy(), atol=1e-6)


@pytest.mark.parametrize("method", reweight.METHODS)
def test_one_step_is_the_same_for_any_micro_batching(method, tiny_flags, tiny_ref, tmp_path):
    import reference
    ref = ["--ref_model", str(tiny_ref)] if reference.takes(method) else []  # rholoss, excess_irdro: a tiny run's
    states = []
    for bs, ga in [(8, 1), (2, 4), (1, 8)]:
        res = run(tiny_flags, tmp_path, f"{bs}x{ga}", "--method", method, "--batch_size", str(bs),
                  "--grad_accum", str(ga), "--max_iters", "1", "--warmup_iters", "0", "--tau", "0.1", *ref)
        states.append(res["model"].state_dict())
    # Adam's first step is about lr * g / (|g| + eps): for a gradient entry near eps, float rounding
    # of the accumulation order moves the update by up to ~1e-3 of a step (lr = 1e-3 here)
    for other in states[1:]:
        for k in states[0]:
            assert torch.allclose(states[0][k], other[k], rtol=0, atol=1e-5), k


# --- logs ---------------------------------------------------------------------

def read_jsonl(path):
    return [json.loads(line) for line in open(path)]


def test_weights_jsonl_irdro_is_softmax_of_the_logged_losses(tiny_flags, tmp_path, tiny_data):
    run(tiny_flags, tmp_path, "irdro", "--method", "irdro", "--tau", "0.5", "--max_iters", "3",
        "--batch_size", "4", "--grad_accum", "3")
    records = read_jsonl(tmp_path / "irdro" / "weights.jsonl")
    train_ids = set(np.load(tiny_data / "train_docs.npz")["ids"].tolist())
    assert [r["step"] for r in records] == [0, 1, 2]
    for r in records:
        l = np.array(r["loss"])
        e = np.exp((l - l.max()) / 0.5)
        assert len(l) == len(r["weight"]) == len(r["doc"]) == 12
        assert np.allclose(r["weight"], e / e.sum(), rtol=1e-5)
        assert set(r["doc"]) <= train_ids
        assert "source" not in r  # one file, no --source_field: data without sources
    for r, w in zip((r for r in read_jsonl(tmp_path / "irdro" / "log.jsonl") if r["type"] == "train"), records):
        assert r["ess"] == pytest.approx(1 / (np.array(w["weight"]) ** 2).sum())  # effective sample size
        assert 1 < r["ess"] < 12


def test_weights_jsonl_names_the_source_of_every_sample(tiny_flags, tiny_sources_data, tmp_path):
    flags = tiny_flags + ["--data", str(tiny_sources_data)]  # the later --data wins
    run(flags, tmp_path, "src", "--method", "irdro", "--tau", "0.5", "--max_iters", "4", "--batch_size", "4",
        "--grad_accum", "2")
    docs = np.load(tiny_sources_data / "train_docs.npz")
    source_of = dict(zip(docs["ids"].tolist(), docs["sources"].tolist()))  # a document's source, as prepared
    records = read_jsonl(tmp_path / "src" / "weights.jsonl")
    for r in records:
        assert len(r["source"]) == len(r["doc"]) == len(r["weight"]) == 8
        assert r["source"] == [source_of[d] for d in r["doc"]]
    assert {s for r in records for s in r["source"]} == {0, 1}  # code and web, both seen in 32 samples
    # a damaged sources array: one line, exit 2, before any training
    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_sources_data, damaged)
    with np.load(damaged / "val_docs.npz") as d:
        train.prepare_data.write_npz(damaged / "val_docs.npz", offsets=d["offsets"], ids=d["ids"], sources=d["ids"])
    msg = bad_run(tiny_flags, tmp_path, "--data", str(damaged))
    assert msg.startswith(f"train.py: error: {damaged / 'val_docs.npz'} is damaged (its sources are not one of the 2")


def test_reweight_warmup_trains_the_first_steps_with_uniform_weights(tiny_flags, tmp_path):
    """--reweight_warmup 2: steps 0-1 are ERM's (1/n each, the same steps as an ERM run), then the method's."""
    common = ["--max_iters", "4", "--batch_size", "4", "--schedule", "constant", "--warmup_iters", "0"]
    run(tiny_flags, tmp_path, "warm", "--method", "midrank", "--reweight_warmup", "2", *common)
    run(tiny_flags, tmp_path, "erm", "--method", "erm", *common[:1], "2", *common[2:])
    records = read_jsonl(tmp_path / "warm" / "weights.jsonl")
    assert all(np.allclose(r["weight"], 1 / 8) for r in records[:2])
    assert records[:2] == read_jsonl(tmp_path / "erm" / "weights.jsonl")  # the warm-up is ERM, exactly
    for r in records[2:]:  # then MidRanking: skip floor(0.125 * 8) = 1, keep 4 at 1/4 each
        assert sorted(r["weight"]) == [0.0] * 4 + [0.25] * 4
    bad = subprocess.run([sys.executable, str(ROOT / "train.py"), *tiny_flags, "--reweight_warmup", "-1", "--out_dir",
                          str(tmp_path / "bad")], capture_output=True, text=True)
    assert bad.returncode == 2 and "--reweight_warmup must be >= 0" in bad.stderr


def test_weights_jsonl_midrank_is_uniform_on_the_kept_band(tiny_flags, tmp_path):
    run(tiny_flags, tmp_path, "midrank", "--method", "midrank", "--skip", "0.25", "--keep", "0.5",
        "--max_iters", "3", "--batch_size", "4", "--grad_accum", "2")
    for r in read_jsonl(tmp_path / "midrank" / "weights.jsonl"):
        ranked = np.argsort(-np.array(r["loss"]), kind="stable")
        w = np.array(r["weight"])[ranked]
        assert np.allclose(w, [0, 0, 0.25, 0.25, 0.25, 0.25, 0, 0])


def test_weights_jsonl_midrank_frac_portion_is_the_official_band(tiny_flags, tmp_path):
    run(tiny_flags, tmp_path, "official", "--method", "midrank", "--frac", "0.25", "--portion", "1",
        "--max_iters", "2", "--batch_size", "4", "--grad_accum", "3")
    args = json.loads((tmp_path / "official" / "args.json").read_text())["segments"][-1]["args"]
    assert (args["frac"], args["portion"], args["skip"], args["keep"]) == (0.25, 1, None, None)
    for r in read_jsonl(tmp_path / "official" / "weights.jsonl"):  # n = 12, c = int(0.25 * 12) = 3: ranks 3..5
        ranked = np.argsort(-np.array(r["loss"]), kind="stable")
        assert np.allclose(np.array(r["weight"])[ranked], [0] * 3 + [1 / 3] * 3 + [0] * 6)


# --- scores against a reference model (--ref_model) -------------------------------------------

@pytest.mark.parametrize("method", ["rholoss", "excess_irdro"])
def test_weights_jsonl_logs_the_reference_losses_the_method_weighed(method, tiny_flags, tiny_ref, tiny_data, tmp_path):
    """The reference's losses are its own (the frozen model of --ref_model on the step's samples), reach the method
    aligned with the losses, and are logged (ref_loss) in the steps that use them: none in --reweight_warmup's."""
    run(tiny_flags, tmp_path, "r", "--method", method, "--keep", "0.5", "--tau", "0.5", "--ref_model", str(tiny_ref),
        "--max_iters", "3", "--batch_size", "4", "--grad_accum", "2", "--reweight_warmup", "1")
    records = read_jsonl(tmp_path / "r" / "weights.jsonl")
    assert "ref_loss" not in records[0] and np.allclose(records[0]["weight"], 1 / 8)  # ERM's warm-up step
    data, cpu = train.load_split(tiny_data, "train", 32), torch.device("cpu")
    ref_model = runtime.load_model(tiny_ref / "ckpt.pt")[0].eval()
    for r in records[1:]:
        samples = train.step_samples(3, r["step"], 8, len(data["start"]))  # --seed 3 (tiny_flags)
        with torch.no_grad():
            ref = ref_model(*train.get_batch(data, samples, 32, cpu))[1]
        assert np.allclose(r["ref_loss"], ref.numpy(), atol=1e-5)
        l, ref = torch.tensor(r["loss"]), torch.tensor(r["ref_loss"])
        if method == "rholoss":  # the top 4 of 8 by the reducible loss
            expected = torch.zeros(8).index_fill(0, torch.argsort(l - ref, descending=True, stable=True)[:4], 0.25)
        else:
            expected = torch.softmax((l - ref) / 0.5, 0)
        assert np.allclose(r["weight"], expected.numpy(), atol=1e-6)
    if method == "rholoss":  # the reference changed which samples count: not the 4 highest losses, in some step
        assert any(set(np.argsort(r["loss"])[4:]) != set(np.flatnonzero(r["weight"])) for r in records[1:])


def test_a_reference_model_is_checked_like_the_trained_one(tiny_flags, tiny_ref, tmp_path, capsys):
    """One line and exit 2: a method against a reference without --ref_model, a --ref_model that is not a model or
    not of the data's tokens and positions; --ref_model with a method that takes none: warned, ignored."""
    assert "give --ref_model PATH" in bad_run(tiny_flags, tmp_path, "--method", "rholoss")
    missing = tmp_path / "no_such_run"
    assert f"--ref_model {missing}" in bad_run(tiny_flags, tmp_path, "--method", "excess_irdro", "--ref_model",
                                               str(missing))
    msg = bad_run(tiny_flags, tmp_path, "--method", "rholoss", "--ref_model", str(tiny_ref), "--block_size", "64")
    assert msg.startswith(f"train.py: error: --ref_model {tiny_ref}") and "exceeds the model's 32 positions" in msg
    import cli
    cli.get_args(["--method", "irdro", "--ref_model", str(tiny_ref)])
    assert capsys.readouterr().err.strip().splitlines() == [f"{cli.build_parser().prog}: warning: --ref_model does "
                                                            "not apply to --method irdro (it takes --tau): ignored"]
    cli.get_args(["--method", "rholoss", "--ref_model", str(tiny_ref), "--tau", "2"])
    assert "(it takes --keep, --ref_model)" in capsys.readouterr().err


def test_a_run_against_a_reference_resumes_with_it(tiny_flags, tiny_ref, tmp_path):
    """--init_from resume alone goes on with the saved --ref_model, and takes the steps of an unbroken run."""
    common = ["--method", "excess_irdro", "--tau", "0.5", "--ref_model", str(tiny_ref), "--batch_size", "4",
              "--eval_interval", "2"]
    straight = run(tiny_flags, tmp_path, "straight", *common, "--max_iters", "4")["model"].state_dict()
    run(tiny_flags, tmp_path, "parts", *common, "--max_iters", "2")
    resumed = run(tiny_flags, tmp_path, "parts", "--init_from", "resume", "--max_iters", "4")["model"].state_dict()
    assert all(torch.allclose(straight[k], resumed[k], rtol=0, atol=1e-6) for k in straight)
    assert read_jsonl(tmp_path / "parts" / "weights.jsonl") == read_jsonl(tmp_path / "straight" / "weights.jsonl")


def test_a_hugging_face_reference_must_have_the_datas_tokenizer(tiny_flags, tiny_llama_ckpt, tiny_llama_data,
                                                                 tmp_path):
    msg = bad_run(tiny_flags, tmp_path, "--method", "rholoss", "--ref_model", str(tiny_llama_ckpt))
    assert f"--ref_model {tiny_llama_ckpt}" in msg and "not with the tokenizer of" in msg
    run(tiny_flags + ["--data", str(tiny_llama_data)], tmp_path, "hf", "--method", "excess_irdro", "--ref_model",
        str(tiny_llama_ckpt), "--max_iters", "2", "--batch_size", "4")
    assert all(len(r["ref_loss"]) == 8 for r in read_jsonl(tmp_path / "hf" / "weights.jsonl"))


def test_training_lowers_the_val_loss_and_logs_every_step(tiny_flags, tmp_path):
    run(tiny_flags, tmp_path, "erm", "--method", "erm", "--max_iters", "30", "--eval_interval", "15",
        "--lr", "3e-3", "--batch_size", "8", "--grad_accum", "1")
    log = read_jsonl(tmp_path / "erm" / "log.jsonl")
    evals = [r["val_loss"] for r in log if r["type"] == "eval"]
    assert len(evals) == 3 and evals[-1] < evals[0] - 1.0
    assert [r["step"] for r in log if r["type"] == "train"] == list(range(30))
    ckpt = torch.load(tmp_path / "erm" / "ckpt.pt", weights_only=False)
    assert ckpt["step"] == 30 and set(ckpt) >= {"model", "optimizer", "model_args", "args", "rng"}
    groups = ckpt["optimizer"]["param_groups"]  # from scratch: nanoGPT's decay of matrices only
    assert ckpt["args"]["decay_params"] == "matrices" and [g["weight_decay"] for g in groups] == [0.1, 0.0]


def test_the_quick_start_defaults_learn(tmp_path, capsys):
    # `python train.py --method irdro --tau 1.0`: every default (the built-in corpus as characters, 4 layers of
    # 128, blocks of 128, 8 x 2 samples a step, lr 2e-3 cosine), only shorter and with a smaller val set
    import prepare_data
    data = prepare_data.prepare(out_dir=tmp_path / "data", tokenizer="char")
    out = run(["--data", str(data), "--method", "irdro", "--tau", "1.0"], tmp_path, "o", "--max_iters", "50",
              "--eval_interval", "50", "--eval_samples", "32")
    evals = [r["val_loss"] for r in read_jsonl(tmp_path / "o" / "log.jsonl") if r["type"] == "eval"]
    assert len(evals) == 2 and out["val_loss"] == evals[-1] <= 0.7 * evals[0]  # at least 30% lower
    last = capsys.readouterr().out.strip().splitlines()[-1]  # the end of a run says what to do next
    assert last.startswith(f"next: python plot.py {tmp_path / 'o'} ") and f"{tmp_path / 'o'}/hf" in last
    w = np.array([r["weight"] for r in read_jsonl(tmp_path / "o" / "weights.jsonl")])
    assert w.shape == (50, 16) and w.max() > 2 / 16 and w.min() < 0.75 / 16  # the weights do move


def test_resume_gives_the_same_parameters_and_weights(tiny_flags, tmp_path):
    common = ["--method", "irdro", "--schedule", "constant", "--eval_interval", "2", "--batch_size", "4",
              "--dropout", "0.1"]  # dropout: the RNG state must be restored too
    straight = run(tiny_flags, tmp_path, "a", *common, "--max_iters", "4")["model"].state_dict()
    run(tiny_flags, tmp_path, "b", *common, "--max_iters", "2")
    resumed = run(tiny_flags, tmp_path, "b", *common, "--max_iters", "4", "--init_from", "resume")
    for k, v in resumed["model"].state_dict().items():
        assert torch.equal(v, straight[k]), k
    assert read_jsonl(tmp_path / "a" / "weights.jsonl") == read_jsonl(tmp_path / "b" / "weights.jsonl")


def test_resume_with_other_flags_keeps_every_segments_flags(tiny_flags, tmp_path, capsys):
    """IR-DRO for 2 steps, then ERM with another batch from step 2, then `--init_from resume` alone: args.json holds
    the three segments, each with the step it took effect at, and weights.jsonl reads against them."""
    out = tmp_path / "o"
    run(tiny_flags, tmp_path, "o", "--method", "irdro", "--tau", "0.1", "--batch_size", "2", "--max_iters", "2",
        "--eval_interval", "2")
    run(tiny_flags, tmp_path, "o", "--method", "erm", "--batch_size", "4", "--max_iters", "4", "--init_from", "resume")
    assert "--method erm differs from the resumed run's irdro" in capsys.readouterr().err
    train.main(["--init_from", "resume", "--out_dir", str(out), "--max_iters", "6"])
    segments = json.loads((out / "args.json").read_text())["segments"]
    assert [(s["step"], s["args"]["method"], s["args"]["batch_size"], s["args"]["max_iters"]) for s in segments] == [
        (0, "irdro", 2, 2), (2, "erm", 4, 4), (4, "erm", 4, 6)]
    assert segments[0]["args"]["method_args"] == {"tau": 0.1} and segments[2]["args"]["n_embd"] == 32
    for r in read_jsonl(out / "weights.jsonl"):
        args = [s["args"] for s in segments if s["step"] <= r["step"]][-1]
        n = args["batch_size"] * args["grad_accum"]
        assert len(r["weight"]) == n and (np.allclose(r["weight"], 1 / n) == (args["method"] == "erm"))


def test_continue_from_an_earlier_run(tiny_flags, tmp_path):
    base = run(tiny_flags, tmp_path, "base", "--method", "erm", "--max_iters", "2")
    cont = run(tiny_flags, tmp_path, "cont", "--method", "irdro", "--max_iters", "0",
               "--init_from", str(tmp_path / "base"), "--n_layer", "3")  # model flags come from the checkpoint
    for k, v in cont["model"].state_dict().items():
        assert torch.equal(v, base["model"].state_dict()[k]), k


# --- bad input -> one line, exit code 2 ----------------------------------------

@pytest.mark.parametrize("flags,message", [
    (["--tau", "0"], "tau"),
    (["--method", "midrank", "--keep", "0.01"], "keep"),
    (["--method", "midrank", "--skip", "0.8", "--keep", "0.5"], "skip"),
    (["--method", "midrank", "--frac", "0.25", "--keep", "0.5"], "give one of the two pairs"),
    (["--method", "midrank", "--portion", "8"], "c = int(frac*n)"),
    (["--data", "/nonexistent/data"], "prepare_data.py"),
    (["--batch_size", "64", "--grad_accum", "64"], "exceeds"),
    (["--init_from", "/nonexistent/run"], "checkpoint"),
    (["--lr", "-1"], "--lr must be >= 0"),
    (["--beta2", "1.5"], "--beta2 must be in [0, 1)"),
    (["--device", "gpu"], "'gpu' is not a device"),
    (["--overwrite", "--init_from", "resume"], "pass one"),
    (["--block_size", "100000"], "is longer than the longest training sample"),
])
def test_bad_input_is_one_line_and_exit_code_2(flags, message, tiny_flags, tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "train.py"), *tiny_flags, "--out_dir", str(tmp_path / "o"),
                        *flags], capture_output=True, text=True)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train.py: error:") and message in lines[0], p.stderr


def test_a_run_folder_belongs_to_one_run(tiny_flags, tmp_path, capsys):
    run(tiny_flags, tmp_path, "o", "--max_iters", "2", "--eval_interval", "1")
    files = lambda: {p.name: p.read_bytes() for p in (tmp_path / "o").iterdir() if p.is_file()}  # noqa: E731
    before = files()
    for bad in (["--max_iters", "3"], ["--tau", "0"]):  # another run, or bad input: refused, nothing touched
        with pytest.raises(SystemExit) as e:
            run(tiny_flags, tmp_path, "o", *bad)
        assert e.value.code == 2 and files() == before
    assert "holds another run (args.json, ckpt-0000001.pt" in capsys.readouterr().err
    run(tiny_flags, tmp_path, "o", "--max_iters", "1", "--eval_interval", "1", "--overwrite")
    assert not (tmp_path / "o" / "ckpt-0000002.pt").exists()  # the old run is gone, not mixed with the new
    assert [r["step"] for r in read_jsonl(tmp_path / "o" / "log.jsonl") if r["type"] == "train"] == [0]
    run(tiny_flags, tmp_path, "o", "--max_iters", "2", "--eval_interval", "1", "--init_from", "resume")
    assert f"resuming from step 1 of {tmp_path / 'o'}" in capsys.readouterr().out


def test_default_out_dir_names_the_settings_and_unused_method_flags_are_warned(tiny_flags, capsys):
    import cli
    assert cli.get_args(["--method", "irdro", "--tau", "0.5"]).out_dir == "out/irdro-tau0.5"
    assert cli.get_args(["--method", "midrank"]).out_dir == "out/midrank-skip0.125-keep0.5"
    assert cli.get_args(["--method", "erm", "--out_dir", "runs/{method}"]).out_dir == "runs/erm"
    assert capsys.readouterr().err == ""
    cli.get_args(["--method", "irdro", "--keep=0"])
    assert capsys.readouterr().err.strip().splitlines() == [
        f"{cli.build_parser().prog}: warning: --keep does not apply to --method irdro (it takes --tau): ignored"]


def test_kill_9_anywhere_then_resume_equals_an_unbroken_run(tiny_flags, tmp_path):
    """SIGKILL at random moments of a run (in steps, evaluations, checkpoint writes), each time started again
    (resumed from its checkpoint, or anew where it has none yet): parameters and logs equal an unbroken run's."""
    import random
    import time
    common = [*tiny_flags, "--method", "irdro", "--max_iters", "24", "--eval_interval", "3", "--batch_size", "2",
              "--grad_accum", "2", "--dropout", "0.1", "--warmup_iters", "2"]
    straight = run(common, tmp_path, "straight")["model"].state_dict()
    out, rng, kills, moments = tmp_path / "killed", random.Random(0), 0, []
    lines = lambda name: len((out / name).read_text().split("\n")) - 1 if (out / name).exists() else 0  # noqa: E731
    while True:
        again = ["--init_from", "resume"] if (out / "ckpt.pt").exists() else ["--overwrite"]
        proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *common, "--out_dir", str(out), *again],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if kills == 12:
            assert proc.wait(timeout=300) == 0, proc.stderr.read()
            break
        # wait for the run to get going (a new step logged), then kill it at a random moment, or at a checkpoint
        start, deadline = lines("weights.jsonl"), time.time() + 120
        while lines("weights.jsonl") <= start and proc.poll() is None and time.time() < deadline:
            time.sleep(0.002)
        if kills % 3 == 2:  # the next checkpoint write
            while not (out / "ckpt.tmp").exists() and proc.poll() is None and time.time() < deadline:
                time.sleep(0.0005)
        else:
            time.sleep(rng.random() * 0.3)
        moments.append((lines("weights.jsonl"), (out / "ckpt.tmp").exists()))
        proc.kill()
        proc.wait()
        kills += 1
    assert len(moments) == 12 and len({m for m in moments}) >= 6, moments  # kills landed at different moments
    final = torch.load(out / "ckpt.pt", weights_only=False)
    assert final["step"] == 24
    for k, v in final["model"].items():
        assert torch.equal(v, straight[k]), k
    timing = ("tok_per_s", "mfu")
    strip = lambda records: [{k: v for k, v in r.items() if k not in timing} for r in records]  # noqa: E731
    assert strip(read_jsonl(out / "log.jsonl")) == strip(read_jsonl(tmp_path / "straight" / "log.jsonl"))
    assert read_jsonl(out / "weights.jsonl") == read_jsonl(tmp_path / "straight" / "weights.jsonl")


def test_a_float64_model_is_never_cast_down(tiny_data):
    """float32 is the floor: a float64 model's losses, weights, gradients and val loss stay float64."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=50304, n_layer=1, n_head=2, n_embd=32, norm="rmsnorm",
                          pos="rope", mlp="swiglu", bias=False)).double()
    data, cpu = train.load_split(tiny_data, "val", 16), torch.device("cpu")
    samples = np.arange(6)
    val = train.evaluate(model, data, samples, 4, 16, cpu, nullcontext())
    with torch.no_grad():
        l = model.eval()(*train.get_batch(data, samples, 16, cpu))[1]
    assert l.dtype == torch.float64 and val == pytest.approx(l.sum().item() / 6, rel=1e-14)
    model.train()
    x, y = train.get_batch(data, samples[:4], 16, cpu)
    hparams = dict(tau=0.5, skip=0.25, keep=0.5, ref_losses=torch.rand(4))  # a float32 reference: no cast down either
    for method in reweight.METHODS:
        losses, w = train.forward_backward(model, [(x[:2], y[:2]), (x[2:], y[2:])], method, hparams, nullcontext())
        assert losses.dtype == w.dtype == torch.float64 and all(p.grad.dtype == torch.float64
                                                                for p in model.parameters())
        model.zero_grad(set_to_none=True)


def test_compiled_model_gives_the_same_step_on_cpu():
    """--compile must work on CPU too (inductor's C++ backend): same losses, weights and gradients."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=32))
    x, y = torch.randint(64, (4, 16)), torch.randint(64, (4, 16))
    batches = [(x[:2], y[:2]), (x[2:], y[2:])]
    eager_losses, eager_w = train.forward_backward(model, batches, "irdro", dict(tau=0.5), nullcontext())
    eager = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    losses, w = train.forward_backward(torch.compile(model), batches, "irdro", dict(tau=0.5), nullcontext())
    assert torch.allclose(losses, eager_losses, atol=1e-5) and torch.allclose(w, eager_w, atol=1e-6)
    for p, g in zip(model.parameters(), eager):
        assert torch.allclose(p.grad, g, rtol=1e-4, atol=1e-6)


# --- continual training of a pretrained (Hugging Face) checkpoint ---------------------------

@pytest.fixture(scope="module")
def tiny_llama(tiny_llama_ckpt, tiny_data):
    """A random LLaMA checkpoint with its own sentencepiece tokenizer, and data prepared with it."""
    import prepare_data
    data = prepare_data.prepare(dataset=str(tiny_data.parent / "docs.jsonl"), out_dir=tiny_data.parent / "llama_data",
                                tokenizer=str(tiny_llama_ckpt), val_fraction=0.2)
    return tiny_llama_ckpt, data


def test_pretrained_continual_training_runs_and_exports(tiny_llama, tmp_path):
    transformers = pytest.importorskip("transformers")
    folder, data = tiny_llama
    out = tmp_path / "run"
    res = train.main(["--pretrained", str(folder), "--data", str(data), "--method", "irdro", "--tau", "1.0",
                      "--max_iters", "5", "--block_size", "32", "--batch_size", "4", "--eval_samples", "8",
                      "--device", "cpu", "--no-compile", "--out_dir", str(out)])
    (segment,) = json.loads((out / "args.json").read_text())["segments"]
    args = segment["args"]
    assert args["lr"] == 2e-6 and args["schedule"] == "constant" and args["weight_decay"] == 0.01  # the recipe
    assert args["decay_params"] == "all" and args["beta2"] == 0.999  # torch.optim.AdamW(model.parameters(), lr)
    assert {"config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json"} <= {
        p.name for p in (out / "hf").iterdir()}
    back = transformers.AutoModelForCausalLM.from_pretrained(out / "hf").eval()
    start = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    x = torch.randint(800, (2, 16))
    with torch.no_grad():
        ours = res["model"].eval().logits(x)
        assert (back(x).logits - ours).abs().max() < 1e-4
        assert (back(x).logits - start(x).logits).abs().max() > 0  # 5 steps changed the model
    assert len(read_jsonl(out / "weights.jsonl")) == 5


def test_pretrained_refuses_data_of_another_tokenizer(tiny_llama, tiny_data, tmp_path):
    folder, _ = tiny_llama
    p = subprocess.run([sys.executable, str(ROOT / "train.py"), "--pretrained", str(folder), "--data", str(tiny_data),
                        "--block_size", "32", "--device", "cpu", "--out_dir", str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "--tokenizer" in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_wandb_is_optional(tiny_flags, tmp_path):
    try:
        import wandb  # noqa: F401
        pytest.skip("wandb is installed here")
    except ImportError:
        pass
    p = subprocess.run([sys.executable, str(ROOT / "train.py"), *tiny_flags, "--out_dir", str(tmp_path / "o"),
                        "--wandb", "proj"], capture_output=True, text=True)
    assert p.returncode == 2 and "pip install wandb" in p.stderr and len(p.stderr.strip().splitlines()) == 1


# --- reliability: stop and resume, atomic checkpoints, bad input --------------------------

def test_sigterm_saves_at_a_step_boundary_and_resume_is_exact(tiny_flags, tmp_path):
    import signal
    import time
    common = [*tiny_flags, "--method", "irdro", "--max_iters", "60", "--warmup_iters", "5", "--eval_interval",
              "1000", "--batch_size", "2", "--grad_accum", "2", "--dropout", "0.1"]  # cosine schedule, dropout
    straight = run(common, tmp_path, "straight")["model"].state_dict()
    out = tmp_path / "stopped"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *common, "--out_dir", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not (out / "weights.jsonl").exists() or len((out / "weights.jsonl").read_text().splitlines()) < 3:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM and "stopped by SIGTERM" in stdout  # not taken for a finished run
    stopped_at = torch.load(out / "ckpt.pt", weights_only=False)["step"]
    assert 3 <= stopped_at < 60
    resumed = run(common, tmp_path, "stopped", "--init_from", "resume")["model"].state_dict()
    for k, v in resumed.items():
        assert torch.equal(v, straight[k]), k
    assert read_jsonl(out / "weights.jsonl") == read_jsonl(tmp_path / "straight" / "weights.jsonl")


def test_resume_drops_a_damaged_record_past_its_checkpoint_and_names_one_before_it(tiny_flags, tmp_path):
    flags = [*tiny_flags, "--max_iters", "4", "--eval_interval", "2"]
    run(flags, tmp_path, "straight")
    past, before = tmp_path / "past", tmp_path / "before"
    for out in (past, before):  # a run checkpointed at step 2 that went on to step 3 before it was stopped
        shutil.copytree(tmp_path / "straight", out)
        shutil.copy(out / "ckpt-0000002.pt", out / "ckpt.pt")
        (out / "ckpt-0000004.pt").unlink()
    for out, line in ((past, 3), (before, 2)):  # weights.jsonl line 4: step 3 (past step 2); line 2: step 1
        lines = (out / "weights.jsonl").read_text().splitlines(keepends=True)
        lines[line] = lines[line][:40] + "\n"
        (out / "weights.jsonl").write_text("".join(lines))
    run(flags, tmp_path, "past", "--init_from", "resume")  # dropped, as the records around it are: then written again
    assert read_jsonl(past / "weights.jsonl") == read_jsonl(tmp_path / "straight" / "weights.jsonl")
    files = lambda: {p.name: p.read_bytes() for p in before.glob("*.*") if p.name != ".lock"}  # noqa: E731
    written = files()
    msg = bad_run(flags, tmp_path, "--out_dir", str(before), "--init_from", "resume")
    assert msg.startswith(f"train.py: error: {before / 'weights.jsonl'} line 3 is damaged (") and msg.endswith(
        "), a record of the run up to its checkpoint of step 2: delete that line to resume without it")
    assert files() == written  # nothing written, args.json included


def test_keep_last_prunes_old_checkpoints(tiny_flags, tmp_path):
    run(tiny_flags, tmp_path, "k", "--max_iters", "8", "--eval_interval", "2", "--keep_last", "2")
    assert sorted(p.name for p in (tmp_path / "k").glob("ckpt*.pt")) == ["ckpt-0000006.pt", "ckpt-0000008.pt",
                                                                         "ckpt.pt"]
    assert torch.load(tmp_path / "k" / "ckpt.pt", weights_only=False)["step"] == 8


def test_non_finite_losses_skip_the_step_and_name_the_documents(tiny_flags, tmp_path, monkeypatch, capsys):
    original = train.forward_backward
    calls = []

    def poisoned(*a, **kw):  # the second step's first sample goes bad
        losses, w = original(*a, **kw)
        calls.append(1)
        if len(calls) == 2:
            losses = losses.clone()
            losses[0] = math.nan
        return losses, w

    one = run(tiny_flags, tmp_path, "one", "--max_iters", "1", "--schedule", "constant", "--warmup_iters", "0")
    monkeypatch.setattr(train, "forward_backward", poisoned)
    two = run(tiny_flags, tmp_path, "two", "--max_iters", "2", "--schedule", "constant", "--warmup_iters", "0")
    assert "non-finite loss in documents [" in capsys.readouterr().err
    log = [json.loads(line, parse_constant=lambda c: pytest.fail(f"log.jsonl holds {c}, not JSON"))
           for line in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in log if r["type"] == "train"][1] is None  # the skipped step's mean loss: null
    for k, v in two["model"].state_dict().items():  # the bad step changed nothing
        assert torch.equal(v, one["model"].state_dict()[k]), k


def test_a_diverging_run_stops_in_one_line_and_keeps_its_last_good_checkpoint(tiny_flags, tmp_path):
    """--lr 1e6 from step 4 of a good run: no checkpoint or export of the NaN model, --keep_last 1 keeps the good one,
    one line naming the learning rate and that checkpoint, exit 2."""
    import safetensors.torch
    common = [*tiny_flags, "--eval_interval", "2", "--keep_last", "1", "--schedule", "constant", "--warmup_iters", "0"]
    run(common, tmp_path, "o", "--max_iters", "4")
    out = tmp_path / "o"
    export = (out / "hf" / "model.safetensors").read_bytes()
    p = subprocess.run([sys.executable, str(ROOT / "train.py"), *common, "--out_dir", str(out), "--init_from", "resume",
                        "--max_iters", "40", "--lr", "1e6"], capture_output=True, text=True)
    errors = [line for line in p.stderr.splitlines() if not line.startswith(("step ", "train.py: warning:"))]
    assert p.returncode == 2 and len(errors) == 1, p.stderr
    assert errors[0].startswith("train.py: error: training stopped at step ") and (
        "likely cause the learning rate: lower --lr (it is 1e+06); the last checkpoint is intact "
        f"({out}/ckpt.pt, step 4: go on from it with --init_from resume)") in errors[0]
    assert sorted(p.name for p in out.glob("ckpt*.pt")) == ["ckpt-0000004.pt", "ckpt.pt"]
    ckpt = torch.load(out / "ckpt.pt", weights_only=False)
    assert ckpt["step"] == 4 and all(v.isfinite().all() for v in ckpt["model"].values())
    assert (out / "hf" / "model.safetensors").read_bytes() == export  # the export of the good run, untouched
    assert all(v.isfinite().all() for v in safetensors.torch.load_file(out / "hf" / "model.safetensors").values())


def test_steps_skipped_in_a_row_stop_the_run_naming_the_documents(tiny_flags, tmp_path, monkeypatch, capsys):
    original = train.forward_backward

    def one_bad_sample(*a, **kw):  # from the fourth step on, the first sample's loss is NaN
        losses, w = original(*a, **kw)
        calls.append(1)
        if len(calls) >= 4:
            losses = losses.clone()
            losses[0] = math.nan
        return losses, w

    calls = []
    monkeypatch.setattr(train, "forward_backward", one_bad_sample)
    with pytest.raises(SystemExit) as e:
        run(tiny_flags, tmp_path, "o", "--max_iters", "100", "--eval_interval", "1")
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(calls) == 3 + runtime.MAX_SKIPPED
    assert err[-1].startswith(f"train.py: error: training stopped at step {2 + runtime.MAX_SKIPPED}: "
                              f"{runtime.MAX_SKIPPED} steps in a row skipped; likely cause the data: documents [")
    # skipped steps leave the model as it was: checkpointed still, up to the step that stops the run
    assert f"the last checkpoint is intact ({tmp_path / 'o'}/ckpt.pt, step {2 + runtime.MAX_SKIPPED}: " in err[-1]
    assert len([line for line in err if "step skipped" in line]) == runtime.MAX_SKIPPED


def test_a_full_disk_at_a_checkpoint_is_one_line_and_exit_2(tiny_flags, tmp_path, monkeypatch, capsys):
    from test_runtime import torch_save_on_a_full_disk
    save, calls = torch.save, []
    monkeypatch.setattr(torch, "save", lambda obj, f: (calls.append(1), (save if len(calls) < 2 else
                                                                          torch_save_on_a_full_disk)(obj, f)))
    with pytest.raises(SystemExit) as e:
        run(tiny_flags, tmp_path, "o", "--max_iters", "6", "--eval_interval", "2")
    out = tmp_path / "o"
    assert e.value.code == 2 and capsys.readouterr().err.strip().splitlines() == [
        f"train.py: error: no space left on device writing {out}/ckpt.pt: the last checkpoint is intact "
        f"({out}/ckpt.pt, step 2: go on from it with --init_from resume)"]
    assert not (out / "ckpt.tmp").exists() and torch.load(out / "ckpt.pt", weights_only=False)["step"] == 2


def bad_run(tiny_flags, tmp_path, *flags):
    p = subprocess.run([sys.executable, str(ROOT / "train.py"), *tiny_flags, "--out_dir", str(tmp_path / "o"),
                        *flags], capture_output=True, text=True)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("train.py: error:"), p.stderr
    return lines[0]


def test_more_bad_input(tiny_flags, tiny_data, tmp_path):
    assert "unknown method 'focal': choose one of erm, midrank" in bad_run(tiny_flags, tmp_path, "--method", "focal")
    assert "tau" in bad_run(tiny_flags, tmp_path, "--tau", "inf")
    assert "cannot find" in bad_run(tiny_flags, tmp_path, "--pretrained", str(tmp_path / "no_such_model"))
    (tmp_path / "afile").write_text("")
    assert "cannot write to --out_dir" in bad_run(tiny_flags, tmp_path, "--out_dir", str(tmp_path / "afile" / "run"))
    run(tiny_flags, tmp_path, "r", "--max_iters", "1")
    (tmp_path / "r" / "ckpt.pt").write_bytes(b"truncated")
    msg = bad_run(tiny_flags, tmp_path, "--out_dir", str(tmp_path / "r"), "--init_from", "resume")
    assert "ckpt.pt is truncated or corrupt" in msg
    torch.save({"model_args": {"n_layer": 1}, "model": {}}, tmp_path / "r" / "ckpt.pt")
    assert "not a checkpoint" in bad_run(tiny_flags, tmp_path, "--init_from", str(tmp_path / "r"))
    empty = tmp_path / "empty"
    shutil.copytree(tiny_data, empty)
    np.savez(empty / "train_docs.npz", offsets=np.zeros(1, dtype=np.int64), ids=np.zeros(0, dtype=np.int64))
    (empty / "train.bin").write_bytes(b"")  # (its tokens too: the offsets must end where train.bin does)
    assert "no training samples" in bad_run(tiny_flags, tmp_path, "--data", str(empty))
    short = tmp_path / "short"  # a train.bin cut one byte short: the file is named, not numpy's message
    shutil.copytree(tiny_data, short)
    (short / "train.bin").write_bytes((tiny_data / "train.bin").read_bytes()[:-1])
    assert f"{short / 'train.bin'} is not a whole number of uint16 tokens" in bad_run(tiny_flags, tmp_path,
                                                                                      "--data", str(short))
    run(tiny_flags, tmp_path, "b32", "--max_iters", "1")  # a longer context than the checkpoint's positions
    assert "exceeds the model's 32 positions" in bad_run(tiny_flags, tmp_path, "--init_from", str(tmp_path / "b32"),
                                                         "--block_size", "64")


def test_a_huge_tau_logs_the_tilted_loss_as_its_limit_the_mean(tiny_flags, tmp_path):
    run(tiny_flags, tmp_path, "t", "--max_iters", "2", "--tau", "1e300")  # tau * log-mean-exp: its limit, not NaN
    log = [json.loads(line, parse_constant=lambda c: pytest.fail(f"log.jsonl holds {c}, not JSON"))
           for line in (tmp_path / "t" / "log.jsonl").read_text().splitlines()]
    train_records = [r for r in log if r["type"] == "train"]
    assert len(train_records) == 2 and all(r["tilted"] == pytest.approx(r["loss"], rel=1e-6) for r in train_records)


def test_float16_on_a_cpu_is_warned_in_one_line_naming_bfloat16(capsys):
    import cli
    cli.check(cli.get_args(["--dtype", "float16", "--device", "cpu"]), 1, False)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("train.py: warning: --dtype float16 on a CPU is slow and its loss "
                                                   "scaler skips steps") and "use --dtype bfloat16" in err
    for dtype in ("bfloat16", "auto"):
        cli.check(cli.get_args(["--dtype", dtype, "--device", "cpu"]), 1, False)
        assert capsys.readouterr().err == ""


def test_damaged_data_is_one_line_before_training(tiny_flags, tiny_data, tmp_path):
    cut, lost = tmp_path / "cut", tmp_path / "lost"
    for folder in (cut, lost):
        shutil.copytree(tiny_data, folder)
    (cut / "train.bin").write_bytes((tiny_data / "train.bin").read_bytes()[:-64])  # whole tokens: the size is fine
    (lost / "val.bin").unlink()
    msg = bad_run(tiny_flags, tmp_path, "--data", str(cut))
    assert msg.startswith(f"train.py: error: {cut / 'train.bin'} holds ") and "prepare it again with python" in msg
    msg = bad_run(tiny_flags, tmp_path, "--data", str(lost))
    assert msg.startswith(f"train.py: error: {lost / 'val.bin'} is missing") and f"--out_dir {lost}" in msg
    msg = bad_run(tiny_flags, tmp_path, "--data", str(ROOT / "README.md"))
    assert "README.md is a file, not a folder of prepared data: prepare it first with python prepare_data.py " \
           "--dataset" in msg and msg.endswith("then pass --data data/README")
    assert not (tmp_path / "o").exists()  # refused before anything was written


def test_float16_recovers_from_gradient_overflow(tiny_flags, tmp_path, monkeypatch, capsys):
    init = torch.amp.GradScaler.__init__
    monkeypatch.setattr(torch.amp.GradScaler, "__init__",  # start far too high: the first steps overflow
                        lambda self, *a, **kw: init(self, *a, **{**kw, "init_scale": 2.0 ** 26}))
    run(tiny_flags, tmp_path, "fp16", "--dtype", "float16", "--max_iters", "16", "--eval_interval", "16",
        "--batch_size", "4", "--grad_accum", "1", "--lr", "3e-3", "--warmup_iters", "0")
    out = capsys.readouterr().out
    assert "gradient overflow, step skipped" in out
    ckpt = torch.load(tmp_path / "fp16" / "ckpt.pt", weights_only=False)
    assert ckpt["scaler"]["scale"] < 2.0 ** 26
    evals = [r["val_loss"] for r in read_jsonl(tmp_path / "fp16" / "log.jsonl") if r["type"] == "eval"]
    assert evals[-1] < evals[0] - 0.05  # once the scale came down, it trained


def test_help_is_grouped_and_answers_without_torch(tmp_path):
    """--help (and a mistyped flag) come before torch is imported: a torch that fails to import is never reached."""
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("raise ImportError('torch was imported')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    p = subprocess.run([sys.executable, str(ROOT / "train.py"), "--help"], capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr
    groups = [line for line in p.stdout.splitlines() if line and not line[0].isspace() and line.endswith(":")]
    assert [g.split(":")[0] for g in groups] == ["options", "method", "data", "model", "optimisation",
                                                  "run and output", "hardware"]
    text = " ".join(p.stdout.split())
    assert "smaller = more weight on the hardest samples" in text and "--frac f --portion p is --skip p*f" in text
    assert all(name in text for name in reweight.METHODS)
    p = subprocess.run([sys.executable, str(ROOT / "train.py"), "--bacth_size", "8"], capture_output=True,
                       text=True, env=env)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        "train.py: error: unrecognized arguments: --bacth_size 8"]


def test_an_unknown_method_is_one_line_and_exit_2(tiny_flags, tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "train.py"), *tiny_flags, "--method", "midrnk", "--out_dir",
                        str(tmp_path / "run")], capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        "train.py: error: argument --method: unknown method 'midrnk': choose one of " + ", ".join(reweight.METHODS)]
    assert not (tmp_path / "run").exists()


# --- memory: one micro-batch's graph alive at a time, nothing kept past its backward -----------

class SavedTensors:
    """Tracks what autograd saves for the backward (activations; the parameters themselves aside): the most bytes
    alive at once, and whether anything is still alive afterwards."""

    def __init__(self, model):
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.alive, self.peak = [], 0

    def pack(self, t):  # the graph holds what this returns: a box, alive exactly as long as the graph keeps it
        box = SavedTensors.Box(t)
        if t.untyped_storage().data_ptr() not in self.params:
            self.alive = [r for r in self.alive if r[0]() is not None]
            self.alive.append((weakref.ref(box), t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()))
            self.peak = max(self.peak, self.live_bytes())
        return box

    class Box:
        def __init__(self, t):
            self.t = t.detach()  # not t itself: a saved output would hold its own graph (a cycle gc cannot see)

    def live_bytes(self):
        return sum(dict((ptr, n) for ref, ptr, n in self.alive if ref() is not None).values())

    def __enter__(self):
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda box: box.t)
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)


@pytest.mark.parametrize("method,dropout,by_sample,n_micro", [
    ("erm", 0.0, None, 4), ("irdro", 0.0, None, 4), ("midrank", 0.0, True, 1), ("midrank", 0.0, False, 4),
    ("midrank", 0.1, None, 4), ("random", 0.0, False, 4)])
def test_one_micro_batch_graph_at_a_time_and_nothing_outlives_its_backward(method, dropout, by_sample, n_micro,
                                                                            monkeypatch):
    monkeypatch.setattr(train, "BY_SAMPLE", by_sample)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32, dropout=dropout)).train()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(64, (16, 16), generator=g), torch.randint(64, (16, 16), generator=g)
    with SavedTensors(model) as one:  # a single micro-batch's forward: the yardstick
        model(x[:4], y[:4])[1].sum().backward()
    model.zero_grad(set_to_none=True)
    batches = [(x[i:i + 4], y[i:i + 4]) for i in range(0, 4 * n_micro, 4)]  # by_sample: a step of one
    with SavedTensors(model) as step:
        losses, w = train.forward_backward(model, batches, method, dict(tau=0.5, skip=0.25, keep=0.5), nullcontext())
    gc.collect()
    assert losses.grad_fn is None and w.grad_fn is None
    assert step.live_bytes() == 0, "a graph outlived its backward"
    assert 0 < step.peak <= 1.1 * one.peak, (step.peak, one.peak)  # never two micro-batches' graphs at once
