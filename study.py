"""
The study: what ERM, MidRanking, IR-DRO and the follow-up weightings do in a small controlled
continual-training experiment, and when it helps (issues 8 and 16; results and their reading in RESULTS.md).

    python study.py                          # the full study: 3 seeds x 15 methods -> out/study (RESULTS.md: time)
    python study.py --quick --out_dir DIR    # the whole pipeline in about a minute (tiny model, few steps)

The experiment, all on data vendored in assets/ (offline):
  1. data. clean = Shakespeare scenes, hard = sections of Milton's Paradise Lost (same language, another
     author, a century later, in verse: hard but learnable), noise = copies of real training documents with
     their characters shuffled (same length and character counts, no structure: unlearnable, and by far the
     highest loss), corrupt = copies of clean scenes with a fraction of their words moved (whitespace kept:
     wrong, but with a loss inside the hard group's range, so no loss ranking can tell it from hard data).
     Some scenes and some Milton sections are held out as the two validation sets; no run trains on them.
  2. per seed, a base model: pretrained with ERM on the clean training scenes only (it never sees Milton); and
     a reference model for the two methods that score against one: that base continued with ERM, for as many
     steps and at the lr of a continual run, on the clean training scenes that no mix document is or is made
     from (data/reference/scenes.json; 56 of the 133 with the default --mix, one more in its unused val split),
     so disjoint from the mix and from both val sets.
  3. per seed and method, continual training from that base on the mix of the four groups (known
     proportions, every document's group recorded), with the same steps, lr and batches for every method
     (the data of step k is a function of (seed, k, n) in train.py); the random control draws its half from
     the same batches.
  4. per run: the final model's val loss on both held-out sets, and from weights.jsonl the share of the
     total weight that the method put on each group.
  5. out_dir/results.json (every number, per seed, the references' val losses included), results.md (the
     tables), study.png (the figure).
The methods: the paper's (ERM, MidRanking, IR-DRO, reweight.py) and the follow-up ones of Sow et al.
(linupper, quadratic = the official code's "peaked", extremes; and the exact random control,
reweight_followup.py), and two against the reference (RHO-LOSS's selection and IR-DRO on the reducible loss
l - l_ref, reweight_followup.py: rholoss, excess_irdro), whose runs start once their seed's reference is done.

Tokens are characters, not GPT-2 BPE: the 50k-way softmax of GPT-2's vocabulary is most of a training step
on a CPU (README, Results), while a 77-symbol vocabulary lets a 0.4M-parameter model learn real structure
in a few minutes on 2 cores. prepare_data.prepare() takes any DocTokenizer; the method does not care what a
token is: it reweights per-sample losses. The runs are independent train.py runs (train.main), a few at a
time in worker processes (--jobs): on a 2-core machine two single-threaded processes get more done than one
process with two threads.
"""

import hashlib
import json
import os
import platform
import random
import re
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import nullcontext, redirect_stdout
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch

import cli
import prepare_data
import reference
import tokenization
import reweight
import train

REPO = Path(__file__).parent
CLEAN_CORPUS = prepare_data.EMBEDDED_CORPUS  # 156 Shakespeare scenes
HARD_CORPUS = REPO / "assets" / "milton.jsonl.gz"  # 67 sections of Paradise Lost
GROUPS = ("clean", "hard", "noise", "corrupt")
CORRUPT_WORDS = 0.7  # the fraction of a corrupt document's words that are moved: tuned on a base model, RESULTS.md

# Full study and --quick: the flags the user leaves out. The full study took 34.2 minutes on 2 shared CPU cores
# (RESULTS.md), before the references and their two methods; --quick only checks that the pipeline works (its
# numbers mean little).
FULL = dict(seeds=[1, 2, 3], n_layer=2, n_head=4, n_embd=128, block_size=128, batch_size=32, base_iters=800,
            base_lr=3e-3, iters=200, lr=1e-3, eval_samples=0)
QUICK = dict(seeds=[1, 2], n_layer=1, n_head=2, n_embd=32, block_size=32, batch_size=16, base_iters=300,
             base_lr=1e-2, iters=10, lr=1e-3, eval_samples=64)


def methods(n):
    """The compared runs: (name, train.py flags), every one on the same n-sample batches (n: the effective
    batch). MidRanking keeping half of it (k = n/2) is compared with the exact random control: k samples of
    the same pool, uniformly at random, 1/k each. skip 0.25 keep 0.75 drops only the top quarter: a
    loss-based noise filter that keeps nearly all the data. The follow-up weightings (Sow et al.) take tau
    0.3: their score f(x) spans [0, 1], so the heaviest sample of a pool weighs up to exp(1/0.3) = 28 times
    the lightest, about what IR-DRO tau 1 gives over a pool's loss range of ~3.5 nats (noise to clean);
    quadratic (the official code's "peaked") also at tau 1, a mild exp(1) = 2.7. The last two score the
    reducible loss l - l_ref against the seed's reference (jobs() adds their --ref_model): RHO-LOSS keeps the
    same half as MidRanking, excess IR-DRO takes IR-DRO's tau 1."""
    k = reweight.midrank_counts(n, 0.125, 0.5)[1]
    return [
        ("ERM", ["--method", "erm"]),
        (f"random {k} of {n} (same pool)", ["--method", "random", "--keep", "0.5"]),
        ("hardest half (skip 0, keep 0.5)", ["--method", "midrank", "--skip", "0", "--keep", "0.5"]),
        ("MidRanking skip 0.125 keep 0.5", ["--method", "midrank", "--skip", "0.125", "--keep", "0.5"]),
        ("MidRanking skip 0.25 keep 0.5", ["--method", "midrank", "--skip", "0.25", "--keep", "0.5"]),
        ("MidRanking skip 0.25 keep 0.75", ["--method", "midrank", "--skip", "0.25", "--keep", "0.75"]),
        ("IR-DRO tau 1", ["--method", "irdro", "--tau", "1"]),
        ("IR-DRO tau 3", ["--method", "irdro", "--tau", "3"]),
        ("IR-DRO tau 10", ["--method", "irdro", "--tau", "10"]),
        ("linupper tau 0.3", ["--method", "linupper", "--tau", "0.3"]),
        ("quadratic tau 0.3", ["--method", "quadratic", "--tau", "0.3"]),
        ("quadratic tau 1", ["--method", "quadratic", "--tau", "1"]),
        ("extremes tau 0.3", ["--method", "extremes", "--tau", "0.3"]),
        ("RHO-LOSS keep 0.5", ["--method", "rholoss", "--keep", "0.5"]),
        ("excess IR-DRO tau 1", ["--method", "excess_irdro", "--tau", "1"]),
    ]


def get_args(argv=None):
    p = cli.Parser(description=__doc__.split("\n\n")[0].strip())  # bad input: one line, exit 2
    a = p.add_argument
    a("--out_dir", default="out/study", help="data, runs, results.json, results.md and study.png go here")
    a("--quick", action="store_true", help="a tiny model and a few steps: checks the pipeline in about a minute")
    a("--seeds", type=int, nargs="+", help=f"seeds: base model init and data order (default {FULL['seeds']})")
    a("--mix", type=float, nargs=4, default=[0.4, 0.3, 0.15, 0.15], metavar=("CLEAN", "HARD", "NOISE", "CORRUPT"),
      help="shares of the continual-training documents; hard = all Milton sections not held out")
    a("--corrupt_words", type=float, default=CORRUPT_WORDS, metavar="FRACTION",
      help="corrupt documents: the fraction of a clean scene's words that trade places")
    a("--jobs", type=int, default=2, help="runs at a time, each in its own process")
    a("--threads", type=int, default=1, help="torch threads per process")
    a("--device", default="cpu", help="torch device of every run")
    for flag, help in (("n_layer", "model: transformer blocks"), ("n_head", "model: attention heads"),
                       ("n_embd", "model: width"), ("block_size", "characters per sample"),
                       ("batch_size", "samples per optimizer step (the pool the methods reweight)"),
                       ("base_iters", "base model: ERM steps on clean text (cosine schedule)"),
                       ("iters", "continual training: steps of every method"),
                       ("eval_samples", "held-out samples per val set; 0 = all")):
        a(f"--{flag}", type=int, help=f"{help} (default {FULL[flag]}; {QUICK[flag]} with --quick)")
    a("--base_lr", type=float, help=f"base model: peak lr (default {FULL['base_lr']}; {QUICK['base_lr']} with --quick)")
    a("--lr", type=float, help=f"continual training: constant lr, no warm-up (default {FULL['lr']})")
    args = p.parse_args(argv)
    for flag, value in (QUICK if args.quick else FULL).items():
        if getattr(args, flag) is None:
            setattr(args, flag, value)
    if not all(x >= 0 for x in args.mix) or not args.mix[0] > 0 or not args.mix[1] > 0:
        p.error(f"--mix needs clean and hard shares > 0, noise and corrupt >= 0, got {args.mix}")
    if not 0 < args.corrupt_words <= 1:
        p.error(f"--corrupt_words must be in (0, 1], got {args.corrupt_words}")
    if args.jobs < 1 or args.threads < 1:
        p.error(f"--jobs and --threads must be >= 1, got {args.jobs} and {args.threads}")
    return args


# -----------------------------------------------------------------------------
# data

def char_tokenizer(texts):
    """Characters as tokens: id 0 is the bos that starts every document, 1.. the characters of `texts`."""
    chars = sorted(set("".join(texts)))
    stoi = {c: i + 1 for i, c in enumerate(chars)}
    itos = "\0" + "".join(chars)
    fingerprint = "char-" + hashlib.sha256("".join(chars).encode()).hexdigest()[:12]
    return tokenization.DocTokenizer("char", fingerprint, len(itos), 0, 0,
                                     lambda batch: [[stoi[c] for c in t] for t in batch],
                                     lambda ids: "".join(itos[i] for i in ids))


def shuffled(text, rng):
    """Noise: the document's own characters in random order. Its length and character counts are those of
    real text, so it can only be told apart by its (absent) structure; no model can learn it beyond the
    character frequencies."""
    chars = list(text)
    rng.shuffle(chars)
    return "".join(chars)


def corrupted(text, fraction, rng):
    """Corrupt: round(fraction * #words) of the document's words (runs of non-whitespace, punctuation
    included) trade places at random; every space and line break stays where it was, every word is spelt
    right. The text stays real words in real line shapes, only their order is partly wrong, so its loss is
    only moderately raised: tuned (CORRUPT_WORDS) to sit among the hard group's losses."""
    parts = re.split(r"(\s+)", text)  # words at the even positions, the whitespace between them at the odd
    words = [i for i in range(0, len(parts), 2) if parts[i]]
    chosen = rng.sample(words, round(fraction * len(words)))
    moved = [parts[i] for i in chosen]
    rng.shuffle(moved)
    for i, word in zip(chosen, moved):
        parts[i] = word
    return "".join(parts)


def prepare(out_dir, mix, corrupt_words=CORRUPT_WORDS, seed=1337):
    """The three data folders: clean/ (the base model's training scenes; val = held-out scenes), hard/ (val =
    held-out Milton sections) and mix/ (continual training; mix/groups.json: the group of every document id
    in its weights.jsonl). The hold-outs are prepare_data's own seeded document splits, the same for every
    study seed. Returns the three folders."""
    clean_src, hard_src = (prepare_data.read_jsonl_gz(path) for path in (CLEAN_CORPUS, HARD_CORPUS))
    tok = char_tokenizer(r["text"] for r in clean_src + hard_src)
    data = out_dir / "data"
    clean = prepare_data.prepare(str(CLEAN_CORPUS), data / "clean", val_fraction=0.15, seed=seed, tokenizer=tok)
    hard = prepare_data.prepare(str(HARD_CORPUS), data / "hard", val_fraction=0.25, seed=seed, tokenizer=tok)

    # the mix: every training section of Milton, clean training scenes and noise in the --mix proportions
    rng = random.Random(seed)
    hard_ids = np.load(hard / "train_docs.npz")["ids"].tolist()
    clean_ids = np.load(clean / "train_docs.npz")["ids"].tolist()
    n_clean, n_noise, n_corrupt = (round(len(hard_ids) * share / mix[1]) for share in (mix[0], mix[2], mix[3]))
    if n_clean > len(clean_ids):
        raise ValueError(f"--mix asks for {n_clean} clean scenes but only {len(clean_ids)} are not held out")
    mix_clean = sorted(rng.sample(clean_ids, n_clean))
    docs = [("clean", clean_src[i]) for i in mix_clean] + [("hard", hard_src[i]) for i in hard_ids]
    sources = [r for _, r in docs]  # noise: shuffled copies of real training documents, clean or hard
    docs += [("noise", dict(text=shuffled(r["text"], rng), title=r["title"] + " (shuffled)"))
             for r in rng.choices(sources, k=n_noise)]
    # corrupt: clean training scenes (any, the base model's own) with a fraction of their words moved
    corrupt_src = rng.choices(clean_ids, k=n_corrupt)
    docs += [("corrupt", dict(text=corrupted(clean_src[i]["text"], corrupt_words, rng),
                              title=clean_src[i]["title"] + " (words shuffled)"))
             for i in corrupt_src]
    data.mkdir(parents=True, exist_ok=True)
    with open(data / "mix.jsonl", "w") as f:
        f.writelines(json.dumps(dict(text=r["text"], title=f"{group}: {r['title']}")) + "\n" for group, r in docs)
    # train.py needs a val split; the smallest one (1-2 documents) is all it takes, and it is never used
    mixed = prepare_data.prepare(str(data / "mix.jsonl"), data / "mix", val_fraction=0.01, seed=seed, tokenizer=tok)
    (mixed / "groups.json").write_text(json.dumps([g for g, _ in docs]) + "\n")
    held_out = sorted(set(clean_ids) - set(mix_clean) - set(corrupt_src))
    if len(held_out) < 2:  # one to train the reference on, one for train.py's val split
        raise ValueError(f"--mix leaves {len(held_out)} of the {len(clean_ids)} clean training scenes out of the mix "
                         "for the reference model, which needs 2: lower the clean or corrupt share")
    return clean, hard, mixed, prepare_reference(data, clean_src, held_out, tok, seed)


def prepare_reference(data, clean_src, held_out, tok, seed):
    """data/reference/: the reference models' data, the clean training scenes that no document of the mix is or is
    made from (not a clean scene of the mix, not the source of a corrupt copy; noise copies only mix documents), so
    its own training steps see none of the mix's documents (its start, the base, has seen every clean training
    scene, as every continual run's start has) and no scene of either val set (clean/'s val scenes are not clean
    training scenes). train.py needs a val split: one scene (val_fraction 0.01) lands in it, unused,
    as in mix/. scenes.json: the clean corpus's ids (clean/titles.json) of the scenes it trains on, and of that one."""
    with open(data / "reference.jsonl", "w") as f:
        f.writelines(json.dumps(dict(text=clean_src[i]["text"], title=clean_src[i]["title"])) + "\n" for i in held_out)
    ref = prepare_data.prepare(str(data / "reference.jsonl"), data / "reference", val_fraction=0.01, seed=seed,
                               tokenizer=tok)
    # the folder's own ids index reference.jsonl, i.e. held_out
    train_ids, val_ids = (np.load(ref / f"{split}_docs.npz")["ids"].tolist() for split in ("train", "val"))
    (ref / "scenes.json").write_text(json.dumps(dict(train=[held_out[i] for i in train_ids],
                                                     unused_val=[held_out[i] for i in val_ids])) + "\n")
    return ref


# -----------------------------------------------------------------------------
# one run: train, evaluate on both held-out sets, count where the weight went

def eval_sets(clean, hard, block_size, eval_samples):
    """(name, data, samples) of the two held-out sets: every val sample, or a fixed random subset."""
    out = []
    for name, folder in (("clean", clean), ("hard", hard)):
        data = train.load_split(Path(folder), "val", block_size)
        n = len(data["start"])
        samples = np.arange(n) if not eval_samples else np.sort(np.random.default_rng(0).permutation(n)[:eval_samples])
        out.append((name, data, samples))
    return out


def val_losses(model, sets, block_size, device):
    device = torch.device(device)
    model.to(device)
    return {name: train.evaluate(model, data, samples, 64, block_size, device, nullcontext())
            for name, data, samples in sets}


def weight_shares(run_dir, groups):
    """From weights.jsonl: the share of the total weight (over all steps) on each group, the share of the
    samples seen from each group (what ERM's weights are), and the mean per-sample loss of each group."""
    weight, seen, loss = (dict.fromkeys(GROUPS, 0.0) for _ in range(3))
    with open(run_dir / "weights.jsonl") as f:
        for line in f:
            r = json.loads(line)
            for d, w, l in zip(r["doc"], r["weight"], r["loss"]):
                weight[groups[d]] += w
                seen[groups[d]] += 1
                loss[groups[d]] += l
    total_w, total_n = sum(weight.values()), sum(seen.values())
    return dict(share={g: weight[g] / total_w for g in GROUPS}, seen={g: seen[g] / total_n for g in GROUPS},
                group_loss={g: loss[g] / seen[g] if seen[g] else None for g in GROUPS})


def run(job):
    """One train.py run (in a worker process), its stdout in <out_dir>/stdout.log; then the final model's val
    losses and, for a continual run, where its weight went. The continual runs' checkpoints are deleted
    (only their logs are needed, and there are dozens); the base's stays, the others start from it, and so does
    the reference's, the runs against it read it."""
    torch.set_num_threads(job["threads"])
    out = Path(job["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(out / "stdout.log", "w") as f, redirect_stdout(f):
        model = train.main(job["argv"] + ["--out_dir", str(out)])["model"]
    res = dict(seconds=time.time() - t0, **{f"val_{k}": v for k, v in val_losses(
        model, eval_sets(job["clean"], job["hard"], job["block_size"], job["eval_samples"]), job["block_size"],
        job["device"]).items()})
    if job.get("groups"):
        res.update(weight_shares(out, json.loads(Path(job["groups"]).read_text())))
        for ckpt in out.glob("ckpt*.pt"):
            ckpt.unlink()
        shutil.rmtree(out / "hf", ignore_errors=True)
    return res


def jobs(args, clean, hard, mixed, ref_data):
    """The base run of every seed, its reference and the continual runs. The reference is the seed's base model
    continued with ERM on the held-out clean scenes of ref_data, for as many steps and at the same lr as a
    continual run: the same model and budget as the runs it scores for, only on clean data none of them sees. The
    runs of a method that scores against a reference (reference.takes) get --ref_model: the seed's."""
    common = dict(threads=args.threads, clean=str(clean), hard=str(hard), block_size=args.block_size,
                  eval_samples=args.eval_samples, device=args.device)
    flags = ["--device", args.device, "--no-compile", "--block_size", str(args.block_size),
             "--batch_size", str(args.batch_size), "--grad_accum", "1", "--keep_last", "1", "--dropout", "0"]
    out = Path(args.out_dir)
    bases, refs, runs = {}, {}, {}
    for seed in args.seeds:
        base, ref = out / f"seed{seed}" / "base", out / f"seed{seed}" / "reference"
        bases[seed] = dict(common, out_dir=str(base), argv=flags + [
            "--data", str(clean), "--method", "erm", "--seed", str(seed), "--n_layer", str(args.n_layer),
            "--n_head", str(args.n_head), "--n_embd", str(args.n_embd), "--max_iters", str(args.base_iters),
            "--lr", str(args.base_lr), "--eval_interval", str(args.base_iters), "--eval_samples", "128"])
        continual = flags + ["--init_from", str(base), "--seed", str(seed), "--max_iters", str(args.iters),
                             "--lr", str(args.lr), "--schedule", "constant", "--warmup_iters", "0",
                             "--eval_interval", str(max(args.iters, 1)), "--eval_samples", "8"]
        refs[seed] = dict(common, out_dir=str(ref), argv=continual + ["--data", str(ref_data), "--method", "erm"])
        runs[seed] = [(name, dict(common, out_dir=str(out / f"seed{seed}" / f"m{i}"), groups=str(mixed / "groups.json"),
                                  argv=continual + ["--data", str(mixed)] + m_flags
                                  + (["--ref_model", str(ref)] if reference.takes(m_flags[1]) else [])))
                      for i, (name, m_flags) in enumerate(methods(args.batch_size))]
    return bases, refs, runs


def needs_reference(job):
    return "--ref_model" in job["argv"]


def run_all(args, bases, refs, runs):
    """Every base first; as soon as a seed's base is done, its reference and its continual runs that need none
    (the reference first: a run against it waits for it), and those that need it when it is done; --jobs at a
    time. Returns {seed: base result}, {seed: reference result}, {seed: {method: result}}."""
    base_res, ref_res, run_res = {}, {}, {seed: {} for seed in runs}
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
        pending = {pool.submit(run, job): (seed, "base") for seed, job in bases.items()}
        while pending:
            done = next(as_completed(pending))
            seed, name = pending.pop(done)
            res = done.result()
            if name == "base":
                base_res[seed] = res
                pending[pool.submit(run, refs[seed])] = (seed, "reference")
                pending.update({pool.submit(run, job): (seed, m) for m, job in runs[seed] if not needs_reference(job)})
            elif name == "reference":
                ref_res[seed] = res
                pending.update({pool.submit(run, job): (seed, m) for m, job in runs[seed] if needs_reference(job)})
            else:
                run_res[seed][name] = res
            print(f"seed {seed} {name}: val clean {res['val_clean']:.4f} hard {res['val_hard']:.4f}"
                  + (f" | weight on noise {res['share']['noise']:.3f} corrupt {res['share']['corrupt']:.3f}"
                     if "share" in res else "")
                  + f" | {res['seconds']:.0f} s", flush=True)
    return base_res, ref_res, run_res


# -----------------------------------------------------------------------------
# report: results.md (table) and study.png (figure)

def mean_std(values):
    """Mean and sample standard deviation (0 for a single value)."""
    v = np.asarray(values, dtype=float)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def summarize(results):
    """One row per method (base first): per seed, both val losses, their paired difference to ERM (same seed,
    same base, same data order) and the weight shares; mean ± std over seeds of each."""
    seeds = sorted(results["base"], key=int)
    per_seed = {"base model (no continual training)": [results["base"][s] for s in seeds]}
    per_seed.update({name: [results["runs"][s][name] for s in seeds] for name, _ in results["methods"]})
    erm = per_seed["ERM"]
    rows = []
    for name, rs in per_seed.items():
        row = dict(method=name, seeds={})
        for k in ("val_clean", "val_hard"):
            row["seeds"][k] = [r[k] for r in rs]
            row["seeds"][f"delta_{k}"] = [r[k] - e[k] for r, e in zip(rs, erm)]
        if "share" in rs[0]:
            row["share"] = {g: mean_std([r["share"][g] for r in rs]) for g in GROUPS}
        row.update({k: mean_std(v) for k, v in row["seeds"].items()})
        rows.append(row)
    return rows


def pm(ms, digits=3, sign=False):
    return f"{ms[0]:{'+' if sign else ''}.{digits}f} ± {ms[1]:.{digits}f}"


def write_table(rows, results, path):
    a, m = results["args"], results["machine"]
    seeds = sorted(results["runs"], key=int)
    seen = {g: mean_std([results["runs"][s]["ERM"]["seen"][g] for s in seeds]) for g in GROUPS}
    lines = [
        ("Val loss: mean per-sample loss (nats per character) on the held-out clean scenes and hard Milton "
         "sections; Δ: paired difference to ERM (same seed), negative is better. Weight: share of all the weight a "
         f"method gave over all its steps. Mean ± std over {len(seeds)} seeds ({', '.join(map(str, a['seeds']))})."),
        "",
        "| method | val loss clean | Δ clean vs ERM | val loss hard | Δ hard vs ERM | weight on clean | on hard | on noise "
        "| on corrupt |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        shares = [pm(r["share"][g], 2) for g in GROUPS] if "share" in r else ["—"] * len(GROUPS)
        lines.append(f"| {r['method']} | {pm(r['val_clean'])} | {pm(r['delta_val_clean'], sign=True)} | "
                     f"{pm(r['val_hard'])} | {pm(r['delta_val_hard'], sign=True)} | " + " | ".join(shares) + " |")
    lines += ["", ("Samples seen in continual training (ERM's weight shares, by construction): "
                   + ", ".join(f"{g} {seen[g][0]:.1%}" for g in GROUPS) + "."), *reference_line(results), "",
              "Mean per-sample training loss of each group over all steps (from weights.jsonl; mean over seeds):", "",
              "| method | " + " | ".join(GROUPS) + " |", "|---|" + "---|" * len(GROUPS)]
    for name, _ in results["methods"]:
        loss = [[results["runs"][s][name]["group_loss"][g] for s in seeds] for g in GROUPS]
        lines.append(f"| {name} | " + " | ".join("—" if None in x else f"{np.mean(x):.3f}" for x in loss) + " |")
    lines += ["", "Per seed, val loss clean / hard:", "",
              "| method | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|" + "---|" * len(seeds)]
    for r in rows:
        lines.append(f"| {r['method']} | " + " | ".join(
            f"{c:.4f} / {h:.4f}" for c, h in zip(r["seeds"]["val_clean"], r["seeds"]["val_hard"])) + " |")
    lines += ["", (f"Continual training: {a['iters']} steps of {a['batch_size']} samples x {a['block_size']} "
                   f"characters, lr {a['lr']:g} constant; base: {a['base_iters']} ERM steps, lr {a['base_lr']:g} "
                   f"cosine; model {a['n_layer']} layers x {a['n_embd']} wide."),
              (f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, {a['jobs']} processes x "
               f"{a['threads']} thread(s); wall time {results['seconds'] / 60:.1f} min."),
              f"Command: `{results['command']}`"]
    path.write_text("\n".join(lines) + "\n")
    return path


def reference_line(results):
    """The reference models' own val losses (a line of results.md; none in a results.json from before them)."""
    if not results.get("reference"):
        return []
    ref, d = results["reference"], results["reference_data"]
    val = {k: mean_std([ref[s][f"val_{k}"] for s in sorted(ref, key=int)]) for k in ("clean", "hard")}
    return ["", (f"Reference model of RHO-LOSS and excess IR-DRO, per seed: the base model continued with ERM for "
                 f"{d['steps']} steps at lr {d['lr']:g} on the {len(d['train'])} held-out clean training scenes that "
                 f"are neither in the mix nor the source of a corrupt copy (nor in a val set): val loss clean "
                 f"{pm(val['clean'])}, hard {pm(val['hard'])}.")]


def plot(rows, path):
    """Three panels, one row per method: the weight shares (stacked), and each val loss with its seeds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [r["method"] for r in rows][::-1]  # top to bottom as in the table
    rows = rows[::-1]
    y = np.arange(len(rows))
    fig, axes = plt.subplots(1, 3, figsize=(15, 0.42 * len(rows) + 1.8), sharey=True,
                             gridspec_kw=dict(width_ratios=[1.2, 1, 1]))
    left = np.zeros(len(rows))
    for g, color in zip(GROUPS, ("C0", "C2", "C3", "C4")):
        share = np.array([r["share"][g][0] if "share" in r else 0 for r in rows])
        axes[0].barh(y, share, left=left, color=color, label=g)
        for yi, s, x in zip(y, share, left):
            if s > 0.06:
                axes[0].text(x + s / 2, yi, f"{s:.2f}", ha="center", va="center", fontsize=8, color="white")
        left += share
    for yi, r in zip(y, rows):
        if "share" not in r:
            axes[0].text(0.01, yi, "no continual training", va="center", fontsize=8, color="grey")
    axes[0].set_xlim(0, 1)
    axes[0].set_title("share of total weight (mean over seeds)", fontsize=10)
    axes[0].legend(ncol=len(GROUPS), fontsize=8, loc="lower right", bbox_to_anchor=(1, 1.06))
    axes[0].set_yticks(y, names, fontsize=9)
    erm = next(r for r in rows if r["method"] == "ERM")
    for ax, key, title in ((axes[1], "val_clean", "held-out clean (Shakespeare)"),
                           (axes[2], "val_hard", "held-out hard (Milton)")):
        for yi, r in zip(y, rows):  # each seed a dot, the mean ± std a black bar
            ax.plot(r["seeds"][f"delta_{key}"], [yi] * len(r["seeds"][key]), ".", color="grey", ms=5)
        ax.errorbar([r[f"delta_{key}"][0] for r in rows], y, xerr=[r[f"delta_{key}"][1] for r in rows],
                    fmt="o", color="k", ms=4, capsize=3)
        ax.axvline(0, color="C1", ls="--", lw=1, label=f"ERM: {erm[key][0]:.3f} ± {erm[key][1]:.3f}")
        ax.set_title(f"val loss − ERM's, {title}\n(same seed; mean ± std, dots: seeds; < 0 is better)",
                     fontsize=10)
        ax.set_xlabel("nats per character")
        ax.legend(fontsize=8, loc="lower right")
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def machine():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return dict(cpu=cpu, cores=os.cpu_count(), torch=torch.__version__, python=platform.python_version())


def main(argv=None):
    args = get_args(argv)
    t0 = time.time()
    out = Path(args.out_dir)
    try:
        clean, hard, mixed, ref_data = prepare(out, args.mix, args.corrupt_words)
    except ValueError as e:  # prepare_data's DataError included
        print(f"study.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    bases, refs, runs = jobs(args, clean, hard, mixed, ref_data)
    print(f"{len(bases)} base models, {len(refs)} references and {sum(map(len, runs.values()))} continual runs, "
          f"{args.jobs} at a time (each run's log: {out}/seed*/*/stdout.log)", flush=True)
    base_res, ref_res, run_res = run_all(args, bases, refs, runs)
    results = dict(command=" ".join(["python study.py", *(sys.argv[1:] if argv is None else argv)]),
                   args=vars(args), machine=machine(), seconds=time.time() - t0,
                   methods=[(name, flags) for name, flags in methods(args.batch_size)],
                   run_dirs={name: Path(job["out_dir"]).name for name, job in runs[args.seeds[0]]},
                   base=base_res, runs=run_res, reference=ref_res,
                   reference_data=dict(json.loads((ref_data / "scenes.json").read_text()),
                                       steps=args.iters, lr=args.lr))
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    report(results, out)
    print((out / "results.md").read_text())
    return results


def report(results, out):
    """results.md and study.png from the results (also from a saved results.json: its seeds are strings)."""
    rows = summarize(results)
    for path in (write_table(rows, results, out / "results.md"), plot(rows, out / "study.png")):
        print(path)


if __name__ == "__main__":
    main()
