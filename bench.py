"""
Benchmark: the optimizer-step time of erm, midrank and irdro, side by side in one run, on the same
model, data and effective batch (with gradient accumulation), and their ratios to ERM.

    python bench.py                          # defaults: train.py's default model and batch
    python bench.py --batch_size 8 --grad_accum 4 --steps 20
    python bench.py --vs-hf                  # our training step vs transformers' on OPT / LLaMA shapes
    python bench.py --vs-nanogpt ../nanoGPT  # nanoGPT's CPU quick start vs our default run, back to back
    python bench.py --loss 2048,256,128256   # the per-sample loss alone: full logits, ours, torch's
    python bench.py --gpu                    # the GPU check, one call, < 5 min (--device cpu: its CPU mode)

Methods are interleaved step by step (mean, erm, midrank, irdro, mean, ...) so that a slow moment of the
machine hits all of them alike; the median step time of each is reported. "mean" is the plain step with no
weights at all (loss.mean() of each micro-batch, backward): the floor that the methods' steps are held to.
A method that scores against a reference model (`--methods erm rholoss excess_irdro`) gets a frozen copy of the
benchmarked model as its reference (--ref_model is not read): its step time includes the reference's forward passes.

--vs-hf times the training step (per-sample loss, IR-DRO weights, backward, optimizer step) of our model (with
AdamW, and with torchao's AdamW8bit where installed) and of transformers' (its logits, the per-sample loss from
them, the official torch.optim.AdamW) on the same random OPT-125m and Llama-3-vocabulary checkpoints and inputs.
Each side also runs in a fresh process that loads the checkpoint from disk, so that its memory (max RSS on CPU,
max allocated on CUDA, above what the process held before loading) is its own.

--loss T,C,V times the per-sample loss alone, forward and backward, in its three forms: from full logits, ours
(loss.py, chunked) and torch's F.linear_cross_entropy (torch 2.13+), each in a process of its own for its memory.

--gpu runs the check a GPU machine lent for minutes needs to run once (docs/benchmarks.md): ours vs transformers
compiled in bf16 at the OPT-125m and Llama-3.2-1B shapes (tok/s, MFU, peak memory, compile time); IR-DRO and
MidRanking against ERM with the graphs torch.compile made for each; the loss's memory at 16k tokens x 128256; a
50-step train.py --pretrained run. Each part runs in processes of its own within a share of --budget seconds, in
that order, and one that runs out of time is cut short with a note; --out gets gpu-check.json and gpu-check.md,
rewritten after every part. It needs no datasets, torchao or network. With --device cpu the same code runs on
tiny shapes in float32 with dynamo's eager backend (seconds to minutes: tests/test_bench.py), measuring nothing.

--vs-nanogpt DIR runs, in a clone of https://github.com/karpathy/nanoGPT, the CPU quick start of its README
(train_shakespeare_char at 4 layers of 128, block 64, batch 12, 2000 iterations, dropout 0, no compile) on our
built-in corpus as characters (the tokens of data/shakespeare-char, written beside its own data as
data/shakespeare_char_ours), then our default `python train.py --method irdro --tau 1.0`: the wall clock of
each whole process (imports included) and the val losses each printed.
"""

import argparse
import copy
import json
import os
import pickle
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch

import cli
import hf
import prepare_data
import reference
import reweight
import runtime
import train
from model import GPT, LOGITS_PER_CHUNK, per_sample_cross_entropy


FORMS = ("midrank-plain", "midrank-bysample")  # MidRanking with train.BY_SAMPLE forced off, on


def main():
    p = cli.build_parser(__doc__)  # the model, data and method flags of train.py, same defaults
    p.add_argument("--methods", nargs="+", default=["erm", "midrank", "irdro"],
                   choices=reweight.METHODS + FORMS, help="methods to time, beside the plain mean step and erm (the "
                   "ratios are to erm), each as train.py takes it; midrank-plain and midrank-bysample: MidRanking with "
                   "train.BY_SAMPLE forced off and on (the measurement behind train.by_sample_wins); rholoss and "
                   "excess_irdro: against a frozen copy of the model as their reference, its forward passes timed")
    p.add_argument("--steps", type=int, default=10, help="timed steps per method")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per method first")
    p.add_argument("--vs-hf", dest="vs_hf", action="store_true", help="ours vs transformers, see above")
    p.add_argument("--vs-hf-worker", dest="worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--vs-nanogpt", dest="nanogpt", default=None, metavar="DIR", help="a nanoGPT clone, see above")
    p.add_argument("--loss", dest="loss_shape", default=None, metavar="TOKENS,WIDTH,VOCAB", help="the per-sample "
                   "loss alone (forward and backward) of that shape: full logits, ours (loss.py) and torch's "
                   "F.linear_cross_entropy (torch 2.13+), e.g. 2048,256,128256")
    p.add_argument("--loss-worker", dest="loss_worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--gpu", action="store_true", help="the GPU check, see above (--device cpu: its CPU mode)")
    p.add_argument("--out", dest="gpu_out", default="out/gpu-check", help="--gpu: where gpu-check.json/.md go")
    p.add_argument("--budget", type=float, default=280, help="--gpu: seconds for the whole check, shared by its parts")
    p.add_argument("--parts", dest="gpu_parts", nargs="+", default=list(GPU_PARTS), choices=list(GPU_PARTS),
                   help="--gpu: the parts to run (in their order)")
    p.add_argument("--compile-backend", dest="compile_backend", default="inductor", help=argparse.SUPPRESS)
    p.add_argument("--methods-worker", dest="methods_worker", default=None, help=argparse.SUPPRESS)
    args = cli.get_args(parser=p)
    if args.methods_worker:
        return methods_worker(args)
    if args.gpu:
        return gpu_check(args)
    if args.nanogpt:
        return vs_nanogpt(Path(args.nanogpt))
    if args.loss_worker:
        return loss_worker(args)
    if args.loss_shape:
        return vs_loss(args)
    if args.worker:
        return vs_hf_worker(args)
    if args.vs_hf:
        return vs_hf(args)

    device = runtime.pick_device(args.device)
    dtype = runtime.pick_dtype(args.dtype, device)
    ctx = nullcontext() if dtype == "float32" else torch.autocast(device.type, dtype=getattr(torch, dtype))
    data_dir = prepare_data.ensure_prepared(Path(args.data))
    data = train.load_split(data_dir, "train", args.block_size)
    torch.manual_seed(0)
    model = GPT(cli.scratch_config(args, data["meta"]["vocab_size"])).to(device)
    optimizer = model.configure_optimizer(0.1, 1e-4, (0.9, 0.95), device.type)
    n_params = model.num_params()
    scores_ref = any(reference.takes(m.partition("-")[0]) for m in args.methods)  # frozen, as --ref_model's is
    ref_model = reference.place(copy.deepcopy(model).eval().requires_grad_(False) if scores_ref else None, device,
                                args.compile)
    if args.compile:
        model = torch.compile(model)
    n = args.batch_size * args.grad_accum

    def batches_of(k):  # step k's micro-batches, the same for every method
        samples = train.step_samples(0, k, n, len(data["start"]))
        return [train.get_batch(data, samples[i:i + args.batch_size], args.block_size, device)
                for i in range(0, n, args.batch_size)]

    methods = ("mean", "erm", *[m for m in args.methods if m != "erm"])  # erm: the reference of every ratio
    times, peak, _ = time_methods(model, optimizer, batches_of, methods, cli.method_hparams(args), ctx, device,
                                  args.warmup, args.steps, ref_model)
    kept = reweight.midrank_counts(n, args.skip, args.keep, args.frac, args.portion)[1]
    print(f"{device} {dtype} | {n_params / 1e6:.2f}M params | "
          f"batch {n} = {args.batch_size} x {args.grad_accum} of {args.block_size} tokens | "
          f"midrank keeps {kept}/{n}, irdro tau {args.tau} | {args.steps} steps, median")
    erm = statistics.median(times["erm"])
    for m in methods:
        t = statistics.median(times[m])
        mem = f" | peak {peak[m] / 2**20:.0f} MiB" if peak[m] is not None else ""
        print(f"{m:13s} {t * 1000:8.1f} ms/step | {n * args.block_size / t / 1e3:7.1f}k tok/s | "
              f"{t / erm:.3f}x erm{mem}")


def plain_mean(model, batches, ctx):
    """The cheapest ERM step, for reference: no weights at all, loss.mean() of each micro-batch."""
    n = sum(len(x) for x, _ in batches)
    for x, y in batches:
        with ctx:
            loss = model(x, y)[1]
        (loss.sum() / n).backward()
    return loss


def method_step(model, optimizer, batches, method, hparams, ctx, device, ref_model=None):
    """One optimizer step of `method` on `batches`, as train.py takes it (train.forward_backward, after the reference's
    losses for a method that takes them), or "mean" (no weights), or "midrank-plain" / "midrank-bysample" (by_sample
    forced off / on): -> its seconds."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    if method == "mean":
        losses = plain_mean(model, batches, ctx)
    else:
        method, _, form = method.partition("-")
        train.BY_SAMPLE = {"plain": False, "bysample": True}.get(form)  # None: by train.by_sample_wins's rule
        if reference.takes(method):  # as train.py's loop: the reference's forward passes, then the step
            hparams = dict(hparams, ref_losses=reference.losses(ref_model, batches, ctx))
        losses, w = train.forward_backward(model, batches, method, hparams, ctx)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    losses.cpu()
    sync()
    return time.perf_counter() - t0


def time_methods(model, optimizer, batches_of, methods, hparams, ctx, device, warmup, steps, ref_model=None):
    """The methods interleaved step by step on the same batches (batches_of(k): step k's micro-batches), so that a
    slow moment of the machine hits all of them alike. -> ({method: timed step seconds}, {method: peak bytes, None
    off CUDA}, {method: (graphs compiled in its warm-up steps, graphs compiled in its timed steps)}): torch.compile's
    graph count (dynamo's counters["stats"]["unique_graphs"], in torch 2.0 to 2.13 alike), so that a graph compiled
    after the warm-up, a recompile, is seen and pinned on the method whose step made it."""
    from torch._dynamo.utils import counters
    times, peak, graphs = ({m: [] for m in methods}, dict.fromkeys(methods), {m: [0, 0] for m in methods})
    for k in range(warmup + steps):
        batches = batches_of(k)
        for m in methods:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            before = counters["stats"]["unique_graphs"]
            dt = method_step(model, optimizer, batches, m, hparams, ctx, device, ref_model)
            graphs[m][k >= warmup] += counters["stats"]["unique_graphs"] - before
            if k >= warmup:
                times[m].append(dt)
            if device.type == "cuda":
                peak[m] = max(peak[m] or 0, torch.cuda.max_memory_allocated())
    return times, peak, graphs


# --- ours vs nanoGPT ----------------------------------------------------------

NANOGPT_QUICK_START = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20",
                       "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4",
                       "--n_embd=128", "--max_iters=2000", "--lr_decay_iters=2000", "--dropout=0.0"]  # its README's


def vs_nanogpt(clone, ours_flags=("--method", "irdro", "--tau", "1.0")):
    """Wall clock and val losses of nanoGPT's CPU quick start in `clone` and of our run, back to back."""
    if not (clone / "train.py").is_file() or not (clone / NANOGPT_QUICK_START[0]).is_file():
        print(f"bench.py: error: {clone} is not a nanoGPT clone (no train.py, {NANOGPT_QUICK_START[0]}): "
              "git clone https://github.com/karpathy/nanoGPT", file=sys.stderr)
        sys.exit(2)
    ours = prepare_data.ensure_prepared(prepare_data.DEFAULT_DATA_DIR)
    data = clone / "data" / "shakespeare_char_ours"  # beside nanoGPT's own shakespeare_char, which stays as it is
    data.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):  # nanoGPT reads uint16 token ids and, from meta.pkl, the vocabulary size
        shutil.copyfile(ours / f"{split}.bin", data / f"{split}.bin")
    with open(data / "meta.pkl", "wb") as f:
        pickle.dump(dict(vocab_size=json.loads((ours / "meta.json").read_text())["vocab_size"]), f)
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, cmd, cwd, evals in (
                ("nanoGPT", NANOGPT_QUICK_START + ["--dataset=shakespeare_char_ours", f"--out_dir={tmp}/nanogpt"],
                 clone, r"step (\d+): train loss \S+, val loss ([\d.]+)"),
                ("ours", list(ours_flags) + ["--out_dir", f"{tmp}/ours"], Path(__file__).parent,
                 r"==> step (\d+): val loss ([\d.]+)")):
            t0 = time.perf_counter()
            res = subprocess.run([sys.executable, "train.py"] + cmd, cwd=cwd, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            runs[name] = wall, [(int(s), float(v)) for s, v in re.findall(evals, res.stdout)]
            if res.returncode or not runs[name][1]:
                last = (res.stderr.strip().splitlines() or ["no evaluation printed"])[-1]
                sys.exit(f"bench.py: {name} failed (exit {res.returncode}, {cwd}): {last}")
    for name, (wall, evals) in runs.items():
        (s0, v0), (s1, v1) = evals[0], evals[-1]
        print(f"{name:8s} {wall:6.1f} s | val loss {v0:.3f} at step {s0} -> {v1:.3f} at step {s1} "
              f"({1 - v1 / v0:.0%} lower) | {wall / runs['nanoGPT'][0]:.2f}x nanoGPT's time")
    return runs


# --- ours vs transformers ------------------------------------------------------

def hf_shapes():
    import transformers  # only the benchmark needs it
    return {
        "OPT-125m": transformers.OPTConfig(),  # the defaults are opt-125m: 768 wide, 12 layers, vocab 50272, tied
        "Llama-3 vocabulary, 4 x 512, GQA 8/2": transformers.LlamaConfig(  # 143M parameters, 92% of them in the
            hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,  # untied tables
            num_key_value_heads=2, vocab_size=128256, max_position_embeddings=2048, rope_theta=500000.0),
    }


SIDES = {"ours": "ours, AdamW", "ours-8bit": "ours, AdamW8bit", "hf": "transformers, AdamW"}  # 8bit: torchao


def vs_hf(args):
    import transformers
    print(f"training step (per-sample loss, IR-DRO weights, backward, optimizer step), batch {args.batch_size} x "
          f"{args.block_size} tokens, {args.device} {args.dtype}: median of {args.steps} steps after {args.warmup}, "
          f"the sides alternating step by step; memory of each in a process of its own, above what the process "
          f"held before loading (torch and transformers imported)")
    sides = [s for s in SIDES if s != "ours-8bit" or has_torchao()]
    for name, config in hf_shapes().items():
        with tempfile.TemporaryDirectory() as tmp:
            torch.manual_seed(0)
            transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp)
            res = {}
            for job in sides + [",".join(sides)]:
                out = subprocess.run([sys.executable, __file__, "--vs-hf-worker", f"{job}:{tmp}"] + sys.argv[1:],
                                     capture_output=True, text=True)
                if out.returncode:
                    sys.exit(f"bench.py: the {job} worker failed: {(out.stderr.strip().splitlines() or ['?'])[-1]}")
                res[job] = json.loads(out.stdout.strip().splitlines()[-1])
        ms, tokens, hf_peak = res[",".join(sides)]["ms"], args.batch_size * args.block_size, res["hf"]["peak"]
        print(f"{name} ({res['hf']['params'] / 1e6:.0f}M parameters, {res['hf']['weights'] / 2**30:.2f} GiB of "
              f"float32 weights):")
        for side in sides:
            r = res[side]
            print(f"  {SIDES[side]:20s} {ms[side]:7.0f} ms/step ({tokens / ms[side] * 1e3:5.0f} tok/s, "
                  f"{ms[side] / ms['hf']:.2f}x transformers' time) | loading {r['load'] / 2**30:.2f} GiB "
                  f"({r['load'] / r['weights']:.2f}x the weights) | step peak {r['peak'] / 2**30:.2f} GiB "
                  f"({r['peak'] / hf_peak:.2f}x transformers')")


def has_torchao():
    import importlib.util
    return importlib.util.find_spec("torchao") is not None


def ours_optimizer(model, side, device):
    """The --pretrained recipe's AdamW (GPT.configure_optimizer, as train.py builds it), with --optim adamw8bit for
    the low-memory side (torchao's AdamW8bit: 8-bit moments)."""
    return model.configure_optimizer(0.01, 2e-6, (0.9, 0.999), device.type, "all",
                                     "adamw8bit" if side == "ours-8bit" else "adamw")


def max_rss():
    """The most resident memory this process has held since the last reset_peak() (CPU), in bytes (Linux's VmHWM)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def reset_peak():
    """Start max_rss() afresh from the resident memory now (Linux: writing 5 to clear_refs resets VmHWM), so that a
    phase's peak is its own, not that of an earlier one (the imports, the loading)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def rss():
    """This process's resident memory now (CPU), in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def vs_hf_worker(args):
    """One or more sides ('ours', 'ours-8bit', 'hf', comma-separated) on one checkpoint folder: each loaded, then
    trained step by step in turn. Prints one JSON line: median ms per side, and (for a lone side) memory."""
    import transformers
    jobs, folder = args.worker.split(":", 1)
    device = runtime.pick_device(args.device)
    dtype = runtime.pick_dtype(args.dtype, device)
    ctx = nullcontext() if dtype == "float32" else torch.autocast(device.type, dtype=getattr(torch, dtype))
    cuda = device.type == "cuda"
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1000, (args.batch_size, args.block_size), generator=g).to(device)
    y = torch.roll(x, -1, dims=1)
    before = torch.cuda.memory_allocated() if cuda else rss()
    torch.cuda.reset_peak_memory_stats() if cuda else reset_peak()
    models, optimizers, losses = {}, {}, {}
    for side in jobs.split(","):
        if side.startswith("ours"):
            model = hf.load_pretrained(folder, dtype=torch.float32)
            losses[side] = lambda m, x, y: m(x, y)[1]
            # the --pretrained recipe: lr 2e-6, betas (0.9, 0.999), weight decay 0.01 on every parameter
            optimizers[side] = lambda m, s=side: ours_optimizer(m, s, device)
        else:  # transformers' model, the loss per sample from its logits, the official torch.optim.AdamW
            model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
            losses[side] = lambda m, x, y: per_sample_cross_entropy(m(x).logits, y)
            optimizers[side] = lambda m: torch.optim.AdamW(m.parameters(), lr=2e-6)
        models[side] = model.to(device).train()
        optimizers[side] = optimizers[side](models[side])
        if args.compile:
            models[side] = torch.compile(models[side], backend=args.compile_backend)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    loaded = torch.cuda.max_memory_allocated() if cuda else max_rss()  # the peak while loading
    torch.cuda.reset_peak_memory_stats() if cuda else reset_peak()  # the step's own peak, not the loading's
    times, first = {side: [] for side in models}, {}  # first: the first step's ms, torch.compile's compile in it
    for k in range(args.warmup + args.steps):
        for side, model in models.items():  # alternating: a slow spell of the machine hits every side
            sync()
            t0 = time.perf_counter()
            with ctx:
                loss = losses[side](model, x, y)
            w = reweight.weights(loss.detach(), "irdro", tau=1.0)
            (w * loss).sum().backward()
            optimizers[side].step()
            optimizers[side].zero_grad(set_to_none=True)
            del loss
            sync()
            if k >= args.warmup:
                times[side].append(time.perf_counter() - t0)
            first.setdefault(side, (time.perf_counter() - t0) * 1e3)
    peak = torch.cuda.max_memory_allocated() if cuda else max_rss()
    params = sum(p.numel() for p in next(iter(models.values())).parameters())
    print(json.dumps(dict(ms={s: statistics.median(t) * 1e3 for s, t in times.items()}, load=loaded - before,
                          peak=peak - before, params=params, weights=4 * params, first_ms=first,
                          attention={s: getattr(getattr(m, "config", None), "_attn_implementation", "sdpa (ours)")
                                     for s, m in models.items()})))


# --- the per-sample loss alone ------------------------------------------------

LOSSES = {"full logits": "per_sample_cross_entropy(h @ W.T) (the plain form)", "ours": "loss.py, chunked",
          "torch": "F.linear_cross_entropy(reduction='none', options=LinearCrossEntropyOptions())"}


def vs_loss(args):
    """Time and peak memory of the per-sample loss's forward and backward, each form in a process of its own."""
    T, C, V = (int(v) for v in args.loss_shape.split(","))
    forms = [f for f in LOSSES if f != "torch" or hasattr(torch.nn.functional, "linear_cross_entropy")]
    print(f"per-sample loss, forward + backward under random per-sample weights: {T} tokens (4 samples), width {C}, "
          f"vocabulary {V}, {args.device} float32; median of {args.steps} after {args.warmup}; memory above the "
          f"inputs, in a process of its own")
    res = {}
    for form in forms:
        out = subprocess.run([sys.executable, __file__, "--loss-worker", form] + sys.argv[1:], capture_output=True,
                             text=True)
        if out.returncode:
            sys.exit(f"bench.py: the {form} worker failed: {(out.stderr.strip().splitlines() or ['?'])[-1]}")
        res[form] = json.loads(out.stdout.strip().splitlines()[-1])
    for form in forms:
        r, full = res[form], res["full logits"]
        print(f"  {form:12s} {r['ms']:8.0f} ms ({r['ms'] / full['ms']:.2f}x full logits) | peak "
              f"{r['peak'] / 2**30:.2f} GiB ({r['peak'] / full['peak']:.2f}x) | {LOSSES[form]}")


def loss_worker(args):
    from loss import chunked_per_sample_cross_entropy
    T, C, V = (int(v) for v in args.loss_shape.split(","))
    device = runtime.pick_device(args.device)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(4, T // 4, C, generator=g).to(device).requires_grad_()
    W = (torch.randn(V, C, generator=g) * 0.02).to(device).requires_grad_()
    y = torch.randint(V, (4, T // 4), generator=g).to(device)
    w = torch.rand(4, generator=g).to(device)
    forms = {
        "full logits": lambda: per_sample_cross_entropy(h @ W.t(), y),
        "ours": lambda: chunked_per_sample_cross_entropy(h, W, y, None, max(1, LOGITS_PER_CHUNK // V)),  # GPT's
        "torch": lambda: torch.nn.functional.linear_cross_entropy(
            h.flatten(0, 1), W, y.flatten(), reduction="none", ignore_index=-1,
            options=torch.nn.LinearCrossEntropyOptions()).view(4, -1).mean(1)}
    cuda = device.type == "cuda"
    before = torch.cuda.memory_allocated() if cuda else rss()
    torch.cuda.reset_peak_memory_stats() if cuda else reset_peak()
    times = []
    for k in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        (w * forms[args.loss_worker]()).sum().backward()
        h.grad = W.grad = None
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if cuda else max_rss()
    print(json.dumps(dict(ms=statistics.median(times[args.warmup:]) * 1e3, peak=peak - before)))


# --- the GPU check: one call, five parts, a time cap each -------------------------------------------------

# Part: (share of the time budget, title). A part may use its share and whatever the parts before it left
# unused, never the shares of the parts after it: a slow compile cuts its own part short, not the others.
# The order is the priority order: what fits comes first.
GPU_PARTS = {
    "vs_hf": (0.45, "1. ours vs transformers: training step, torch.compile"),
    "methods": (0.25, "2-3. IR-DRO and MidRanking (keep 0.5) vs ERM, interleaved; graphs compiled per method"),
    "loss": (0.08, "4. the per-sample loss alone: full logits vs chunked"),
    "train": (0.22, "5. train.py --pretrained on a random LLaMA-shape checkpoint"),
}
LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0,
                max_position_embeddings=2048)  # Llama-3.2-1B's shape (its llama3 RoPE scaling left out: no cost)


class GpuCheck:
    """What every part needs: the settings of the mode (the GPU's, or the CPU mode's tiny ones, which run the same
    code in seconds so that the check cannot rot), the checkpoints, the time left, and the workers."""

    def __init__(self, args, device, tmp):
        self.args, self.device, self.tmp, self.cuda = args, device, Path(tmp), device.type == "cuda"
        self.out = Path(args.gpu_out)
        big = self.cuda
        # bf16 autocast and inductor on the GPU; on CPU float32 and dynamo with its "eager" backend: the graphs
        # are traced and counted as on the GPU, without inductor's minute of C++ compiling per graph
        self.dtype, self.backend = ("bfloat16", "inductor") if big else ("float32", "eager")
        self.batch, self.block, self.grad_accum = (8, 512, 2) if big else (2, 32, 2)
        self.steps, self.warmup = (10, 3) if big else (2, 1)
        self.loss_shape = "16384,2048,128256" if big else "64,32,128256"  # 16k tokens at Llama-3's vocabulary
        # train.py: steps; eval samples; documents of the corpus; compiled (on CPU inductor would take minutes)
        self.train_steps, self.train_flags = (50, ["--eval_samples", "32", "--compile"]) if big else (
            8, ["--eval_samples", "8", "--no-compile"])
        self.max_docs = None if big else 20
        self.shapes = gpu_shapes(big)
        self.folders, self.deadline = {}, None
        # the check's own CUDA-only calls (the workers have theirs: synchronize, max_memory_allocated): here alone
        self.name = torch.cuda.get_device_name(device) if self.cuda else "cpu"
        self.peak = runtime.peak_of(self.name) if self.cuda else None  # bf16 dense FLOP/s; None: no MFU

    def free_cache(self):
        if self.cuda:  # what this process keeps on the GPU while the workers run: its context alone
            torch.cuda.empty_cache()

    def step_flags(self):
        return ["--device", str(self.device), "--dtype", self.dtype, "--compile", "--compile-backend", self.backend,
                "--batch_size", str(self.batch), "--block_size", str(self.block), "--steps", str(self.steps),
                "--warmup", str(self.warmup)]

    def left(self):
        return self.deadline - time.perf_counter()

    def worker(self, argv, what, env=None):
        """bench.py argv in a process of its own (its memory its own), within the part's time -> (its JSON line
        with its wall_s and stderr, None) or (None, why not)."""
        if self.left() < 5:
            return None, f"{what}: skipped, the part's time cap was reached"
        rc, out, err, wall = run_capped([sys.executable, __file__, *argv], self.left(), env=env)
        if rc is None:
            return None, f"{what}: stopped after {wall:.0f} s at the part's time cap"
        if rc:
            return None, f"{what}: failed (exit {rc}): {(err.strip().splitlines() or ['?'])[-1][:300]}"
        return dict(json.loads(out.strip().splitlines()[-1]), wall_s=round(wall, 1), stderr=err), None


def gpu_shapes(big):
    import transformers
    if big:
        return {"OPT-125m": hf_shapes()["OPT-125m"], "Llama-3.2-1B": transformers.LlamaConfig(**LLAMA_1B)}
    return {"OPT-125m": transformers.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=1, num_attention_heads=2,
                                               word_embed_proj_dim=32, max_position_embeddings=64),
            "Llama-3.2-1B": transformers.LlamaConfig(**dict(LLAMA_1B, hidden_size=32, intermediate_size=64,
                                                            num_hidden_layers=2, num_attention_heads=4,
                                                            num_key_value_heads=2, max_position_embeddings=64))}


def run_capped(cmd, timeout, cwd=None, env=None):
    """cmd in a session of its own, killed with all it started (inductor's compile workers) once past timeout.
    -> (exit status, None if killed; stdout; stderr; seconds)"""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd, env=env,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=max(timeout, 1))
        rc = p.returncode
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        rc = None
    return rc, out, err, time.perf_counter() - t0


def gpu_check(args):
    """--gpu: the parts in priority order, each within its time cap; the report rewritten after each part."""
    try:
        device = runtime.pick_device(args.device)
    except ValueError as e:
        print(f"bench.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    if device.type not in ("cuda", "cpu") or (args.device == "auto" and device.type != "cuda"):
        print(f"bench.py: error: --gpu found no CUDA device (auto picked {device}): run it on a GPU machine, or pass "
              "--device cpu for its CPU mode (tiny shapes, seconds: it checks the code, it measures nothing)",
              file=sys.stderr)
        sys.exit(2)
    if not args.budget > 0:
        print(f"bench.py: error: --budget must be > 0 seconds, got {args.budget}", file=sys.stderr)
        sys.exit(2)
    # the check needs no network, and a machine that drops packets would hold tiktoken's download (it has no
    # timeout) for minutes before prepare_data falls back to its vendored ranks: refused at once, in every process
    closed = "http://127.0.0.1:9"  # a local port nothing listens on
    os.environ.update(HTTPS_PROXY=closed, https_proxy=closed, HTTP_PROXY=closed, http_proxy=closed, HF_HUB_OFFLINE="1")
    parts = [p for p in GPU_PARTS if p in args.gpu_parts]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        check = GpuCheck(args, device, tmp)
        report = gpu_report_head(check, parts)
        check.folders = write_checkpoints(check)
        report["setup_s"] = round(time.perf_counter() - t0, 1)
        write_gpu_report(check, report)
        for i, part in enumerate(parts):
            later = sum(GPU_PARTS[p][0] for p in parts[i + 1:]) * args.budget
            check.deadline = t0 + args.budget - later
            started = time.perf_counter()
            try:  # a part that breaks must not take the later ones with it: the machine is lent once
                result = GPU_PART_RUNS[part](check)
            except Exception as e:
                result = dict(title=GPU_PARTS[part][1], notes=[f"failed: {type(e).__name__}: {str(e)[:300]}"])
            result["wall_s"] = round(time.perf_counter() - started, 1)
            result["cap_s"] = round(check.deadline - started, 1)
            report["parts"][part] = result
            write_gpu_report(check, report)
    report["total_s"] = round(time.perf_counter() - t0, 1)
    write_gpu_report(check, report)
    print(f"wrote {check.out / 'gpu-check.json'} and {check.out / 'gpu-check.md'} in {report['total_s']:.0f} s")
    return report


def gpu_report_head(check, parts):
    import transformers
    return dict(command="python " + " ".join(sys.argv), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                mode="gpu" if check.cuda else "cpu (tiny shapes: checks the code, measures nothing)",
                device=check.name, peak_flops=check.peak, torch=torch.__version__,
                cuda=torch.version.cuda, transformers=transformers.__version__, python=sys.version.split()[0],
                dtype=check.dtype, compile_backend=check.backend, budget_s=check.args.budget, parts_run=parts,
                parts={})


def write_checkpoints(check):
    """The random checkpoints, saved once in transformers' format (float32): every part loads the same weights.
    The LLaMA one gets GPT-2's tokenizer files (hf.write_gpt2_tokenizer: offline, from the vendored ranks), so that
    train.py --pretrained accepts the built-in corpus prepared as GPT-2 tokens (its ids fit the 128256 rows)."""
    import transformers
    folders = {}
    for name, config in check.shapes.items():
        folder = check.tmp / name
        torch.manual_seed(0)
        with torch.device(check.device):  # initialised on the GPU: seconds, not a minute on the CPU, at 1B
            model = transformers.AutoModelForCausalLM.from_config(config)
        model.save_pretrained(folder)
        del model
        if config.model_type == "llama":
            hf.write_gpt2_tokenizer(folder, check.block)
        folders[name] = folder
    check.free_cache()
    return folders


def flops_per_token(folder, block_size):
    """runtime.Progress's count (6 per matmul parameter + attention), from the checkpoint's config alone (meta)."""
    with torch.device("meta"):
        model = GPT(hf.config_from_hf(json.loads((folder / "config.json").read_text())))
    return runtime.Progress(model, block_size, torch.device("cpu"), "float32", 0, 1).flops_per_token


def part_vs_hf(check):
    """1. The training step of vs_hf_worker (per-sample loss, IR-DRO weights, backward, AdamW), each side in a
    process of its own one after the other (not alternating: one compile per process is what fits the time),
    compiled; compile_s is the first step's time less a timed step's."""
    res, notes = {}, []
    for shape, folder in check.folders.items():
        fpt, tokens = flops_per_token(folder, check.block), check.batch * check.block
        for side in ("ours", "hf"):
            r, note = check.worker(["--vs-hf-worker", f"{side}:{folder}", *check.step_flags()], f"{shape} {side}")
            if note:
                notes.append(note)
                continue
            ms = r["ms"][side]
            res.setdefault(shape, {})[side] = dict(
                ms=round(ms, 2), tok_per_s=round(tokens / ms * 1e3),
                compile_s=round((r["first_ms"][side] - ms) / 1e3, 1),
                mfu=mfu(fpt * tokens / ms * 1e3, check), peak_gib=round(r["peak"] / 2**30, 3), params=r["params"],
                attention=r["attention"][side], wall_s=r["wall_s"])
        sides = res.get(shape, {})
        if len(sides) == 2:  # the goals: ours >= 1.0x transformers' tokens/s, at <= 0.6x its peak memory
            sides["ours_vs_hf"] = dict(tok_per_s=round(sides["ours"]["tok_per_s"] / sides["hf"]["tok_per_s"], 3),
                                       peak=round(sides["ours"]["peak_gib"] / sides["hf"]["peak_gib"], 3))
    return dict(title=GPU_PARTS["vs_hf"][1], batch=f"{check.batch} x {check.block}", shapes=res, notes=notes,
                how="each side in a fresh process, one after the other (not alternating); peak: "
                    "torch.cuda.max_memory_allocated (CPU: max RSS) above what the process held before loading; "
                    "MFU: the same model FLOPs (runtime.Progress) for both sides; ours: the --pretrained AdamW "
                    "(fused), transformers: torch.optim.AdamW(model.parameters()) and the per-sample loss from its "
                    "logits")


def mfu(flops_per_s, check):
    return round(flops_per_s / check.peak, 4) if check.peak else None


def part_methods(check):
    """2-3. The methods' steps as train.py takes them, interleaved on the same batches (methods_worker), per shape;
    and the graphs torch.compile made for each, in the warm-up and after it (a recompile)."""
    res, notes = {}, []
    for shape, folder in check.folders.items():
        r, note = check.worker(["--methods-worker", str(folder), "--grad_accum", str(check.grad_accum),
                                *check.step_flags()], f"{shape} methods", env=dict(os.environ, TORCH_LOGS="recompiles"))
        if note:
            notes.append(note)
            continue
        # dynamo's own words for the guards that failed: "0/1: tensor 'idx' size mismatch at index 0. expected 8,
        # actual 4" (graph 1 of frame 0); a recompile lists those of every graph it could not use
        why = re.findall(r"\[__recompiles\]\s+- (\d+/\d+: .*)$", r.pop("stderr"), re.M)
        r["recompile_reasons"] = sorted({w[:160] for w in why})[:10]
        res[shape] = r
    return dict(title=GPU_PARTS["methods"][1], batch=f"{check.grad_accum} x {check.batch} x {check.block}",
                shapes=res, notes=notes, how="ours compiled, the methods interleaved step by step in one process "
                "(train.forward_backward, then AdamW); graphs: dynamo's counters['stats']['unique_graphs'] grown "
                "during the method's own steps, so a graph shared with a method before it counts there only")


METHODS_TIMED = ("erm", "irdro", "midrank")  # erm first: the others' graphs count beyond it


def methods_worker(args):
    """Ours from a checkpoint folder, compiled, and METHODS_TIMED's steps on random batches (bench.time_methods).
    Prints one JSON line: per method the median ms, its ratio to ERM, peak memory and graphs compiled."""
    device = runtime.pick_device(args.device)
    dtype = runtime.pick_dtype(args.dtype, device)
    ctx = nullcontext() if dtype == "float32" else torch.autocast(device.type, dtype=getattr(torch, dtype))
    model = hf.load_pretrained(args.methods_worker, dtype=torch.float32).to(device).train()
    optimizer = ours_optimizer(model, "ours", device)
    if args.compile:
        model = torch.compile(model, backend=args.compile_backend)
    vocab, n = model.config.vocab_size, args.batch_size * args.grad_accum

    def batches_of(k):  # fresh tokens every step: MidRanking's kept rows, and so its shapes, change as in training
        g = torch.Generator().manual_seed(k)
        x = torch.randint(min(vocab, 50257), (n, args.block_size + 1), generator=g)
        return [(x[i:i + args.batch_size, :-1].contiguous().to(device),  # contiguous, as train.get_batch's
                 x[i:i + args.batch_size, 1:].contiguous().to(device)) for i in range(0, n, args.batch_size)]

    times, peak, graphs = time_methods(model, optimizer, batches_of, METHODS_TIMED, cli.method_hparams(args), ctx,
                                       device, args.warmup, args.steps)
    waits = {m: device_waits(model, optimizer, batches_of(0), m, cli.method_hparams(args), ctx, device)
             for m in METHODS_TIMED}
    erm = statistics.median(times["erm"])
    from torch._dynamo.utils import counters  # all of them, in case a torch renames the one counted
    print(json.dumps(dict(methods={m: dict(ms=round(statistics.median(t) * 1e3, 2),
                                           x_erm=round(statistics.median(t) / erm, 3),
                                           peak_gib=None if peak[m] is None else round(peak[m] / 2**30, 3),
                                           graphs_warmup=graphs[m][0], graphs_after_warmup=graphs[m][1],
                                           waits=waits[m])
                                  for m, t in times.items()},
                          counters={k: dict(counters[k]) for k in ("stats", "frames") if k in counters})))


def device_waits(model, optimizer, batches, method, hparams, ctx, device):
    """The host-device synchronisations of one step of `method` (train.forward_backward, then AdamW), one warning each
    in CUDA's sync debug mode; None off CUDA, where tests/test_train.py counts them (the same should be found: ERM
    and IR-DRO none, MidRanking its kept-index read)."""
    if device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            train.forward_backward(model, batches, method, hparams, ctx)
            optimizer.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
            optimizer.zero_grad(set_to_none=True)
    return sum("synchroniz" in str(w.message) for w in caught)


def part_loss(check):
    """4. loss_worker's forms at 16k tokens and Llama-3's vocabulary, each in a process of its own (float32)."""
    res, notes = {}, []
    forms = [f for f in LOSSES if f != "torch" or hasattr(torch.nn.functional, "linear_cross_entropy")]
    for form in forms:
        r, note = check.worker(["--loss-worker", form, "--loss", check.loss_shape, "--device", str(check.device),
                                "--steps", "2", "--warmup", "1"], f"loss {form}")
        if note:
            notes.append(note)
            continue
        res[form] = dict(ms=round(r["ms"], 1), peak_gib=round(r["peak"] / 2**30, 3), wall_s=r["wall_s"])
    if "full logits" in res:
        for r in res.values():
            r["x_full_peak"] = round(r["peak_gib"] / res["full logits"]["peak_gib"], 3)
    return dict(title=GPU_PARTS["loss"][1], shape=f"tokens, width, vocabulary = {check.loss_shape}", forms=res,
                notes=notes, how="bench.py --loss's workers: forward + backward under random per-sample weights, "
                "float32; peak above the inputs")


def part_train(check):
    """5. train.py --pretrained on the LLaMA-shape checkpoint (GPT-2 tokenizer) and the built-in corpus prepared with
    it, compiled, in bf16 on the GPU; stopped at the part's cap. Does the loss fall, is the step time steady?"""
    if check.left() < 10:
        return dict(title=GPU_PARTS["train"][1], notes=["skipped: no time left in the budget"])
    folder = check.folders["Llama-3.2-1B"]
    data = prepare_data.prepare(tokenizer="gpt2", out_dir=check.tmp / "shakespeare-gpt2",
                                max_docs=check.max_docs)
    run = check.tmp / "run"
    # lr 1e-4, not the recipe's 2e-6: a random checkpoint moves too little at 2e-6 in 50 steps to show the fall
    cmd = [sys.executable, str(Path(__file__).parent / "train.py"), "--pretrained", str(folder), "--data", str(data),
           "--method", "irdro", "--max_iters", str(check.train_steps), "--eval_interval", str(check.train_steps),
           "--batch_size", str(check.batch), "--block_size", str(check.block), "--lr", "1e-4", "--device",
           str(check.device), "--dtype", check.dtype, *check.train_flags, "--out_dir", str(run)]
    rc, out, err, wall = run_capped(cmd, check.left())
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()] if (
        run / "log.jsonl").exists() else []
    ms = [int(v) for v in re.findall(r"^step \d+/\d+ \|.* \| (\d+) ms \|", out, re.M)]  # the step lines' step time
    res = dict(title=GPU_PARTS["train"][1], command=" ".join(["python", *cmd[1:]]), exit=rc, wall_s=round(wall, 1),
               steps_done=len(ms), notes=[])
    res.update(train_summary(records, ms))
    done = len(ms) == check.train_steps and [s for s, _ in res["val_loss"]][-1:] == [check.train_steps]
    if rc is None:  # after its last evaluation train.py writes a checkpoint (16 bytes a parameter) and the export
        res["notes"].append("stopped at the part's time cap " + ("after every step and the last evaluation, while "
                            "writing the checkpoint or the export" if done else f"after {len(ms)} steps"))
    elif rc:
        res["notes"].append(f"failed (exit {rc}): {(err.strip().splitlines() or ['?'])[-1][:300]}")
    return res


def train_summary(records, ms):
    """Loss first and last (train: the mean of 5 steps; val: the evaluations), and the step time past the first
    fifth of the steps (the compile and warm-up): median, 10th and 90th percentile, from train.py's step lines."""
    train_loss = [r["loss"] for r in records if r["type"] == "train"]
    val = [(r["step"], r["val_loss"]) for r in records if r["type"] == "eval"]
    out = dict(train_loss_first5=mean_or_none(train_loss[:5]), train_loss_last5=mean_or_none(train_loss[-5:]),
               val_loss=val, mfu_median=None)
    if len(val) > 1:  # the held-out loss, at step 0 and at the end
        out["loss_fell"] = val[-1][1] < val[0][1]
    else:  # stopped before the last evaluation: the train loss, if there are steps enough
        out["loss_fell"] = out["train_loss_last5"] < out["train_loss_first5"] if len(train_loss) >= 10 else None
    steady = ms[len(ms) // 5:] if len(ms) >= 5 else []
    if steady:
        q = statistics.quantiles(steady, n=10) if len(steady) > 1 else [steady[0]] * 9
        med = statistics.median(steady)
        out.update(steady_steps=len(steady), ms_median=med, ms_p10=q[0], ms_p90=q[-1], ms_max=max(steady),
                   steady=q[-1] <= 1.1 * med)  # steady: the 90th percentile within 10% of the median
        mfus = [r["mfu"] for r in records if r["type"] == "train" and "mfu" in r][len(ms) // 5:]
        out["mfu_median"] = round(statistics.median(mfus), 4) if mfus else None
    return out


def mean_or_none(xs):
    return round(statistics.fmean(xs), 4) if xs else None


def write_gpu_report(check, report):
    """gpu-check.json (everything) and gpu-check.md (the tables), rewritten after every part: a check cut short
    (the machine taken back) leaves what it had measured."""
    check.out.mkdir(parents=True, exist_ok=True)
    (check.out / "gpu-check.json").write_text(json.dumps(report, indent=1) + "\n")
    lines = [f"# GPU check: {report['device']}, {report['date']}", "",
             f"`{report['command']}`: {report['mode']}; torch {report['torch']} (CUDA {report['cuda']}), transformers "
             f"{report['transformers']}, Python {report['python']}; {report['dtype']}, torch.compile backend "
             f"{report['compile_backend']}; budget {report['budget_s']} s, setup (checkpoints) "
             f"{report.get('setup_s', '?')} s, total {report.get('total_s', 'not finished')} s."]
    for name in report["parts_run"]:
        part = report["parts"].get(name)
        lines += ["", f"## {GPU_PARTS[name][1]}", ""]
        if part is None:
            lines.append("not run yet")
            continue
        lines += (GPU_TABLES[name](part) if "how" in part or "command" in part else []) + [""]
        lines += [f"- {n}" for n in part["notes"]]
        lines.append(f"- {part.get('how') or part.get('command') or 'nothing measured'}; {part['wall_s']} s of a "
                     f"{part['cap_s']} s cap")
    (check.out / "gpu-check.md").write_text("\n".join(lines) + "\n")


def fmt(v, spec=""):
    return "-" if v is None else format(v, spec)


def table_vs_hf(part):
    rows = ["| shape | side | ms/step | tok/s | MFU | peak GiB | compile s | attention |", "|---" * 8 + "|"]
    for shape, sides in part["shapes"].items():
        for side in ("ours", "hf"):
            r = sides.get(side)
            if r:
                rows.append(f"| {shape} ({r['params'] / 1e6:.0f}M) | {side} | {r['ms']:.1f} | {r['tok_per_s']} | "
                            f"{fmt(r['mfu'], '.1%')} | {r['peak_gib']:.2f} | {r['compile_s']} | {r['attention']} |")
        if "ours_vs_hf" in sides:
            v = sides["ours_vs_hf"]
            rows.append(f"| {shape} | ours / hf | | {v['tok_per_s']:.2f}x | | {v['peak']:.2f}x | | |")
    return [f"batch {part['batch']} tokens", ""] + rows


def table_methods(part):
    rows = ["| shape | method | ms/step | x ERM | peak GiB | graphs in warm-up | graphs after | device syncs |",
            "|---" * 8 + "|"]
    for shape, res in part["shapes"].items():
        for m, r in res["methods"].items():
            rows.append(f"| {shape} | {m} | {r['ms']:.1f} | {r['x_erm']:.3f} | {fmt(r['peak_gib'], '.2f')} | "
                        f"{r['graphs_warmup']} | {r['graphs_after_warmup']} | {fmt(r.get('waits'), 'd')} |")
    reasons = [f"- {shape}, a guard that made a graph recompile: {why}" for shape, res in part["shapes"].items()
               for why in res["recompile_reasons"]]
    return [f"batch {part['batch']} tokens (grad_accum x micro-batch x block)", ""] + rows + [""] + reasons


def table_loss(part):
    rows = ["| form | ms (fwd + bwd) | peak GiB | x full logits |", "|---" * 4 + "|"]
    rows += [f"| {f} | {r['ms']} | {r['peak_gib']:.2f} | {fmt(r.get('x_full_peak'), '.2f')} |"
             for f, r in part["forms"].items()]
    return [part["shape"], ""] + rows


def table_train(part):
    return ["| steps | train loss, first 5 -> last 5 | val loss (step: loss) | step ms, median (p10-p90, max) | "
            "steady | loss fell | MFU |", "|---" * 7 + "|",
            f"| {part['steps_done']} | {fmt(part['train_loss_first5'])} -> {fmt(part['train_loss_last5'])} | "
            f"{', '.join(f'{s}: {v:.3f}' for s, v in part['val_loss']) or '-'} | {fmt(part.get('ms_median'))} "
            f"({fmt(part.get('ms_p10'))}-{fmt(part.get('ms_p90'))}, {fmt(part.get('ms_max'))}) | "
            f"{fmt(part.get('steady'))} | {fmt(part['loss_fell'])} | {fmt(part['mfu_median'], '.1%')} |"]


GPU_TABLES = {"vs_hf": table_vs_hf, "methods": table_methods, "loss": table_loss, "train": table_train}
GPU_PART_RUNS = {"vs_hf": part_vs_hf, "methods": part_methods, "loss": part_loss, "train": part_train}


if __name__ == "__main__":
    main()
