"""
Benchmark: the optimizer-step time of erm, midrank and irdro, side by side in one run, on the same
model, data and effective batch (with gradient accumulation), and their ratios to ERM.

    python bench.py                          # defaults: train.py's default model and batch
    python bench.py --batch_size 8 --grad_accum 4 --steps 20

Methods are interleaved step by step (erm, midrank, irdro, erm, ...) so that a slow moment of the
machine hits all of them alike; the median step time of each is reported.
"""

import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch

import prepare_data
import reweight
import train
from model import GPT


def main():
    p = train.build_parser(__doc__)  # the model, data and method flags of train.py, same defaults
    p.add_argument("--steps", type=int, default=10, help="timed steps per method")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per method first")
    args = train.get_args(parser=p)

    device = train.pick_device(args.device)
    dtype = train.pick_dtype(args.dtype, device)
    ctx = nullcontext() if dtype == "float32" else torch.autocast(device.type, dtype=getattr(torch, dtype))
    data_dir = Path(args.data)
    if not (data_dir / "meta.json").exists():
        prepare_data.prepare()
    data = train.load_split(data_dir, "train", args.block_size)
    torch.manual_seed(0)
    model = GPT(train.scratch_config(args, data["meta"]["vocab_size"])).to(device)
    optimizer = model.configure_optimizer(0.1, 1e-4, (0.9, 0.95), device.type)
    n_params = model.num_params()
    if args.compile:
        model = torch.compile(model)
    n = args.batch_size * args.grad_accum
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step(method, k):
        samples = train.step_samples(0, k, n, len(data["start"]))
        batches = [train.get_batch(data, samples[i:i + args.batch_size], args.block_size, device)
                   for i in range(0, n, args.batch_size)]
        sync()
        t0 = time.perf_counter()
        losses, w = train.forward_backward(model, batches, method, args.tau, args.skip, args.keep, ctx)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.cpu()
        sync()
        return time.perf_counter() - t0

    times = {m: [] for m in reweight.METHODS}
    peak = {}
    for k in range(args.warmup + args.steps):
        for m in reweight.METHODS:  # the same batch k for every method
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            dt = step(m, k)
            if k >= args.warmup:
                times[m].append(dt)
            if device.type == "cuda":
                peak[m] = max(peak.get(m, 0), torch.cuda.max_memory_allocated())

    kept = reweight.midrank_counts(n, args.skip, args.keep)[1]
    print(f"{device} {dtype} | {n_params / 1e6:.2f}M params | "
          f"batch {n} = {args.batch_size} x {args.grad_accum} of {args.block_size} tokens | "
          f"midrank keeps {kept}/{n}, irdro tau {args.tau} | {args.steps} steps, median")
    erm = statistics.median(times["erm"])
    for m in reweight.METHODS:
        t = statistics.median(times[m])
        mem = f" | peak {peak[m] / 2**20:.0f} MiB" if m in peak else ""
        print(f"{m:8s} {t * 1000:8.1f} ms/step | {n * args.block_size / t / 1e3:7.1f}k tok/s | "
              f"{t / erm:.3f}x erm{mem}")


if __name__ == "__main__":
    main()
