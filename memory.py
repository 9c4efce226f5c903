"""
What a training run needs in memory, from arithmetic: the bytes of the weights, their gradients, the optimizer
state, and what one micro-batch's forward pass keeps for the backward pass, counted from the model's own
parameters and from the tensors autograd saves in model.py's blocks (tests/test_memory.py holds both to
measurement on CPU).

    python memory.py --table       # docs/memory.md: what fits on 24 / 40 / 80 / 141 GB GPUs

train.py prints `Memory.summary()` when a run starts; runtime.py refuses a run that its CUDA device cannot hold,
naming the first flags that fit (`remedy`). Nothing here touches a device: the model may live on "meta".
"""

import argparse
from dataclasses import dataclass, replace

import torch

from model import GPT, GPTConfig

GiB, MiB = 2 ** 30, 2 ** 20
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# The loss's transient peak per logit. loss.py holds one chunk of `loss_chunk` tokens' logits at a time
# (model.loss_chunk), in float32, overwritten in place by the log-sum-exp and the softmax; under autocast also the
# matmul's bf16 output while it is cast up: 4.0 to 6.1 bytes measured (tests/test_memory.py), 8 with a margin.
# The plain form (loss_chunk 0) holds all the micro-batch's logits three times over: the logits, the float32
# log-probabilities cross_entropy keeps for the backward, and their gradient.
LOSS_BYTES_PER_LOGIT = 8
FULL_LOGITS_BYTES_PER_LOGIT = 12
# On CUDA a run fits where need * (1 + MARGIN) <= free memory: the allocator's fragmentation, the backward pass's
# transient gradients of activations and the kernels' workspaces are not in the arithmetic.
MARGIN = 0.10
# The table only: what a GPU of nominal size X cannot give a run (CUDA context, cuBLAS workspace). A live check
# asks torch.cuda.mem_get_info, whose free memory already leaves the context out.
CUDA_CONTEXT = 1 * GiB
# torchao's AdamW8bit quantizes a moment only for tensors of >= 4096 values that split into blocks of 256 (as
# bitsandbytes): uint8 codes, one float32 scale per block and a 256-entry float32 code map; smaller tensors keep
# their moments in the parameters' dtype.
QUANT_BLOCK, QUANT_MIN, QUANT_MAP = 256, 4096, 256 * 4
# What a run can switch to for less memory, cheapest first: 8-bit moments cost no time, bf16 weights risk rounding
# (stochastic rounding mitigates it), --grad_ckpt costs ~30% more compute. A smaller micro-batch comes last.
SWITCHES = (("optim", "adamw8bit"), ("param_dtype", "bfloat16"), ("grad_ckpt", True))
OPTIMIZER_NAMES = {"adamw": "AdamW", "adamw8bit": "AdamW8bit"}


@dataclass(frozen=True)
class Run:
    """The settings of a training run that decide its memory (train.py's flags)."""
    batch_size: int = 8
    block_size: int = 512
    grad_accum: int = 1           # no memory of its own: a suggestion keeps batch_size * grad_accum
    grad_ckpt: bool = False
    optim: str = "adamw"
    param_dtype: str = "float32"  # weights and gradients
    dtype: str = "bfloat16"       # autocast's compute dtype; "float32": no autocast
    fsdp: bool = False
    world: int = 1                # processes; under FSDP weights, gradients and optimizer state are split over them
    loss_chunk: int = None        # tokens per chunk of the loss (0: all at once); None: the model's own
    reference_params: int = 0     # a frozen reference model's (--ref_model): its weights alone, whole on every process

    @classmethod
    def from_args(cls, args, dtype, world=1):
        """train.py's flags; `dtype` as runtime.pick_dtype resolved --dtype on the run's device."""
        return cls(batch_size=args.batch_size, block_size=args.block_size, grad_accum=args.grad_accum,
                   grad_ckpt=args.grad_ckpt, optim=getattr(args, "optim", "adamw"),
                   param_dtype=getattr(args, "param_dtype", "float32"), dtype=dtype, fsdp=args.fsdp, world=world)

    @property
    def shards(self):
        return self.world if self.fsdp else 1


@dataclass
class Memory:
    """Bytes one process needs for a run, by part; `total` is their sum (a step holds them all at its peak:
    gradients accumulate while the next micro-batch runs)."""
    weights: int
    grads: int
    optimizer: int
    weight_copies: int      # compute-dtype copies of weights a forward pass holds (autocast's cache, FSDP's gathers)
    activations: int        # one micro-batch's, as the run is set (with or without --grad_ckpt)
    other_activations: int  # the same with --grad_ckpt the other way round (said in the summary)
    loss: int               # the loss's transient peak (LOSS_BYTES_PER_LOGIT)
    run: Run
    reference: int = 0      # a reference model's weights (--ref_model), in param_dtype

    @property
    def total(self):
        return (self.weights + self.grads + self.optimizer + self.weight_copies + self.activations + self.loss
                + self.reference)

    def summary(self):
        """One line: 'memory: weights 2.5 GiB + grads 2.5 GiB + AdamW 5.0 GiB + ... = 13.1 GiB'."""
        r = self.run
        copies = "FSDP's gathered weights" if r.fsdp else f"{r.dtype} weight copies"
        copies = f" + {copies} {size(self.weight_copies)}" if self.weight_copies else ""
        ckpt = "without" if r.grad_ckpt else "with"
        fsdp = f" (weights, grads, optimizer: 1/{r.world} each, FSDP)" if r.shards > 1 else ""
        return (f"memory: weights {size(self.weights)} + grads {size(self.grads)} + "
                f"{OPTIMIZER_NAMES.get(r.optim, r.optim)} {size(self.optimizer)}{copies} + activations "
                f"{size(self.activations)} per micro-batch of {r.batch_size} x {r.block_size} "
                f"({size(self.other_activations)} {ckpt} --grad_ckpt) + loss {size(self.loss)}"
                + (f" + reference model {size(self.reference)}" if self.reference else "") + f" = {size(self.total)}"
                f"{fsdp}, by the arithmetic")


def size(n):
    return f"{n / GiB:.1f} GiB" if n >= GiB / 10 else f"{n / MiB:.1f} MiB"


# -----------------------------------------------------------------------------
# weights, gradients, optimizer state: from the parameters themselves

def parameters(model):
    """numel of each parameter (tied ones once, as the optimizer sees them)."""
    return [p.numel() for p in model.parameters()]


def optimizer_bytes(numels, optim, param_bytes):
    """AdamW's two moments and float32 step count per parameter tensor: torch.optim.AdamW and torchao's _AdamW keep
    the moments in the parameters' dtype, torchao's AdamW8bit in 8 bits (QUANT_*)."""
    if optim not in OPTIMIZER_NAMES:
        raise ValueError(f"unknown optimizer {optim!r}: choose {' or '.join(OPTIMIZER_NAMES)}")
    total = 0
    for n in numels:
        if optim == "adamw8bit" and n >= QUANT_MIN and n % QUANT_BLOCK == 0:
            moment = n + 4 * n // QUANT_BLOCK + QUANT_MAP
        else:
            moment = n * param_bytes
        total += 2 * moment + 4
    return total


def weight_copy_bytes(model, run, param_bytes, compute_bytes):
    """Autocast casts each Linear's weight and bias to the compute dtype once per forward pass and keeps the copy
    (its cache) until the autocast region ends, after the loss: all of them at once, with or without --grad_ckpt.
    FSDP gathers the blocks' matmul weights in the compute dtype itself instead, two blocks' at a time (the running
    one, the prefetched one), plus one block's full float32 gradient before it is reduce-scattered; and everything
    else (embeddings, norms, the head) in float32 (runtime.shard_or_move), counted as held for the whole step."""
    head = model.lm_head if getattr(model, "loss_chunk", 0) else None  # the chunked loss casts it itself (loss_bytes)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head]
    autocast = run.dtype not in ("float32", run.param_dtype)  # no autocast, or nothing for it to cast
    if run.fsdp:
        in_blocks = set(model.transformer.h.modules())
        block = matmul_numel(m for m in model.transformer.h[0].modules() if isinstance(m, torch.nn.Linear))
        rest = sum(parameters(model)) - block * model.config.n_layer
        in_root = [m for m in linears if m not in in_blocks]  # opt-350m's projections: autocast's, as on one GPU
        cast = matmul_numel(in_root) * compute_bytes if autocast else 0
        return rest * param_bytes + 2 * block * compute_bytes + block * 4 + cast
    return matmul_numel(linears) * compute_bytes if autocast else 0


def matmul_numel(linears):
    return sum(t.numel() for m in linears for t in (m.weight, m.bias) if t is not None)


def loss_bytes(model, run, compute_bytes, chunk):
    """The loss's transient peak: a chunk's logits at LOSS_BYTES_PER_LOGIT, and under autocast the chunked loss's own
    compute-dtype copy of the head's weight; all the tokens' logits at FULL_LOGITS_BYTES_PER_LOGIT when chunk is 0."""
    c, tokens = model.config, run.batch_size * run.block_size
    if not chunk:
        return tokens * c.vocab_size * FULL_LOGITS_BYTES_PER_LOGIT
    cast = c.vocab_size * c.embd_dim * compute_bytes if run.dtype not in ("float32", run.param_dtype) else 0
    return min(chunk, tokens) * c.vocab_size * LOSS_BYTES_PER_LOGIT + cast


# -----------------------------------------------------------------------------
# activations: per token, the tensors autograd saves in model.py's modules (SDPA as the flash / memory-efficient
# kernels run it: q, k, v, the output and a float32 log-sum-exp, never the T x T scores). Not counted: dropout masks
# (continual training uses none), and what torch.compile fuses away (it saves less, not more).

def norm_bytes(config, dim, param_bytes, autocast):
    """A norm's saved input and statistics per token (its output is counted as the next matmul's input)."""
    if config.norm == "rmsnorm":  # model.RMSNorm: x in float32, 1/rms (float32), x/rms in x's dtype (for the gain)
        return 4 * dim + 4 + param_bytes * dim
    # under autocast layer_norm runs in float32 (CUDA's list): bf16 weights make x a float32 copy. (CPU autocast leaves
    # it alone, saving the bf16 x, 2 bytes less per value; with float32 weights the two agree.)
    return (4 if autocast else param_bytes) * dim + 8  # input, float32 mean and 1/std


def block_bytes(config, param_bytes, compute_bytes, autocast):
    """Bytes one Block saves per token. The residual stream has the weights' dtype (the embedding's output), matmul
    inputs the compute dtype (autocast's copies)."""
    c, a = config, compute_bytes
    norms = 2 * norm_bytes(c, c.n_embd, param_bytes, autocast)
    matmul_inputs = 2 * a * c.n_embd  # the inputs of c_attn and c_fc (c_proj's are counted as outputs below)
    attention = a * (c.n_head + 2 * c.n_kv_head) * c.head_dim  # c_attn's output: q, k, v are views of it, all saved
    if c.pos == "rope":  # rotated q and k are new tensors (cos and sin: once per model, with the embeddings)
        attention += a * (c.n_head + c.n_kv_head) * c.head_dim
    attention += a * c.n_head * c.head_dim + 4 * c.n_head  # SDPA's output (c_proj's input), float32 log-sum-exp
    # gelu: its input and output; relu: its output only (the backward needs no more); swiglu: gate|up (one
    # matmul's output), silu(gate), and their product
    mlp = a * c.mlp_hidden * {"gelu": 2, "relu": 1, "swiglu": 4}[c.mlp]
    return norms + matmul_inputs + attention + mlp


def head_input_bytes(c, run, param_bytes, compute_bytes):
    """What loss.py keeps for its backward: the final hidden states (in the residual stream's dtype, the weights', or
    project_out's compute dtype), a float32 log-sum-exp and the int64 target per token, and each row's target count."""
    hidden = compute_bytes if c.embd_dim != c.n_embd else param_bytes
    return (hidden * c.embd_dim + 4 + 8) * run.batch_size * run.block_size + 8 * run.batch_size


def activation_bytes(config, run, param_bytes, compute_bytes, grad_ckpt):
    """What one micro-batch's forward pass keeps for the backward pass, by part (bytes), the loss excluded."""
    c, T, a = config, run.block_size, compute_bytes
    autocast = run.dtype != "float32"
    tokens = run.batch_size * T
    embeddings = 8 * tokens  # token ids (int64), for the embedding's backward
    embeddings += 8 * T if c.pos == "learned" else 2 * 4 * T * c.head_dim  # position ids, or RoPE's cos and sin
    final = norm_bytes(c, c.n_embd, param_bytes, autocast) * tokens if c.prenorm else 0  # ln_f
    if c.embd_dim != c.n_embd:  # project_in's and project_out's inputs
        embeddings += a * c.embd_dim * tokens
        final += a * c.n_embd * tokens
    block = block_bytes(c, param_bytes, a, autocast) * tokens
    parts = dict(embeddings=embeddings, blocks=block * c.n_layer, recompute=0, final=final,
                 head_input=head_input_bytes(c, run, param_bytes, a))
    if grad_ckpt:  # each block's input is kept; one block's activations come back in the backward pass
        parts.update(blocks=param_bytes * c.n_embd * tokens * c.n_layer, recompute=block)
    return parts


# -----------------------------------------------------------------------------

def estimate(model, run):
    """Memory of `run` for `model` (ours; real or on the meta device), per process."""
    if run.param_dtype not in ("float32", "bfloat16"):
        raise ValueError(f"unknown parameter dtype {run.param_dtype!r}: choose float32 or bfloat16")
    c, p = model.config, BYTES[run.param_dtype]
    a = BYTES[run.dtype] if run.dtype != "float32" else p  # no autocast: the weights' dtype throughout
    numels = parameters(model)
    shard = lambda n: -(-n // run.shards)  # noqa: E731  (FSDP: each process holds 1/world, rounded up)
    chunk = getattr(model, "loss_chunk", 0) if run.loss_chunk is None else run.loss_chunk
    acts = {ckpt: sum(activation_bytes(c, run, p, a, ckpt).values()) for ckpt in (False, True)}
    return Memory(weights=shard(sum(numels) * p), grads=shard(sum(numels) * p),
                  optimizer=shard(optimizer_bytes(numels, run.optim, p)),
                  weight_copies=weight_copy_bytes(model, run, p, a), activations=acts[run.grad_ckpt],
                  other_activations=acts[not run.grad_ckpt],
                  loss=loss_bytes(model, run, a, chunk), run=run, reference=run.reference_params * p)


def fits(memory, available):
    return memory.total * (1 + MARGIN) <= available


def candidates(run):
    """Runs that need less, in order of cost: the SWITCHES' combinations counted in binary (each switch costs more
    than all the earlier ones together), then each again at a smaller micro-batch with grad_accum raised to keep
    the effective batch (the divisors of batch_size * grad_accum, largest first). Switches already on stay on."""
    n = run.batch_size * run.grad_accum
    seen = {run}
    for batch in [b for b in range(run.batch_size, 0, -1) if n % b == 0]:
        for mask in range(2 ** len(SWITCHES)):
            changes = {flag: value for i, (flag, value) in enumerate(SWITCHES) if mask >> i & 1}
            new = replace(run, **changes, batch_size=batch, grad_accum=n // batch)
            if new not in seen:
                seen.add(new)
                yield new


def suggest(model, run, available):
    """The first of `candidates` that fits in `available` bytes, or None."""
    return next((r for r in candidates(run) if fits(estimate(model, r), available)), None)


def flags(run, base):
    """The flags that turn `base` into `run`."""
    out = []
    for flag in ("optim", "param_dtype", "grad_ckpt", "batch_size", "grad_accum"):
        value = getattr(run, flag)
        if value != getattr(base, flag):
            out.append(f"--{flag}" if value is True else f"--{flag} {value}")
    return " ".join(out)


def remedy(model, run, available):
    """What to do about a run that does not fit in `available` bytes, as a clause of a one-line error."""
    better = suggest(model, run, available)
    if better is not None:
        return f"try {flags(better, run)} ({size(estimate(model, better).total)} by the arithmetic)"
    tried = list(candidates(run))
    last = tried[-1] if tried else run  # every switch on, micro-batch 1
    return (f"even {flags(last, run) or 'this run'} needs {size(estimate(model, last).total)} by the arithmetic: "
            "shard it over more GPUs (torchrun ... --fsdp) or use a GPU with more memory")


# -----------------------------------------------------------------------------
# the table of docs/memory.md: public checkpoints' architectures as our GPTConfig (parameters from model.py)

PUBLIC = {
    "OPT-125m": GPTConfig(family="opt", block_size=2048, vocab_size=50272, n_layer=12, n_head=12, n_embd=768,
                          mlp="relu", mlp_hidden=3072, pos_offset=2),
    "OPT-350m": GPTConfig(family="opt", block_size=2048, vocab_size=50272, n_layer=24, n_head=16, n_embd=1024,
                          mlp="relu", mlp_hidden=4096, pos_offset=2, prenorm=False, embd_dim=512),
    "OPT-1.3B": GPTConfig(family="opt", block_size=2048, vocab_size=50272, n_layer=24, n_head=32, n_embd=2048,
                          mlp="relu", mlp_hidden=8192, pos_offset=2),
    "Sheared-LLaMA-1.3B": GPTConfig(family="llama", block_size=4096, vocab_size=32000, n_layer=24, n_head=16,
                                    n_embd=2048, mlp="swiglu", mlp_hidden=5504, bias=False, norm="rmsnorm",
                                    pos="rope", tie_embeddings=False),
    "Llama-2-7B": GPTConfig(family="llama", block_size=4096, vocab_size=32000, n_layer=32, n_head=32, n_embd=4096,
                            mlp="swiglu", mlp_hidden=11008, bias=False, norm="rmsnorm", pos="rope",
                            tie_embeddings=False),
    "Llama-3-8B": GPTConfig(family="llama", block_size=8192, vocab_size=128256, n_layer=32, n_head=32, n_kv_head=8,
                            n_embd=4096, mlp="swiglu", mlp_hidden=14336, bias=False, norm="rmsnorm", pos="rope",
                            rope_theta=500000.0, tie_embeddings=False),
}
GPUS = (24, 40, 80, 141)  # GB, as sold (taken as GiB, less CUDA_CONTEXT)
CHOICES = (("adamw", "float32"), ("adamw8bit", "float32"), ("adamw", "bfloat16"), ("adamw8bit", "bfloat16"))


def meta_model(config):
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        return GPT(config)


def table(batch_size=8, block_size=512, loss_chunk=None):
    """Markdown rows: for each model, optimizer / weight dtype and --grad_ckpt, the need at the recipe and, per GPU,
    the largest micro-batch that fits (grad_accum raised to keep the effective batch)."""
    rows = [f"| model | --optim | --param_dtype | --grad_ckpt | bytes/param | need at {batch_size} x {block_size} | "
            + " | ".join(f"{g} GB" for g in GPUS) + " |", "|---" * (6 + len(GPUS)) + "|"]
    batches = [b for b in range(batch_size, 0, -1) if batch_size % b == 0]
    for name, config in PUBLIC.items():
        model = meta_model(config)
        n = sum(parameters(model))
        for (optim, param_dtype) in CHOICES:
            for ckpt in (False, True):
                run = Run(batch_size=batch_size, block_size=block_size, grad_ckpt=ckpt, optim=optim,
                          param_dtype=param_dtype, loss_chunk=loss_chunk)
                need = estimate(model, run)
                state = (need.weights + need.grads + need.optimizer) / n
                cells = []
                for gpu in GPUS:
                    b = next((b for b in batches if fits(estimate(model, replace(run, batch_size=b)),
                                                         gpu * GiB - CUDA_CONTEXT)), None)
                    cells.append("-" if b is None else str(b) if b == batch_size else f"{b} (x{batch_size // b})")
                rows.append(f"| {name} ({n / 1e9:.2f}B) | {optim} | {param_dtype} | {'yes' if ckpt else 'no'} | "
                            f"{state:.2f} | {need.total / GiB:.1f} GiB | " + " | ".join(cells) + " |")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description="What a training run needs in memory, from arithmetic.")
    p.add_argument("--table", action="store_true", help="docs/memory.md's table of what fits where")
    p.add_argument("--batch_size", type=int, default=8, help="micro-batch of the table's recipe")
    p.add_argument("--block_size", type=int, default=512, help="tokens per sample of the table's recipe")
    p.add_argument("--loss_chunk", type=int, default=None, help="tokens per chunk of the loss (0: all at once); "
                   "default: the model's own (model.loss_chunk)")
    args = p.parse_args(argv)
    if not args.table:
        p.error("nothing to do: pass --table")
    print("\n".join(table(args.batch_size, args.block_size, args.loss_chunk)))


if __name__ == "__main__":
    main()
