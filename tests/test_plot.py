"""plot.py: every figure is written, is a real non-blank image, and bad input fails in one line."""

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
