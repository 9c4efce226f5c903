"""bench.py runs end to end and reports every method against ERM."""

import subprocess
import sys

from conftest import ROOT


def test_bench_prints_a_ratio_per_method(tiny_data):
    p = subprocess.run([sys.executable, str(ROOT / "bench.py"), "--data", str(tiny_data), "--n_layer", "1",
                        "--n_head", "2", "--n_embd", "32", "--block_size", "32", "--batch_size", "2",
                        "--grad_accum", "2", "--steps", "2", "--warmup", "0", "--device", "cpu"],
                       capture_output=True, text=True, check=True)
    rows = [line.split() for line in p.stdout.splitlines() if line.endswith("x erm")]
    assert [r[0] for r in rows] == ["mean", "erm", "midrank", "irdro"]  # mean: the plain step, for reference
    assert rows[1][-2] == "1.000x" and all(float(r[1]) > 0 for r in rows)
