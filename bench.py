"""
Benchmark: the optimizer-step time of erm, midrank and irdro, side by side in one run, on the same
model, data and effective batch (with gradient accumulation), and their ratios to ERM.

    python bench.py                          # defaults: train.py's default model and batch
    python bench.py --batch_size 8 --grad_accum 4 --steps 20
    python bench.py --vs-hf                  # our training step vs transformers' on OPT / LLaMA shapes

Methods are interleaved step by step (mean, erm, midrank, irdro, mean, ...) so that a slow moment of the
machine hits all of them alike; the median step time of each is reported. "mean" is the plain step with no
weights at all (loss.mean() of each micro-batch, backward): the floor that the methods' steps are held to.

--vs-hf times the training step (forward, per-sample loss, backward) of our model and of transformers'
on the same random OPT-125m-shaped and LLaMA-shaped checkpoints and inputs. Each side runs in a fresh
process that loads the checkpoint from disk, so that its peak memory (max RSS on CPU, max allocated on
CUDA) is its own.
"""

import argparse
import json
import resource
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
    p.add_argument("--methods", nargs="+", default=["erm", "midrank", "irdro"], choices=reweight.METHODS,
                   help="methods to time, beside the plain mean step and erm (the ratios are to erm)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per method")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per method first")
    p.add_argument("--vs-hf", dest="vs_hf", action="store_true", help="ours vs transformers, see above")
    p.add_argument("--vs-hf-worker", dest="worker", default=None, help=argparse.SUPPRESS)
    args = cli.get_args(parser=p)
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
        else:
            losses, w = train.forward_backward(model, batches, method, cli.method_hparams(args), ctx)
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

    kept = int((reweight.weights(torch.rand(n), "midrank", **cli.method_hparams(args)) > 0).sum())
    print(f"{device} {dtype} | {n_params / 1e6:.2f}M params | "
          f"batch {n} = {args.batch_size} x {args.grad_accum} of {args.block_size} tokens | "
          f"midrank keeps {kept}/{n}, irdro tau {args.tau} | {args.steps} steps, median")
    erm = statistics.median(times["erm"])
    for m in methods:
        t = statistics.median(times[m])
        mem = f" | peak {peak[m] / 2**20:.0f} MiB" if m in peak else ""
        print(f"{m:8s} {t * 1000:8.1f} ms/step | {n * args.block_size / t / 1e3:7.1f}k tok/s | "
              f"{t / erm:.3f}x erm{mem}")


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
