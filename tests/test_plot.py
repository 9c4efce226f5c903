"""plot.py: every figure is written, is a real non-blank image, and bad input fails in one line."""

import csv
import json
import subprocess
import sys
from contextlib import nullcontext

import matplotlib.image as mpimg
import numpy as np

import pytest
import torch

import plot
import train
from model import GPT, GPTConfig

ROOT = train.Path(train.__file__).parent
RUN_FIGURES = ("weights_hist.png", "loss_vs_weight.png", "ess.png")


_trained = {}


@pytest.fixture
def runs(tiny_flags, tmp_path_factory):
    """Two tiny training runs (4 steps of 8 = 4 x 2 samples) side by side in one folder. Trained
    once per session and shared (tiny_flags is per test, so a wider-scoped fixture cannot use it);
    the tests only add figures beside the runs."""
    if "dirs" not in _trained:
        root = tmp_path_factory.mktemp("runs")
        for method in ("irdro", "midrank"):
            train.main(tiny_flags + ["--out_dir", str(root / method), "--method", method, "--max_iters", "4",
                                     "--eval_interval", "2", "--batch_size", "4", "--grad_accum", "2"])
        _trained["dirs"] = [root / "irdro", root / "midrank"]
    return _trained["dirs"]


def assert_real_image(path):
    assert path.is_file(), path
    img = mpimg.imread(path)[..., :3]  # PNG -> float RGB in [0, 1]
    assert img.shape[0] > 200 and img.shape[1] > 300
    assert img.std() > 0.05, f"{path} looks blank"
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 10, f"{path} has almost no colours"


def test_run_figures_and_overlaid_loss_curves(runs, tmp_path, capsys):
    cmp = tmp_path / "cmp.png"
    written = plot.main([str(d) for d in runs] + ["--steps", "0", "99", "--compare", str(cmp)])  # 99 -> step 3
    printed = capsys.readouterr().out.split()
    expected = [d / f for d in runs for f in RUN_FIGURES] + [cmp]
    assert [str(p) for p in written] == printed
    assert sorted(map(str, written)) == sorted(map(str, expected))
    for path in expected:
        assert_real_image(path)
    assert plot.pick_steps(plot.load_run(runs[0])["weights"], [0, 99])[-1]["step"] == 3


def test_sources_figure_plots_each_sources_share_of_the_weight(tiny_flags, tiny_sources_data, tmp_path, monkeypatch):
    run = tmp_path / "run"
    train.main(tiny_flags + ["--data", str(tiny_sources_data), "--out_dir", str(run), "--method", "irdro", "--tau",
                             "0.2", "--max_iters", "5", "--batch_size", "4", "--grad_accum", "2"])
    figures = keep_figures(monkeypatch)
    written = plot.main([str(run), "--smooth", "0"])  # no smoothing: the lines are the per-step shares themselves
    assert run / "sources.png" in written and run / "sources.csv" in written
    assert_real_image(run / "sources.png")
    # the shares computed here, independently, from weights.jsonl: source s's share of a step's weight is the sum
    # of its samples' weights; its share of the samples is their count / n
    records = [json.loads(line) for line in (run / "weights.jsonl").read_text().splitlines()]
    names = json.loads((tiny_sources_data / "meta.json").read_text())["sources"]
    assert names == ["code", "web"]
    lines = {line.get_label().split(":")[0]: line.get_ydata() for line in figures["sources.png"].axes[0].get_lines()}
    table = {row["source"]: row for row in csv.DictReader(open(run / "sources.csv"))}
    for s, name in enumerate(names):
        weight = [sum(w for w, src in zip(r["weight"], r["source"]) if src == s) for r in records]
        samples = [r["source"].count(s) / len(r["source"]) for r in records]
        assert np.allclose(lines[name], weight) and np.allclose(lines["_" + name], samples)
        assert float(table[name]["weight_share"]) == pytest.approx(np.mean(weight), abs=1e-6)
        assert float(table[name]["sample_share"]) == pytest.approx(np.mean(samples), abs=1e-6)
    assert sum(float(row["weight_share"]) for row in table.values()) == pytest.approx(1, abs=1e-5)
    # the data folder gone: the sources keep their indices as names
    shares = plot.source_shares(dict(plot.load_run(run), args={"data": str(tmp_path / "gone")}))
    assert shares[3] == ["source 0", "source 1"] and np.allclose(shares[1].sum(1), 1)


def keep_figures(monkeypatch):
    """{file name: figure} of every figure plot.py saves from now on."""
    figures, save = {}, plot.save

    def keep(fig, path):
        figures[path.name] = fig
        return save(fig, path)
    monkeypatch.setattr(plot, "save", keep)
    return figures


def test_more_sources_than_lines_sum_the_rest_as_other(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)  # 12 sources in 3 steps of 78 samples: source s holds s + 1 of each step's
    steps = [dict(step=k, source=rng.permutation(np.repeat(np.arange(12), np.arange(1, 13))).tolist(),
                  weight=rng.dirichlet(np.ones(78)).tolist()) for k in range(3)]
    figures = keep_figures(monkeypatch)
    plot.plot_sources(dict(dir=tmp_path, weights=steps, args={}, label="synthetic"), 0)
    ax = figures["sources.png"].axes[0]
    legend = [t.get_text().split(":")[0] for t in ax.get_legend().get_texts()]
    assert legend == [f"source {s}" for s in range(11, 2, -1)] + ["other (3 sources)", "dashed"]  # most samples first
    lines = {line.get_label().split(":")[0]: line.get_ydata() for line in ax.get_lines()}
    rest = [sum(w for w, s in zip(r["weight"], r["source"]) if s < 3) for r in steps]
    assert np.allclose(lines["other (3 sources)"], rest) and np.allclose(lines["_other (3 sources)"], 6 / 78)
    assert len(list(csv.DictReader(open(tmp_path / "sources.csv")))) == 12  # the table has them all


def test_runs_without_sources_have_no_sources_figure(runs):
    assert plot.source_shares(plot.load_run(runs[0])) is None and plot.plot_sources(plot.load_run(runs[0]), 0.9) == []
    assert not (runs[0] / "sources.png").exists()


def test_default_compare_path():
    assert plot.default_compare_path(["a/x", "a/y/z"]) == train.Path("a").resolve() / "loss_curves.png"
    assert plot.default_compare_path(["a/x"]) == train.Path("a/x/loss_curves.png")  # one run: inside it


def test_loss_hist_matches_train_evaluate(runs, tiny_data, tmp_path):
    out = tmp_path / "hist.png"
    # a dir and a ckpt.pt file are both accepted; --data defaults to the checkpoint's own data
    assert plot.main(["--loss-hist", str(runs[0]), str(runs[1] / "ckpt.pt"), "--out", str(out)]) == [out]
    assert_real_image(out)
    # the per-sample losses are the model's: their mean over the whole val split is train.evaluate's
    [(name, losses)], _ = plot.checkpoint_losses([runs[0] / "ckpt.pt"], None, "val", 10**6, "cpu")
    ckpt = torch.load(runs[0] / "ckpt.pt", weights_only=False)
    model = GPT(GPTConfig(**ckpt["model_args"]))
    model.load_state_dict(ckpt["model"])
    val = train.load_split(tiny_data, "val", ckpt["args"]["block_size"])
    n = len(val["start"])
    expected = train.evaluate(model, val, np.arange(n), 8, ckpt["args"]["block_size"], torch.device("cpu"),
                              nullcontext())
    assert len(losses) == n and name == "irdro (step 4)"
    assert losses.mean() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("argv, problem", [
    (["{empty}"], "no log.jsonl in"),
    (["{tmp}/missing"], "no run dir"),
    (["--loss-hist", "{empty}"], "no checkpoint at"),
    (["--loss-hist", "{tmp}/bad.pt"], "cannot read"),
])
def test_bad_input_is_one_line_and_exit_2(argv, problem, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.pt").write_text("not a checkpoint")
    with pytest.raises(SystemExit) as e:
        plot.main([a.format(empty=tmp_path / "empty", tmp=tmp_path) for a in argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"plot.py: error: {problem}") and err.count("\n") == 1
    assert not list((tmp_path / "empty").iterdir())  # nothing written


def test_cli_error_from_a_shell(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "plot.py"), str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("plot.py: error: no log.jsonl in") and r.stderr.count("\n") == 1


def test_a_torn_last_line_is_left_out_and_a_damaged_log_is_one_line(runs, tmp_path, capsys):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(runs[0], run)
    whole = plot.load_run(run)
    for name in ("log.jsonl", "weights.jsonl"):  # a run still writing, or killed mid-line
        with open(run / name, "a") as f:
            f.write('{"step": 4, "loss": [2.1')
    torn = plot.load_run(run)
    assert torn["log"] == whole["log"] and torn["weights"] == whole["weights"]
    assert plot.main([str(run)])  # figures are drawn
    (run / "log.jsonl").write_text('{"step": 0\n' + (runs[0] / "log.jsonl").read_text())
    with pytest.raises(SystemExit) as e:
        plot.main([str(run)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert err.startswith(f"plot.py: error: {run / 'log.jsonl'} line 1 is damaged")


def test_weights_of_zero_get_their_own_panel_not_a_place_on_the_log_axis(runs, monkeypatch):
    figs = []
    monkeypatch.setattr(plot, "save", lambda fig, path: figs.append(fig) or path)
    irdro, midrank = (plot.load_run(d) for d in runs)
    plot.plot_weight_hist(irdro)
    plot.plot_weight_hist(midrank)
    (irdro_log,), (mid_log, mid_zero) = ([a for a in f.axes if a.get_label() != "<colorbar>"] for f in figs)
    assert irdro_log.get_yscale() == mid_log.get_yscale() == "log" and mid_zero.get_yscale() == "linear"
    labels = [t.get_text() for t in mid_log.get_yticklabels()]
    assert "1" in labels and not any(t.startswith("0 ") or t == "0" for t in labels)  # no 0 on a log axis
    assert [t.get_text() for t in mid_zero.get_yticklabels()] == ["w = 0"]
    # the w = 0 panel holds the dropped share of every column: here MidRanking drops half of each batch
    zero_share = mid_zero.collections[0].get_array()
    assert np.allclose(zero_share.compressed(), 0.5)


def test_run_labels_name_the_settings_the_method_takes():
    import cli
    for argv, label in ((["--method", "midrank", "--frac", "0.125", "--portion", "1"], "midrank (frac=0.125, portion=1)"),
                        (["--method", "midrank"], "midrank (skip=0.125, keep=0.5)"),
                        (["--method", "irdro", "--tau", "0.5"], "irdro (τ=0.5)"), (["--method", "erm"], "erm")):
        assert plot.describe(vars(cli.get_args(argv))) == label
    assert plot.describe({"method": "irdro", "tau": 1.0, "keep": 0.5}) == "irdro (τ=1)"  # an older run's args.json


def test_a_damaged_line_is_named_by_its_line_number_and_nulls_read_as_nan(runs, tmp_path, capsys):
    import json
    import shutil
    run = tmp_path / "run"
    shutil.copytree(runs[0], run)
    lines = (run / "weights.jsonl").read_text().splitlines(keepends=True) * 30  # 120 records
    good = lines[100]
    lines[100] = good[:len(good) // 2] + "\n"  # line 101 cut in the middle, by a disk that lost data
    (run / "weights.jsonl").write_text("".join(lines))
    with pytest.raises(SystemExit) as e:
        plot.main([str(run)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert err.startswith(f"plot.py: error: {run / 'weights.jsonl'} line 101 is damaged (") and \
        err.endswith("): delete that line to plot the rest, or pass another run\n")
    # a step whose losses were not finite: train.py writes them as null (strict JSON); read back as NaN, still drawn
    record = json.loads(lines[3])  # step 3: one of the steps loss_vs_weight.png shows
    record["loss"][0] = record["weight"][0] = None
    lines[3], lines[100] = json.dumps(record) + "\n", good
    (run / "weights.jsonl").write_text("".join(lines))
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    next(r for r in log if r["type"] == "train")["loss"] = None
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    loaded = plot.load_run(run)
    assert np.isnan(loaded["weights"][3]["loss"][0]) and np.isnan(loaded["log"][1]["loss"])
    assert len(plot.main([str(run)])) == 4  # the three figures of the run and the loss curves
