"""train.py under torchrun: 2 CPU processes (gloo), DDP and FSDP2, against 1 process with the same effective batch.

The claim tested: the weights of every method are those of the GLOBAL effective batch, so
2 processes x grad_accum 2 take the same steps as 1 process x grad_accum 4, up to float rounding."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

import memory
import runtime
import train
from model import GPT, GPTConfig

ROOT = train.Path(train.__file__).parent
# method flags; "midrank_one" keeps a single sample of 8, so one rank has nothing to backpropagate
METHODS = {"erm": ["--method", "erm"], "irdro": ["--method", "irdro", "--tau", "0.1"],
           "midrank": ["--method", "midrank", "--skip", "0.125", "--keep", "0.5"],
           "midrank_one": ["--method", "midrank", "--skip", "0.25", "--keep", "0.125"],
           "quadratic": ["--method", "quadratic", "--tau", "1.0"], "random": ["--method", "random", "--keep", "0.5"]}
STEPS = ["--max_iters", "3", "--warmup_iters", "0", "--eval_interval", "3", "--dropout", "0"]


def torchrun(flags, nproc=2, script="train.py", timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(nproc), script, *flags], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def read_jsonl(path):
    return [json.loads(line) for line in open(path)]


def assert_same_run(a, b, atol):
    """Two out_dirs: the same parameters (within atol), the same per-sample losses, weights and documents."""
    pa, pb = (torch.load(d / "ckpt.pt", weights_only=False)["model"] for d in (a, b))
    assert pa.keys() == pb.keys()
    for k in pa:
        assert torch.allclose(pa[k], pb[k], rtol=0, atol=atol), k
    wa, wb = read_jsonl(a / "weights.jsonl"), read_jsonl(b / "weights.jsonl")
    assert [r["step"] for r in wa] == [r["step"] for r in wb]
    for ra, rb in zip(wa, wb):
        assert ra["doc"] == rb["doc"]
        assert torch.allclose(torch.tensor(ra["loss"]), torch.tensor(rb["loss"]), atol=1e-5)
        assert torch.allclose(torch.tensor(ra["weight"]), torch.tensor(rb["weight"]), atol=1e-5)


needs_fsdp_on_cpu = pytest.mark.skipif(not runtime.FSDP_ON_CPU, reason="FSDP2 on CPU needs torch >= 2.7")


# FSDP runs the two methods that touch gradients between micro-batches (irdro) or skip a rank's backward
@pytest.mark.parametrize("method,shard", [(m, "ddp") for m in METHODS] + [
    pytest.param("irdro", "fsdp", marks=needs_fsdp_on_cpu), pytest.param("midrank_one", "fsdp", marks=needs_fsdp_on_cpu)])
def test_two_processes_take_the_steps_of_one(method, shard, tiny_flags, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    train.main(tiny_flags + METHODS[method] + STEPS + ["--batch_size", "2", "--grad_accum", "4", "--out_dir", str(one)])
    res = torchrun(tiny_flags + METHODS[method] + STEPS + ["--batch_size", "2", "--grad_accum", "2",
                                                           "--out_dir", str(two)] + (["--fsdp"] if shard == "fsdp" else []))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "x 2 processes" in res.stdout
    # Adam's update lr * m / (sqrt(v) + eps) amplifies the rounding of the accumulation order for gradient
    # entries near eps by up to ~1e-3 of a step of lr 1e-3; three steps here
    assert_same_run(one, two, atol=3e-5)
    log = read_jsonl(two / "log.jsonl")  # rank 0 alone writes: one record per step and evaluation
    assert [r["step"] for r in log if r["type"] == "train"] == [0, 1, 2]
    if method == "midrank_one":
        assert all(sum(w > 0 for w in r["weight"]) == 1 for r in read_jsonl(two / "weights.jsonl"))


@pytest.mark.parametrize("method,shard", [("rholoss", "ddp"), ("excess_irdro", "ddp"),
                                          pytest.param("excess_irdro", "fsdp", marks=needs_fsdp_on_cpu)])
def test_two_processes_against_a_reference_take_the_steps_of_one(method, shard, tiny_flags, tiny_ref, tmp_path):
    """--ref_model: each rank scores its own samples with the reference (whole on every rank, also under FSDP), and
    the weights are those of the global batch, the ranks' reference losses gathered as their losses are."""
    one, two = tmp_path / "one", tmp_path / "two"
    flags = tiny_flags + ["--method", method, *{"rholoss": ["--keep", "0.5"], "excess_irdro": ["--tau", "0.1"]}[method],
                          "--ref_model", str(tiny_ref)] + STEPS
    train.main(flags + ["--batch_size", "2", "--grad_accum", "4", "--out_dir", str(one)])
    res = torchrun(flags + ["--batch_size", "2", "--grad_accum", "2", "--out_dir", str(two)] +
                   (["--fsdp"] if shard == "fsdp" else []))
    assert res.returncode == 0, res.stderr[-3000:]
    assert_same_run(one, two, atol=3e-5)
    for ra, rb in zip(read_jsonl(one / "weights.jsonl"), read_jsonl(two / "weights.jsonl")):
        assert len(ra["ref_loss"]) == 8 and torch.allclose(torch.tensor(ra["ref_loss"]), torch.tensor(rb["ref_loss"]),
                                                           atol=1e-5)


@needs_fsdp_on_cpu
def test_resume_across_world_sizes(tiny_flags, tmp_path):
    """FSDP on 2 processes for 2 steps, DDP on 2 processes for 1 more, 1 process for the last:
    the same as 4 steps in 1 process. Checkpoints hold the full state, whatever wrote them."""
    flags = tiny_flags + METHODS["irdro"] + ["--warmup_iters", "0", "--eval_interval", "1", "--batch_size", "2",
                                             "--schedule", "constant", "--out_dir"]
    straight, parts = tmp_path / "straight", tmp_path / "parts"
    train.main(flags + [str(straight), "--grad_accum", "4", "--max_iters", "4"])
    res = torchrun(flags + [str(parts), "--grad_accum", "2", "--max_iters", "2", "--fsdp"])
    assert res.returncode == 0, res.stderr[-3000:]
    res = torchrun(flags + [str(parts), "--grad_accum", "2", "--max_iters", "3", "--init_from", "resume"])
    assert res.returncode == 0, res.stderr[-3000:]
    train.main(flags + [str(parts), "--grad_accum", "4", "--max_iters", "4", "--init_from", "resume"])
    assert_same_run(straight, parts, atol=4e-5)


def test_sigterm_under_torchrun_checkpoints_every_rank_at_one_step_and_resumes(tiny_flags, tmp_path):
    """torchrun passes SIGTERM to its processes, which may see it at different moments: they agree on the
    step to stop at, rank 0 checkpoints it, all exit; resuming then equals a straight run."""
    flags = tiny_flags + METHODS["irdro"] + ["--batch_size", "2", "--warmup_iters", "0", "--schedule", "constant",
                                             "--eval_interval", "1000"]
    parts, straight = tmp_path / "parts", tmp_path / "straight"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py",
           *flags, "--grad_accum", "2", "--max_iters", "1000", "--out_dir", str(parts)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        if line.startswith("step 3/"):
            proc.send_signal(signal.SIGTERM)
            break
    out = proc.communicate(timeout=120)[0]
    assert "stopped by" in out
    k = torch.load(parts / "ckpt.pt", weights_only=False)["step"]
    assert 3 <= k < 1000
    res = torchrun(flags + ["--grad_accum", "2", "--max_iters", str(k + 2), "--init_from", "resume",
                            "--out_dir", str(parts)])
    assert res.returncode == 0, res.stderr[-3000:]
    train.main(flags + ["--grad_accum", "4", "--max_iters", str(k + 2), "--out_dir", str(straight)])
    assert_same_run(straight, parts, atol=1e-5 * (k + 2))


def test_an_error_in_one_rank_ends_all_of_them(tiny_flags, tmp_path):
    """Rank 1 fails in its third step; rank 0 must not wait for it forever, and the error must show."""
    script = tmp_path / "fail_rank1.py"
    script.write_text(f"""import os, sys
sys.path.insert(0, {str(ROOT)!r})
import train
calls = []
get_batch = train.get_batch
def failing_get_batch(*args):
    calls.append(1)
    if os.environ["RANK"] == "1" and len(calls) == 5:
        raise RuntimeError("disk on fire in rank 1")
    return get_batch(*args)
train.get_batch = failing_get_batch
train.main()
""")
    res = torchrun(tiny_flags + METHODS["irdro"] + ["--max_iters", "50", "--batch_size", "2", "--grad_accum", "2",
                                                    "--out_dir", str(tmp_path / "out")], script=str(script), timeout=240)
    assert res.returncode != 0
    assert "disk on fire in rank 1" in res.stderr


def test_fsdp_needs_torchrun(tiny_flags, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(tiny_flags + ["--fsdp", "--out_dir", str(tmp_path / "x")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "torchrun" in err


def test_fsdp_on_cpu_before_torch_2_7_is_refused(tiny_flags, tmp_path, monkeypatch):
    monkeypatch.setattr(runtime, "FSDP_ON_CPU", False)  # what torch 2.6 says
    args = train.cli.get_args(tiny_flags + ["--fsdp", "--out_dir", str(tmp_path / "x")])
    with pytest.raises(ValueError, match="--fsdp on CPU needs torch >= 2.7"):
        train.cli.check(args, 2, distributed=True)


CUSTOM_METHOD_SCRIPT = """import os, sys
sys.path.insert(0, {root!r})
sys.path.insert(0, {tests!r})
from contextlib import nullcontext
import torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
import reweight, train
from test_train import cube_root, sharpened, tiny_model
for fn in (cube_root, sharpened):  # methods added from outside: train.py knows nothing of them
    setattr(reweight, fn.__name__, fn)
reweight.METHODS += ("cube_root", "sharpened")
dist.init_process_group("gloo")
rank = dist.get_rank()
g = torch.Generator().manual_seed(0)
x, y = torch.randint(64, (8, 16), generator=g), torch.randint(64, (8, 16), generator=g)
out = {{}}
for name in ("cube_root", "sharpened"):
    model = tiny_model()
    ddp = DDP(model)
    own = slice(4 * rank, 4 * rank + 4)  # this rank's half of the 8 samples, as 4 micro-batches of 1
    batches = [(x[own][i:i + 1], y[own][i:i + 1]) for i in range(4)]
    losses, w = train.forward_backward(ddp, batches, name, dict(tau=0.1, skip=0.0, keep=0.5), nullcontext())
    out[name] = dict(w=w, grads=[p.grad.clone() for p in model.parameters()])
if rank == 0:
    torch.save(dict(out, x=x, y=y), {out!r})
dist.barrier()
dist.destroy_process_group()
"""


def test_a_method_added_in_reweight_is_exact_under_torchrun(tmp_path):
    """2 processes x grad_accum 4 with methods added in a test (one streamed, one scored): the gradient of
    the float64 whole-batch reference, with the weights of the global batch."""
    from test_train import cube_root, float64_reference, sharpened, tiny_model
    script, out = tmp_path / "custom.py", tmp_path / "grads.pt"
    script.write_text(CUSTOM_METHOD_SCRIPT.format(root=str(ROOT), tests=str(ROOT / "tests"), out=str(out)))
    res = torchrun([], script=str(script))
    assert res.returncode == 0, res.stderr[-3000:]
    got = torch.load(out, weights_only=False)
    for fn, hp in ((cube_root, dict(keep=0.5)), (sharpened, dict(tau=0.1))):
        ref, w_ref = float64_reference(tiny_model(), got["x"], got["y"], lambda l: fn(l, **hp))
        assert torch.allclose(got[fn.__name__]["w"], w_ref, atol=1e-6)
        for g, r in zip(got[fn.__name__]["grads"], ref):
            assert torch.allclose(g, r, rtol=1e-4, atol=1e-6)


@needs_fsdp_on_cpu
def test_fsdp_with_a_sharded_untied_head_takes_the_steps_of_one_process(tiny_llama_data, tiny_llama_ckpt, tmp_path):
    """A LLaMA checkpoint (untied head): under FSDP the head is a unit of its own and the chunked loss is its
    forward; in chunks of 5 tokens (several per sample), the steps equal one process's."""
    flags = ["--pretrained", str(tiny_llama_ckpt), "--data", str(tiny_llama_data), "--block_size", "32",
             "--eval_samples", "8", "--device", "cpu", "--no-compile", "--loss_chunk", "5", "--lr", "1e-3",
             "--weight_decay", "0.1", "--batch_size", "2"] + METHODS["irdro"] + STEPS
    one, two = tmp_path / "one", tmp_path / "two"
    train.main(flags + ["--grad_accum", "4", "--out_dir", str(one)])
    res = torchrun(flags + ["--grad_accum", "2", "--out_dir", str(two), "--fsdp"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert_same_run(one, two, atol=3e-5)



# GPT-2-like (LayerNorm, learned positions, tied head) and LLaMA-like (RMSNorm, RoPE, SwiGLU, untied head)
PRECISION_CONFIGS = dict(
    gpt2=GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32),
    llama=GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, bias=False,
                    norm="rmsnorm", pos="rope", mlp="swiglu", mlp_hidden=48, tie_embeddings=False))

PRECISION_SCRIPT = """import sys
sys.path.insert(0, {root!r})
import torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
import runtime, train
from model import GPT, Block, GPTConfig
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(1)
x, y = torch.randint(64, (8, 16)), torch.randint(64, (8, 16))
own = slice(4 * rank, 4 * rank + 4)  # this rank's half of the 8 samples, as 2 micro-batches of 2
batches = [(x[own][i:i + 2], y[own][i:i + 2]) for i in (0, 2)]
ctx, _ = runtime.precision("bfloat16", torch.device("cpu"))
out = {{}}
for name, config in {configs}.items():
    for shard in ("ddp", "fsdp"):
        torch.manual_seed(0)
        raw = GPT(config)
        raw.loss_chunk = 5  # several chunks per sample: the head's gradient is summed over them
        seen = {{}}  # the dtypes each module computes with: its parameters as gathered; a block's input
        def record(m, args, prefix):
            seen.update({{prefix + k: p.dtype for k, p in m.named_parameters(recurse=False)}})
            if isinstance(m, Block):
                seen[prefix + "(input)"] = args[0].dtype
        for prefix, m in raw.named_modules():
            m.register_forward_pre_hook(lambda m, args, prefix=prefix + ".": record(m, args, prefix.lstrip(".")))
        model = DDP(raw) if shard == "ddp" else runtime.shard_or_move(raw, torch.device("cpu"), "bfloat16", True)
        losses, _ = train.forward_backward(model, batches, "irdro", dict(tau=0.5), ctx)
        grads = {{k: getattr(p.grad, "full_tensor", lambda: p.grad)() for k, p in raw.named_parameters()}}
        out[name, shard] = dict(losses=losses, grads=grads, seen=seen)
if rank == 0:
    torch.save(out, {out!r})
dist.barrier()
dist.destroy_process_group()
"""


@needs_fsdp_on_cpu
def test_ddp_and_fsdp_compute_alike_under_bf16_autocast(tmp_path):
    """One precision story (docs/training.md, Precision): FSDP gathers the blocks' matmul weights in bf16, the values
    autocast makes of the float32 weights under DDP, and the rest (embeddings, norms, head) in float32, so that the
    residual stream stays float32 as under DDP. 2 processes under bf16 autocast then give DDP's per-sample losses and
    gradients up to float32 rounding, far inside bf16's own error (bf16 and float32 differ here by ~1e-4 in the losses
    and ~7e-3 in the gradients; the bf16 residual stream FSDP had made it differ from DDP by 4e-4 and 1e-2)."""
    script, out = tmp_path / "precision.py", tmp_path / "precision.pt"
    configs = "dict(" + ", ".join(f"{k}={c!r}" for k, c in PRECISION_CONFIGS.items()) + ")"
    script.write_text(PRECISION_SCRIPT.format(root=str(ROOT), configs=configs, out=str(out)))
    res = torchrun([], script=str(script))
    assert res.returncode == 0, res.stderr[-3000:]
    got = torch.load(out, weights_only=False)
    for name, config in PRECISION_CONFIGS.items():
        ddp, fsdp = got[name, "ddp"], got[name, "fsdp"]
        assert ddp["losses"].dtype == fsdp["losses"].dtype == torch.float32
        assert (ddp["losses"] - fsdp["losses"]).abs().max() <= 1e-6, name
        for k, g in ddp["grads"].items():
            assert (fsdp["grads"][k] - g).norm() <= 1e-5 * g.norm(), (name, k)
        for k, dtype in fsdp["seen"].items():
            matmul = (".attn." in k or ".mlp." in k) and "(input)" not in k
            assert dtype == (torch.bfloat16 if matmul else torch.float32), (name, k)
            assert ddp["seen"][k] == torch.float32, (name, k)
        assert_memory_counts_the_gathers(GPT(config), fsdp["seen"])


def assert_memory_counts_the_gathers(model, seen):
    """memory.py's FSDP weight copies are what FSDP gathered, in the dtypes it gathered them in: the root's parameters
    all step, two blocks' matmul weights at a time and one block's float32 gradient."""
    numel = {k: p.numel() for k, p in model.named_parameters()}
    gathered = {k: n * seen[k].itemsize for k, n in numel.items()}
    matmuls = [k for k in numel if ".attn." in k or ".mlp." in k]
    block = [k for k in matmuls if k.startswith("transformer.h.0.")]
    want = (sum(b for k, b in gathered.items() if k not in matmuls) + 2 * sum(gathered[k] for k in block)
            + 4 * sum(numel[k] for k in block))
    assert memory.weight_copy_bytes(model, memory.Run(fsdp=True, world=2), 4, 2) == want
