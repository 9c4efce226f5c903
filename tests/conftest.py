"""Shared fixtures: a tiny corpus prepared with prepare_data.py, and tiny-model training flags."""

import gzip
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


@pytest.fixture(scope="session")
def tiny_sources_data(tmp_path_factory):
    """40 documents from two files, web.jsonl (26) and code.jsonl (14): prepared as two sources (sources.py)."""
    tmp = tmp_path_factory.mktemp("tiny_sources")
    rng = random.Random(1)
    (tmp / "in").mkdir()
    for name, n_docs, words in (("web", 26, "the king queen lord love night day sword crown".split()),
                                ("code", 14, "def return if else for in x y = ( ) : 0 1".split())):
        with open(tmp / "in" / f"{name}.jsonl", "w") as f:
            for _ in range(n_docs):
                f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(3, 80)))}) + "\n")
    return prepare_data.prepare(dataset=str(tmp / "in"), out_dir=tmp / "data", val_fraction=0.2)


def tiny_run_flags(data, seed=3):
    return ["--data", str(data), "--n_layer", "1", "--n_head", "2", "--n_embd", "32",
            "--block_size", "32", "--eval_samples", "8", "--device", "cpu", "--no-compile", "--seed", str(seed)]


@pytest.fixture
def tiny_flags(tiny_data):
    """train.py flags for a fast CPU run on the tiny corpus (add --out_dir, --method, ...)."""
    return tiny_run_flags(tiny_data)


@pytest.fixture(scope="session")
def tiny_ref(tiny_data, tmp_path_factory):
    """A reference model for --ref_model: the out_dir of a tiny ERM run of 4 steps on the tiny corpus, from another
    seed than tiny_flags' runs (its losses are not the trained model's)."""
    import train
    out = tmp_path_factory.mktemp("ref") / "run"
    train.main(tiny_run_flags(tiny_data, seed=11) + ["--method", "erm", "--max_iters", "4", "--warmup_iters", "0",
                                                     "--lr", "1e-2", "--batch_size", "4", "--out_dir", str(out)])
    return out


# --- checkpoint tokenizer fixtures (a tiny LLaMA-style sentencepiece model), shared by tests ---

def write_json(path, obj):
    path.write_text(json.dumps(obj, ensure_ascii=False))


def added(content):  # how older hub configs write a special token
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True, "rstrip": False,
            "single_word": False}


@pytest.fixture(scope="session")
def spm_model():
    """A tiny sentencepiece BPE with LLaMA's settings (byte fallback, <unk> <s> </s> = 0 1 2, digits split,
    whitespace kept as it is) and one user-defined symbol; trains in ~0.1 s."""
    with gzip.open(prepare_data.EMBEDDED_CORPUS, "rt", encoding="utf-8") as f:
        lines = [line for r in (json.loads(x) for _, x in zip(range(30), f)) for line in r["text"].splitlines()]
    import io

    import sentencepiece
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(x for x in lines if x.strip()), model_writer=model, vocab_size=800, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, user_defined_symbols=["<sep>"],
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
        split_digits=True, allow_whitespace_only_pieces=True, character_coverage=1.0, num_threads=1, minloglevel=2)
    return model.getvalue()


def llama_config(**kw):  # as Sheared-LLaMA / Llama-2 checkpoints write it
    return {"add_bos_token": True, "add_eos_token": False, "bos_token": added("<s>"), "eos_token": added("</s>"),
            "unk_token": added("<unk>"), "clean_up_tokenization_spaces": False, "legacy": False,
            "model_max_length": 4096, "pad_token": None, "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer",
            **kw}


def spm_dir(folder, model, **cfg):
    folder.mkdir(parents=True)
    (folder / "tokenizer.model").write_bytes(model)
    write_json(folder / "tokenizer_config.json", llama_config(**cfg))
    write_json(folder / "config.json", {"model_type": "llama", "vocab_size": 800})
    return folder




@pytest.fixture(scope="session")
def tiny_llama_ckpt(tmp_path_factory, spm_model):
    """A random 2-layer LLaMA checkpoint folder (GQA, vocab 800) with the sentencepiece tokenizer above."""
    transformers = pytest.importorskip("transformers")
    import torch
    folder = spm_dir(tmp_path_factory.mktemp("llama") / "ckpt", spm_model)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=800, max_position_embeddings=64)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_data(tmp_path_factory, tiny_data, tiny_llama_ckpt):
    """The tiny corpus of tiny_data tokenized with tiny_llama_ckpt's own tokenizer (what --pretrained needs)."""
    return prepare_data.prepare(dataset=str(tiny_data.parent / "docs.jsonl"), val_fraction=0.2,
                                out_dir=tmp_path_factory.mktemp("llama_data") / "data", tokenizer=str(tiny_llama_ckpt))


class HostWaits:
    """Counts, on any device, what would make the host wait for a GPU or copy to it: reading a value (.item(),
    bool(), .tolist(), .cpu(), .numpy()), an op whose output size depends on the values (nonzero, a boolean mask),
    a tensor made from host data (torch.tensor of a list, a list index: a copy to the device; a Python number is
    left out: `w[i] = 0.5` fills on the device). On a CPU none of these costs anything, so they are counted, not
    timed: `with HostWaits() as waits: ...`, then `waits.seen` lists them in order."""

    def __init__(self):
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode
        aten, seen = torch.ops.aten, []
        self.seen = seen
        waits = {aten._local_scalar_dense.default: "read a value", aten.nonzero.default: "nonzero",
                 aten.masked_select.default: "masked_select", aten.lift_fresh.default: "tensor from host data",
                 aten.lift_fresh_copy.default: "tensor from host data"}

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                masked = func is aten.index.Tensor and any(i is not None and i.dtype == torch.bool for i in args[1])
                number = "lift" in func.__name__ and args[0].dim() == 0
                if (func in waits and not number) or masked:
                    seen.append("boolean mask" if masked else waits[func])
                return func(*args, **(kwargs or {}))

        self.mode, self.patch = Mode(), pytest.MonkeyPatch()
        for name in ("cpu", "tolist", "numpy"):
            self.patch.setattr(torch.Tensor, name, self.counted(getattr(torch.Tensor, name), name))

    def counted(self, method, name):
        def wrapper(*args, **kwargs):
            self.seen.append(name)
            return method(*args, **kwargs)
        return wrapper

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)
        self.patch.undo()
