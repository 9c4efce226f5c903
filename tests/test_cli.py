"""cli.py: on --init_from resume the saved run's flags are the defaults; the model's own flags cannot change, any
other change is warned (args.json keeps every segment's flags, tests/test_train.py)."""

import json
import subprocess
import sys

import pytest

import cli
import train
from conftest import ROOT


@pytest.fixture
def saved_run(tiny_flags, tmp_path):
    out = tmp_path / "run"
    train.main(tiny_flags + ["--method", "midrank", "--frac", "0.25", "--portion", "1", "--batch_size", "4",
                             "--max_iters", "2", "--eval_interval", "2", "--lr", "3e-3", "--out_dir", str(out)])
    return out


def test_init_from_resume_alone_goes_on_with_the_saved_runs_flags(saved_run, tiny_data, capsys):
    capsys.readouterr()
    args = cli.get_args(["--init_from", "resume", "--out_dir", str(saved_run)])
    assert (args.method, args.frac, args.portion, args.skip, args.keep) == ("midrank", 0.25, 1, None, None)
    assert (args.batch_size, args.lr, args.data, args.n_embd, args.block_size) == (4, 3e-3, str(tiny_data), 32, 32)
    assert args.device == "auto" and args.init_from == "resume"  # where it runs: not taken from the saved run
    assert capsys.readouterr().err == ""
    args = cli.get_args(["--init_from", "resume", "--out_dir", str(saved_run), "--skip", "0.1", "--keep", "0.5"])
    assert (args.skip, args.keep, args.frac, args.portion) == (0.1, 0.5, None, None)  # the band given wins whole


def test_a_changed_flag_is_warned_once_each(saved_run, capsys):
    capsys.readouterr()
    args = cli.get_args(["--init_from", "resume", "--out_dir", str(saved_run), "--method", "erm", "--batch_size", "2",
                         "--lr", "3e-3", "--eval_interval", "7", "--device", "cpu"])
    assert (args.method, args.batch_size, args.eval_interval) == ("erm", 2, 7)
    prog, where = cli.build_parser().prog, saved_run / "args.json"
    assert capsys.readouterr().err.splitlines() == [  # the same lr, and how the run goes (eval_interval): not warned
        f"{prog}: warning: --batch_size 2 differs from the resumed run's 4: it takes effect from the step resumed at "
        f"({where} keeps both)",
        f"{prog}: warning: --method erm differs from the resumed run's midrank: it takes effect from the step resumed "
        f"at ({where} keeps both)"]


@pytest.mark.parametrize("flag,value,saved", [("--n_embd", "64", "32"), ("--no-bias", None, "True"),
                                              ("--dropout", "0.1", "0.0")])
def test_the_models_own_flags_are_refused_on_resume_naming_the_saved_value(flag, value, saved, saved_run):
    p = subprocess.run([sys.executable, str(ROOT / "train.py"), "--init_from", "resume", "--out_dir", str(saved_run),
                        flag, *([value] if value else [])], capture_output=True, text=True)
    name = flag.removeprefix("--no-").removeprefix("--")
    assert p.returncode == 2 and p.stderr.splitlines() == [
        f"train.py: error: --{name} {value or False} differs from the resumed run's {saved} "
        f"({saved_run / 'args.json'}): a resumed run keeps its model; drop --{name}, or start a new run in another "
        "--out_dir"], p.stderr


def test_a_damaged_args_json_is_one_line(saved_run):
    (saved_run / "args.json").write_text('{"segments": [')
    p = subprocess.run([sys.executable, str(ROOT / "train.py"), "--init_from", "resume", "--out_dir", str(saved_run)],
                       capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.splitlines() == [
        f"train.py: error: {saved_run / 'args.json'} is damaged (JSONDecodeError: Expecting value: line 1 column 15 "
        "(char 14)): restore it, or delete it to resume without the record of earlier segments' flags"], p.stderr
