"""--optim adamw8bit and --param_dtype bfloat16 (torchao): why bf16 weights need stochastic rounding, that it tracks
float32 master weights in expectation, and that every choice trains, checkpoints, resumes exactly and exports."""

import json
import os
import subprocess
import sys

import pytest
import torch

import cli
import runtime
import train
from conftest import ROOT
from model import GPT, GPTConfig

torchao_optim = pytest.importorskip("torchao.optim")
CHOICES = [("adamw8bit", "float32"), ("adamw", "bfloat16"), ("adamw8bit", "bfloat16")]


@pytest.fixture
def eager_torchao(monkeypatch):
    """torchao compiles its step once per parameter shape (tens of seconds each on 2 CPU cores); run eagerly,
    the same arithmetic. A subprocess gets TORCHDYNAMO_DISABLE=1 for the same reason."""
    monkeypatch.setattr(torch, "compile", lambda fn=None, **kwargs: fn if fn is not None else (lambda f: f))
    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "1")


def one_adamw_step(p, grad, kind, lr):
    p = torch.nn.Parameter(p.clone())
    p.grad = grad.to(p.dtype)
    opt = (torch.optim.AdamW([p], lr=lr, weight_decay=0.0) if kind == "torch" else
           torchao_optim._AdamW([p], lr=lr, weight_decay=0.0, bf16_stochastic_round=True))
    opt.step()
    return p.detach()


def test_plain_bf16_weights_lose_a_small_update_and_stochastic_rounding_keeps_it(eager_torchao):
    """Adam's first step moves every weight by lr (m / sqrt(v) = 1). At 0.02 a bf16 step is 2^-13 = 1.2e-4: an update
    of lr 2e-6 rounds back to the same weight every time. Rounded stochastically, a weight moves a whole bf16 step
    with probability 2e-6 / 1.2e-4, so the mean moves by lr, up to sampling noise."""
    n, lr = 1 << 16, 2e-6
    w, g = torch.full((n,), 0.02), torch.ones(n)
    w16 = w.bfloat16()
    assert torch.equal(one_adamw_step(w16, g, "torch", lr), w16)  # plain bf16: the update is gone entirely
    assert torch.allclose(one_adamw_step(w, g, "torch", lr), w - lr, rtol=0, atol=4e-9)  # float32 keeps it
    torch.manual_seed(0)
    sr = one_adamw_step(w16, g, "torchao", lr)
    ulp = 2.0 ** -13
    moved = (w16.float() - sr.float()) / ulp
    assert set(moved.unique().tolist()) <= {0.0, 1.0}  # each weight stays or moves one bf16 step down
    sd = ulp * (lr / ulp * (1 - lr / ulp)) ** 0.5 / n ** 0.5  # of the mean of n Bernoulli steps
    assert abs((w16.float() - sr.float()).mean().item() - lr) < 5 * sd


def test_stochastic_rounding_tracks_float32_master_weights_in_expectation(eager_torchao):
    """200 AdamW steps on the same gradients: float32 weights (the reference), bf16 rounded to nearest and bf16 with
    stochastic rounding. The float32 weights drift by ~1e-4; rounded to nearest, bf16 weights never move; rounded
    stochastically, each bf16 weight random-walks about its float32 twin (the spread of independent roundings) and
    the mean error is ~0."""
    torch.manual_seed(0)
    n, lr, steps = 1 << 14, 2e-6, 200
    start = (0.01 + 0.02 * torch.rand(n)) * torch.randn(n).sign()  # |w| >= 0.01: half a bf16 step > 2e-6
    params = dict(fp32=torch.nn.Parameter(start.clone()), nearest=torch.nn.Parameter(start.bfloat16()),
                  sr=torch.nn.Parameter(start.bfloat16()))
    opts = dict(fp32=torch.optim.AdamW([params["fp32"]], lr=lr, weight_decay=0.0),
                nearest=torch.optim.AdamW([params["nearest"]], lr=lr, weight_decay=0.0),
                sr=torchao_optim._AdamW([params["sr"]], lr=lr, weight_decay=0.0, bf16_stochastic_round=True))
    drift = torch.randn(n).sign()  # each weight is pushed one way, with noise: the float32 path moves ~steps * lr
    for _ in range(steps):
        g = drift + 0.5 * torch.randn(n)
        for name, p in params.items():
            p.grad = g.to(p.dtype)
            opts[name].step()
    fp32, sr, nearest = (params[k].detach().float() for k in ("fp32", "sr", "nearest"))
    moved = (fp32 - start).abs().mean().item()
    assert moved > 1e-4
    assert torch.equal(nearest, start.bfloat16().float())  # rounded to nearest: not one of 200 updates kept
    err = sr - fp32
    ulp = torch.exp2(torch.floor(torch.log2(fp32.abs())) - 7)  # one bf16 step at each weight
    # each step rounds with an error of mean 0 and variance <= ulp * update: a random walk, not a bias
    assert err.pow(2).mean().sqrt() < 1.5 * (steps * lr * ulp).mean().sqrt()
    assert abs(err.mean().item()) < 0.02 * moved  # unbiased: the mean error is a small fraction of the drift
    assert (sr - start.bfloat16().float()).abs().mean().item() == pytest.approx(moved, rel=0.1)


def run(flags, out, *extra):
    return train.main([*flags, "--out_dir", str(out), *extra])


def read_jsonl(path):
    return [json.loads(line) for line in open(path)]


@pytest.mark.parametrize("optim,param_dtype", CHOICES)
def test_each_choice_trains_resumes_exactly_and_exports(optim, param_dtype, tiny_flags, tmp_path, eager_torchao):
    transformers = pytest.importorskip("transformers")
    common = [*tiny_flags, "--optim", optim, "--param_dtype", param_dtype, "--method", "irdro", "--batch_size", "4",
              "--eval_interval", "2", "--warmup_iters", "1"]  # a schedule: the lr tensor of torchao is set each step
    straight = run(common, tmp_path / "a", "--max_iters", "4")["model"]
    run(common, tmp_path / "b", "--max_iters", "2")
    ckpt = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)
    state = next(iter(ckpt["optimizer"]["state"].values()))
    assert all(v.dtype == getattr(torch, param_dtype) for v in ckpt["model"].values())
    if optim == "adamw8bit":  # the matrices' moments are torchao's 8-bit tensors
        assert any(type(s["exp_avg"]).__name__ == "OptimState8bit" for s in ckpt["optimizer"]["state"].values())
    assert "exp_avg" in state
    resumed = run(common, tmp_path / "b", "--max_iters", "4", "--init_from", "resume")["model"]
    for (k, v), w in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert v.dtype == getattr(torch, param_dtype) and torch.equal(v, w), k
    assert read_jsonl(tmp_path / "a" / "weights.jsonl") == read_jsonl(tmp_path / "b" / "weights.jsonl")
    key = "transformer.h.0.mlp.c_fc.weight"  # steps 3-4 moved the weights (bf16 too: rounding kept the updates)
    assert not torch.equal(ckpt["model"][key], straight.state_dict()[key])
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "a" / "hf").float().eval()
    x = torch.randint(100, (2, 16))
    with torch.no_grad():
        assert (back(x).logits - straight.float().eval().logits(x)).abs().max() < 1e-4


def test_resume_with_another_optimizer_or_weight_dtype_is_one_line(tiny_flags, tmp_path, eager_torchao):
    run([*tiny_flags, "--optim", "adamw8bit"], tmp_path / "r", "--max_iters", "2", "--eval_interval", "2")
    for flags, saved in ((["--optim", "adamw"], "--optim adamw differs from the resumed run's adamw8bit"),
                         (["--param_dtype", "bfloat16"], "--param_dtype bfloat16 differs from the resumed run's float32")):
        p = subprocess.run([sys.executable, str(ROOT / "train.py"), *tiny_flags, "--out_dir", str(tmp_path / "r"),
                            "--init_from", "resume", "--max_iters", "4", *flags], capture_output=True, text=True)
        assert p.returncode == 2 and saved in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    # the saved choice is the resumed run's default: --init_from resume alone goes on with 8-bit moments
    resumed = run([*tiny_flags, "--init_from", "resume", "--max_iters", "3"], tmp_path / "r")
    assert json.loads((tmp_path / "r" / "args.json").read_text())["segments"][-1]["args"]["optim"] == "adamw8bit"
    assert resumed["val_loss"] is not None


def test_without_torchao_the_choice_names_the_pip_command(tiny_flags, tmp_path, monkeypatch, capsys):
    import importlib.util
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else find_spec(name, *a))
    with pytest.raises(SystemExit) as e:
        run([*tiny_flags, "--optim", "adamw8bit"], tmp_path / "o")
    err = capsys.readouterr().err
    assert e.value.code == 2 and "pip install torchao" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()  # refused before anything was written


@pytest.mark.parametrize("flags,message", [
    (["--optim", "adamw8bit", "--fsdp"], "--fsdp"),
    (["--param_dtype", "bfloat16", "--dtype", "float32"], "--param_dtype bfloat16 computes in bfloat16"),
    (["--param_dtype", "bfloat16", "--dtype", "float16"], "--param_dtype bfloat16 computes in bfloat16")])
def test_choices_that_cannot_work_are_refused(flags, message, tiny_flags):
    args = cli.get_args([*tiny_flags, *flags])
    with pytest.raises(ValueError, match=message):
        cli.check(args, 2, distributed=True)


def test_bf16_weights_compute_in_bf16(tiny_flags):
    assert cli.get_args([*tiny_flags, "--param_dtype", "bfloat16"]).dtype == "bfloat16"  # auto follows the weights
    assert cli.get_args(tiny_flags).dtype == "auto"


def test_stochastic_rounding_leaves_the_global_generator_as_it_was(eager_torchao):
    """The rounding draws its bits from a generator seeded by (seed, step count): dropout's stream is untouched."""
    torch.manual_seed(5)
    model = GPT(GPTConfig(block_size=8, vocab_size=64, n_layer=1, n_head=2, n_embd=32)).bfloat16()
    opt = model.configure_optimizer(0.0, 1e-3, (0.9, 0.999), "cpu", "all")
    runtime.seed_rounding(opt, 7, torch.device("cpu"))
    x = torch.randint(64, (2, 8))
    model(x, x)[1].sum().backward()
    before = torch.get_rng_state()
    opt.step()
    assert torch.equal(torch.get_rng_state(), before)


def test_ddp_replicas_round_alike(tiny_flags, tmp_path, eager_torchao):
    """Under DDP every rank steps its own replica: their bf16 rounding must draw the same bits, or the replicas drift
    apart (the global generators are seeded per rank, for dropout). Each rank saves its weights after the run."""
    script = tmp_path / "ranks.py"
    script.write_text(f"import os, sys, torch\nsys.path.insert(0, {str(ROOT)!r})\nimport train\n"
                      "res = train.main(sys.argv[1:])\n"
                      f"torch.save(res['model'].state_dict(), {str(tmp_path)!r} + f\"/rank{{os.environ['RANK']}}.pt\")\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(script), *tiny_flags, "--param_dtype", "bfloat16", "--method", "irdro", "--batch_size", "2",
                        "--max_iters", "3", "--eval_interval", "3", "--out_dir", str(tmp_path / "o")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(v.dtype == torch.bfloat16 for v in a.values())
