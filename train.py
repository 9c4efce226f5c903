"""
Train a GPT with per-sample losses reweighted by ERM, MidRanking or IR-DRO.

    python train.py --method irdro --tau 1.0              # the default corpus, prepared if missing
    python train.py --method midrank --skip 0.125 --keep 0.5
    python train.py --init_from out/erm --method irdro    # continual training from an earlier run
    torchrun --nproc_per_node 8 train.py --method irdro   # data parallel (DDP); add --fsdp to shard

Every optimizer step sees an effective batch of n = batch_size * grad_accum * world_size samples
(documents or chunks of documents). reweight.py turns their detached losses l_1..l_n into weights
w_1..w_n and the step descends sum_i w_i l_i. The weights are those of the *whole* effective batch,
across all processes, exactly, while only one micro-batch's graph is alive at a time (see forward_backward).
"""

import argparse
import json
import math
import os
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.nn.parallel import DistributedDataParallel as DDP

import prepare_data
import reweight
from model import GPT, IGNORE_INDEX, GPTConfig, checkpoint_folder

# Defaults that depend on the kind of run, for the flags the user leaves out. A pretrained run follows the
# paper's official recipe (constant lr 2e-6, AdamW with torch's betas, wd 0.01, 512 tokens, 100 updates).
SCRATCH_DEFAULTS = dict(block_size=128, grad_accum=2, max_iters=250, lr=2e-3, min_lr=2e-4,
                        schedule="cosine", warmup_iters=20, weight_decay=0.1, beta2=0.95)
PRETRAINED_DEFAULTS = dict(block_size=512, grad_accum=1, max_iters=100, lr=2e-6, min_lr=2e-6,
                           schedule="constant", warmup_iters=0, weight_decay=0.01, beta2=0.999)


def by_mode(flag):
    return f"(default: {SCRATCH_DEFAULTS[flag]}; {PRETRAINED_DEFAULTS[flag]} with --pretrained)"


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump: bad input says what is wrong and exits 2
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # flags defaulting to None state their defaults themselves
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser(description=__doc__):
    p = Parser(description=description.split("\n\n")[0], formatter_class=HelpFormatter)
    a = p.add_argument
    # reweighting
    a("--method", default="irdro", choices=reweight.METHODS, help="how per-sample losses are weighted")
    a("--tau", type=float, default=1.0, help="IR-DRO temperature: w = softmax(loss / tau)")
    a("--skip", type=float, default=0.125, help="MidRanking: fraction of highest-loss samples skipped")
    a("--keep", type=float, default=0.5, help="MidRanking: fraction kept after the skipped ones")
    # data
    a("--data", default=str(prepare_data.DEFAULT_DATA_DIR), help="folder written by prepare_data.py")
    a("--block_size", type=int, default=None,
      help=f"most target tokens per sample (context length) {by_mode('block_size')}")
    a("--batch_size", type=int, default=8, help="micro-batch size (samples per forward pass)")
    a("--grad_accum", type=int, default=None, help=f"micro-batches per optimizer step {by_mode('grad_accum')}")
    # model (from scratch)
    a("--n_layer", type=int, default=4, help="transformer blocks")
    a("--n_head", type=int, default=4, help="attention heads")
    a("--n_embd", type=int, default=128, help="embedding width")
    a("--dropout", type=float, default=0.0, help="dropout probability (0 for continual training)")
    a("--bias", action=argparse.BooleanOptionalAction, default=True, help="biases in Linear/LayerNorm")
    a("--init_from", default="scratch", help="'scratch', 'resume' (from --out_dir), or an earlier out_dir")
    a("--pretrained", default=None, help="continual training of a Hugging Face GPT-2 / OPT / LLaMA-family "
      "checkpoint: a local folder or, online, a hub name (its data must be prepared with its tokenizer)")
    a("--grad_ckpt", action="store_true", help="activation checkpointing: less memory, ~30%% more compute")
    # optimisation
    a("--max_iters", type=int, default=None, help=f"optimizer steps {by_mode('max_iters')}")
    a("--lr", type=float, default=None, help=f"peak learning rate {by_mode('lr')}")
    a("--min_lr", type=float, default=None, help=f"cosine schedule: final learning rate {by_mode('min_lr')}")
    a("--schedule", default=None, choices=("cosine", "constant"),
      help=f"learning-rate schedule after warm-up {by_mode('schedule')}")
    a("--warmup_iters", type=int, default=None, help=f"linear warm-up steps {by_mode('warmup_iters')}")
    a("--weight_decay", type=float, default=None,
      help=f"AdamW weight decay (matrices only) {by_mode('weight_decay')}")
    a("--beta1", type=float, default=0.9, help="AdamW beta1")
    a("--beta2", type=float, default=None, help=f"AdamW beta2 {by_mode('beta2')}")
    a("--grad_clip", type=float, default=1.0, help="clip the gradient norm (0 = off)")
    # evaluation, logging, output
    a("--eval_interval", type=int, default=50, help="evaluate and checkpoint every this many steps")
    a("--keep_last", type=int, default=2, help="checkpoints kept in out_dir (ckpt.pt is the latest)")
    a("--eval_samples", type=int, default=128, help="held-out samples in the val loss")
    a("--out_dir", default="out/{method}", help="where checkpoints and logs go; {method} is replaced")
    a("--seed", type=int, default=1337, help="model init and the data order")
    a("--wandb", default=None, metavar="PROJECT", help="also log to Weights & Biases (needs `pip install wandb`)")
    # system
    a("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps")
    a("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
      help="auto: bfloat16 where supported, float16 (with loss scaling) on older GPUs, float32 on CPU")
    a("--compile", action=argparse.BooleanOptionalAction, default="auto",
      help="torch.compile the model; auto: on for CUDA")
    a("--fsdp", action="store_true", help="under torchrun: shard parameters, gradients and optimizer state "
      "over the processes (FSDP2) instead of replicating them (DDP)")
    return p


def get_args(argv=None, parser=None):
    args = (parser or build_parser()).parse_args(argv)
    for flag, value in (PRETRAINED_DEFAULTS if args.pretrained else SCRATCH_DEFAULTS).items():
        if getattr(args, flag) is None:
            setattr(args, flag, value)
    args.out_dir = args.out_dir.format(method=args.method)
    args.compile = args.compile is True or (args.compile == "auto" and pick_device(args.device).type == "cuda")
    return args


# -----------------------------------------------------------------------------
# data: documents -> samples -> the micro-batches of optimizer step k

def load_split(data_dir, split, block_size):
    """A split as a table of samples. A document of L tokens has L-1 targets; it is cut into
    consecutive chunks of at most block_size targets, so no sample crosses a document boundary.
    Instruction data (prepare_data.py --format instruct): one example is one sample, never chunked, and its
    mask (1 = target) keeps the prompt out of the loss."""
    meta = json.loads((data_dir / "meta.json").read_text())
    tokens = np.memmap(data_dir / f"{split}.bin", dtype=meta["dtype"], mode="r")
    mask = None
    if meta.get("format") == "instruct":
        if meta["max_len"] - 1 > block_size:
            raise ValueError(f"{data_dir} holds instruction examples of up to {meta['max_len']} tokens, which must "
                             f"not be chunked: re-prepare with --max_len {block_size + 1} (or less) or raise "
                             f"--block_size to {meta['max_len'] - 1}")
        mask = np.memmap(data_dir / f"{split}_mask.bin", dtype=np.uint8, mode="r")
    docs = np.load(data_dir / f"{split}_docs.npz")
    offsets, ids = docs["offsets"], docs["ids"]
    n_targets = np.maximum(np.diff(offsets) - 1, 0)
    n_chunks = -(-n_targets // block_size)  # ceil division
    d = np.repeat(np.arange(len(ids)), n_chunks)  # document index of every sample
    chunk = np.arange(len(d)) - np.repeat(np.cumsum(n_chunks) - n_chunks, n_chunks)
    start = offsets[d] + chunk * block_size
    end = np.minimum(start + block_size + 1, offsets[d + 1])  # tokens [start, end) of the sample
    return dict(tokens=tokens, start=start, end=end, doc=ids[d], meta=meta, mask=mask)


def get_batch(data, samples, block_size, device):
    """Samples -> inputs x and targets y, both (len(samples), block_size). Short samples are padded
    at the end: with causal attention the padding never influences real positions, and its targets
    are IGNORE_INDEX so it never counts in a loss."""
    x = np.zeros((len(samples), block_size), dtype=np.int64)
    y = np.full((len(samples), block_size), IGNORE_INDEX, dtype=np.int64)
    for row, s in enumerate(samples):
        seq = data["tokens"][data["start"][s]:data["end"][s]].astype(np.int64)
        x[row, :len(seq) - 1], y[row, :len(seq) - 1] = seq[:-1], seq[1:]
        if data.get("mask") is not None:  # instruction data: only response tokens (and the eos) are targets
            target = data["mask"][data["start"][s] + 1:data["end"][s]]
            y[row, :len(seq) - 1][target == 0] = IGNORE_INDEX
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    if device.type == "cuda":  # pinned memory lets the copy overlap with compute
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


@lru_cache(maxsize=2)
def epoch_order(seed, epoch, n_samples):
    return np.random.default_rng([seed, epoch]).permutation(n_samples)


def step_samples(seed, step, n, n_samples):
    """The n samples of optimizer step `step`: positions step*n .. step*n+n-1 of an endless stream
    of epochs, each a fresh permutation. A function of (seed, step, n) alone, so the data does not
    depend on how the step is split into micro-batches or processes, and resume needs no state."""
    g = step * n + np.arange(n)
    return np.array([epoch_order(seed, e, n_samples)[i] for e, i in zip(g // n_samples, g % n_samples)])


# -----------------------------------------------------------------------------
# processes: torchrun starts one per GPU; one process is rank 0 of a world of 1

def world():
    """(rank, world size) of this process; (0, 1) outside torchrun."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def all_max(t):
    if dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def all_sum(t):
    if dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t)
    return t


def all_cat(t):
    """The tensors of all ranks, concatenated in rank order."""
    if not dist.is_initialized():
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


# checkpoints hold the full (unsharded) state on rank 0's CPU, with parameter names as the optimizer's keys:
# one format whatever the number of processes and with or without FSDP
FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)


def grad_sync(model, last):
    """DDP all-reduces gradients in a backward pass unless it runs under no_sync (forward included), so
    the micro-batches of a step accumulate locally and only the last one communicates. FSDP has no
    no_sync here on purpose: it reduce-scatters every micro-batch, which keeps gradients sharded."""
    return nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()


# -----------------------------------------------------------------------------
# one optimizer step's forward and backward passes

def forward_backward(model, batches, method, tau, skip, keep, ctx, scale=lambda loss: loss):
    """Leave grad = d/dtheta sum_i w_i l_i in the parameters, with w computed by reweight.py from
    the losses of ALL micro-batches of the effective batch. Returns (losses, weights) of all of it.

    Memory stays that of one micro-batch; the official code instead kept every graph alive until the
    weights were known. How each method gets there without that:
    - erm: w_i = 1/n is known in advance, so each micro-batch backpropagates sum(l)/n.
    - irdro: w_i = exp(l_i/tau) / S with S = sum_j exp(l_j/tau) over the whole batch. The numerator
      is per sample and S a common scalar, so we accumulate sum_i exp((l_i - m)/tau) grad l_i with a
      running max m (for overflow safety), rescale the accumulated gradient by exp((m_old - m)/tau)
      when m grows, and divide by S at the end: online softmax. No extra forward pass.
    - midrank: a sample's weight depends on its rank in the whole batch, which only the last
      micro-batch reveals, so we first score all samples without building graphs (one forward, about
      a third of a training step), then backpropagate only the kept ones. With keep < 2/3 this is
      cheaper than ERM, since the dropped samples never pay for a backward pass.

    Under torchrun, `batches` are this rank's share (rank r holds samples r*n_r .. (r+1)*n_r - 1 of the
    step) and the weights are still those of the global batch (the official code normalised per device):
    irdro shares the running max m with one all-reduce per micro-batch, so every rank rescales by the
    same factor, and sums S at the end; midrank gathers the scores (n floats); DDP/FSDP average the
    gradients of the ranks, and since the weights already sum to 1 globally each rank's loss is
    multiplied by the world size to turn that mean into the sum.
    `scale` is the loss scaler's scale (float16 training); gradients are linear in it."""
    rank, size = world()
    n = size * sum(len(x) for x, _ in batches)
    # taken now, before any forward: between a module's forward and backward FSDP registers its gathered
    # parameters on it, while the gradients accumulate on these (sharded) ones
    params = list(model.parameters())

    def grads():
        return [p.grad for p in params if p.grad is not None]

    def backward(loss):
        scale(loss * size).backward()

    if method == "midrank":
        with torch.no_grad(), ctx:
            mine = torch.cat([model(x, y)[1] for x, y in batches]).float()
        losses = all_cat(mine)
        w = reweight.weights(losses, "midrank", skip=skip, keep=keep)
        w_mine = w[rank * len(mine):(rank + 1) * len(mine)]
        X, Y = torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])
        chunks = w_mine.nonzero().squeeze(1).split(len(batches[0][0]))  # kept samples, re-packed
        if len(chunks[0]) == 0:  # none kept here: still join the gradient sync, with a weight-0 sample
            chunks = [torch.zeros(1, dtype=torch.long, device=X.device)]
        for i, rows in enumerate(chunks):
            with grad_sync(model, last=i == len(chunks) - 1):
                with ctx:
                    _, loss = model(X[rows], Y[rows])
                backward((loss * w_mine[rows]).sum())
        return losses, w
    losses, m, S = [], torch.tensor(-math.inf, device=batches[0][0].device), 0.0
    for i, (x, y) in enumerate(batches):
        with grad_sync(model, last=i == len(batches) - 1):
            with ctx:
                _, loss = model(x, y)
            l = loss.detach().float()
            losses.append(l)
            if method == "erm":
                coef = torch.full_like(l, 1.0 / n)
            else:  # irdro, online softmax
                m_new = torch.maximum(m, all_max(l.max()))
                if i > 0:  # no .item(): the rescale never waits for the device
                    factor = torch.exp((m - m_new) / tau)
                    torch._foreach_mul_(grads(), factor)
                    S = S * factor
                coef = torch.exp((l - m_new) / tau)
                S, m = S + coef.sum(), m_new
            backward((loss * coef).sum())
    losses = all_cat(torch.cat(losses))
    if method == "irdro":
        torch._foreach_div_(grads(), all_sum(S))
    return losses, reweight.weights(losses, method, tau=tau)


# -----------------------------------------------------------------------------

def lr_at(step, args):
    """Linear warm-up, then constant or cosine decay to min_lr at max_iters."""
    if step < args.warmup_iters:
        return args.lr * (step + 1) / (args.warmup_iters + 1)
    if args.schedule == "constant":
        return args.lr
    progress = (step - args.warmup_iters) / max(1, args.max_iters - args.warmup_iters)
    return args.min_lr + 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))) * (args.lr - args.min_lr)


@torch.no_grad()
def evaluate(model, data, samples, batch_size, block_size, device, ctx):
    """Plain mean of the per-sample losses over a fixed set of held-out samples. Under torchrun each rank
    scores an equal share, the last one padded with a repeated sample that does not count: an FSDP
    forward pass is a collective, so every rank must run the same number of them."""
    rank, size = world()
    per_rank = -(-len(samples) // size)
    idx = rank * per_rank + np.arange(per_rank)
    counts = idx < len(samples)
    idx = samples[np.minimum(idx, len(samples) - 1)]
    model.eval()
    total = 0.0
    for i in range(0, per_rank, batch_size):
        x, y = get_batch(data, idx[i:i + batch_size], block_size, device)
        with ctx:
            loss = model(x, y)[1].float()
        total += loss[torch.from_numpy(counts[i:i + batch_size]).to(device)].sum().item()
    model.train()
    if hasattr(model, "reshard"):  # FSDP keeps the root's parameters gathered after a forward: free them
        model.reshard()  # (and register the sharded ones again, for forward_backward)
    if size > 1:
        total = all_sum(torch.tensor(total, dtype=torch.float64, device=device)).item()
    return total / len(samples)


def save_checkpoint(obj, out_dir, keep_last):
    """Write out_dir/ckpt-<step>.pt, point out_dir/ckpt.pt at it, keep the newest keep_last.

    Every file is written under a temporary name, flushed to disk and then renamed (atomic), and old
    checkpoints are pruned only after that: a crash at any moment leaves ckpt.pt complete, either the
    old one or the new one, never a torn one."""
    path = out_dir / f"ckpt-{obj['step']:07d}.pt"
    tmp = out_dir / "ckpt.tmp"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    os.link(path, tmp)  # ckpt.pt: a second name for the same file, swapped in atomically
    os.replace(tmp, out_dir / "ckpt.pt")
    fd = os.open(out_dir, os.O_RDONLY)  # make the renames themselves durable
    os.fsync(fd)
    os.close(fd)
    for old in sorted(out_dir.glob("ckpt-*.pt"))[:-keep_last]:
        old.unlink()


def load_checkpoint(path):
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}: check --init_from / --out_dir")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated or not a checkpoint at all
        raise ValueError(f"{path} is truncated or corrupt ({type(e).__name__}): resume from an older "
                         f"ckpt-*.pt beside it (copy it to ckpt.pt) or start again") from None


def drop_records_after(path, step):
    """Keep the JSON lines of steps before `step` (and the evaluation at `step` itself)."""
    if path.exists():
        records = [json.loads(line) for line in path.read_text().splitlines()]
        keep = [r for r in records if r["step"] < step or (r.get("type") == "eval" and r["step"] == step)]
        path.write_text("".join(json.dumps(r) + "\n" for r in keep))


def pick_device(name):
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


# Dense (no sparsity) bf16/fp16 tensor-core peaks from the vendors' spec sheets, FLOP/s. MFU is reported
# only for a GPU named here, rather than against a guess.
PEAK_FLOPS = {"H200": 989e12, "H100 SXM": 989e12, "H100 80GB HBM3": 989e12, "H100 NVL": 835e12,
              "H100 PCIe": 756e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "V100": 125e12, "T4": 65e12}


def peak_flops(device, dtype):
    if device.type != "cuda" or dtype == "float32":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def pick_dtype(name, device):
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "float32"


def scratch_config(args, vocab_size):
    """The model of a from-scratch run; the vocabulary is padded to a multiple of 64 (faster matmuls;
    the extra tokens never occur and the model learns to give them ~zero probability)."""
    return GPTConfig(block_size=args.block_size, vocab_size=-(-vocab_size // 64) * 64, n_layer=args.n_layer,
                     n_head=args.n_head, n_embd=args.n_embd, dropout=args.dropout, bias=args.bias)


def setup(args, size=1, distributed=False):
    """Everything that can fail on bad input happens here, before any training or writing.
    `size`: the number of processes; `distributed`: started by torchrun."""
    if args.fsdp and not distributed:
        raise ValueError("--fsdp shards the model over torchrun's processes: launch with "
                         "torchrun --nproc_per_node N train.py --fsdp ... (N = 1 works too)")
    if args.fsdp and pick_dtype(args.dtype, pick_device(args.device)) == "float16":
        raise ValueError("--fsdp does not support float16 loss scaling here: use --dtype bfloat16 or float32")
    if args.method == "irdro":
        reweight.check_tau(args.tau)
    n = args.batch_size * args.grad_accum * size
    if args.method == "midrank":
        reweight.midrank_counts(n, args.skip, args.keep)
    for flag in ("batch_size", "grad_accum", "block_size", "eval_interval", "eval_samples", "keep_last"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.max_iters < 0:
        raise ValueError(f"--max_iters must be >= 0, got {args.max_iters}")
    data_dir = Path(args.data)
    if not (data_dir / "meta.json").exists():
        if data_dir.resolve() != prepare_data.DEFAULT_DATA_DIR.resolve():
            raise FileNotFoundError(f"no prepared data in {data_dir} (meta.json missing): run "
                                    f"python prepare_data.py --dataset YOUR_DATA --out_dir {data_dir}")
        if size > 1:  # several processes would write the same files at once
            raise FileNotFoundError(f"{data_dir} is not prepared yet: run python prepare_data.py once, then torchrun")
        prepare_data.prepare()  # the embedded default corpus: prepare it on first use
    train_data = load_split(data_dir, "train", args.block_size)
    val_data = load_split(data_dir, "val", args.block_size)
    n_train = len(train_data["start"])
    if n_train == 0:
        raise ValueError(f"no training samples in {data_dir}: its train split is empty; prepare more documents")
    if n > n_train:
        raise ValueError(f"effective batch of {n} samples exceeds the {n_train} training samples: "
                         f"lower --batch_size or --grad_accum" + (" (or use fewer processes)" if size > 1 else ""))
    if len(val_data["start"]) == 0:
        raise ValueError(f"no validation samples in {data_dir}: re-run prepare_data.py with a larger --val_fraction")

    out_dir = Path(args.out_dir)
    ckpt, meta = None, train_data["meta"]
    torch.manual_seed(args.seed)  # the model's initialisation (from scratch) and dropout
    if args.init_from != "scratch":  # one of our own runs: this one (resume) or an earlier one
        ckpt_path = out_dir / "ckpt.pt" if args.init_from == "resume" else Path(args.init_from) / "ckpt.pt"
        ckpt = load_checkpoint(ckpt_path)
        try:
            model = GPT(GPTConfig(**ckpt["model_args"]))
            model.load_state_dict(ckpt["model"])
        except (KeyError, TypeError, RuntimeError) as e:
            raise ValueError(f"{ckpt_path} is not a checkpoint of this code's GPT ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:120]}): pass a train.py out_dir") from None
        if ckpt.get("tokenizer") != tokenizer_id(meta):
            raise ValueError(f"{ckpt_path} was trained on {ckpt.get('tokenizer')} tokens but {data_dir} holds "
                             f"{tokenizer_id(meta)} tokens: prepare the data with the model's tokenizer")
    elif args.pretrained:
        folder = checkpoint_folder(args.pretrained)
        # float32 master weights: AdamW's tiny updates (lr 2e-6) would vanish in bf16 weights; the
        # forward and backward passes still run in bf16 under autocast on GPUs
        model = GPT.from_pretrained(folder, dtype=torch.float32)
        theirs = prepare_data.load_tokenizer(folder).fingerprint
        if theirs != tokenizer_id(meta):
            raise ValueError(f"{data_dir} was tokenized with {meta['tokenizer']}, not with the tokenizer of "
                             f"{args.pretrained}: run python prepare_data.py --tokenizer {args.pretrained} ...")
    else:
        if args.n_embd % args.n_head:
            raise ValueError(f"--n_embd {args.n_embd} is not divisible by --n_head {args.n_head}")
        model = GPT(scratch_config(args, meta["vocab_size"]))
    if args.block_size > model.config.block_size:
        raise ValueError(f"--block_size {args.block_size} exceeds the model's {model.config.block_size} positions")
    if meta["vocab_size"] > model.config.vocab_size:
        raise ValueError(f"{data_dir} has a vocabulary of {meta['vocab_size']} tokens, the model only "
                         f"{model.config.vocab_size}: prepare the data with the model's tokenizer")
    model.grad_ckpt = args.grad_ckpt
    if args.wandb:
        try:
            import wandb  # noqa: F401  (optional: never required)
        except ImportError:
            raise ValueError("--wandb needs the wandb package: pip install wandb, or drop --wandb") from None
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".writable-{os.getpid()}"  # one per process: torchrun's ranks all check at once
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise ValueError(f"cannot write to --out_dir {out_dir} ({e.strerror}): choose a writable folder") from None
    return train_data, val_data, model, ckpt


def tokenizer_id(meta):
    """What identifies a data folder's tokenizer: the fingerprint of its vocabulary where recorded."""
    return meta.get("tokenizer_fingerprint") or meta["tokenizer"]


def main(argv=None):
    args = get_args(argv)
    distributed = "RANK" in os.environ  # started by torchrun (or another launcher that sets its variables)
    try:
        train_data, val_data, model, ckpt = setup(args, int(os.environ.get("WORLD_SIZE", "1")), distributed)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        sys.exit(2)

    device = pick_device(args.device)
    if distributed:  # one process per GPU (or per CPU process group, for tests), each its own device
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, size = world()
    master = rank == 0  # the one process that logs and writes files
    dtype = pick_dtype(args.dtype, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls on Ampere+: much faster, ~fp32 loss
        torch.backends.cudnn.allow_tf32 = True
    ctx = (nullcontext() if dtype == "float32" else
           torch.autocast(device_type=device.type, dtype=getattr(torch, dtype)))
    scaler = torch.amp.GradScaler(device.type, enabled=(dtype == "float16"))

    raw_model = model
    if args.fsdp:  # every block is a unit whose parameters are gathered just before use and freed after
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        policy = MixedPrecisionPolicy(param_dtype=getattr(torch, dtype), reduce_dtype=torch.float32)
        for block in model.transformer.h:
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)  # also moves the shards to the device
    else:
        model.to(device)
    optimizer = model.configure_optimizer(args.weight_decay, args.lr, (args.beta1, args.beta2), device.type)
    step = 0
    if size > 1:  # the same initial weights everywhere, but each rank its own dropout masks
        torch.manual_seed(args.seed + rank)
    if args.init_from == "resume":  # same run: restore the optimizer, step counter and RNG too
        set_optimizer_state_dict(model, optimizer, ckpt["optimizer"], options=FULL_STATE)
        scaler.load_state_dict(ckpt["scaler"])
        step = ckpt["step"]
        if rank < len(ckpt["rng"]):  # a checkpoint of a smaller world has no state for this rank
            torch.set_rng_state(ckpt["rng"][rank]["torch"])
            if device.type == "cuda" and ckpt["rng"][rank].get("cuda") is not None:
                torch.cuda.set_rng_state(ckpt["rng"][rank]["cuda"])
    if args.compile:
        model = torch.compile(model)
    if distributed and not args.fsdp:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    out_dir = Path(args.out_dir)
    log_file = weights_file = None
    if master:
        (out_dir / "args.json").write_text(json.dumps(vars(args), indent=1))
        if args.init_from == "resume":  # the run may have gone on past its checkpoint before it died
            for name in ("log.jsonl", "weights.jsonl"):
                drop_records_after(out_dir / name, step)
        mode = "a" if args.init_from == "resume" else "w"
        log_file, weights_file = open(out_dir / "log.jsonl", mode), open(out_dir / "weights.jsonl", mode)
        if args.wandb:
            import wandb
            wandb.init(project=args.wandb, name=out_dir.name, config=vars(args))

    def log(record, text):
        if not master:
            return
        print(text, flush=True)
        log_file.write(json.dumps(record) + "\n")
        log_file.flush()
        if args.wandb:
            wandb.log({k: v for k, v in record.items() if k not in ("type", "step")}, step=record["step"])

    n_rank = args.batch_size * args.grad_accum
    n = n_rank * size
    n_train = len(train_data["start"])
    eval_set = np.sort(np.random.default_rng(0).permutation(len(val_data["start"]))[:args.eval_samples])
    if master:
        print(f"{raw_model.num_params() / 1e6:.2f}M parameters | {args.method} | {n_train} train samples | "
              f"effective batch {n} = {args.batch_size} x {args.grad_accum}" + (f" x {size} processes" if size > 1
              else "") + f" | {device} {dtype}" + (" | FSDP" if args.fsdp else ""))

    val_loss, last_eval = None, (step if args.init_from == "resume" else None)
    def checkpoint(step, val_loss):
        # under FSDP gathering the full state is a collective: all ranks call, rank 0 writes
        state = dict(model=get_model_state_dict(raw_model, options=FULL_STATE),
                     optimizer=get_optimizer_state_dict(raw_model, optimizer, options=FULL_STATE))
        rng = [dict(torch=torch.get_rng_state(), cuda=torch.cuda.get_rng_state() if device.type == "cuda" else None)]
        if size > 1:  # every rank's own dropout stream, in rank order
            rng_mine, rng = rng[0], [None] * size
            dist.all_gather_object(rng, rng_mine)
        if master:
            save_checkpoint(dict(state, scaler=scaler.state_dict(), model_args=asdict(raw_model.config),
                                 args=vars(args), step=step, val_loss=val_loss, rng=rng,
                                 tokenizer=tokenizer_id(train_data["meta"])), out_dir, args.keep_last)

    # a pre-empted or interrupted run finishes its step, checkpoints it and exits 0 (see the loop)
    stop_signal = []
    handlers = {sig: signal.signal(sig, lambda signum, frame: stop_signal.append(signum))
                for sig in (signal.SIGTERM, signal.SIGINT)}
    peak = peak_flops(device, dtype)
    # model FLOPs per token of a training step (forward + backward = 3 x forward): 6 per parameter plus
    # attention's 12 * layers * width * context (the PaLM appendix's count)
    C = raw_model.config
    flops_per_token = 6 * raw_model.num_params() + 12 * C.n_layer * C.n_head * C.head_dim * args.block_size
    t_start, first_step = time.time(), step
    while True:
        if step != last_eval and (step % args.eval_interval == 0 or step == args.max_iters):
            val_loss = evaluate(model, val_data, eval_set, args.batch_size, args.block_size, device, ctx)
            log(dict(type="eval", step=step, val_loss=val_loss), f"==> step {step}: val loss {val_loss:.4f}")
            if step > 0:
                checkpoint(step, val_loss)
        if step >= args.max_iters:
            break
        stop = bool(stop_signal)
        if size > 1:  # the ranks may get the signal at different moments: all stop at the same step
            stop = all_max(torch.tensor(float(stop), device=device)).item() > 0
        if stop:  # SIGTERM / SIGINT arrived during the last step: save it, then leave cleanly
            checkpoint(step, val_loss)
            if master:
                print(f"stopped by {signal.Signals(stop_signal[0]).name if stop_signal else 'a signal'} after "
                      f"step {step}: checkpoint saved in {out_dir}; continue with --init_from resume")
            break

        t0 = time.time()
        lr = lr_at(step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        samples = step_samples(args.seed, step, n, n_train)  # the global batch; this rank's share below
        mine = samples[rank * n_rank:(rank + 1) * n_rank]
        batches = [get_batch(train_data, mine[i:i + args.batch_size], args.block_size, device)
                   for i in range(0, n_rank, args.batch_size)]
        losses, w = forward_backward(model, batches, args.method, args.tau, args.skip, args.keep,
                                     ctx, scaler.scale)
        losses, w = losses.cpu(), w.cpu()  # the one device sync of the step
        docs = train_data["doc"][samples]
        if torch.isfinite(losses).all():  # the losses of the global batch: every rank decides alike
            if args.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            scale = scaler.get_scale()
            scaler.step(optimizer)  # float16: skipped by the scaler if a gradient overflowed ...
            scaler.update()  # ... which then halves the loss scale and tries again next step
            if scaler.get_scale() < scale and master:
                print(f"step {step}: float16 gradient overflow, step skipped, loss scale now {scaler.get_scale():g}")
        elif master:  # one corrupt sample must not poison the model: drop this step, keep going
            bad = docs[~torch.isfinite(losses).numpy()].tolist()
            print(f"step {step}: non-finite loss in documents {bad}: step skipped", file=sys.stderr)
        optimizer.zero_grad(set_to_none=True)
        dt = time.time() - t0

        ntok = int((train_data["end"][samples] - train_data["start"][samples] - 1).sum())  # targets, all ranks
        rec = dict(type="train", step=step, loss=losses.mean().item(), wloss=(w * losses).sum().item(),
                   wmax=w.max().item(), ess=reweight.effective_sample_size(w), lr=lr, tok_per_s=ntok / dt)
        if args.method == "irdro":
            rec["tilted"] = reweight.tilted_loss(losses, args.tau).item()
        eta = (time.time() - t_start) / (step + 1 - first_step) * (args.max_iters - step - 1)
        mfu = ""
        if peak:  # an ERM step's FLOPs over the effective batch, against the GPUs' dense bf16 peak
            rec["mfu"] = flops_per_token * n * args.block_size / dt / (peak * size)
            mfu = f" | MFU {rec['mfu']:.1%}"
        log(rec, f"step {step + 1}/{args.max_iters} | loss {rec['loss']:.4f} | weighted {rec['wloss']:.4f} | "
                 f"w max {rec['wmax']:.3f} | ess {rec['ess']:.1f}/{n} | lr {lr:.2e} | "
                 f"{rec['tok_per_s'] / 1e3:.1f}k tok/s{mfu} | {dt * 1000:.0f} ms | ETA {eta / 60:.1f} min")
        if master:
            weights_file.write(json.dumps(dict(step=step, loss=losses.tolist(), weight=w.tolist(),
                                               doc=docs.tolist())) + "\n")
            weights_file.flush()
        step += 1
    for sig, handler in handlers.items():
        signal.signal(sig, handler)
    state = get_model_state_dict(raw_model, options=FULL_STATE)  # FSDP: a collective
    if master:
        log_file.close()
        weights_file.close()
        export(raw_model.config, state, args, out_dir / "hf")
    if distributed:  # leave together: a rank destroying its group while another still exports can hang
        dist.barrier()
        dist.destroy_process_group()
    return dict(val_loss=val_loss, model=raw_model)


def export(config, state, args, hf_dir):
    """The trained model in Hugging Face's layout, with the tokenizer files of the pretrained checkpoint,
    for transformers and lm-evaluation-harness (`lm_eval --model hf --model_args pretrained=DIR`)."""
    with torch.device("meta"):  # no initialisation: the weights are those of `state`
        model = GPT(config)
    model.load_state_dict(state, assign=True)
    model.save_pretrained(hf_dir)
    if args.pretrained:
        folder = checkpoint_folder(args.pretrained)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                     "vocab.json", "merges.txt", "generation_config.json"):
            if (folder / name).exists():
                shutil.copy(folder / name, hf_dir / name)
    print(f"exported {hf_dir}")


if __name__ == "__main__":
    main()
