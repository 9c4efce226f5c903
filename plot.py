"""
Figures of a training run: what the reweighting did, and what it did to the loss.

    python plot.py out/irdro-tau1.0 out/erm                   # per-run figures + loss_curves.png
    python plot.py out/irdro-tau1.0 --steps 0 100 249         # loss-vs-weight at chosen steps
    python plot.py --loss-hist out/base out/irdro_ct          # per-sample val loss, before / after

Per run dir (train.py's log.jsonl, weights.jsonl, args.json) it writes weights_hist.png,
loss_vs_weight.png and ess.png beside the run, and for data prepared with sources (prepare_data.py --source_field,
or several files) sources.png and sources.csv: each source's share of the weight against its share of the samples.
The runs' loss curves go to one overlaid figure.
Weights are shown as w*n throughout, so 1 is ERM's uniform 1/n whatever the batch size.
"""

import argparse
import csv
import json
import math
import os
import sys
from pathlib import Path

import matplotlib
matplotlib.use("Agg")  # headless: files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402

FIGSIZE, DPI = (7, 4), 120  # about 840 x 480 pixels: readable at README width
MAX_SOURCES = 10  # lines of sources.png: the sources with the most samples, the rest summed as one "other"


class PlotError(Exception):
    """Bad input: reported as one line on stderr, exit code 2."""


def load_run(run_dir):
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise PlotError(f"no run dir {run_dir}: pass a train.py --out_dir")
    for name in ("log.jsonl", "weights.jsonl"):
        if not (run_dir / name).is_file():
            raise PlotError(f"no {name} in {run_dir}: pass a run dir written by train.py (its --out_dir)")
    log, weights = (read_jsonl(run_dir / name) for name in ("log.jsonl", "weights.jsonl"))
    if not weights or not any(r["type"] == "train" for r in log):
        raise PlotError(f"{run_dir} has no training steps logged yet: train for at least one step")
    args = json.loads((run_dir / "args.json").read_text()) if (run_dir / "args.json").is_file() else {}
    args = args["segments"][-1]["args"] if "segments" in args else args  # the latest segment's flags (older runs: one)
    return dict(dir=run_dir, log=log, weights=weights, args=args, label=run_label(run_dir, args))


def read_jsonl(path):
    """train.py writes each record as one line ending in a newline, so what follows the last newline is a line
    still being written (or torn by a kill): left out. A bad line before it means a damaged file: named by its
    number in the file (json's own message counts within the line)."""
    records = []
    for i, line in enumerate(path.read_bytes().split(b"\n")[:-1], 1):
        try:
            if line.strip():
                records.append(json.loads(line, object_hook=nan_for_null))
        except ValueError as e:  # not JSON, or not UTF-8
            raise PlotError(f"{path} line {i} is damaged ({getattr(e, 'msg', e)}): delete that line to plot the "
                            "rest, or pass another run") from None
    return records


def nan_for_null(record):
    """train.py writes a value that is not finite (a skipped step's loss) as null, strict JSON: NaN again here,
    which the figures leave out."""
    return {k: math.nan if v is None else [math.nan if x is None else x for x in v] if isinstance(v, list) else v
            for k, v in record.items()}


def describe(args):
    """'irdro (τ=1)', 'midrank (skip=0.125, keep=0.5)', 'erm': the method and the settings it takes
    (args.json's method_args; older runs: tau for irdro, skip and keep for midrank)."""
    method = args.get("method", "?")
    old = {"irdro": ("tau",), "midrank": ("skip", "keep")}.get(method, ())
    settings = args.get("method_args", {k: args[k] for k in old if k in args})
    shown = ", ".join(f"{'τ' if k == 'tau' else k}={v:g}" for k, v in settings.items() if v is not None)
    return f"{method} ({shown})" if shown else method


def run_label(run_dir, args):
    name = Path(run_dir).resolve().name
    return describe(args) if name == args.get("method") else f"{name}: {describe(args)}"


def ema(x, alpha):
    """Exponential moving average started at the first value (no drag towards zero); a NaN (a skipped step's loss)
    is passed over."""
    out, acc = np.empty(len(x)), next((v for v in x if v == v), np.nan)
    for i, v in enumerate(x):
        acc = acc if v != v else alpha * acc + (1 - alpha) * v
        out[i] = acc
    return out


def save(fig, path):
    if fig.get_layout_engine() is None:
        fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    print(path)
    return Path(path)


# -----------------------------------------------------------------------------
# per-run figures

def plot_weight_hist(run):
    """Step x weight 2D histogram: how spread out the weights are, and how that changes as the
    losses of a batch drift apart or together during training. w = 0 (MidRanking's skipped and dropped
    samples) has no place on a log axis: it gets a panel of its own below a broken axis."""
    recs = run["weights"]
    x = np.concatenate([np.full(len(r["weight"]), r["step"]) for r in recs])
    y = np.concatenate([np.asarray(r["weight"]) * len(r["weight"]) for r in recs])
    pos, dropped = y > 0, (y == 0).any()  # (NaN, a skipped step's: neither)
    # log bins of width d centred on 1, so ERM's weights fill exactly one row on the reference line
    lo, hi, d = min(y[pos].min() / 1.3, 0.3), max(y[pos].max() * 1.3, 3), 0.06
    yedges = 10 ** (d * (np.arange(np.floor(np.log10(lo) / d) - 1, np.ceil(np.log10(hi) / d) + 1) + 0.5))
    width = -(-(x.max() - x.min() + 1) // 60)  # whole steps per column: no uneven striping
    xedges = np.arange(x.min(), x.max() + width + 1, width)
    per_column = np.maximum(np.histogram(x, xedges)[0], 1)[:, None]
    H = np.histogram2d(x[pos], y[pos], [xedges, yedges])[0] / per_column  # colour = share of the column's samples
    norm = LogNorm(vmin=0.1 if not H[H > 0].size else min(H[H > 0].min(), 0.1), vmax=1)
    if dropped:
        fig, (ax, ax0) = plt.subplots(2, 1, sharex=True, figsize=FIGSIZE, layout="constrained",
                                      gridspec_kw=dict(height_ratios=[7, 1]))
    else:
        fig, ax = plt.subplots(figsize=FIGSIZE)
    mesh = ax.pcolormesh(xedges, yedges, np.ma.masked_equal(H.T, 0), cmap="viridis", norm=norm)
    ax.axhline(1, color="red", ls="--", lw=1.2, label="ERM: w = 1/n")
    ax.set_yscale("log")
    ticks = [t for t in (1e-4, 1e-3, 0.01, 0.03, 0.1, 0.3, 1, 2, 3, 10, 30, 100, 300) if yedges[0] <= t <= yedges[-1]]
    ax.set_yticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.set_ylim(yedges[0], yedges[-1])
    ax.set_ylabel("weight × n  (log scale)")
    ax.set_title(f"{run['label']}: per-sample weights, n = {len(recs[-1]['weight'])}")
    ax.legend(loc="upper right", fontsize=9)
    if dropped:  # the w = 0 panel: the share of each column's samples that weigh nothing
        zero = np.histogram(x[~pos], xedges)[0][None, :] / per_column.T
        ax0.pcolormesh(xedges, [0, 1], np.ma.masked_equal(zero, 0), cmap="viridis", norm=norm)
        ax0.set_yticks([0.5], ["w = 0"])
        ax.spines["bottom"].set_visible(False)
        ax0.spines["top"].set_visible(False)
        ax.tick_params(bottom=False)
        for a, y0, dy in ((ax, 0, 0.02), (ax0, 1, 0.14)):  # break marks: the axis does not run on from 0 to the log range
            for xb in (0, 1):
                a.plot([xb - 0.008, xb + 0.008], [y0 - dy, y0 + dy], transform=a.transAxes, color="k", clip_on=False, lw=1)
    (ax0 if dropped else ax).set_xlabel("optimizer step")
    fig.colorbar(mesh, ax=[ax, ax0] if dropped else ax, label="fraction of the step's samples")
    return save(fig, run["dir"] / "weights_hist.png")


def pick_steps(recs, wanted):
    """The recorded steps nearest to the wanted ones (default: first, middle, last)."""
    steps = np.array([r["step"] for r in recs])
    wanted = wanted or [steps[0], steps[len(steps) // 2], steps[-1]]
    idx = sorted({int(np.abs(steps - s).argmin()) for s in wanted})
    return [recs[i] for i in idx]


def plot_loss_vs_weight(run, wanted_steps):
    """One panel per chosen step: each sample's loss against its weight. IR-DRO's points lie on the
    exponential w*n = n*exp(l/τ)/Σexp(l_j/τ); MidRanking's are a 0/1 step over its kept band."""
    args, recs = run["args"], pick_steps(run["weights"], wanted_steps)
    color = "C1" if args.get("method") == "midrank" else "C0"
    fig, axes = plt.subplots(1, len(recs), figsize=(max(FIGSIZE[0], 3.2 * len(recs)), FIGSIZE[1]),
                             sharey=True, squeeze=False)
    for ax, r in zip(axes[0], recs):
        l, w = np.asarray(r["loss"]), np.asarray(r["weight"]) * len(r["weight"])
        if args.get("method") == "irdro":  # the closed form the points must lie on
            tau, grid = args["tau"], np.linspace(np.nanmin(l), np.nanmax(l), 200)
            ax.plot(grid, np.exp((grid - np.nanmax(l)) / tau) / np.nanmean(np.exp((l - np.nanmax(l)) / tau)),
                    color="grey", lw=1, label="n·softmax(l/τ)")
        if args.get("method") == "midrank" and (w > 0).any():
            ax.axvspan(l[w > 0].min(), l[w > 0].max(), color="C2", alpha=0.15,
                       label=f"kept: {(w > 0).sum()} of {len(w)}")
        ax.axhline(1, color="red", ls="--", lw=1, label="ERM: w = 1/n")
        ax.scatter(l, w, s=18, color=color, alpha=0.8, edgecolor="none")
        ax.set_title(f"step {r['step']}", fontsize=10)
        ax.set_xlabel("per-sample loss (nats/token)")
    axes[0][0].set_ylabel("weight × n")
    top = max(np.nanmax(r["weight"]) * len(r["weight"]) for r in recs) * 1.1
    axes[0][0].set_ylim(-0.03 * top, top)  # a little below 0 so dropped samples are not cut in half
    axes[0][0].legend(fontsize=8, loc="upper left")
    fig.suptitle(f"{run['label']}: loss vs weight of each sample in the batch", fontsize=11)
    return save(fig, run["dir"] / "loss_vs_weight.png")


def plot_ess(run, alpha):
    """How many samples a step effectively learns from (1/Σw², as a fraction of n), and how much
    the heaviest one counts: the cost side of focusing on hard samples."""
    train = [r for r in run["log"] if r["type"] == "train"]
    steps = np.array([r["step"] for r in train])
    n = len(run["weights"][-1]["weight"])
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(FIGSIZE[0], 5), sharex=True)
    for ax, y, label in ((a1, np.array([r["ess"] for r in train]) / n, "ESS / n"),
                         (a2, np.array([r["wmax"] for r in train]) * n, "max weight × n")):
        ax.plot(steps, y, color="C0", alpha=0.25, lw=0.8)
        ax.plot(steps, ema(y, alpha), color="C0", lw=1.5, label=f"EMA {alpha:g}")
        ax.axhline(1, color="red", ls="--", lw=1, label="ERM (uniform)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    a1.set_ylim(0, 1.05)
    a2.set_ylim(bottom=0)
    a1.legend(fontsize=8, loc="lower left")
    a2.set_xlabel("optimizer step")
    a1.set_title(f"{run['label']}: effective sample size and max weight, n = {n}", fontsize=10)
    return save(fig, run["dir"] / "ess.png")


def source_shares(run):
    """Each step's share of the weight per source (the sum of its samples' weights; they sum to 1) and share of the
    samples (count / n, what ERM's uniform weights give it), from weights.jsonl: -> (steps, weight shares and sample
    shares, both (steps, sources), the sources' names), or None for a run whose data had no sources."""
    recs = [r for r in run["weights"] if "source" in r]
    if not recs:
        return None
    k = max(max(r["source"]) for r in recs) + 1
    data = run["args"].get("data")  # the names, from the data while it is where the run read it
    meta = Path(data) / "meta.json" if data else None
    names = (json.loads(meta.read_text()).get("sources") if meta and meta.is_file() else None) or []
    names = names if len(names) >= k else [f"source {i}" for i in range(k)]
    weight = np.array([np.bincount(r["source"], weights=r["weight"], minlength=len(names)) for r in recs])
    seen = np.array([np.bincount(r["source"], minlength=len(names)) / len(r["source"]) for r in recs])
    return np.array([r["step"] for r in recs]), weight, seen, names


def plot_sources(run, alpha):
    """Where the weight goes, per source: each source's share of a step's weight (solid) against its share of the
    step's samples (dashed); a source whose solid line runs above its dashed one is favoured by the method. Beside
    it sources.csv, the means over the steps. A run without sources: nothing."""
    shares = source_shares(run)
    if shares is None:
        return []
    steps, weight, seen, names = shares
    mean_w, mean_s = np.nanmean(weight, axis=0), np.nanmean(seen, axis=0)  # a skipped step's NaN weights left out
    order = np.argsort(-mean_s, kind="stable")
    shown = order[:MAX_SOURCES] if len(names) <= MAX_SOURCES else order[:MAX_SOURCES - 1]
    lines = [(names[i], weight[:, i], seen[:, i]) for i in shown]
    if len(shown) < len(names):
        rest = order[len(shown):]
        lines.append((f"other ({len(rest)} sources)", weight[:, rest].sum(1), seen[:, rest].sum(1)))
    fig, ax = plt.subplots(figsize=FIGSIZE)
    for i, (name, w, s) in enumerate(lines):
        ax.plot(steps, ema(w, alpha), color=f"C{i}", lw=1.6,
                label=f"{name}: weight {np.nanmean(w):.3f}, samples {np.nanmean(s):.3f}")
        ax.plot(steps, ema(s, alpha), color=f"C{i}", lw=1, ls="--", label=f"_{name}: samples")  # _: not in the legend
    ax.plot([], [], color="grey", lw=1, ls="--", label="dashed: share of the samples")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"share of the step (EMA {alpha:g})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{run['label']}: share of the weight per source (mean over steps in the legend)", fontsize=10)
    figure, table = save(fig, run["dir"] / "sources.png"), run["dir"] / "sources.csv"
    with open(table, "w", newline="") as f:  # weight_x_n: how much a sample of the source weighs, 1 = uniform
        csv.writer(f).writerows([("source", "weight_share", "sample_share", "weight_x_n")] + [
            (name, f"{w:.6f}", f"{s:.6f}", f"{w / s:.4f}" if s else "") for name, w, s in zip(names, mean_w, mean_s)])
    print(table)
    return [figure, table]


def plot_loss_curves(runs, path, alpha):
    """All runs overlaid. Train loss is the plain batch mean (the same quantity for every method,
    unlike the weighted loss each one descends), smoothed, with the raw curve faint."""
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    top, start = [], []
    for i, run in enumerate(runs):
        train = [r for r in run["log"] if r["type"] == "train"]
        evals = [r for r in run["log"] if r["type"] == "eval"]
        steps, loss = np.array([r["step"] + 1 for r in train]), np.array([r["loss"] for r in train])
        a1.plot(steps, loss, color=f"C{i}", alpha=0.2, lw=0.7)
        a1.plot(steps, ema(loss, alpha), color=f"C{i}", lw=1.6, label=run["label"])
        if evals:
            a2.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", color=f"C{i}",
                    ms=4, label=f"{run['label']}: {evals[-1]['val_loss']:.3f}")
        # zoom past the first 10% of training: the fall from the initial loss would flatten the rest
        top += [np.nanmax(loss[len(loss) // 10:])] + [r["val_loss"] for r in evals if r["step"] >= steps[-1] // 10]
        start.append(loss[0])
    a1.set_ylim(top=np.nanmax(top) * 1.03)
    a1.set_title(f"train loss (batch mean, EMA {alpha:g}; raw faint)", fontsize=10)
    a2.set_title("val loss (mean per-sample loss, held-out)", fontsize=10)
    if max(start) > max(top) * 1.03:
        fig.suptitle(f"y axis cut at the top: training starts at loss {max(start):.1f}", fontsize=9, y=0.99)
    for ax in (a1, a2):
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save(fig, path)


# -----------------------------------------------------------------------------
# per-sample loss histogram of checkpoints (needs torch and a forward pass)

def checkpoint_losses(ckpts, data, split, max_samples, device):
    """Per-sample losses of each checkpoint on the same samples of one split."""
    import torch  # only this mode needs torch; the log figures stay quick to make
    import tokenization
    import train
    from model import GPT, GPTConfig
    loaded = []
    for p in ckpts:
        try:
            ckpt = torch.load(p, map_location="cpu", weights_only=False)
        except Exception as e:  # not a torch file at all
            raise PlotError(f"cannot read {p} ({type(e).__name__}): pass the ckpt.pt of a train.py run") from None
        if not isinstance(ckpt, dict) or not {"model", "model_args", "args"} <= ckpt.keys():
            raise PlotError(f"{p} is not a train.py checkpoint (model, model_args, args): pass a run's ckpt.pt")
        loaded.append(ckpt)
    data_dir = Path(data or loaded[0]["args"]["data"])
    if not (data_dir / "meta.json").is_file():
        raise PlotError(f"no prepared data in {data_dir}: pass --data DIR (a prepare_data.py output)")
    block = loaded[0]["args"].get("block_size", loaded[0]["model_args"]["block_size"])
    split_data = train.load_split(data_dir, split, block)
    n = len(split_data["start"])
    if n == 0:
        raise PlotError(f"no {split} samples in {data_dir}: choose another --split")
    # a fixed random subset, the same for every checkpoint, so the histograms are comparable
    samples = np.sort(np.random.default_rng(0).permutation(n)[:max_samples])
    device, out = torch.device(device), []
    for path, ckpt in zip(ckpts, loaded):
        fits = ckpt.get("tokenizer") == tokenization.tokenizer_id(split_data["meta"])
        if not fits or ckpt["model_args"]["block_size"] < block:
            raise PlotError(f"{path} does not fit {data_dir} (tokenizer or block size): pass a matching --data")
        model = GPT(GPTConfig(**ckpt["model_args"]))
        model.load_state_dict(ckpt["model"])
        model.to(device).eval()
        with torch.no_grad():
            losses = [model(*train.get_batch(split_data, samples[i:i + 16], block, device))[1].float().cpu()
                      for i in range(0, len(samples), 16)]
        out.append((f"{path.parent.name} (step {ckpt.get('step', '?')})", torch.cat(losses).numpy()))
    return out, data_dir


def find_checkpoints(paths):
    ckpts = [Path(p) / "ckpt.pt" if Path(p).is_dir() else Path(p) for p in paths]
    for c in ckpts:
        if not c.is_file():
            raise PlotError(f"no checkpoint at {c}: pass a ckpt.pt or a run dir that holds one")
    return ckpts


def plot_loss_hist(ckpts, data, split, max_samples, device, out):
    results, data_dir = checkpoint_losses(ckpts, data, split, max_samples, device)
    allv = np.concatenate([l for _, l in results])
    bins = np.linspace(allv.min(), allv.max(), 41)  # shared bins: the shapes compare directly
    fig, ax = plt.subplots(figsize=FIGSIZE)
    for i, (name, l) in enumerate(results):
        ax.hist(l, bins=bins, color=f"C{i}", alpha=0.25, label=f"{name}: mean {l.mean():.3f}")
        ax.hist(l, bins=bins, color=f"C{i}", histtype="step", lw=1.5)
        ax.axvline(l.mean(), color=f"C{i}", ls="--", lw=1)
    ax.set_xlabel("per-sample loss (nats/token)")
    ax.set_ylabel("samples")
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.set_title(f"per-sample {split} loss on {data_dir.name} ({len(results[0][1])} samples)")
    ax.legend(fontsize=9)
    return save(fig, out or ckpts[0].parent / "loss_hist.png")


def default_compare_path(dirs):
    """loss_curves.png in the runs' common parent (out/ for out/erm out/irdro), or in the one run."""
    parent = os.path.commonpath([Path(d).resolve() for d in dirs]) if len(set(dirs)) > 1 else dirs[0]
    return Path(parent) / "loss_curves.png"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("runs", nargs="*", metavar="OUT_DIR", help="run dirs written by train.py")
    a("--steps", type=int, nargs="+", help="steps of loss_vs_weight.png (default: first, middle, last)")
    a("--compare", help="the overlaid loss curves (default: loss_curves.png in the runs' common parent)")
    a("--smooth", type=float, default=0.9, help="EMA factor of noisy per-step curves, 0 = raw (default 0.9)")
    a("--loss-hist", nargs="+", metavar="CKPT_OR_DIR", help="per-sample loss histogram of checkpoints")
    a("--data", help="--loss-hist: data dir (default: the first checkpoint's training data)")
    a("--split", default="val", choices=("train", "val"), help="--loss-hist: data split (default val)")
    a("--max_samples", type=int, default=256, help="--loss-hist: samples evaluated, a fixed random subset (default 256)")
    a("--device", default="cpu", help="--loss-hist: torch device (default cpu)")
    a("--out", help="--loss-hist: output PNG (default: loss_hist.png beside the first checkpoint)")
    args = p.parse_args(argv)
    if not args.runs and not args.loss_hist:
        p.error("give run dirs to plot and/or --loss-hist CKPT_OR_DIR ...")
    written = []
    try:
        runs = [load_run(d) for d in args.runs]  # all inputs checked before any figure is written
        ckpts = find_checkpoints(args.loss_hist or [])
        for run in runs:
            written += [plot_weight_hist(run), plot_loss_vs_weight(run, args.steps), plot_ess(run, args.smooth)]
            written += plot_sources(run, args.smooth)  # data prepared with sources only
        if runs:
            written.append(plot_loss_curves(runs, args.compare or default_compare_path(args.runs), args.smooth))
        if args.loss_hist:
            written.append(plot_loss_hist(ckpts, args.data, args.split, args.max_samples, args.device, args.out))
    except PlotError as e:
        print(f"plot.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    return written


if __name__ == "__main__":
    main()
