"""
Benchmark: the optimizer-step time of erm, midrank and irdro, side by side in one run, on the same
model, data and effective batch (with gradient accumulation), and their ratios to ERM.

    python bench.py                          # defaults: train.py's default model and batch
    python bench.py --batch_size 8 --grad_accum 4 --steps 20
    python bench.py --vs-hf                  # our training step vs transformers' on OPT / LLaMA shapes
    python bench.py --vs-nanogpt ../nanoGPT  # nanoGPT's CPU quick start vs our default run, back to back
    python bench.py --loss 2048,256,128256   # the per-sample loss alone: full logits, ours, torch's

Methods are interleaved step by step (mean, erm, midrank, irdro, mean, ...) so that a slow moment of the
machine hits all of them alike; the median step time of each is reported. "mean" is the plain step with no
weights at all (loss.mean() of each micro-batch, backward): the floor that the methods' steps are held to.

--vs-hf times the training step (per-sample loss, IR-DRO weights, backward, optimizer step) of our model (with
AdamW, and with torchao's AdamW8bit where installed) and of transformers' (its logits, the per-sample loss from
them, the official torch.optim.AdamW) on the same random OPT-125m and Llama-3-vocabulary checkpoints and inputs.
Each side also runs in a fresh process that loads the checkpoint from disk, so that its memory (max RSS on CPU,
max allocated on CUDA, above what the process held before loading) is its own.

--loss T,C,V times the per-sample loss alone, forward and backward, in its three forms: from full logits, ours
(loss.py, chunked) and torch's F.linear_cross_entropy (torch 2.13+), each in a process of its own for its memory.

--vs-nanogpt DIR runs, in a clone of https://github.com/karpathy/nanoGPT, the CPU quick start of its README
(train_shakespeare_char at 4 layers of 128, block 64, batch 12, 2000 iterations, dropout 0, no compile) on our
built-in corpus as characters (the tokens of data/shakespeare-char, written beside its own data as
data/shakespeare_char_ours), then our default `python train.py --method irdro --tau 1.0`: the wall clock of
each whole process (imports included) and the val losses each printed.
"""

import argparse
import json
import pickle
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

import cli
import hf
import prepare_data
import reweight
import runtime
import train
from model import GPT, LOGITS_PER_CHUNK, per_sample_cross_entropy


def main():
    p = cli.build_parser(__doc__)  # the model, data and method flags of train.py, same defaults
    p.add_argument("--methods", nargs="+", default=["erm", "midrank", "irdro"],
                   choices=reweight.METHODS + ("midrank-plain",), help="methods to time, beside the plain mean step "
                   "and erm (the ratios are to erm); midrank-plain: MidRanking with train.SAMPLE_GRAPHS off")
    p.add_argument("--steps", type=int, default=10, help="timed steps per method")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per method first")
    p.add_argument("--vs-hf", dest="vs_hf", action="store_true", help="ours vs transformers, see above")
    p.add_argument("--vs-hf-worker", dest="worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--vs-nanogpt", dest="nanogpt", default=None, metavar="DIR", help="a nanoGPT clone, see above")
    p.add_argument("--loss", dest="loss_shape", default=None, metavar="TOKENS,WIDTH,VOCAB", help="the per-sample "
                   "loss alone (forward and backward) of that shape: full logits, ours (loss.py) and torch's "
                   "F.linear_cross_entropy (torch 2.13+), e.g. 2048,256,128256")
    p.add_argument("--loss-worker", dest="loss_worker", default=None, help=argparse.SUPPRESS)
    args = cli.get_args(parser=p)
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
    if args.compile:
        model = torch.compile(model)
    n = args.batch_size * args.grad_accum
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def plain_mean(batches):  # the cheapest ERM step, for reference: no weights at all
        for x, y in batches:
            with ctx:
                loss = model(x, y)[1]
            (loss.sum() / n).backward()
        return loss

    def step(method, k):
        samples = train.step_samples(0, k, n, len(data["start"]))
        batches = [train.get_batch(data, samples[i:i + args.batch_size], args.block_size, device)
                   for i in range(0, n, args.batch_size)]
        sync()
        t0 = time.perf_counter()
        if method == "mean":
            losses = plain_mean(batches)
        else:  # midrank-plain: MidRanking scored with no graph at all (as under torchrun)
            train.SAMPLE_GRAPHS = method != "midrank-plain"
            losses, w = train.forward_backward(model, batches, method.removesuffix("-plain"),
                                               cli.method_hparams(args), ctx)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.cpu()
        sync()
        return time.perf_counter() - t0

    methods = ("mean", "erm", *[m for m in args.methods if m != "erm"])  # erm: the reference of every ratio
    times = {m: [] for m in methods}
    peak = {}
    for k in range(args.warmup + args.steps):
        for m in methods:  # the same batch k for every method
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            dt = step(m, k)
            if k >= args.warmup:
                times[m].append(dt)
            if device.type == "cuda":
                peak[m] = max(peak.get(m, 0), torch.cuda.max_memory_allocated())

    kept = reweight.midrank_counts(n, args.skip, args.keep, args.frac, args.portion)[1]
    print(f"{device} {dtype} | {n_params / 1e6:.2f}M params | "
          f"batch {n} = {args.batch_size} x {args.grad_accum} of {args.block_size} tokens | "
          f"midrank keeps {kept}/{n}, irdro tau {args.tau} | {args.steps} steps, median")
    erm = statistics.median(times["erm"])
    for m in methods:
        t = statistics.median(times[m])
        mem = f" | peak {peak[m] / 2**20:.0f} MiB" if m in peak else ""
        print(f"{m:13s} {t * 1000:8.1f} ms/step | {n * args.block_size / t / 1e3:7.1f}k tok/s | "
              f"{t / erm:.3f}x erm{mem}")


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
            models[side] = torch.compile(models[side])
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    loaded = torch.cuda.max_memory_allocated() if cuda else max_rss()  # the peak while loading
    torch.cuda.reset_peak_memory_stats() if cuda else reset_peak()  # the step's own peak, not the loading's
    times = {side: [] for side in models}
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
    peak = torch.cuda.max_memory_allocated() if cuda else max_rss()
    params = sum(p.numel() for p in next(iter(models.values())).parameters())
    print(json.dumps(dict(ms={s: statistics.median(t) * 1e3 for s, t in times.items()}, load=loaded - before,
                          peak=peak - before, params=params, weights=4 * params)))


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


if __name__ == "__main__":
    main()
