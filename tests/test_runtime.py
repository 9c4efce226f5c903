"""runtime.py: atomic checkpoint files, resumable logs, signals, the optimizer step with loss scaling."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import torch

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


def test_drop_records_after_keeps_earlier_steps_and_the_eval_at_the_step(tmp_path):
    path = tmp_path / "log.jsonl"
    records = [dict(type="eval", step=0), dict(type="train", step=0), dict(type="train", step=1),
               dict(type="eval", step=2), dict(type="train", step=2), dict(type="train", step=3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    runtime.drop_records_after(path, 2)
    assert [json.loads(line) for line in path.read_text().splitlines()] == records[:4]


def test_stop_signal_is_recorded_and_the_old_handler_restored():
    before = signal.getsignal(signal.SIGTERM)
    stop = runtime.StopSignal()
    assert not stop.requested(torch.device("cpu"))
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.01)
    assert stop.requested(torch.device("cpu")) and stop.name() == "SIGTERM"
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
