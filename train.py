"""
Train a GPT with per-sample losses reweighted by ERM, MidRanking or IR-DRO.

    python train.py --method irdro --tau 1.0              # the default corpus, prepared if missing
    python train.py --method midrank --skip 0.125 --keep 0.5
    python train.py --init_from out/erm --method irdro    # continual training from an earlier run
    torchrun --nproc_per_node 8 train.py --method irdro   # data parallel (DDP); add --fsdp to shard

Every optimizer step sees an effective batch of n = batch_size * grad_accum * world_size samples
(documents or chunks of documents). reweight.py turns their detached losses l_1..l_n into weights
w_1..w_n and the step descends sum_i w_i l_i: the weights of the *whole* effective batch, exactly, with
one micro-batch's graph alive at a time. Read step_samples, forward_backward (the method), then train.
"""

import cli  # no torch: the flags are read first, so that --help and a mistyped flag answer at once
if __name__ == "__main__":
    cli.parse()  # exits on --help or a bad flag; main() reads them again, with the checks that need torch

import functools
import math
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

import hf
import prepare_data
import reference
import reweight
import runtime
import tokenization
from model import GPT, IGNORE_INDEX
from runtime import all_cat, all_max, all_sum, grad_sync, world

# -----------------------------------------------------------------------------
# data: documents -> samples -> the micro-batches of optimizer step k

def load_split(data_dir, split, block_size):
    """A split as a table of samples. A document of L tokens has L-1 targets; it is cut into
    consecutive chunks of at most block_size targets, so no sample crosses a document boundary.
    Instruction data (prepare_data.py --format instruct): one example is one sample, never chunked, so each
    must fit block_size; its mask (1 = target) keeps the prompt out of the loss."""
    meta, tokens, offsets, ids, mask, sources = prepare_data.read_split(data_dir, split)  # files checked together
    n_targets = np.maximum(np.diff(offsets) - 1, 0)
    if mask is not None and len(ids) and n_targets.max() > block_size:  # the examples' lengths, not the --max_len cap
        i = n_targets.argmax()
        raise ValueError(f"{data_dir}: {split} example {ids[i]} has {n_targets[i]} targets, more than --block_size "
                         f"{block_size}, and examples are never chunked: raise --block_size to {n_targets[i]} or "
                         f"re-prepare with --max_len {block_size + 1} (truncating the longer ones)")
    n_chunks = -(-n_targets // block_size)  # ceil division
    doc = np.repeat(np.arange(len(ids)), n_chunks)  # document index of every sample
    chunk = np.arange(len(doc)) - np.repeat(np.cumsum(n_chunks) - n_chunks, n_chunks)
    start = offsets[doc] + chunk * block_size
    end = np.minimum(start + block_size + 1, offsets[doc + 1])  # tokens [start, end) of the sample
    return dict(tokens=tokens, start=start, end=end, doc=ids[doc], meta=meta, mask=mask,
                source=None if sources is None else sources[doc])  # index into meta["sources"] (several sources)


def get_batch(data, samples, block_size, device):
    """Samples -> inputs x and targets y, both (len(samples), block_size). Short samples are padded
    at the end: with causal attention the padding never influences real positions, and its targets
    are IGNORE_INDEX so it never counts in a loss."""
    x = np.zeros((len(samples), block_size), dtype=np.int64)
    y = np.full((len(samples), block_size), IGNORE_INDEX, dtype=np.int64)
    for row, sample in enumerate(samples):
        seq = data["tokens"][data["start"][sample]:data["end"][sample]].astype(np.int64)
        x[row, :len(seq) - 1], y[row, :len(seq) - 1] = seq[:-1], seq[1:]
        if data.get("mask") is not None:  # instruction data: only response tokens (and the eos) are targets
            target = data["mask"][data["start"][sample] + 1:data["end"][sample]]
            y[row, :len(seq) - 1][target == 0] = IGNORE_INDEX
    return runtime.to_device(torch.from_numpy(x), device), runtime.to_device(torch.from_numpy(y), device)


def step_samples(seed, step, n, n_samples):
    """The n samples of optimizer step `step`: epochs of whole steps, each a fresh permutation of the samples
    cut into n_samples // n steps of n; the leftover n_samples % n go unused that epoch (as drop_last does),
    so a step never holds a sample twice. A function of (seed, step, n, n_samples) alone: the data does not
    depend on how the step is split into micro-batches or processes, and resume needs no state."""
    epoch, k = divmod(step, n_samples // n)  # n_samples // n steps per epoch
    return epoch_order(seed, epoch, n_samples)[k * n:(k + 1) * n].copy()


def step_batches(data, args, step, device):
    """(the samples of step `step`, this rank's micro-batches of them on the device)."""
    rank, size = world()
    n_rank = args.batch_size * args.grad_accum
    samples = step_samples(args.seed, step, n_rank * size, len(data["start"]))
    own = samples[rank * n_rank:(rank + 1) * n_rank]
    return samples, [get_batch(data, own[i:i + args.batch_size], args.block_size, device)
                     for i in range(0, n_rank, args.batch_size)]


@functools.lru_cache(maxsize=2)
def epoch_order(seed, epoch, n_samples):
    return np.random.default_rng([seed, epoch]).permutation(n_samples)


# -----------------------------------------------------------------------------
# one optimizer step: the gradient of sum_i w_i l_i over the whole effective batch

def naive_step(model, x, y, method, hparams, ctx=nullcontext()):
    """The step as the method defines it, runnable: all n samples in one forward pass. -> (losses, weights)
    Exact, and the oracle that forward_backward is tested equal to (tests/test_train.py); but it keeps the graphs of
    the whole batch alive until the backward pass (the official code kept them across its whole pool)."""
    with ctx:
        _, losses = model(x, y)                               # l_i: mean token loss of sample i, shape (n,)
    w = reweight.weights(losses.detach(), method, **hparams)  # from the detached losses: no gradient through w
    (w * losses).sum().backward()                             # grad = sum_i w_i grad l_i
    return losses.detach(), w


def forward_backward(model, batches, method, hparams, ctx, scale=lambda loss: loss):
    """naive_step's gradient with one micro-batch's graph alive at a time: leaves grad = d/dtheta sum_i w_i l_i in
    the parameters, w = reweight.weights(the losses of all micro-batches of all processes). -> (losses, weights) of
    the whole effective batch, left on the device. Two exact forms: `streamed` for the methods whose weights are a
    softmax of per-sample scores (those reweight.py gives a `.score`: ERM, IR-DRO), `scored` for every other one.

    Under torchrun, `batches` are this rank's share (rank r holds samples r*n_r .. (r+1)*n_r - 1 of the step); DDP
    and FSDP average the ranks' gradients, so each rank's loss is multiplied by the world size to turn that mean
    into the sum. `scale` is the float16 loss scaler's (gradients are linear in it). A method that takes `ref_losses`
    (reference.py) finds the whole batch's in hparams, aligned with the losses: a micro-batch is scored with its own."""
    backward = lambda weighted_loss: scale(weighted_loss * world()[1]).backward()  # noqa: E731
    fn, hp = reweight.method(method, **hparams)
    ref_all = hp.pop("ref_losses", None)  # None: the method takes no reference
    sizes = [len(x) for x, _ in batches]
    first = world()[0] * sum(sizes)  # where this rank's samples start in the batch
    refs = [None] * len(batches) if ref_all is None else ref_all[first:first + sum(sizes)].split(sizes)
    with_ref = lambda r: {} if r is None else dict(ref_losses=r)  # noqa: E731
    if hasattr(fn, "score"):  # softmax(score) was held to the method itself at set-up (cli.check_method)
        score = lambda losses, r: fn.score(losses, **hp, **with_ref(r))  # noqa: E731
        return streamed(model, batches, refs, ref_all, score, ctx, backward)
    weigh = lambda losses: reweight.weights(losses, method, **hp, **with_ref(ref_all))  # noqa: E731
    return scored(model, batches, weigh, ctx, backward)


def streamed(model, batches, refs, ref_all, score, ctx, backward):
    """For weights that are a softmax of per-sample scores (ERM: s_i = 0; IR-DRO: s_i = l_i / tau), with
    w_i = exp(s_i) / Z and one normaliser Z = sum_j exp(s_j) over the whole batch,

        sum_i w_i grad l_i  =  (1/Z) sum_i exp(s_i) grad l_i,

    so each micro-batch is backpropagated with coefficients exp(s_i - M) as it comes, and the gradient is
    divided by Z at the end: an online softmax, no extra forward pass. M is the running max of the scores,
    so that exp never overflows; when it grows, what was accumulated so far (gradient and Z) is multiplied
    by exp(M_old - M_new). Under torchrun every rank shares M (all-reduce max) and Z (all-reduce sum)."""
    params = list(model.parameters())  # before any forward: FSDP swaps in gathered parameters during one
    losses, norm = [], 0.0
    top = torch.full((), -math.inf, device=batches[0][0].device)  # made on the device: no copy from the host
    for i, ((x, y), ref) in enumerate(zip(batches, refs)):  # ref: the micro-batch's reference losses, or None
        with grad_sync(model, last=i == len(batches) - 1):
            with ctx:
                _, loss = model(x, y)
            losses.append(loss.detach())
            scores = score(loss.detach(), ref)
            new_top = torch.maximum(top, all_max(scores.max()))
            if i > 0:  # no .item(): the rescale never waits for the device
                factor = torch.exp(top - new_top)
                torch._foreach_mul_([p.grad for p in params if p.grad is not None], factor)
                norm = norm * factor
            coef = torch.exp(scores - new_top)
            norm, top = norm + coef.sum(), new_top
            backward((loss * coef).sum())
    torch._foreach_div_([p.grad for p in params if p.grad is not None], all_sum(norm))
    losses = all_cat(torch.cat(losses))
    return losses, torch.softmax(score(losses, ref_all), dim=0)


def scored(model, batches, weigh, ctx, backward):
    """Any method: score the whole batch without graphs, weigh it, then forward and backward only the samples that
    weigh, re-packed into micro-batches of the usual size: a dropped sample never pays for a backward pass.

    Under dropout every pass draws new masks, so a re-packed pass would train other losses than the ones ranked;
    there each micro-batch that holds a kept sample is forwarded again as it was scored instead, from the RNG state
    its scoring pass started from (the same masks, the same losses), its dropped rows weighing 0. Under torchrun
    the ranks gather the scores and all run as many passes (DDP and FSDP expect one forward per backward, and
    FSDP's passes are collectives). One optimisation, where it wins: `by_sample`."""
    dropout = any(isinstance(m, torch.nn.Dropout) and m.p > 0 and m.training for m in model.modules())
    if not dropout and by_sample_wins(model, batches):
        return by_sample(model, *batches[0], weigh, ctx, backward)
    rank, _ = world()
    device, size, n_own = batches[0][0].device, len(batches[0][0]), sum(len(x) for x, _ in batches)
    quarter, states, own = -(-size // 4), [], []
    with torch.no_grad(), ctx:
        for x, y in batches:
            states.append(runtime.rng_state(device) if dropout else None)
            own.append(model(x, y)[1])
    after = runtime.rng_state(device) if dropout else None
    losses = all_cat(torch.cat(own))
    w = weigh(losses)
    w_own = w[rank * n_own:(rank + 1) * n_own]
    kept = w_own.nonzero().squeeze(1)  # the step's one read of the weights (a device sync): how many passes
    if dropout:  # the micro-batches holding a kept sample again, as scored
        again = sorted({i // size for i in kept.tolist()})
        passes = [(states[j], *batches[j], w_own[j * size:(j + 1) * size]) for j in again]
    else:  # the kept samples, re-packed, the last pass padded with weight-0 rows to a multiple of a quarter batch
        x_all, y_all = torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])
        pad = -len(kept) % quarter  # so that torch.compile sees at most 4 sizes of pass (loss.py fixes each)
        w_kept, kept = torch.cat([w_own[kept], w_own[:pad] * 0]), torch.cat([kept, kept[:1].repeat(pad)])
        passes = [(None, x_all[rows], y_all[rows], w_rows)
                  for rows, w_rows in zip(kept.split(size), w_kept.split(size)) if len(rows)]
    x, y = batches[0]
    passes = runtime.same_count(passes, (None, x[:quarter], y[:quarter], w_own[:quarter] * 0), device)  # torchrun
    for i, (state, x, y, w_rows) in enumerate(passes):
        if state is not None:
            runtime.set_rng_state(state, device)
        with grad_sync(model, last=i == len(passes) - 1), ctx:
            _, loss = model(x, y)
        backward((loss * w_rows).sum())
    if dropout:  # the RNG ends as after one pass a micro-batch
        runtime.set_rng_state(after, device)
    return losses, w


def by_sample(model, x, y, weigh, ctx, backward):
    """`scored` for a step of one micro-batch in one process, where by_sample_wins: each sample is scored through a
    graph of its own, so that the kept ones are backpropagated with no second forward pass and the dropped ones are
    freed unbackpropagated. Every pass is of one sample: one shape for the compiler, whatever is kept."""
    with ctx:
        graphs = [model(x[i:i + 1], y[i:i + 1])[1] for i in range(len(x))]
    losses = torch.cat([g.detach() for g in graphs])
    w = weigh(losses)
    kept = w.nonzero().squeeze(1).tolist()  # the step's one read of the weights: which graphs to backpropagate
    backward(sum(graphs[i] * w[i] for i in kept).sum())
    return losses, w


BY_SAMPLE = None  # None: by by_sample_wins's rule; True / False: forced (the tests and bench.py take both forms)


def by_sample_wins(model, batches):
    """by_sample saves a forward pass of the kept samples and pays in batch-of-one passes: it wins where the output
    layer is most of the forward. Measured (bench.py, README, 2 CPU cores): MidRanking keep 0.5 at grad_accum 1 went
    from 0.90x to 0.75x ERM with GPT-2 BPE (output layer 89% of the weights) and from 0.85x to 0.98x with characters
    (2%). So: one micro-batch in one process, where the output layer holds more weights than all blocks (OPT and
    LLaMA: 20-45%). (With more micro-batches the others' kept samples would be re-packed into passes of every size.)"""
    if len(batches) > 1 or world()[1] > 1 or BY_SAMPLE is not None:
        return bool(BY_SAMPLE) and len(batches) == 1 and world()[1] == 1
    return model.lm_head.weight.numel() > sum(p.numel() for p in model.transformer.h.parameters())


# -----------------------------------------------------------------------------
# set-up: everything that can fail on bad input happens here, before any training or writing

def setup(args, size=1, distributed=False):
    """-> (train data, val data, model, checkpoint or None, reference or None) of a run of `size` processes."""
    cli.check(args, size, distributed)
    data_dir = prepare_data.ensure_prepared(Path(args.data), size)
    train_data, val_data = (load_split(data_dir, split, args.block_size) for split in ("train", "val"))
    cli.check_data(args, train_data, val_data, data_dir, size)
    model, ckpt = build_model(args, train_data["meta"], data_dir)
    ref_model = reference.load(args, train_data["meta"], data_dir)  # --ref_model, where the method scores against it
    runtime.check_memory(model, args, size, distributed, ref_model)  # more than the GPU's free memory: refused
    cli.claim_out_dir(args, ckpt)
    return train_data, val_data, model, ckpt, ref_model


def build_model(args, meta, data_dir):
    """The GPT to train: from one of our checkpoints (resume, or an earlier run), from a Hugging Face
    checkpoint (--pretrained), or new. -> (model, checkpoint or None)."""
    ckpt = None
    torch.manual_seed(args.seed)  # the model's initialisation (from scratch) and dropout
    if args.init_from != "scratch" or args.pretrained:  # one of our own runs (this one: resume), or a Hugging Face one
        ours = args.init_from != "scratch"
        source = (args.out_dir if args.init_from == "resume" else args.init_from) if ours else args.pretrained
        # float32 master weights (or bf16 ones updated with stochastic rounding): AdamW's tiny updates (lr 2e-6)
        # would vanish in bf16 weights rounded to nearest; forward and backward run in bf16 under autocast on GPUs
        model, ckpt = reference.load_checked(source, ours, meta, data_dir, args.block_size,
                                             getattr(torch, args.param_dtype))  # refused unless it reads the data
    else:
        if args.n_embd % args.n_head:
            raise ValueError(f"--n_embd {args.n_embd} is not divisible by --n_head {args.n_head}")
        model = GPT(cli.scratch_config(args, meta["vocab_size"])).to(getattr(torch, args.param_dtype))
    model.grad_ckpt, model.loss_chunk = args.grad_ckpt, model.loss_chunk if args.loss_chunk is None else args.loss_chunk
    vars(args).update({f: getattr(model.config, f) for f in cli.MODEL_FLAGS})  # args.json: the model's, not the flags
    return model, ckpt


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
    idx, counts = samples[np.minimum(idx, len(samples) - 1)], idx < len(samples)
    model.eval()
    total = 0.0
    for i in range(0, per_rank, batch_size):
        x, y = get_batch(data, idx[i:i + batch_size], block_size, device)
        with ctx:
            loss = model(x, y)[1]  # float32 at least (loss.py), never cast down; no logits built
        total += loss[torch.from_numpy(counts[i:i + batch_size]).to(device)].sum().item()
    model.train()
    if hasattr(model, "reshard"):  # FSDP keeps the root's parameters gathered after a forward: free them
        model.reshard()  # (and register the sharded ones again, for forward_backward)
    return all_sum(torch.tensor(total, dtype=torch.float64, device=device)).item() / len(samples)


def main(argv=None):
    args = cli.get_args(argv)
    distributed = "RANK" in os.environ  # started by torchrun (or another launcher that sets its variables)
    try:
        train_data, val_data, model, ckpt, ref = setup(args, int(os.environ.get("WORLD_SIZE", "1")), distributed)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C in set-up (e.g. while the built-in corpus is prepared): nothing half-written
        print(f"train.py: {prepare_data.INTERRUPTED}", file=sys.stderr)
        sys.exit(130)
    run = runtime.place(model, ckpt, args, distributed)  # device, precision, DDP/FSDP, AdamW; resumed: their state
    log = runtime.RunLog(Path(args.out_dir), args, resume_step=run.step if args.init_from == "resume" else None)
    log.print(runtime.run_line(model, args, len(train_data["start"]), run.device, run.dtype, ref))
    with runtime.out_of_memory_exits(model, args), runtime.failures_exit():  # OOM, diverged, disk full: exit 2
        val_loss, sig = train(args, run, train_data, val_data, log, reference.place(ref, run.device, args.compile))
        state = runtime.model_state(model)  # FSDP: a collective; finite: the last checkpoint was of these
        if log.on:
            log.close()
            hf.export(model.config, state, Path(args.out_dir) / "hf", hf.checkpoint_folder(args.pretrained) if
                      args.pretrained else train_data["meta"].get("tokenizer_source", train_data["meta"]["tokenizer"]))
            log.print(f"next: python plot.py {args.out_dir}  (figures) | {args.out_dir}/hf: for transformers, lm-eval")
    runtime.finish(distributed, sig)  # stopped by a signal: exits 128 + its number, once checkpointed
    return dict(val_loss=val_loss, model=model)


def train(args, run, train_data, val_data, log, ref_model=None):
    """The training loop of the placed model `run` (runtime.Placed), from run.step to max_iters, with the reference
    model of a method that takes one (reference.py). -> (the last val loss, the number of a signal that stopped it)"""
    step, model, optimizer, scaler, device = run.step, run.model, run.optimizer, run.scaler, run.device
    n = args.batch_size * args.grad_accum * world()[1]  # samples in a step, all ranks
    hparams = cli.method_hparams(args)
    eval_set = np.sort(np.random.default_rng(0).permutation(len(val_data["start"]))[:args.eval_samples])
    val_loss, last_eval, skipped, upcoming = None, (step if args.init_from == "resume" else None), 0, None
    stop = runtime.StopSignal()  # SIGTERM/SIGINT: finish the step, checkpoint, exit 128 + the signal's number
    progress = runtime.Progress(run.raw_model, args.block_size, device, run.dtype, step, args.max_iters)
    checkpoint = functools.partial(runtime.save_run, run.raw_model, optimizer, scaler, device, args,  # all ranks call
                                   tokenizer=tokenization.tokenizer_id(train_data["meta"]))

    while True:
        if step != last_eval and (step % args.eval_interval == 0 or step == args.max_iters):
            val_loss = evaluate(model, val_data, eval_set, args.batch_size, args.block_size, device, run.ctx)
            log.record(dict(type="eval", step=step, val_loss=val_loss), f"==> step {step}: val loss {val_loss:.4f}")
            if step > 0:
                checkpoint(step, val_loss=val_loss)
        if step >= args.max_iters:
            break
        if stop.signum:  # all ranks stop at the same step (read with the last step's losses)
            checkpoint(step, val_loss=val_loss)
            log.print(f"stopped by {stop.name()} after step {step}: checkpoint saved; go on with --init_from resume")
            break

        t0 = time.time()
        lr = lr_at(step, args)
        runtime.set_lr(optimizer, lr)
        samples, batches = upcoming or step_batches(train_data, args, step, device)  # this rank's share of samples
        method = args.method if step >= args.reweight_warmup else "erm"  # --reweight_warmup: uniform weights first
        # the reference's losses of the whole batch (all ranks), in the steps whose method takes them (not in warm-up)
        ref = all_cat(reference.losses(ref_model, batches, run.ctx)) if ref_model and reference.takes(method) else None
        losses, w = forward_backward(model, batches, method, dict(hparams, ref_losses=ref), run.ctx, scaler.scale)
        upcoming = step_batches(train_data, args, step + 1, device)  # made (and copied) while the device computes
        host = torch.cat([losses, w, *([] if ref is None else [ref]), stop.flag(losses)]).cpu()  # the step's one sync
        losses, w, ref, stop.signum = host[:n], host[n:2 * n], host[2 * n:-1], int(host[-1])  # ref: none, or n
        docs = train_data["doc"][samples]
        skipped = runtime.step_or_skip(optimizer, scaler, model, args, losses, docs, step, log, skipped)  # non-finite
        dt = time.time() - t0

        record = dict(type="train", step=step, loss=losses.mean().item(), wloss=(w * losses).sum().item(),
                      wmax=w.max().item(), ess=1 / (w.double() ** 2).sum().item(), lr=lr)  # n for ERM's w
        if args.method == "irdro":
            record["tilted"] = reweight.tilted_loss(losses, args.tau).item()
        n_tokens = int((train_data["end"][samples] - train_data["start"][samples] - 1).sum())  # targets, all ranks
        tail = progress.update(record, step, dt, n_tokens, int((w > 0).sum()))  # MFU: the samples trained on
        log.record(record, runtime.step_line(record, args.max_iters, n, tail))
        source = {} if train_data.get("source") is None else dict(source=train_data["source"][samples].tolist())
        reducible = dict(ref_loss=ref.tolist()) if len(ref) else {}  # loss - ref_loss: what the method weighed
        log.weights(dict(step=step, loss=losses.tolist(), weight=w.tolist(), doc=docs.tolist(), **source, **reducible))
        step += 1
    stop.restore()
    return val_loss, stop.signum


if __name__ == "__main__":
    main()
