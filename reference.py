"""
The reference model of a method that scores against one (RHO-LOSS, Mindermann et al., ICML 2022): train.py
--ref_model, a model trained on clean held-out data, frozen; its per-sample losses of a step's own samples reach the
method as its argument `ref_losses` (reweight_followup.py: rholoss, excess_irdro weigh l_i - l_ref,i).

    python train.py --data data/clean --method erm --out_dir out/ref                  # a reference, on clean data
    python train.py --data data/mix --method rholoss --keep 0.5 --ref_model out/ref   # then the run that uses it

A model comes from disk here with the same checks whichever run reads it (load_checked): the one train.py trains
(--init_from, --pretrained) and the reference, each refused in one line unless it reads the data's tokens.
"""

import inspect
from pathlib import Path

import torch

import hf
import reweight
import runtime
import tokenization


def takes(method):
    """Whether a method of reweight.py scores against the reference: it names `ref_losses` among its arguments."""
    return "ref_losses" in inspect.signature(reweight.method(method)[0]).parameters


def load_checked(source, ours, meta, data_dir, block_size, dtype):
    """(model, its checkpoint or None) from one of train.py's run folders (`ours`: its ckpt.pt) or a Hugging Face
    checkpoint (a folder, or online a hub name), its weights in `dtype`. ValueError (one line) unless it reads the data
    in `data_dir`: trained on the same tokenizer's tokens, with their vocabulary and block_size positions at least."""
    if ours:
        path = Path(source) / "ckpt.pt"
        model, ckpt = runtime.load_model(path, dtype)
        if ckpt.get("tokenizer") != tokenization.tokenizer_id(meta):
            raise ValueError(f"{path} was trained on {ckpt.get('tokenizer')} tokens but {data_dir} holds "
                             f"{tokenization.tokenizer_id(meta)} tokens: prepare the data with the model's tokenizer")
    else:
        folder, ckpt = hf.checkpoint_folder(source), None
        model = hf.load_pretrained(folder, dtype=dtype)
        if tokenization.load_tokenizer(folder).fingerprint != tokenization.tokenizer_id(meta):
            raise ValueError(f"{data_dir} was tokenized with {meta['tokenizer']}, not with the tokenizer of "
                             f"{source}: run python prepare_data.py --tokenizer {source} ...")
    if block_size > model.config.block_size:
        raise ValueError(f"--block_size {block_size} exceeds the model's {model.config.block_size} positions")
    if meta["vocab_size"] > model.config.vocab_size:
        raise ValueError(f"{data_dir} has a vocabulary of {meta['vocab_size']} tokens, the model only "
                         f"{model.config.vocab_size}: prepare the data with the model's tokenizer")
    return model, ckpt


def load(args, meta, data_dir):
    """The reference of --ref_model, frozen (eval mode: no dropout; no gradients), on the CPU in --param_dtype (train.py
    places it beside the model: place); None where the method takes none (cli.complete warned of an ignored one)."""
    if not (args.ref_model and takes(args.method)):
        return None
    ours = (Path(args.ref_model) / "ckpt.pt").exists()  # one of our runs, else a Hugging Face checkpoint
    try:
        model, _ = load_checked(args.ref_model, ours, meta, data_dir, args.block_size, getattr(torch, args.param_dtype))
    except (ValueError, FileNotFoundError) as e:  # the trained model's errors, named as the reference's
        what = f"--ref_model {args.ref_model} (a train.py out_dir, or a Hugging Face checkpoint)"
        raise ValueError(f"{what}: {e}") from None
    return model.eval().requires_grad_(False)


def place(model, device, compile):
    """The reference (or None) on the run's device, compiled as the trained model is. Under torchrun every process
    holds all of it (not sharded: it has no gradients or optimizer state, only its weights)."""
    if model is None:
        return None
    model = model.to(device)
    return torch.compile(model) if compile else model


@torch.no_grad()
def losses(model, batches, ctx):
    """The reference's per-sample losses of the micro-batches `batches`, in their order, (n,): no graph, in the compute
    dtype's autocast `ctx` as the trained model's, never cast down (loss.py). No read of the device."""
    with ctx:
        return torch.cat([model(x, y)[1] for x, y in batches])
