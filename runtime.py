"""
The plumbing of a training run, kept out of train.py so that the method's step reads top to bottom:
processes (torchrun: DDP or FSDP2), device and precision (autocast, float16 loss scaling), pre-emption
signals, checkpoint files, logs (console, jsonl, Weights & Biases) and progress (tok/s, MFU, ETA).
Nothing here knows about reweighting.
"""

import errno
import json
import math
import os
import shutil
import signal
import sys
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

import memory
from model import GPT, GPTConfig


# -----------------------------------------------------------------------------
# processes: torchrun starts one per GPU; a plain run is rank 0 of a world of 1

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


def grad_sync(model, last):
    """DDP all-reduces gradients in a backward pass unless it runs under no_sync (forward included), so
    the micro-batches of a step accumulate locally and only the last one communicates. FSDP has no
    no_sync here on purpose: it reduce-scatters every micro-batch, which keeps gradients sharded."""
    return nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()


def start(device_name, distributed):
    """The device of this process; under torchrun also joins the process group (one GPU per process)."""
    device = pick_device(device_name)
    if distributed:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def finish(distributed, signum=0):
    """Leave: under torchrun together; a run stopped by a signal then exits 128 + its number (SIGTERM: 143), as a
    killed process would, so that `train.py && next` does not take the stop for a finished run."""
    if distributed:  # leave together: a rank destroying its group while another still exports can hang
        dist.barrier()
        dist.destroy_process_group()
    while HELD:  # the run folders this process wrote are free again
        HELD.popitem()[1].close()
    if signum:
        sys.exit(128 + signum)


# FSDP2 (fully_shard) runs on CUDA from torch 2.6, on CPU (gloo) from 2.7: 2.6's lacks the CPU stream no-ops it calls
FSDP_ON_CPU = torch.torch_version.TorchVersion(torch.__version__) >= (2, 7)


def shard_or_move(model, device, dtype, fsdp):
    """FSDP2 with DDP's numerics (docs/training.md, Precision): each block's matmul weights, its attention and MLP
    together, are one unit gathered in `dtype`, the very values autocast makes of the float32 weights under DDP, and
    take their inputs as they come (the float32 residual stream). Everything else, gathered as stored (float32),
    stays with the root: the token table (its output starts the residual stream), the norms (they compute in
    float32, from float32 gains) and a tied head; an untied head is a float32 unit of its own, gathered only while the
    loss runs, whose gradient loss.py sums over chunks in float32. Gradients are reduced in float32. (Gathering the
    blocks in float32 too would match as well, but autocast's bf16 copies of every block's weights would then live
    until the backward, unsharded, as under DDP.) Without FSDP the whole model moves to the device."""
    if not fsdp:
        return model.to(device)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    # (a Linear's output of a 3-D input is a view, which recent torch warns of; Block adds it out of place)
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    matmuls = MixedPrecisionPolicy(param_dtype=getattr(torch, dtype), reduce_dtype=torch.float32,
                                   cast_forward_inputs=False)
    as_stored = MixedPrecisionPolicy(reduce_dtype=torch.float32)
    for block in model.transformer.h:  # its norms are the root's
        fully_shard([block.attn, block.mlp], mp_policy=matmuls)
    if not model.config.tie_embeddings:  # (model.OutputHead: the loss is the head's own forward)
        fully_shard(model.lm_head, mp_policy=as_stored)
    return fully_shard(model, mp_policy=as_stored)  # also moves the shards to the device


def compile_and_wrap(model, compile, ddp, device):
    if compile:
        model = torch.compile(model)
    if ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model


# -----------------------------------------------------------------------------
# device and precision

def pick_device(name):
    """--device as a torch.device; ValueError (one line) for a name torch does not know or a device not here."""
    if name != "auto":
        try:
            device = torch.device(name)
        except RuntimeError:
            raise ValueError(f"--device {name!r} is not a device: use auto, cpu, cuda, cuda:N or mps") from None
        if device.type == "cuda":
            count = torch.cuda.device_count()
        elif device.type == "mps":
            count = int(torch.backends.mps.is_available())
        else:
            count = 1
        if (device.index or 0) >= count:
            raise ValueError(f"--device {name}: this machine has {count} {device.type} device(s) visible to torch: "
                             "use --device auto or cpu")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(name, device):
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "float32"


def precision(dtype, device):
    """(autocast context, loss scaler): bf16/fp16 matmuls under autocast; float16 also needs its
    gradients scaled up so that small ones do not underflow (the scaler is a no-op otherwise)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls on Ampere+: much faster, ~fp32 loss
        torch.backends.cudnn.allow_tf32 = True
    ctx = nullcontext() if dtype == "float32" else torch.autocast(device_type=device.type, dtype=getattr(torch, dtype))
    return ctx, torch.amp.GradScaler(device.type, enabled=(dtype == "float16"))


def optimizer_step(optimizer, scaler, params, grad_clip):
    """Clip and step. Returns False where float16 gradients overflowed: the scaler then skips the
    step and halves its scale, to try again next step."""
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    scale = scaler.get_scale()
    scaler.step(optimizer)
    scaler.update()
    return scaler.get_scale() >= scale


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:  # torchao keeps lr as a tensor, an input of its compiled step: filled
        if torch.is_tensor(group["lr"]):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


def seed_rounding(optimizer, seed, device):
    """bf16 stochastic rounding draws random bits in every optimizer step. Drawn from the global generator they
    would differ between DDP ranks (seeded apart for dropout), so their replicas would drift apart, and they would
    shift dropout's stream. Each step draws them instead from the generator seeded by (seed, the optimizer's own
    step count, which a resumed run restores), forked so that the global one is left as it was."""
    fork = []

    def before(opt, args, kwargs):
        steps = next(iter(opt.state.values()), {}).get("step", 0)  # a CPU tensor in torchao: no device sync
        fork.append(torch.random.fork_rng(devices=[device] if device.type == "cuda" else []))
        fork[-1].__enter__()
        torch.manual_seed(seed * 1_000_003 + int(steps))

    optimizer.register_step_pre_hook(before)
    optimizer.register_step_post_hook(lambda opt, args, kwargs: fork.pop().__exit__(None, None, None))


# -----------------------------------------------------------------------------
# checkpoints: the full (unsharded) state on rank 0's CPU, with parameter names as the optimizer's keys,
# one format whatever the number of processes and with or without FSDP

FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_state(model, optimizer, device):
    """Model, optimizer and every rank's RNG state, gathered (collectives under torchrun: all ranks call)."""
    rng = [dict(torch=torch.get_rng_state(), cuda=torch.cuda.get_rng_state() if device.type == "cuda" else None)]
    if dist.is_initialized():  # every rank's own dropout stream, in rank order
        own, rng = rng[0], [None] * dist.get_world_size()
        dist.all_gather_object(rng, own)
    return dict(model=model_state(model), rng=rng,
                optimizer=get_optimizer_state_dict(model, optimizer, options=FULL_STATE))


def model_state(model):
    return get_model_state_dict(model, options=FULL_STATE)


def restore(ckpt, model, optimizer, scaler, device):
    """Resume: optimizer, loss scale and this rank's RNG as they were; returns the step to go on from."""
    set_optimizer_state_dict(model, optimizer, ckpt["optimizer"], options=FULL_STATE)
    scaler.load_state_dict(ckpt["scaler"])
    rank = world()[0]
    if rank < len(ckpt["rng"]):  # a checkpoint of a smaller world has no state for this rank
        torch.set_rng_state(ckpt["rng"][rank]["torch"])
        if device.type == "cuda" and ckpt["rng"][rank].get("cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng"][rank]["cuda"])
    return ckpt["step"]


def save_checkpoint(obj, out_dir, keep_last):
    """Write out_dir/ckpt-<step>.pt, point out_dir/ckpt.pt at it, keep the newest keep_last.

    Every file is written under a temporary name, flushed to disk and then renamed (atomic), and old
    checkpoints are pruned only after that: a crash at any moment leaves ckpt.pt complete, either the
    old one or the new one, never a torn one. A full disk: the partial file is removed, Failure (one line)."""
    path = out_dir / f"ckpt-{obj['step']:07d}.pt"
    tmp = out_dir / "ckpt.tmp"
    tmp.unlink(missing_ok=True)  # a kill between link and replace below leaves it a second name of a checkpoint
    with writing(out_dir / "ckpt.pt", tmp):
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


class Failure(Exception):
    """A run that cannot go on (its parameters diverged, the disk is full), in one line: main prints it as
    `train.py: error: ...` and exits 2. What was written before it, the last checkpoint above all, is intact."""


def disk_full(e):
    """Whether `e` comes of a full disk: an OSError ENOSPC, or an error raised while handling one (torch.save's
    zip writer turns it into `RuntimeError: ... unexpected pos`, the OSError in its __context__)."""
    while e is not None:
        if getattr(e, "errno", None) == errno.ENOSPC:
            return True
        e = e.__cause__ or e.__context__
    return False


@contextmanager
def writing(path, tmp=None):
    """Around a write of `path` (through `tmp`, a file or folder removed if the write fails): a full disk
    becomes one line naming the file, rather than a traceback with the cause buried in it."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        if not disk_full(e):
            raise
        raise Failure(f"no space left on device writing {path}: {last_checkpoint(path.parent)}") from None


def last_checkpoint(out_dir):
    """What is left of a run that fails: its last checkpoint (never one of non-finite parameters, save_run), or none."""
    ckpts = sorted(Path(out_dir).glob("ckpt-*.pt"))
    return ("the last checkpoint is intact" if ckpts else "no checkpoint had been written yet") + (
        f" ({out_dir}/ckpt.pt, step {int(ckpts[-1].stem[5:])}: go on from it with --init_from resume)" if ckpts else "")


@contextmanager
def failures_exit():
    """A Failure anywhere in training or at its end: one line on stderr (rank 0's: under torchrun every rank
    raises the same divergence), exit 2."""
    try:
        yield
    except Failure as e:
        if world()[0] == 0:
            print(f"train.py: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


def load_checkpoint(path):
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}: check --init_from / --out_dir")
    try:  # mapped (mmap), not read: a tensor is read when used, so an optimizer state not resumed never is
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:  # truncated or not a checkpoint at all
        raise ValueError(f"{path} is truncated or corrupt ({type(e).__name__}): resume from an older "
                         f"ckpt-*.pt beside it (copy it to ckpt.pt) or start again") from None


def drop_records_after(path, step):
    """Keep the JSON lines of steps before `step` (and the evaluation at `step` itself): kept_records."""
    if path.exists():
        tmp = path.with_name(path.name + ".tmp")  # a kill while rewriting must not lose the records kept
        tmp.write_bytes(b"".join(line + b"\n" for line in kept_records(path, step)))
        os.replace(tmp, path)


def kept_records(path, step):
    """The lines of a run's log.jsonl or weights.jsonl that a resume from `step` keeps: steps before it and the
    evaluation at it. Every record is written as one line ending in a newline, so what follows the last newline is
    a line torn by a kill: dropped. A damaged line (a disk that lost data) past the checkpoint goes too, as the
    records around it do: it is past when a record of step >= `step` comes before it (records are in step order,
    the evaluation at `step` is the last one kept). A damaged line before that would leave a hole in the record
    the run keeps, which a user would want to know rather than have dropped in silence: ValueError, naming it."""
    keep, past = [], False
    for i, line in enumerate(path.read_bytes().split(b"\n")[:-1] if path.exists() else [], 1):
        try:
            record = json.loads(line) if line.strip() else None
            at = None if record is None else int(record["step"])
        except (ValueError, KeyError, TypeError) as e:  # not JSON, not UTF-8, or not a record of train.py's
            if past:
                continue
            why = (e.msg if isinstance(e, json.JSONDecodeError) else "not UTF-8" if isinstance(e, UnicodeDecodeError)
                   else "no step")
            raise ValueError(f"{path} line {i} is damaged ({why}), a record of the run up to its checkpoint of step "
                             f"{step}: delete that line to resume without it") from None
        if at is not None and (at < step or record.get("type") == "eval" and at == step):
            keep.append(line)
        past = past or at is not None and at >= step
    return keep


# -----------------------------------------------------------------------------
# the run folder: one run owns it, one process at a time writes it

RUN_FILES = ("args.json", "args.json.tmp", "log.jsonl", "weights.jsonl", "ckpt.pt", "ckpt.tmp", "hf", "hf.tmp")


HELD = {}  # out_dir -> its lock file, held by this process until finish()


def claim_out_dir(out_dir, resume, overwrite):
    """Make out_dir this run's, once every other input is known good (nothing in it is touched before):
    a lock held for the life of the process (a second writer is refused, naming the first; the OS drops the
    lock when the process dies, even by SIGKILL), then another run's files are refused unless this run
    continues them (resume) or replaces them (overwrite)."""
    import fcntl

    out_dir.mkdir(parents=True, exist_ok=True)
    if out_dir.resolve() not in HELD:  # (one process may run several times into one folder, one after another)
        lock = open(out_dir / ".lock", "a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            raise ValueError(f"{out_dir} is being written by a running train.py ({holder}): wait for it to end, "
                             "or choose another --out_dir") from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()}\n")
        lock.flush()
        HELD[out_dir.resolve()] = lock
    found = sorted(p for p in out_dir.iterdir() if p.name in RUN_FILES or p.match("ckpt-*.pt"))
    if found and not resume:
        if not overwrite:
            names = ", ".join(p.name for p in found[:4]) + (", ..." if len(found) > 4 else "")
            raise ValueError(f"--out_dir {out_dir} holds another run ({names}): pass --overwrite to replace it, "
                             "--init_from resume to continue it, or choose another --out_dir")
        for p in found:
            shutil.rmtree(p) if p.is_dir() else p.unlink()


# -----------------------------------------------------------------------------
# signals: a pre-empted or interrupted run finishes its step, checkpoints it and exits 128 + the signal's number

class StopSignal:
    def __init__(self):
        self.received, self.signum = [], 0
        self.previous = {sig: signal.signal(sig, lambda signum, frame: self.received.append(signum))
                         for sig in (signal.SIGTERM, signal.SIGINT)}

    def flag(self, like):
        """The signal's number (SIGTERM 15, SIGINT 2), max-reduced over the ranks, as a 1-element tensor like `like`:
        the ranks may get it at different moments and must agree on the step and on the exit code. Read on the host
        with the step's losses (train.py), so that the check adds no device sync of its own."""
        return all_max(torch.full((1,), float(self.received[0] if self.received else 0), dtype=like.dtype,
                                  device=like.device))

    def name(self):
        return signal.Signals(self.signum).name if self.signum else "a signal"

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


# -----------------------------------------------------------------------------
# logs and progress: rank 0 alone prints and writes

class RunLog:
    """out_dir/log.jsonl (train and eval records), out_dir/weights.jsonl (every sample's loss and weight),
    the console, and optionally Weights & Biases. On resume, records past the checkpoint are dropped."""

    def __init__(self, out_dir, args, resume_step=None):
        self.on = world()[0] == 0
        if not self.on:
            return
        write_segments(out_dir, args, resume_step)
        if resume_step is not None:
            print(f"resuming from step {resume_step} of {out_dir}", flush=True)
        for name in ("log.jsonl", "weights.jsonl") if resume_step is not None else ():
            drop_records_after(out_dir / name, resume_step)  # the run may have gone on past its checkpoint
        mode = "w" if resume_step is None else "a"
        self.log_file, self.weights_file = open(out_dir / "log.jsonl", mode), open(out_dir / "weights.jsonl", mode)
        self.wandb = None
        if args.wandb:
            import wandb
            self.wandb = wandb
            wandb.init(project=args.wandb, name=out_dir.name, config=vars(args))

    def print(self, text, file=None):
        if self.on:
            print(text, file=file, flush=True)

    def record(self, record, text):
        """A train or eval record: log.jsonl, the console line `text`, and wandb."""
        if self.on:
            self.print(text)
            self.write(self.log_file, record)
            if self.wandb:
                self.wandb.log({k: v for k, v in record.items() if k not in ("type", "step")}, step=record["step"])

    def weights(self, record):
        if self.on:
            self.write(self.weights_file, record)

    @staticmethod
    def write(file, record):  # a full disk: one line; the torn last line is dropped on resume (drop_records_after)
        with writing(Path(file.name)):
            write_line(file, record)

    def close(self):
        if self.on:
            self.log_file.close()
            self.weights_file.close()


def run_segments(out_dir):
    """args.json: the flags of each segment of the run, [{"step": the step it took effect at, "args": its flags}, ...];
    [] where there is none. (An older run's args.json holds one segment's flags alone: its step 0.)"""
    path = out_dir / "args.json"
    if not path.is_file():
        return []
    try:
        record = json.loads(path.read_text())
        return record["segments"] if "segments" in record else [dict(step=0, args=record)]
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{path} is damaged ({type(e).__name__}: {e}): restore it, or delete it to resume "
                         "without the record of earlier segments' flags") from None


def write_segments(out_dir, args, resume_step):
    """args.json with this segment's flags appended; a resumed run drops the segments that began at or after its step
    (as RunLog drops their records: nothing of them is left)."""
    earlier = [s for s in run_segments(out_dir) if s["step"] < resume_step] if resume_step is not None else []
    path, tmp = out_dir / "args.json", out_dir / "args.json.tmp"  # replaced whole: a kill keeps the old record
    with writing(path, tmp):
        tmp.write_text(json.dumps(dict(segments=earlier + [dict(step=resume_step or 0, args=vars(args))]), indent=1))
    os.replace(tmp, path)


def write_line(file, record):
    """One record, one line of strict JSON: a float that is not finite (the losses of a skipped step) is written as
    null, as json.dumps would write NaN or Infinity, which JSON does not have and most readers outside Python refuse."""
    try:
        line = json.dumps(record, allow_nan=False)
    except ValueError:  # (rare: only then is the record walked)
        line = json.dumps(finite_or_null(record), allow_nan=False)
    file.write(line + "\n")
    file.flush()


def finite_or_null(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    return value


# Dense (no sparsity) bf16/fp16 tensor-core peaks from the vendors' spec sheets, FLOP/s, by the name CUDA gives the
# device less its "NVIDIA " / "Tesla " prefix. MFU is reported only for a GPU named here, rather than against a guess.
PEAK_FLOPS = {"H200": 989e12, "H200 NVL": 835e12, "H100 SXM": 989e12, "H100 80GB HBM3": 989e12, "H100 NVL": 835e12,
              "H100 PCIe": 756e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "V100": 125e12, "T4": 65e12}


def peak_flops(device, dtype):
    if device.type != "cuda" or dtype == "float32":
        return None
    return peak_of(torch.cuda.get_device_name(device))


def peak_of(name):
    """The entry of the longest name that `name` is, or begins with as a whole word ("A100-SXM4-80GB" is an A100;
    "L40" is not an L4)."""
    name = name.removeprefix("NVIDIA ").removeprefix("Tesla ")
    names = [k for k in PEAK_FLOPS if name == k or name[len(k):len(k) + 1] in (" ", "-") and name.startswith(k)]
    return PEAK_FLOPS[max(names, key=len)] if names else None


class Progress:
    """Throughput, model FLOPs utilisation and time left, for the progress line."""

    def __init__(self, model, block_size, device, dtype, first_step, max_iters):
        # model FLOPs per token of a training step (forward + backward = 3 x forward): 6 per parameter that takes part
        # in a matmul (an untied token table is a lookup, the position table an addition) plus attention's
        # 12 * layers * width * context (the PaLM appendix's count)
        config = model.config
        n_params = model.num_params() - (0 if config.tie_embeddings else model.transformer.wte.weight.numel())
        attention = 12 * config.n_layer * config.n_head * config.head_dim * block_size
        self.flops_per_token, self.block_size = 6 * n_params + attention, block_size
        self.peak = peak_flops(device, dtype)
        self.t_start, self.first_step, self.max_iters = time.time(), first_step, max_iters

    def update(self, record, step, dt, n_tokens, n_samples):
        """Adds tok_per_s (and mfu) to the step's record; returns the line's tail. n_samples: those the step trained
        on (forward and backward; MidRanking's dropped samples are only scored), for the MFU."""
        record["tok_per_s"] = n_tokens / dt
        eta = (time.time() - self.t_start) / (step + 1 - self.first_step) * (self.max_iters - step - 1)
        mfu = ""
        if self.peak:  # the trained samples' training FLOPs (padded to block_size), against the GPUs' dense bf16 peak
            record["mfu"] = self.flops_per_token * n_samples * self.block_size / dt / (self.peak * world()[1])
            mfu = f" | MFU {record['mfu']:.1%}"
        return f"{n_tokens / dt / 1e3:.1f}k tok/s{mfu} | {dt * 1000:.0f} ms | ETA {eta / 60:.1f} min"


# -----------------------------------------------------------------------------
# random state: dropout draws from the device's generator (and the CPU's); a pass replayed from a saved
# state draws the same masks

def rng_state(device):
    accelerator = {"cuda": lambda: torch.cuda.get_rng_state(device), "mps": lambda: torch.mps.get_rng_state()}
    return torch.get_rng_state(), accelerator.get(device.type, lambda: None)()


def set_rng_state(state, device):
    torch.set_rng_state(state[0])
    if device.type == "cuda":
        torch.cuda.set_rng_state(state[1], device)
    elif device.type == "mps":
        torch.mps.set_rng_state(state[1])


# -----------------------------------------------------------------------------
# the run's pieces that train.py's loop takes as given: a model placed, an optimizer, a checkpoint writer

def load_model(path, dtype=None):
    """(our GPT, the checkpoint) from one of train.py's checkpoints, the weights in `dtype` (None: as saved). The
    model holds the checkpoint's tensors themselves, not a copy of them (load_checkpoint maps the file)."""
    ckpt = load_checkpoint(path)
    try:
        state = {k: v.to(dtype or v.dtype) for k, v in ckpt["model"].items()}
        model = GPT.from_state_dict(GPTConfig(**ckpt["model_args"]), state)
    except (KeyError, TypeError, AttributeError, RuntimeError) as e:
        raise ValueError(f"{path} is not a checkpoint of this code's GPT ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:120]}): pass a train.py out_dir") from None
    return model, ckpt


@dataclass
class Placed:
    """A model placed for training (place): what train.py's loop takes as given."""
    raw_model: GPT                 # the model itself: its weights, checkpoints, exports, MFU
    model: torch.nn.Module         # the same, as trained: compiled, DDP- or FSDP-wrapped
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler   # float16's loss scaler; a no-op in any other dtype
    ctx: object                    # autocast to the compute dtype, or nothing (float32)
    device: torch.device
    dtype: str                     # the compute dtype's name
    step: int                      # the first step: 0, or the resumed run's


def place(model, ckpt, args, distributed):
    """Device, precision, sharding, AdamW, the resumed state and compilation of the model to train. -> Placed"""
    device = start(args.device, distributed)
    dtype = pick_dtype(args.dtype, device)
    ctx, scaler = precision(dtype, device)
    raw_model, model = model, shard_or_move(model, device, dtype, args.fsdp)
    optimizer = raw_model.configure_optimizer(args.weight_decay, args.lr, (args.beta1, args.beta2), device.type,
                                              args.decay_params, args.optim)
    if getattr(optimizer, "bf16_stochastic_round", False):
        seed_rounding(optimizer, args.seed, device)
    if distributed:  # the same initial weights everywhere, but each rank its own dropout masks
        torch.manual_seed(args.seed + world()[0])
    step = restore(ckpt, model, optimizer, scaler, device) if args.init_from == "resume" else 0
    model = compile_and_wrap(model, args.compile, distributed and not args.fsdp, device)
    return Placed(raw_model, model, optimizer, scaler, ctx, device, dtype, step)


def save_run(raw_model, optimizer, scaler, device, args, step, **extra):
    """A checkpoint of the run at `step` (all ranks call: under FSDP gathering the state is a collective). Never one of
    non-finite parameters: the run stops instead (Failure), and the last good checkpoint stays the newest one."""
    params, val_loss = finite(raw_model, device), extra.get("val_loss")  # huge finite parameters can give NaN losses
    if not params or not math.isfinite(0 if val_loss is None else val_loss):
        what = f"its val loss is {val_loss}" if params else "its parameters are not finite"
        raise Failure(diverged(step, what, args, scaler))
    state = full_state(raw_model, optimizer, device)
    if world()[0] == 0:
        save_checkpoint(dict(state, scaler=scaler.state_dict(), model_args=asdict(raw_model.config), args=vars(args),
                             step=step, **extra), Path(args.out_dir), args.keep_last)


def finite(model, device):
    """Whether every parameter on every rank is finite: one flag, all-reduced, so that all ranks agree. It waits for
    the device: called at checkpoints and after skipped steps, never on every step."""
    local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]  # FSDP: this rank's shard
    bad = torch.stack([~t.isfinite().all() for t in local]).any().float()
    return all_max(bad.to(device)).item() == 0


MAX_SKIPPED = 10  # steps skipped in a row (non-finite losses) before a run is stopped: it is not coming back


def diverged(step, what, args, scaler, docs=None):
    """The one line of a run stopped at `step`: what went wrong, its likely cause and the last good checkpoint."""
    if scaler.is_enabled():
        cause = "float16's narrow range: use --dtype bfloat16 (or float32)"
    elif docs is not None:
        cause = f"the data: documents {docs} give non-finite losses; check them, or drop them from the data"
    else:
        cause = f"the learning rate: lower --lr (it is {args.lr:g})"
    return f"training stopped at step {step}: {what}; likely cause {cause}; {last_checkpoint(args.out_dir)}"


def step_or_skip(optimizer, scaler, model, args, losses, docs, step, log, skipped=0):
    """The optimizer step, unless a loss is not finite (one corrupt sample must not poison the model) or float16
    gradients overflowed; the gradients are cleared either way. -> steps skipped in a row, counting this one.
    MAX_SKIPPED in a row (non-finite losses; float16 overflows once the loss scale is below 1, where it no longer
    helps): the run stops, Failure, naming the likely cause."""
    if not torch.isfinite(losses).all():
        bad = docs[~torch.isfinite(losses).numpy()].tolist()
        log.print(f"step {step}: non-finite loss in documents {bad}: step skipped", file=sys.stderr)
        skipped += 1
    elif not optimizer_step(optimizer, scaler, model.parameters(), args.grad_clip):
        log.print(f"step {step}: float16 gradient overflow, step skipped, loss scale now {scaler.get_scale():g}")
        skipped, bad = skipped + (scaler.get_scale() < 1), None
    else:
        skipped = 0
    optimizer.zero_grad(set_to_none=True)
    if skipped >= MAX_SKIPPED:  # every loss bad, or the parameters: diverged (lr, float16); else a few bad documents
        params = finite(model, next(model.parameters()).device)
        data = params and bad is not None and len(bad) < len(docs)
        raise Failure(diverged(step, f"{skipped} steps in a row skipped" + ("" if params else
                               ", its parameters not finite"), args, scaler, docs=bad if data else None))
    return skipped


def to_device(t, device):
    if device.type == "cuda":  # pinned memory lets the copy overlap with compute
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def memory_run(args, dtype, size, reference=None):
    """memory.Run of train.py's flags for `size` processes, with a reference model's weights (--ref_model) if any."""
    n_ref = sum(p.numel() for p in reference.parameters()) if reference is not None else 0
    return replace(memory.Run.from_args(args, dtype, size), reference_params=n_ref)


def run_line(raw_model, args, n_train, device, dtype, reference=None):
    """The run in two lines: what it trains on what, and the memory it needs (memory.py)."""
    n = args.batch_size * args.grad_accum * world()[1]
    return (f"{raw_model.num_params() / 1e6:.2f}M parameters | {args.method} | {n_train} train samples | effective "
            f"batch {n} = {args.batch_size} x {args.grad_accum} x {world()[1]} processes | {device} {dtype}"
            + (" | FSDP" if args.fsdp else "") + "\n"
            + memory.estimate(raw_model, memory_run(args, dtype, world()[1], reference)).summary())


def step_line(record, max_iters, n, tail):
    return (f"step {record['step'] + 1}/{max_iters} | loss {record['loss']:.4f} | weighted {record['wloss']:.4f} | "
            f"w max {record['wmax']:.3f} | ess {record['ess']:.1f}/{n} | lr {record['lr']:.2e} | {tail}")


def same_count(items, pad, device):
    """`items` padded with `pad` to the length of the longest of any rank's: under FSDP every forward and
    backward pass is a collective, so every rank must run as many (DDP: each rank joins the one gradient sync)."""
    if not dist.is_initialized():
        return items
    return items + [pad] * (int(all_max(torch.tensor(len(items), device=device)).item()) - len(items))


# -----------------------------------------------------------------------------
# memory: said before it fails (memory.py's arithmetic), and in one line when it fails all the same

def free_memory(device):
    """Bytes a run may still take on `device`; None where torch cannot tell (CPU, MPS): nothing is refused there."""
    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None


def check_memory(model, args, size, distributed, reference=None):
    """ValueError (one line) where the run's need by the arithmetic, plus memory.MARGIN, exceeds the free memory of
    its CUDA device, naming the first flags that fit (memory.remedy). Under torchrun each process checks its GPU."""
    device = pick_device(args.device)
    if distributed and device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    run = memory_run(args, pick_dtype(args.dtype, device), size, reference)
    need, free = memory.estimate(model, run), free_memory(device)
    if free is not None and not memory.fits(need, free):
        raise ValueError(f"this run needs {memory.size(need.total * (1 + memory.MARGIN))} on {device} ("
                         f"{memory.size(need.total)} by the arithmetic + {memory.MARGIN:.0%}) and {memory.size(free)} "
                         f"are free: {memory.remedy(model, run, free)}")


@contextmanager
def out_of_memory_exits(model, args):
    """Out of memory all the same (the arithmetic leaves out fragmentation and workspaces beyond its margin): one line
    naming flags that need at least the margin less, exit 2. Nothing is written after the failure, so the last
    checkpoint (save_checkpoint writes atomically) stays as it was."""
    try:
        yield
    except torch.OutOfMemoryError as e:
        device = next(model.parameters()).device
        run = memory.Run.from_args(args, pick_dtype(args.dtype, device), world()[1])
        need = memory.estimate(model, run)
        free = free_memory(device)  # this process's own cached blocks are free to the next run too
        available = need.total if free is None else min(need.total, free + torch.cuda.memory_reserved(device))
        ckpt = Path(args.out_dir) / "ckpt.pt"
        kept = f"{ckpt}, the last checkpoint, is intact" if ckpt.exists() else "no checkpoint had been written"
        what = ". ".join(str(e).split(". ")[:2])  # "CUDA out of memory. Tried to allocate 2.00 GiB" (it goes on)
        print(f"train.py: error: out of memory on {device} in training ({what}; {memory.size(need.total)} by the "
              f"arithmetic): {memory.remedy(model, run, available)}; {kept}", file=sys.stderr, flush=True)
        sys.exit(2)
