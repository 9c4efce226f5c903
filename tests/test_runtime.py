"""runtime.py: atomic checkpoint files, resumable logs, signals, the optimizer step with loss scaling."""

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

import hf

import runtime
from conftest import ROOT


KILL_SCRIPT = """
import sys, torch
sys.path.insert(0, {root!r})
import runtime
from pathlib import Path
out = Path({out!r})
step = {start}
while True:  # checkpoints as fast as possible, until killed
    step += 1
    runtime.save_checkpoint(dict(step=step, model=dict(w=torch.full((1_000_000,), float(step)))), out, 2)
"""


def test_kill_9_at_any_moment_leaves_a_complete_checkpoint(tmp_path):
    rng = random.Random(0)
    out = tmp_path / "ckpts"
    out.mkdir()
    runtime.save_checkpoint(dict(step=0, model=dict(w=torch.zeros(1_000_000))), out, 2)
    last, torn = 0, 0
    for _ in range(20):
        inode = os.stat(out / "ckpt.pt").st_ino
        proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT.format(root=str(ROOT), out=str(out), start=last)])
        while os.stat(out / "ckpt.pt").st_ino == inode:  # wait until it is writing checkpoints in a loop
            time.sleep(0.005)
        time.sleep(rng.random() * 0.2)  # then kill it at a random moment
        proc.kill()
        proc.wait()
        torn += (out / "ckpt.tmp").exists()  # killed in the middle of a write
        ckpt = torch.load(out / "ckpt.pt", weights_only=False)  # the latest complete one, never torn
        assert torch.equal(ckpt["model"]["w"], torch.full((1_000_000,), float(ckpt["step"])))
        assert ckpt["step"] > last
        last = ckpt["step"]
        assert len(list(out.glob("ckpt-*.pt"))) <= 3  # keep_last 2, plus at most one not yet pruned
    assert torn >= 3  # the kills did land while checkpoints were being written


def no_space(*a, **kw):
    raise OSError(errno.ENOSPC, "No space left on device")


def torch_save_on_a_full_disk(obj, f):
    """torch.save on a full disk, as it fails: some bytes written, then its zip writer's RuntimeError raised while
    handling the file's OSError ENOSPC (the OSError only in its __context__)."""
    f.write(b"PK partial")
    try:
        no_space()
    except OSError:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 3035968 vs 3035856")


@pytest.mark.parametrize("save", [torch_save_on_a_full_disk, no_space])
def test_a_full_disk_while_checkpointing_is_one_line_and_the_last_checkpoint_intact(save, tmp_path, monkeypatch):
    runtime.save_checkpoint(dict(step=1, model=dict(w=torch.ones(3))), tmp_path, 1)
    before = (tmp_path / "ckpt.pt").read_bytes()
    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(runtime.Failure) as e:
        runtime.save_checkpoint(dict(step=2, model=dict(w=torch.ones(3))), tmp_path, 1)
    assert str(e.value) == (f"no space left on device writing {tmp_path}/ckpt.pt: the last checkpoint is intact "
                            f"({tmp_path}/ckpt.pt, step 1: go on from it with --init_from resume)")
    assert (tmp_path / "ckpt.pt").read_bytes() == before and not (tmp_path / "ckpt.tmp").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-0000001.pt", "ckpt.pt"]
    monkeypatch.setattr(torch, "save", lambda obj, f: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):  # any other failure is not taken for a full disk
        runtime.save_checkpoint(dict(step=2, model=dict(w=torch.ones(3))), tmp_path, 1)
    assert not (tmp_path / "ckpt.tmp").exists()


def test_a_full_disk_while_logging_is_one_line(tmp_path, monkeypatch):
    args = type("Args", (), dict(wandb=None))()
    log = runtime.RunLog(tmp_path, args)
    log.record(dict(type="train", step=0), "step 1")
    monkeypatch.setattr(runtime, "write_line", lambda file, record: (file.write('{"step": 1, "lo'), no_space()))
    for write in (lambda: log.record(dict(type="train", step=1), "step 2"), lambda: log.weights(dict(step=1))):
        with pytest.raises(runtime.Failure, match=f"^no space left on device writing {tmp_path}/(log|weights).jsonl: "
                                                  "no checkpoint had been written yet$"):
            write()


def test_a_full_disk_while_exporting_leaves_no_partial_file(tmp_path, monkeypatch):
    from model import GPT, GPTConfig
    model = GPT(GPTConfig(block_size=8, vocab_size=64, n_layer=1, n_head=2, n_embd=16))
    hf.export(model.config, model.state_dict(), tmp_path / "hf")
    before = {p.name: p.read_bytes() for p in (tmp_path / "hf").iterdir()}

    def partial(model, out_dir, special_ids=None):
        (out_dir / "model.safetensors").write_bytes(b"partial")
        no_space()

    monkeypatch.setattr(hf, "save_pretrained", partial)
    with pytest.raises(runtime.Failure, match=f"^no space left on device writing {tmp_path}/hf: "):
        hf.export(model.config, model.state_dict(), tmp_path / "hf")
    assert {p.name: p.read_bytes() for p in (tmp_path / "hf").iterdir()} == before  # the old export, whole
    assert not (tmp_path / "hf.tmp").exists()


def test_the_one_line_of_a_diverged_run_names_the_likely_cause(tmp_path):
    args = type("Args", (), dict(lr=1e6, out_dir=str(tmp_path)))()
    scaler, fp16 = torch.amp.GradScaler("cpu", enabled=False), torch.amp.GradScaler("cpu", enabled=True)
    assert runtime.diverged(7, "its val loss is nan", args, scaler) == (
        "training stopped at step 7: its val loss is nan; likely cause the learning rate: lower --lr (it is 1e+06); "
        "no checkpoint had been written yet")
    assert "likely cause float16's narrow range: use --dtype bfloat16" in runtime.diverged(7, "x", args, fp16)
    runtime.save_checkpoint(dict(step=5), tmp_path, 2)
    assert runtime.diverged(7, "10 steps in a row skipped", args, scaler, docs=[3, 9]).endswith(
        "likely cause the data: documents [3, 9] give non-finite losses; check them, or drop them from the data; "
        f"the last checkpoint is intact ({tmp_path}/ckpt.pt, step 5: go on from it with --init_from resume)")


def test_finite_looks_at_every_parameter():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    assert runtime.finite(model, torch.device("cpu"))
    with torch.no_grad():
        model[1].bias[0] = float("inf")
    assert not runtime.finite(model, torch.device("cpu"))


def test_args_json_keeps_each_segment_and_a_resume_drops_those_it_replaces(tmp_path):
    from argparse import Namespace as args
    runtime.write_segments(tmp_path, args(lr=1), None)
    runtime.write_segments(tmp_path, args(lr=2), 200)
    runtime.write_segments(tmp_path, args(lr=3), 300)
    assert runtime.run_segments(tmp_path) == [dict(step=0, args=dict(lr=1)), dict(step=200, args=dict(lr=2)),
                                              dict(step=300, args=dict(lr=3))]
    runtime.write_segments(tmp_path, args(lr=4), 200)  # resumed from step 200 again: the later segments are gone
    assert [s["args"]["lr"] for s in runtime.run_segments(tmp_path)] == [1, 4]
    runtime.write_segments(tmp_path, args(lr=5), None)  # a new run (--overwrite)
    assert runtime.run_segments(tmp_path) == [dict(step=0, args=dict(lr=5))]
    (tmp_path / "args.json").write_text(json.dumps(dict(lr=6, method="erm")))  # an older run's: its flags alone
    assert runtime.run_segments(tmp_path) == [dict(step=0, args=dict(lr=6, method="erm"))]
    assert not (tmp_path / "args.json.tmp").exists() and runtime.run_segments(tmp_path / "none") == []


def test_drop_records_after_keeps_earlier_steps_and_the_eval_at_the_step(tmp_path):
    path = tmp_path / "log.jsonl"
    records = [dict(type="eval", step=0), dict(type="train", step=0), dict(type="train", step=1),
               dict(type="eval", step=2), dict(type="train", step=2), dict(type="train", step=3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    runtime.drop_records_after(path, 2)
    assert [json.loads(line) for line in path.read_text().splitlines()] == records[:4]
    # a line torn by a kill (no closing newline) is dropped whatever its step
    path.write_text("".join(json.dumps(r) + "\n" for r in records[:2]) + '{"type": "train", "st')
    runtime.drop_records_after(path, 5)
    assert path.read_text() == "".join(json.dumps(r) + "\n" for r in records[:2])


def test_a_damaged_record_past_the_checkpoint_is_dropped_and_one_before_it_named(tmp_path):
    path = tmp_path / "weights.jsonl"
    lines = [json.dumps(dict(step=i, loss=[1.0])) for i in range(6)]
    latin1 = '{"step": 4, "caf\xe9"}'
    for bad in ('{"step": 4, "lo', "\x00" * 8, latin1, "[1, 2]"):  # cut, zeroed by a crash, not UTF-8, not ours
        damaged = lines[:4] + [bad] + lines[5:]  # line 5, after the record of step 3: past a checkpoint of step 3
        path.write_bytes("".join(line + "\n" for line in damaged).encode("latin-1"))
        runtime.drop_records_after(path, 3)
        assert path.read_text() == "".join(line + "\n" for line in lines[:3])
        path.write_bytes("".join(line + "\n" for line in damaged).encode("latin-1"))
        with pytest.raises(ValueError, match="line 5 is damaged"):  # step 4: it may be the eval kept at step 4
            runtime.drop_records_after(path, 4)
        path.write_bytes("".join(line + "\n" for line in damaged).encode("latin-1"))
        before = path.read_bytes()
        with pytest.raises(ValueError) as e:  # a checkpoint of step 5: line 5 is among the records it keeps
            runtime.drop_records_after(path, 5)
        why = {"\x00" * 8: "Expecting value", latin1: "not UTF-8", "[1, 2]": "no step"}.get(bad, "")
        assert str(e.value).startswith(f"{path} line 5 is damaged ({why}") and str(e.value).endswith(
            "), a record of the run up to its checkpoint of step 5: delete that line to resume without it")
        assert path.read_bytes() == before  # nothing rewritten
    path.write_text(lines[0] + "\n\n" + lines[1] + "\n")  # a blank line is no record, and no damage either
    assert runtime.kept_records(path, 2) == [lines[0].encode(), lines[1].encode()]
    assert runtime.kept_records(tmp_path / "missing.jsonl", 2) == []


def test_records_are_strict_json_non_finite_values_null(tmp_path):
    with open(tmp_path / "log.jsonl", "w") as f:
        runtime.write_line(f, dict(step=3, loss=float("nan"), tilted=float("inf"), weight=[0.5, float("-inf")], n=2))
        runtime.write_line(f, dict(step=4, loss=1.5))
    strict = [json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
              for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert strict == [dict(step=3, loss=None, tilted=None, weight=[0.5, None], n=2), dict(step=4, loss=1.5)]


HOLDER = """
import sys, time
sys.path.insert(0, {root!r})
import runtime
from pathlib import Path
runtime.claim_out_dir(Path({out!r}), False, False)
print("held", flush=True)
time.sleep(120)
"""


def test_one_writer_per_run_folder(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER.format(root=str(ROOT), out=str(out))],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ValueError, match=f"being written by a running train.py \\(pid {holder.pid}\\)"):
            runtime.claim_out_dir(out, resume=True, overwrite=True)  # whatever the flags
    finally:
        holder.kill()
        holder.wait()
    runtime.claim_out_dir(out, False, False)  # the OS released the lock of the killed process
    runtime.claim_out_dir(out, False, False)  # and one process may claim its own folder again
    runtime.finish(False)


def test_a_folder_with_another_run_is_refused_unless_resumed_or_overwritten(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")  # not a run file: a folder holding only this is free
    runtime.claim_out_dir(out, False, False)
    runtime.finish(False)
    for name in ("log.jsonl", "ckpt-0000004.pt", "hf/config.json"):
        (out / name).parent.mkdir(exist_ok=True)
        (out / name).write_text("old")
    with pytest.raises(ValueError, match="holds another run .*--overwrite.*--init_from resume"):
        runtime.claim_out_dir(out, False, False)
    runtime.finish(False)
    assert (out / "log.jsonl").read_text() == "old"
    runtime.claim_out_dir(out, True, False)  # resume: the run's files are its own
    assert (out / "log.jsonl").exists()
    runtime.claim_out_dir(out, False, True)  # overwrite: the old run's files go, other files stay
    runtime.finish(False)
    assert sorted(p.name for p in out.iterdir()) == [".lock", "notes.txt"]


@pytest.mark.parametrize("name,message", [("gpu", "'gpu' is not a device"), ("cuda:99", r"cuda device\(s\) visible")])
def test_a_device_that_is_not_there_is_one_line(name, message):
    with pytest.raises(ValueError, match=message):
        runtime.pick_device(name)


def test_stop_signal_is_recorded_and_the_old_handler_restored():
    before = signal.getsignal(signal.SIGTERM)
    stop = runtime.StopSignal()
    losses = torch.ones(3)
    assert stop.flag(losses).tolist() == [0.0]
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.01)
    assert stop.flag(losses).tolist() == [float(signal.SIGTERM)]
    stop.signum = int(stop.flag(losses))  # as train.py reads it, with the step's losses
    assert stop.name() == "SIGTERM"
    stop.restore()
    assert signal.getsignal(signal.SIGTERM) == before


def test_optimizer_step_clips_and_reports_a_float16_overflow():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([p], lr=1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=True, init_scale=4.0)
    scaler.scale((p * torch.tensor([3.0, 4.0, 0.0])).sum()).backward()  # grad norm 5 (x4 scaled): clipped to 1
    assert runtime.optimizer_step(opt, scaler, [p], grad_clip=1.0)
    assert torch.allclose(p.data, -torch.tensor([0.6, 0.8, 0.0]))
    opt.zero_grad()
    scaler.scale(p.sum() * float("inf")).backward()
    assert not runtime.optimizer_step(opt, scaler, [p], grad_clip=1.0)  # skipped, scale halved
    assert torch.allclose(p.data, -torch.tensor([0.6, 0.8, 0.0])) and scaler.get_scale() == 2.0


@pytest.mark.parametrize("name,peak", [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H200", 989e12),
                                       ("NVIDIA H200 NVL", 835e12), ("NVIDIA A100-SXM4-80GB", 312e12),
                                       ("NVIDIA A100 80GB PCIe", 312e12), ("NVIDIA L4", 121e12), ("NVIDIA L40S", 362e12),
                                       ("NVIDIA L40", None), ("Tesla T4", 65e12), ("NVIDIA GeForce RTX 4090", None)])
def test_gpu_peaks_match_whole_names(name, peak):
    assert runtime.peak_of(name) == peak  # "L40" is not an L4: no MFU rather than a wrong one


@pytest.mark.parametrize("tie", [True, False])
def test_mfu_counts_the_parameters_in_matmuls_and_the_samples_trained(tie):
    from model import GPT, GPTConfig
    model = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32, tie_embeddings=tie))
    progress = runtime.Progress(model, 16, torch.device("cpu"), "bfloat16", 0, 10)
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))  # head included
    others = sum(p.numel() for n, p in model.named_parameters() if not n.endswith("weight") or ".ln_" in n)
    assert progress.flops_per_token == 6 * (matmul + others) + 12 * 2 * 2 * 16 * 16  # no token or position table
    progress.peak = 1e12  # as on a GPU: MFU of 3 samples trained (of 8 in the batch) in one second
    record = {}
    progress.update(record, 0, 1.0, 8 * 16, 3)
    assert record["mfu"] == pytest.approx(progress.flops_per_token * 3 * 16 / 1e12)


def test_load_model_holds_the_checkpoints_tensors_in_the_dtype_asked(tmp_path):
    """No second copy of the weights: the model is built on the meta device and given the checkpoint's tensors."""
    from dataclasses import asdict

    from model import GPT, GPTConfig
    model = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=32))
    torch.save(dict(model=model.state_dict(), model_args=asdict(model.config)), tmp_path / "ckpt.pt")
    loaded, ckpt = runtime.load_model(tmp_path / "ckpt.pt")
    for name, p in loaded.named_parameters():
        assert p.data_ptr() == ckpt["model"][name].data_ptr() and torch.equal(p, model.state_dict()[name]), name
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    loaded, _ = runtime.load_model(tmp_path / "ckpt.pt", torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
