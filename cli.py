"""
train.py's command line: its flags, the defaults that depend on the kind of run (from scratch or
--pretrained), and the checks on their values that need no data. Bad input is one line and exit code 2.

Importing this file loads no torch (seconds): train.py parses its flags first, so --help and a mistyped flag
answer at once. The checks that need torch import it (and reweight, runtime, model) where they run.
"""

import argparse
import os
import sys
from pathlib import Path

import prepare_data  # numpy only


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump: bad input says what is wrong and exits 2
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


class Given(argparse.Namespace):
    """argparse sets a flag's default only where the namespace lacks it; this one lacks none, so parsing into it sets
    just the flags on the command line (vars() of it are those)."""
    def __getattr__(self, name):
        if name.startswith("_"):  # argparse's own bookkeeping
            raise AttributeError(name)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # flags defaulting to None state their defaults themselves
        return action.help if action.default is None else super()._get_help_string(action)


# Defaults that depend on the kind of run, for the flags the user leaves out. A pretrained run follows the
# paper's official recipe (constant lr 2e-6, torch.optim.AdamW(model.parameters()) with its defaults: betas
# (0.9, 0.999), weight decay 0.01 on every parameter; 512 tokens, 100 updates).
SCRATCH_DEFAULTS = dict(block_size=128, grad_accum=2, max_iters=250, lr=2e-3, min_lr=2e-4, schedule="cosine",
                        warmup_iters=20, weight_decay=0.1, decay_params="matrices", beta2=0.95)
PRETRAINED_DEFAULTS = dict(block_size=512, grad_accum=1, max_iters=100, lr=2e-6, min_lr=2e-6, schedule="constant",
                           warmup_iters=0, weight_decay=0.01, decay_params="all", beta2=0.999)
METHOD_FLAGS = ("tau", "skip", "keep", "frac", "portion")  # a method takes those it names as arguments in reweight.py
# MidRanking's band: --skip/--keep, or the official --frac/--portion (exact); the pair given sets it, the other
# pair stays None, and giving both is an error
MIDRANK_DEFAULTS = dict(skip=0.125, keep=0.5)
OFFICIAL_MIDRANK_DEFAULTS = dict(frac=0.125, portion=0)  # the official script's defaults (portion 0: hardest only)


def by_mode(flag):
    return f"(default: {SCRATCH_DEFAULTS[flag]}; {PRETRAINED_DEFAULTS[flag]} with --pretrained)"


def build_parser(description="Train a GPT with per-sample losses reweighted by ERM, MidRanking or IR-DRO."):
    p = Parser(description=description.split("\n\n")[0], formatter_class=HelpFormatter)
    method = p.add_argument_group("method: how the n per-sample losses of a step become the weights w_i (reweight.py)",
                                  "Each method reads only the flags it names; the others are ignored.")
    add_method_flags(method.add_argument)
    a = p.add_argument_group("data").add_argument
    a("--data", default=str(prepare_data.DEFAULT_DATA_DIR), help="folder written by prepare_data.py; the built-in "
      "corpus (data/shakespeare-char, or data/shakespeare as GPT-2 tokens) is prepared on first use")
    a("--block_size", type=int, default=None,
      help=f"most target tokens per sample (context length) {by_mode('block_size')}")
    a("--batch_size", type=int, default=8, help="micro-batch size (samples per forward pass)")
    a("--grad_accum", type=int, default=None, help=f"micro-batches per optimizer step; the weights are those of the "
      f"whole step's n = batch_size * grad_accum * processes samples, exactly {by_mode('grad_accum')}")
    a = p.add_argument_group("model: a new GPT, an earlier run, or a pretrained checkpoint").add_argument
    a("--n_layer", type=int, default=4, help="transformer blocks")
    a("--n_head", type=int, default=4, help="attention heads")
    a("--n_embd", type=int, default=128, help="embedding width")
    a("--dropout", type=float, default=0.0, help="dropout probability (0 for continual training)")
    a("--bias", action=argparse.BooleanOptionalAction, default=True, help="biases in Linear/LayerNorm")
    a("--init_from", default="scratch", help="'scratch', 'resume' (from --out_dir), or an earlier out_dir")
    a("--pretrained", default=None, help="continual training of a Hugging Face GPT-2 / OPT / LLaMA-family "
      "checkpoint: a local folder or, online, a hub name (its data must be prepared with its tokenizer)")
    a = p.add_argument_group("optimisation").add_argument
    a("--max_iters", type=int, default=None, help=f"optimizer steps {by_mode('max_iters')}")
    a("--lr", type=float, default=None, help=f"peak learning rate {by_mode('lr')}")
    a("--min_lr", type=float, default=None, help=f"cosine schedule: final learning rate {by_mode('min_lr')}")
    a("--schedule", default=None, choices=("cosine", "constant"),
      help=f"learning-rate schedule after warm-up {by_mode('schedule')}")
    a("--warmup_iters", type=int, default=None, help=f"linear warm-up steps {by_mode('warmup_iters')}")
    a("--weight_decay", type=float, default=None, help=f"AdamW weight decay {by_mode('weight_decay')}")
    a("--decay_params", default=None, choices=("matrices", "all"), help="which parameters are decayed: matrices "
      "(Linear/Embedding weights, not biases or norm gains; nanoGPT) or all (the official code, torch.optim.AdamW("
      f"model.parameters())) {by_mode('decay_params')}")
    a("--beta1", type=float, default=0.9, help="AdamW beta1")
    a("--beta2", type=float, default=None, help=f"AdamW beta2 {by_mode('beta2')}")
    a("--grad_clip", type=float, default=1.0, help="clip the gradient norm (0 = off)")
    a("--optim", default="adamw", choices=("adamw", "adamw8bit"), help="adamw: torch's, float32 moments (8 bytes "
      "per parameter); adamw8bit: torchao's, 8-bit moments (~2 bytes; pip install torchao)")
    a("--param_dtype", default="float32", choices=("float32", "bfloat16"), help="the weights and gradients: float32 "
      "(8 bytes per parameter) or bfloat16 (4 bytes, computed in bfloat16, updated with stochastic rounding so that "
      "small updates are kept in expectation; torchao). Low-memory choices: docs/memory.md")
    a = p.add_argument_group("run and output").add_argument
    a("--out_dir", default="out/{run}", help="where checkpoints and logs go; {run} is replaced by the method and "
      "its settings (out/irdro-tau1.0, out/midrank-skip0.125-keep0.5, out/erm), {method} by the method")
    a("--overwrite", action="store_true", help="replace another run's files in --out_dir (refused otherwise)")
    a("--eval_interval", type=int, default=50, help="evaluate and checkpoint every this many steps")
    a("--eval_samples", type=int, default=128, help="held-out samples in the val loss")
    a("--keep_last", type=int, default=2, help="checkpoints kept in out_dir (ckpt.pt is the latest)")
    a("--seed", type=int, default=1337, help="model init and the data order")
    a("--wandb", default=None, metavar="PROJECT", help="also log to Weights & Biases (needs `pip install wandb`)")
    a = p.add_argument_group("hardware").add_argument
    a("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps")
    a("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
      help="auto: bfloat16 where supported, float16 (with loss scaling) on older GPUs, float32 on CPU")
    a("--compile", action=argparse.BooleanOptionalAction, default="auto",
      help="torch.compile the model; auto: on for CUDA")
    a("--grad_ckpt", action="store_true", help="activation checkpointing: less memory, ~30%% more compute")
    a("--loss_chunk", type=int, default=None, help="tokens per chunk of the loss, which is computed from the hidden "
      "states chunk by chunk so that the (batch x tokens x vocabulary) logits never exist (loss.py); 0 = from full "
      "logits, the plain way (default: 2^25 // vocabulary size, 128 MB of float32 logits a chunk)")
    a("--fsdp", action="store_true", help="under torchrun: shard parameters, gradients and optimizer state "
      "over the processes (FSDP2) instead of replicating them (DDP)")
    return p


def add_method_flags(a):
    """The method group's flags (`a`: its add_argument): reweight.py's methods and the arguments they take."""
    a("--method", default="irdro", metavar="NAME", help="erm: w_i = 1/n. midrank: drop the highest losses, "
      "w_i = 1/k on the next k, 0 on the rest (--skip/--keep or --frac/--portion). irdro: w = softmax(loss / tau) "
      "(--tau). Beyond the paper (reweight_followup.py): linupper, quadratic, extremes (--tau), random (--keep); "
      "against a reference model (--ref_model), by the reducible loss l - l_ref: rholoss (--keep: the top k), "
      "excess_irdro (--tau: softmax((l - l_ref) / tau))")
    a("--tau", type=float, default=1.0, help="IR-DRO's temperature, w = softmax(loss / tau): smaller = more weight "
      "on the hardest samples (tau -> 0: all on the largest loss), larger = closer to ERM's 1/n")
    a("--reweight_warmup", type=int, default=0, metavar="N", help="train the first N steps with ERM's uniform "
      "weights, then with --method (a warm-up of the reweighting, as the follow-up work does)")
    a("--skip", type=float, default=None, help="MidRanking: the fraction of highest-loss samples skipped as likely "
      "noise, floor(skip * n); larger = further from the hardest (default: 0.125, unless --frac/--portion)")
    a("--keep", type=float, default=None, help="MidRanking: the fraction trained on after the skipped ones, "
      "k = floor(keep * n), 1/k each; the rest weigh 0. The official --frac f --portion p is --skip p*f --keep f "
      "(up to rounding; give --frac/--portion for the official rule exactly) (default: 0.5, unless --frac/--portion)")
    a("--frac", type=float, default=None, help="MidRanking as the official code sets it, exactly: c = int(frac * n) "
      "samples are kept; replaces --skip/--keep (giving both is an error) (default: 0.125 with --portion)")
    a("--portion", type=int, default=None, help="MidRanking, official: train on the sorted ranks [portion*c, "
      "(portion+1)*c), rank 0 the highest loss; 0 = hardest only (default: 0 with --frac)")
    a("--ref_model", default=None, metavar="PATH", help="rholoss, excess_irdro: the frozen reference model whose "
      "per-sample losses l_ref are subtracted, trained on clean held-out data: a train.py out_dir (train one with "
      "--method erm on a clean --data) or a Hugging Face checkpoint, with the data's tokenizer")


def parse(argv=None, parser=None):
    """The flags as given, parsed (--help prints and exits here; a malformed flag exits 2): no torch needed."""
    return (parser or build_parser()).parse_args(argv)


# --init_from resume: the saved run's flags are the defaults, so that `--init_from resume` alone goes on with the same
# run. A flag given that differs from them is warned (args.json keeps each segment's flags), except these, which say
# where and how the run goes rather than what it learns (those in the first tuple are not taken from the saved run:
# a run may move to another machine or launcher); the model's own flags cannot change at all.
MACHINE_FLAGS = ("init_from", "out_dir", "overwrite", "device", "compile", "fsdp")
QUIET_FLAGS = MACHINE_FLAGS + ("max_iters", "eval_interval", "keep_last", "wandb", "grad_ckpt", "loss_chunk")
MODEL_FLAGS = ("n_layer", "n_head", "n_embd", "dropout", "bias")  # as the model has them (build_model records them)
STATE_FLAGS = ("optim", "param_dtype")  # the form of the optimizer state and weights a checkpoint holds
BAND_FLAGS = ("skip", "keep", "frac", "portion")  # one pair sets MidRanking's band: the pair given wins whole


def get_args(argv=None, parser=None):
    """The flags, parsed and completed: the kind of run's defaults (on resume: the saved run's), the method's flags,
    the device."""
    import runtime  # loads torch: after --help has had its answer
    parser = parser or build_parser()
    given = set(vars(parser.parse_args(argv, namespace=Given())))  # the flags on the command line
    saved = None
    if parse(argv, parser).init_from == "resume":
        out_dir = complete(parser, parse(argv, parser), given, quiet=True).out_dir  # the run to go on with
        try:
            segments = runtime.run_segments(Path(out_dir))
        except ValueError as e:
            parser.error(str(e))
        saved = segments[-1]["args"] if segments else None  # none: setup says there is no checkpoint to resume
        if saved:
            band = set() if given & set(BAND_FLAGS) else set(BAND_FLAGS)
            keys = set(vars(parser.parse_args([]))) - set(MACHINE_FLAGS) - set(BAND_FLAGS) - given | band
            parser.set_defaults(**{k: v for k, v in saved.items() if k in keys}, out_dir=out_dir)
    args = complete(parser, parse(argv, parser), given)
    if saved:
        check_resumed(parser, args, saved, given)
    return args


def complete(parser, args, given, quiet=False):
    """Parsed flags -> completed: the defaults that depend on the run, the method's own flags (a method flag given
    that the method does not take is warned, unless quiet), out_dir's {run} filled in, the device."""
    import reference
    import reweight
    import runtime
    official = args.frac is not None or args.portion is not None
    if official and (args.skip is not None or args.keep is not None):
        parser.error("--frac/--portion and --skip/--keep both set MidRanking's kept ranks: give one of the two pairs")
    defaults = {**(PRETRAINED_DEFAULTS if args.pretrained else SCRATCH_DEFAULTS),
                **(OFFICIAL_MIDRANK_DEFAULTS if official else MIDRANK_DEFAULTS)}
    for flag, value in defaults.items():
        if getattr(args, flag) is None:
            setattr(args, flag, value)
    try:
        _, taken = reweight.method(args.method, **method_hparams(args))  # reweight.METHODS as they are now
    except ValueError as e:  # an unknown method
        parser.error(f"argument --method: {e}")
    ref = {"ref_model"} if reference.takes(args.method) else set()  # the flag of the method's ref_losses
    if ref and not args.ref_model and not quiet:  # (quiet: resume's first pass, before the saved run's flags)
        parser.error(f"--method {args.method} scores the losses against a reference model's: give --ref_model PATH "
                     "(a train.py out_dir trained on clean held-out data, or a Hugging Face checkpoint)")
    # a method flag on the command line that the method does not take is ignored: say so (sweeps pass them all)
    for flag in sorted(given & {*METHOD_FLAGS, "ref_model"} - {*taken, *ref}) if not quiet else ():
        takes = ", ".join(f"--{k}" for k in [*taken, *ref]) or "no method flags"
        print(f"{parser.prog}: warning: --{flag} does not apply to --method {args.method} (it takes {takes}): "
              "ignored", file=sys.stderr)
    args.method_args = taken  # what the method takes of the flags: in args.json, for plot.py's labels
    run = "-".join([args.method] + [f"{k}{v}" for k, v in taken.items() if v is not None])
    args.out_dir = args.out_dir.format(method=args.method, run=run)
    try:
        device = runtime.pick_device(args.device)
    except ValueError as e:
        parser.error(str(e))
    if args.param_dtype == "bfloat16" and args.dtype == "auto":  # bf16 weights: bf16 compute (float32 on CPU else)
        args.dtype = "bfloat16"
    args.compile = args.compile is True or (args.compile == "auto" and device.type == "cuda")
    return args


def check_resumed(parser, args, saved, given):
    """A resumed run's flags given against the saved run's: the model's own refused (exit 2), any other warned."""
    where = Path(args.out_dir) / "args.json"
    changed = {flag: (saved.get(flag, getattr(args, flag)), getattr(args, flag)) for flag in sorted(given - set(
        QUIET_FLAGS)) if saved.get(flag, getattr(args, flag)) != getattr(args, flag)}
    for flag, (old, new) in changed.items():  # refused before anything is warned
        if flag in MODEL_FLAGS or flag == "pretrained":
            parser.error(f"--{flag} {new} differs from the resumed run's {old} ({where}): a resumed run keeps its "
                         f"model; drop --{flag}, or start a new run in another --out_dir")
        if flag in STATE_FLAGS:  # a new run can start from the weights with a new optimizer
            parser.error(f"--{flag} {new} differs from the resumed run's {old} ({where}): a resumed run keeps its "
                         f"optimizer state; drop --{flag}, or start a new run from its weights: --init_from "
                         f"{args.out_dir} --out_dir ANOTHER")
    for flag, (old, new) in changed.items() if int(os.environ.get("RANK", "0")) == 0 else ():  # torchrun: once
        print(f"{parser.prog}: warning: --{flag} {new} differs from the resumed run's {old}: it takes effect from "
              f"the step resumed at ({where} keeps both)", file=sys.stderr)


def method_hparams(args):
    """The method flags, by name: reweight.weights passes a method those it takes as arguments."""
    return {flag: getattr(args, flag) for flag in METHOD_FLAGS}


def check(args, size, distributed):
    """Flag values that cannot work, whatever the data. `size`: the number of processes."""
    import torch

    import runtime
    if args.fsdp and not distributed:
        raise ValueError("--fsdp shards the model over torchrun's processes: launch with "
                         "torchrun --nproc_per_node N train.py --fsdp ... (N = 1 works too)")
    if args.fsdp and runtime.pick_device(args.device).type == "cpu" and not runtime.FSDP_ON_CPU:
        raise ValueError(f"--fsdp on CPU needs torch >= 2.7 (this is {torch.__version__}): drop --fsdp (DDP), "
                         "or run on a GPU")
    if args.fsdp and runtime.pick_dtype(args.dtype, runtime.pick_device(args.device)) == "float16":
        raise ValueError("--fsdp does not support float16 loss scaling here: use --dtype bfloat16 or float32")
    if args.dtype == "float16" and runtime.pick_device(args.device).type == "cpu" and os.environ.get("RANK", "0") == "0":
        # warned, not refused: it works, and it is how the loss scaler is tested on a machine without a GPU
        print("train.py: warning: --dtype float16 on a CPU is slow and its loss scaler skips steps until its scale "
              "comes down (the first ones, or all of a short run): use --dtype bfloat16, the CPU's half precision",
              file=sys.stderr)
    for flag in ("batch_size", "grad_accum", "block_size", "eval_interval", "eval_samples", "keep_last"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    for flag in ("max_iters", "loss_chunk", "reweight_warmup"):
        if (getattr(args, flag) or 0) < 0:
            raise ValueError(f"--{flag} must be >= 0, got {getattr(args, flag)}")
    for flag in ("lr", "min_lr", "weight_decay", "grad_clip"):
        if not getattr(args, flag) >= 0:  # AdamW would raise a traceback; NaN fails here too
            raise ValueError(f"--{flag} must be >= 0, got {getattr(args, flag)}")
    for flag in ("beta1", "beta2", "dropout"):
        if not 0 <= getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be in [0, 1), got {getattr(args, flag)}")
    if (args.optim, args.param_dtype) != ("adamw", "float32"):
        check_low_memory(args)
    if args.overwrite and args.init_from == "resume":
        raise ValueError("--overwrite replaces the run in --out_dir, --init_from resume continues it: pass one")
    check_method(args.method, method_hparams(args), args.batch_size * args.grad_accum * size)
    if args.wandb:
        try:
            import wandb  # noqa: F401  (optional: never required)
        except ImportError:
            raise ValueError("--wandb needs the wandb package: pip install wandb, or drop --wandb") from None


def check_method(method, hparams, n):
    """The method's own checks (tau > 0, skip + keep <= 1, ...), on a pool of n spread-out losses. A streamed method
    trains on softmax(its .score) (train.streamed), so that must be the method itself: an edited reweight.py function
    whose .score no longer matches is refused here, not trained on silently."""
    import torch

    import reweight
    losses = torch.linspace(0.5, 12.0, n, dtype=torch.float64)
    hparams = dict(hparams, ref_losses=torch.cos(losses) + 2)  # for a method that takes a reference's (not monotone)
    w = reweight.weights(losses, method, **hparams)
    fn, hp = reweight.method(method, **hparams)
    if hasattr(fn, "score") and not torch.allclose(torch.softmax(fn.score(losses, **hp), 0), w, rtol=1e-4, atol=1e-8):
        raise ValueError(f"reweight.{method} disagrees with softmax(reweight.{method}.score): make them agree, or "
                         f"delete {method}.score to train on reweight.{method} alone")


def check_low_memory(args):
    """--optim adamw8bit and --param_dtype bfloat16 need torchao, and bfloat16 weights compute in bfloat16."""
    import importlib.util
    flags = " ".join(f"--{k} {getattr(args, k)}" for k in ("optim", "param_dtype") if getattr(args, k) not in (
        "adamw", "float32"))
    if importlib.util.find_spec("torchao") is None:
        raise ValueError(f"{flags} needs torchao: pip install torchao, or drop {flags}")
    if args.fsdp:  # FSDP2 shards 16 bytes per parameter over the processes instead; the two are not tested together
        raise ValueError(f"{flags} is not supported with --fsdp here, which shards weights, gradients and optimizer "
                         "state already: drop one of the two")
    if args.param_dtype == "bfloat16" and args.dtype not in ("auto", "bfloat16"):
        raise ValueError(f"--param_dtype bfloat16 computes in bfloat16, not in --dtype {args.dtype}: drop --dtype")


def check_data(args, train_data, val_data, data_dir, size):
    """Flag values against the data (train.load_split's tables of samples). `size`: the number of processes."""
    n, n_train = args.batch_size * args.grad_accum * size, len(train_data["start"])
    if n_train == 0:
        raise ValueError(f"no training samples in {data_dir}: its train split is empty; prepare more documents")
    if n > n_train:
        raise ValueError(f"effective batch of {n} samples exceeds the {n_train} training samples: "
                         f"lower --batch_size or --grad_accum" + (" (or use fewer processes)" if size > 1 else ""))
    if len(val_data["start"]) == 0:
        raise ValueError(f"no validation samples in {data_dir}: re-run prepare_data.py with a larger --val_fraction")
    longest = int((train_data["end"] - train_data["start"]).max()) - 1  # targets of the longest training sample
    if args.init_from == "scratch" and not args.pretrained and args.block_size > max(longest, 128):
        # a new model's positions and every batch are --block_size long: far beyond the data, only memory and time
        raise ValueError(f"--block_size {args.block_size} is longer than the longest training sample of {data_dir} "
                         f"({longest} tokens): every sample would be padded to it; use --block_size {max(longest, 128)}")


def claim_out_dir(args, ckpt=None):
    """--out_dir can be written (made if missing) and is this run's (runtime.claim_out_dir; under torchrun
    rank 0 claims it for all): checked last, once every other input is known good. On resume (`ckpt`, the run's
    checkpoint), the records it continues must be readable up to the checkpoint: a damaged line is named here,
    before anything is written."""
    import runtime
    rank0 = int(os.environ.get("RANK", "0")) == 0
    try:
        Path(args.out_dir).mkdir(parents=True, exist_ok=True)
        probe = Path(args.out_dir) / f".writable-{os.getpid()}"  # one per process: torchrun's ranks check at once
        probe.touch()
        probe.unlink()
        if rank0:
            runtime.claim_out_dir(Path(args.out_dir), args.init_from == "resume", args.overwrite)
    except OSError as e:
        raise ValueError(f"cannot write to --out_dir {args.out_dir} ({e.strerror}): choose a writable folder") from None
    for name in ("log.jsonl", "weights.jsonl") if rank0 and args.init_from == "resume" else ():
        runtime.kept_records(Path(args.out_dir) / name, ckpt["step"])  # (RunLog drops the rest when it opens them)


def scratch_config(args, vocab_size):
    """The model of a from-scratch run; the vocabulary is padded to a multiple of 64 (faster matmuls;
    the extra tokens never occur and the model learns to give them ~zero probability)."""
    from model import GPTConfig
    return GPTConfig(block_size=args.block_size, vocab_size=-(-vocab_size // 64) * 64, n_layer=args.n_layer,
                     n_head=args.n_head, n_embd=args.n_embd, dropout=args.dropout, bias=args.bias)
