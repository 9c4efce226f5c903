"""
Benchmark: the optimizer-step time of erm, midrank and irdro, side by side in one run, on the same
model, data and effective batch (with gradient accumulation), and their ratios to ERM.

    python bench.py                          # defaults: train.py's default model and batch
    python bench.py --batch_size 8 --grad_accum 4 --steps 20
    python bench.py --vs-hf                  # our training step vs transformers' on OPT / LLaMA shapes
    python bench.py --vs-nanogpt ../nanoGPT  # nanoGPT's CPU quick start vs our default run, back to back

Methods are interleaved step by step (mean, erm, midrank, irdro, mean, ...) so that a slow moment of the
machine hits all of them alike; the median step time of each is reported. "mean" is the plain step with no
weights at all (loss.mean() of each micro-batch, backward): the floor that the methods' steps are held to.

--vs-hf times the training step (forward, per-sample loss, backward) of our model and of transformers'
on the same random OPT-125m-shaped and LLaMA-shaped checkpoints and inputs. Each side runs in a fresh
process that loads the checkpoint from disk, so that its peak memory (max RSS on CPU, max allocated on
CUDA) is its own.

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
from model import GPT


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
    args = cli.get_args(parser=p)
    if args.nanogpt:
        return vs_nanogpt(Path(args.nanogpt))
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
        "OPT-125m": transformers.OPTConfig(),  # the defaults are opt-125m: 768 wide, 12 layers, vocab 50272
        "LLaMA 768x12, GQA 12/4": transformers.LlamaConfig(
            hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
            num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048),
    }


def vs_hf(args):
    import transformers
    print(f"training step (forward, per-sample loss, backward), batch {args.batch_size} x {args.block_size} "
          f"tokens, {args.device} {args.dtype}: median of {args.steps} steps after {args.warmup}, the two "
          f"models alternating step by step; peak memory of each in a process of its own")
    for name, config in hf_shapes().items():
        with tempfile.TemporaryDirectory() as tmp:
            torch.manual_seed(0)
            transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp)
            res = {}
            for sides in ("ours", "hf", "ours,hf"):
                out = subprocess.run([sys.executable, __file__, "--vs-hf-worker", f"{sides}:{tmp}"] + sys.argv[1:],
                                     capture_output=True, text=True, check=True).stdout
                res[sides] = json.loads(out.strip().splitlines()[-1])
        t, o, h = res["ours,hf"]["ms"], res["ours"]["peak_mib"], res["hf"]["peak_mib"]
        tokens = args.batch_size * args.block_size
        print(f"{name:24s} ours {tokens / t['ours'] * 1e3:6.0f} tok/s, peak {o:6.0f} MiB | transformers "
              f"{tokens / t['hf'] * 1e3:6.0f} tok/s, peak {h:6.0f} MiB | speed {t['hf'] / t['ours']:.2f}x, "
              f"memory {o / h:.2f}x")


def vs_hf_worker(args):
    """Time the training step of one or both sides ('ours', 'hf', 'ours,hf') on one checkpoint folder."""
    sides, folder = args.worker.split(":", 1)
    device = runtime.pick_device(args.device)
    dtype = runtime.pick_dtype(args.dtype, device)
    ctx = nullcontext() if dtype == "float32" else torch.autocast(device.type, dtype=getattr(torch, dtype))
    models, step_loss = {}, {}
    for side in sides.split(","):
        if side == "ours":
            models[side] = hf.load_pretrained(folder, dtype=torch.float32)
            step_loss[side] = lambda m, x, y: m(x, y)[1]
        else:
            import transformers
            from model import per_sample_cross_entropy
            models[side] = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
            step_loss[side] = lambda m, x, y: per_sample_cross_entropy(m(x).logits, y)
        models[side] = models[side].to(device).train()
        if args.compile:
            models[side] = torch.compile(models[side])
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1000, (args.batch_size, args.block_size), generator=g).to(device)
    y = torch.roll(x, -1, dims=1)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = {side: [] for side in models}
    for k in range(args.warmup + args.steps):
        for side, model in models.items():  # alternating: a slow spell of the machine hits both
            sync()
            t0 = time.perf_counter()
            with ctx:
                loss = step_loss[side](model, x, y)
            loss.mean().backward()
            model.zero_grad(set_to_none=True)
            sync()
            if k >= args.warmup:
                times[side].append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    print(json.dumps(dict(ms={s: statistics.median(t) * 1e3 for s, t in times.items()}, peak_mib=peak / 2**20)))


if __name__ == "__main__":
    main()
