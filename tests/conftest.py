"""Shared fixtures: a tiny corpus prepared with prepare_data.py, and tiny-model training flags."""

import json
import random
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import prepare_data  # noqa: E402


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """40 documents of 3 to 120 words: short ones get padded, long ones span several chunks."""
    tmp = tmp_path_factory.mktemp("tiny")
    rng = random.Random(0)
    words = "the king queen lord love night day sword crown death life heart blood fair sweet".split()
    with open(tmp / "docs.jsonl", "w") as f:
        for i in range(40):
            n = rng.randint(3, 120)
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(n)) + "."}) + "\n")
    return prepare_data.prepare(dataset=str(tmp / "docs.jsonl"), out_dir=tmp / "data", val_fraction=0.2)


@pytest.fixture
def tiny_flags(tiny_data):
    """train.py flags for a fast CPU run on the tiny corpus (add --out_dir, --method, ...)."""
    return ["--data", str(tiny_data), "--n_layer", "1", "--n_head", "2", "--n_embd", "32",
            "--block_size", "32", "--eval_samples", "8", "--device", "cpu", "--no-compile", "--seed", "3"]
