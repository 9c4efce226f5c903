"""bench.py runs end to end and reports every method against ERM."""

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT


def test_bench_prints_a_ratio_per_method(tiny_data):
    p = subprocess.run([sys.executable, str(ROOT / "bench.py"), "--data", str(tiny_data), "--n_layer", "1",
                        "--n_head", "2", "--n_embd", "32", "--block_size", "32", "--batch_size", "2",
                        "--grad_accum", "2", "--steps", "2", "--warmup", "0", "--device", "cpu"],
                       capture_output=True, text=True, check=True)
    rows = [line.split() for line in p.stdout.splitlines() if line.endswith("x erm")]
    assert [r[0] for r in rows] == ["mean", "erm", "midrank", "irdro"]  # mean: the plain step, for reference
    assert rows[1][-2] == "1.000x" and all(float(r[1]) > 0 for r in rows)


def test_bench_times_the_methods_against_a_reference_with_its_forward_passes(tiny_data):
    """rholoss and excess_irdro: a frozen copy of the model is their reference (no --ref_model needed)."""
    p = subprocess.run([sys.executable, str(ROOT / "bench.py"), "--data", str(tiny_data), "--n_layer", "1",
                        "--n_head", "2", "--n_embd", "32", "--block_size", "32", "--batch_size", "2",
                        "--grad_accum", "2", "--steps", "2", "--warmup", "1", "--device", "cpu",
                        "--methods", "erm", "rholoss", "excess_irdro"], capture_output=True, text=True, check=True)
    rows = [line.split() for line in p.stdout.splitlines() if line.endswith("x erm")]
    assert [r[0] for r in rows] == ["mean", "erm", "rholoss", "excess_irdro"] and all(float(r[1]) > 0 for r in rows)


FAKE_NANOGPT = '''
import pickle, sys
from pathlib import Path
args = dict(a[2:].split("=", 1) for a in sys.argv[2:])
data = Path("data") / args["dataset"]
assert args["max_iters"] == "2000" and args["n_embd"] == "128" and args["device"] == "cpu"
vocab = pickle.load(open(data / "meta.pkl", "rb"))["vocab_size"]
n = len((data / "train.bin").read_bytes()) // 2
print(f"found vocab_size = {vocab}, {n} tokens")
print("step 0: train loss 4.3000, val loss 4.2000")
print("iter 0: loss 4.3, time 50.0ms, mfu 0.01%")
print("step 2000: train loss 1.8000, val loss 2.1000")
'''


def test_vs_nanogpt_runs_both_on_the_same_tokens_and_reports_each(tmp_path, capsys):
    """A stand-in for the nanoGPT clone (its CLI shape, our tokens as data), then a short run of ours."""
    import bench
    clone = tmp_path / "nanoGPT"
    (clone / "config").mkdir(parents=True)
    (clone / "config" / "train_shakespeare_char.py").write_text("dataset = 'shakespeare_char'\n")
    (clone / "train.py").write_text(FAKE_NANOGPT)
    runs = bench.vs_nanogpt(clone, ["--method", "irdro", "--max_iters", "4", "--eval_interval", "2", "--n_layer",
                                    "1", "--n_head", "2", "--n_embd", "32", "--block_size", "32", "--eval_samples",
                                    "8", "--device", "cpu"])
    ours = bench.prepare_data.DEFAULT_DATA_DIR
    assert (clone / "data/shakespeare_char_ours/train.bin").read_bytes() == (ours / "train.bin").read_bytes()
    assert runs["nanoGPT"][1] == [(0, 4.2), (2000, 2.1)]
    assert [s for s, _ in runs["ours"][1]] == [0, 2, 4] and runs["ours"][1][-1][1] < runs["ours"][1][0][1]
    out = [line for line in capsys.readouterr().out.splitlines() if " s | val loss " in line]  # not "prepared ..."
    assert out[0].startswith("nanoGPT") and "4.200 at step 0 -> 2.100 at step 2000 (50% lower) | 1.00x" in out[0]
    assert out[1].startswith("ours") and "x nanoGPT's time" in out[1]


def test_vs_nanogpt_refuses_a_folder_that_is_not_a_clone(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "bench.py"), "--vs-nanogpt", str(tmp_path)],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "is not a nanoGPT clone" in p.stderr and "git clone" in p.stderr


def test_the_loss_bench_measures_each_form_in_its_own_process():
    p = subprocess.run([sys.executable, str(ROOT / "bench.py"), "--loss", "64,8,300", "--steps", "1", "--warmup", "0",
                        "--device", "cpu"], capture_output=True, text=True, check=True)
    rows = [line.split() for line in p.stdout.splitlines()[1:]]
    assert [r[0] for r in rows][:2] == ["full", "ours"] and len(rows) == 2 + hasattr(__import__("torch").nn.functional,
                                                                                       "linear_cross_entropy")
    assert all(float(r[2 if r[0] == "full" else 1]) > 0 for r in rows)  # ms per step


# what the GPU machine lacks (docs/benchmarks.md): blocked in every process of the check, workers and train.py too
NO_DATASETS_NO_TORCHAO = "import sys\nsys.modules['datasets'] = None\nsys.modules['torchao'] = None\n"


def test_the_gpu_check_runs_in_its_cpu_mode_without_datasets_or_torchao(tmp_path):
    """bench.py --gpu --device cpu: every part of the GPU check on tiny shapes, with only what the GPU machine has."""
    import json
    import os
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(NO_DATASETS_NO_TORCHAO)  # imported at start-up by every child too
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    blocked = subprocess.run([sys.executable, "-c", "import datasets"], env=env, capture_output=True, text=True)
    assert blocked.returncode and "ModuleNotFoundError" in blocked.stderr  # the block works
    out = tmp_path / "gpu-check"
    p = subprocess.run([sys.executable, str(ROOT / "bench.py"), "--gpu", "--device", "cpu", "--out", str(out),
                        "--budget", "900"],  # a busy CI machine: the caps are for the GPU, not for this
                       env=env, capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    report = json.loads((out / "gpu-check.json").read_text())
    assert report["mode"].startswith("cpu") and report["device"] == "cpu" and report["torch"] and report["command"]
    assert list(report["parts"]) == ["vs_hf", "methods", "loss", "train"] and report["total_s"] < report["budget_s"]
    assert all(not part["notes"] and part["wall_s"] <= part["cap_s"] for part in report["parts"].values())
    shapes = report["parts"]["vs_hf"]["shapes"]
    assert list(shapes) == ["OPT-125m", "Llama-3.2-1B"]
    for sides in shapes.values():
        for side in ("ours", "hf"):
            r = sides[side]
            assert r["ms"] > 0 and r["tok_per_s"] > 0 and r["peak_gib"] > 0 and r["compile_s"] > -1 and r["mfu"] is None
        assert sides["ours_vs_hf"]["tok_per_s"] > 0 and sides["ours_vs_hf"]["peak"] > 0
    for res in report["parts"]["methods"]["shapes"].values():
        methods = res["methods"]
        assert methods["erm"]["x_erm"] == 1.0 and all(methods[m]["ms"] > 0 for m in ("irdro", "midrank"))
        # one graph for ERM's streamed step, IR-DRO's the same one; MidRanking's scoring graphs are its own
        assert (methods["erm"]["graphs_warmup"], methods["irdro"]["graphs_warmup"]) == (1, 0)
        assert methods["erm"]["graphs_after_warmup"] == methods["irdro"]["graphs_after_warmup"] == 0
        assert methods["midrank"]["graphs_warmup"] >= 1
    forms = report["parts"]["loss"]["forms"]
    assert forms["full logits"]["x_full_peak"] == 1.0 and forms["ours"]["peak_gib"] > 0
    train = report["parts"]["train"]
    assert train["exit"] == 0 and train["steps_done"] == 8 and [s for s, _ in train["val_loss"]] == [0, 8]
    assert train["loss_fell"] is True and train["ms_median"] > 0 and train["ms_p10"] <= train["ms_p90"]
    table = (out / "gpu-check.md").read_text()
    assert "| Llama-3.2-1B (4M) | ours |" in table and "| full logits |" in table and "| 8 |" in table


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a GPU is here: --gpu would run the real check")
def test_the_gpu_check_refuses_to_run_its_gpu_mode_without_a_gpu(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "bench.py"), "--gpu", "--out", str(tmp_path)],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "--gpu found no CUDA device" in p.stderr and len(p.stderr.splitlines()) == 1


def test_a_gpu_check_out_of_time_skips_its_parts_with_a_note_and_still_writes_the_report(tmp_path):
    """A budget too small for any worker (4 s, setup included, on any machine): every part is skipped with a note
    saying why, and the report is written all the same."""
    import json
    out = tmp_path / "gpu-check"
    p = subprocess.run([sys.executable, str(ROOT / "bench.py"), "--gpu", "--device", "cpu", "--out", str(out),
                        "--parts", "methods", "train", "--budget", "4"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    parts = json.loads((out / "gpu-check.json").read_text())["parts"]
    assert list(parts) == ["methods", "train"] and not parts["methods"]["shapes"]
    assert parts["methods"]["notes"] and all("time cap" in n for n in parts["methods"]["notes"])
    assert "skipped" in parts["train"]["notes"][0]
    assert "nothing measured" in (out / "gpu-check.md").read_text()


def test_a_gpu_check_worker_still_running_at_its_parts_cap_is_stopped_with_a_note(tmp_path, monkeypatch):
    """The part's worker is killed at the part's deadline (a stand-in for bench.py that never finishes)."""
    import argparse
    import time

    import bench
    never = tmp_path / "never.py"
    never.write_text("import time\ntime.sleep(120)\n")
    monkeypatch.setattr(bench, "__file__", str(never))  # the workers run `python <bench.py> ...`
    check = bench.GpuCheck(argparse.Namespace(gpu_out=str(tmp_path / "out")), bench.torch.device("cpu"), tmp_path)
    check.deadline = time.perf_counter() + 6
    result, note = check.worker(["--methods-worker", "x"], "OPT-125m methods")
    assert result is None and note.startswith("OPT-125m methods: stopped after") and "time cap" in note
    assert time.perf_counter() < check.deadline + 20  # killed at the cap, not after the worker's 120 s


def test_a_worker_past_its_cap_is_killed_with_the_processes_it_started():
    import time

    import bench
    child = ("import subprocess, sys, time; "  # a worker that started processes of its own (inductor's compilers)
             "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
             "print(g.pid, flush=True); time.sleep(60)")
    t0 = time.perf_counter()
    rc, out, _, wall = bench.run_capped([sys.executable, "-c", child], timeout=5)
    assert rc is None and wall < 30 and time.perf_counter() - t0 < 30  # killed at 5 s, not after 60
    status = Path(f"/proc/{int(out.split()[0])}/status")
    for _ in range(50):  # gone, or a zombie waiting for its new parent to reap it
        if not status.exists() or "State:\tZ" in status.read_text():
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the worker's own child outlived it")
