"""tokenization.load_tokenizer: a checkpoint's own tokenizer gives AutoTokenizer's ids, plus the bos our format needs.

Every fixture is built here, offline: GPT-2 / OPT byte-level BPE files rebuilt from the vendored GPT-2 ranks, and a
tiny LLaMA-style sentencepiece model trained on the embedded Shakespeare. transformers' AutoTokenizer is the reference.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import prepare_data  # noqa: E402
import tokenization  # noqa: E402
from conftest import added, llama_config, spm_dir, write_json  # noqa: E402

transformers = pytest.importorskip("transformers")
sentencepiece = pytest.importorskip("sentencepiece")

TEXTS = [
    "Hello world",
    "First line.\nSecond line, with  two spaces.\n",
    " leading space, and trailing newlines\n\n",
    "  two leading spaces\tand a tab\r\n",
    "Unicode: café, naïve, 東京 — and emoji 🙂.",
    "Digits 12345, 1,234.56 and 3.14159; 'tis can't we'll",
    "A literal <|endoftext|>, </s>, <s>, <unk> and <pad> inside a text.",
    "<s>at the start and at the end</s>",
    "   ",
    "x",
]
PLAIN = [t for t in TEXTS if "<" not in t]  # no special-token strings
EOT = 50256


@pytest.fixture(autouse=True)
def hf_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


def auto(folder):
    return transformers.AutoTokenizer.from_pretrained(str(folder))


def hf_ids(hf, text):
    return hf(text)["input_ids"]


# ---- GPT-2 / OPT byte-level BPE


def byte_to_unicode():
    """GPT-2's reversible map from bytes to printable characters (vocab.json and merges.txt are written in it)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


@pytest.fixture(scope="module")
def gpt2_bpe():
    """GPT-2's (vocab, merges) rebuilt from the vendored tiktoken ranks: the merge that makes token r is what BPE
    does to r's bytes with the tokens ranked below r, which always ends in exactly two parts."""
    ranks = tokenization.gpt2_encoding()._mergeable_ranks
    u = byte_to_unicode()
    s = lambda b: "".join(u[x] for x in b)  # noqa: E731
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) == 1:
            continue
        parts = [token[i:i + 1] for i in range(len(token))]
        while len(parts) > 2:
            pair_rank = [ranks.get(a + b, rank) for a, b in zip(parts, parts[1:])]
            i = int(np.argmin(pair_rank))
            assert pair_rank[i] < rank
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        assert ranks[parts[0]] < rank and ranks[parts[1]] < rank
        merges.append(f"{s(parts[0])} {s(parts[1])}")
    vocab = {s(token): rank for token, rank in ranks.items()}
    vocab["<|endoftext|>"] = EOT
    assert len(vocab) == 50257 and len(merges) == 50000
    return vocab, merges


def write_bpe(folder, vocab, merges, tokenizer_config=None, special_tokens_map=None, config=None):
    folder.mkdir(parents=True)
    write_json(folder / "vocab.json", vocab)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    for name, obj in (("tokenizer_config.json", tokenizer_config), ("special_tokens_map.json", special_tokens_map),
                      ("config.json", config)):
        if obj is not None:
            write_json(folder / name, obj)
    return folder


@pytest.fixture(scope="module")
def gpt2_dirs(gpt2_bpe, tmp_path_factory):
    """GPT-2 as on the hub before tokenizer.json (vocab.json + merges.txt) and as transformers saves it."""
    root = tmp_path_factory.mktemp("gpt2")
    files = write_bpe(root / "files", *gpt2_bpe, config={"model_type": "gpt2", "vocab_size": 50257})
    auto(files).save_pretrained(root / "json")
    assert (root / "json" / "tokenizer.json").exists() and not (root / "json" / "vocab.json").exists()
    return {"files": files, "json": root / "json"}


@pytest.fixture(scope="module")
def opt_dirs(gpt2_bpe, tmp_path_factory):
    """OPT-style: GPT-2's BPE with its own id order (4 specials first), </s> as bos/eos/unk, add_bos_token: true,
    and a model vocab_size (50272) larger than the tokenizer's, as facebook/opt-* have."""
    root = tmp_path_factory.mktemp("opt")
    vocab, merges = gpt2_bpe
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3,
             **{t: i + 4 for t, i in vocab.items() if t != "<|endoftext|>"}}
    specials = {"bos_token": added("</s>"), "eos_token": added("</s>"), "unk_token": added("</s>"),
                "pad_token": added("<pad>")}
    files = write_bpe(root / "files", vocab, merges,
                      tokenizer_config={"errors": "replace", **specials, "add_prefix_space": False,
                                        "add_bos_token": True, "tokenizer_class": "GPT2Tokenizer"},
                      special_tokens_map={k: {x: y for x, y in v.items() if x != "__type"}
                                          for k, v in specials.items()},
                      config={"model_type": "opt", "vocab_size": 50272})
    auto(files).save_pretrained(root / "json")
    write_json(root / "json" / "config.json", {"model_type": "opt", "vocab_size": 50272})
    return {"files": files, "json": root / "json"}


@pytest.mark.parametrize("kind", ["files", "json"])
def test_gpt2_matches_autotokenizer_and_vendored_tiktoken(gpt2_dirs, kind):
    tok, hf = tokenization.load_tokenizer(gpt2_dirs[kind]), auto(gpt2_dirs[kind])
    assert hf_ids(hf, "Hello world") == [15496, 995]  # GPT-2's HF tokenizer adds no bos ...
    for text in TEXTS:
        assert tok.encode(text) == [EOT] + hf_ids(hf, text), text  # ... so ours starts documents with the eos
    assert (tok.bos, tok.eos, tok.vocab_size, tok.name) == (EOT, EOT, 50257, kind)
    assert tok.fingerprint == "gpt2"  # the same token -> id mapping as the tiktoken path: interchangeable
    # independent cross-check of the vendored ranks and of the GPT-2 path: tiktoken == HF on plain text
    gpt2 = tokenization.load_tokenizer("gpt2")
    assert gpt2.encode_batch(PLAIN) == tok.encode_batch(PLAIN)
    # AutoTokenizer parses "<|endoftext|>" written in a text (so do we); the gpt2 path keeps it as text, as before
    special = TEXTS[6]
    assert EOT in tok.encode(special)[1:] and EOT not in gpt2.encode(special)[1:]
    assert tok.decode(tok.encode(TEXTS[4])[1:]) == TEXTS[4]


@pytest.mark.parametrize("kind", ["files", "json"])
def test_opt_matches_autotokenizer(opt_dirs, kind):
    tok, hf = tokenization.load_tokenizer(opt_dirs[kind]), auto(opt_dirs[kind])
    assert hf_ids(hf, "Hello world") == [2, 15496 + 4, 995 + 4]  # OPT prepends </s> = 2, in its own id order
    for text in TEXTS:
        assert tok.encode(text) == hf_ids(hf, text), text
    assert (tok.bos, tok.eos, tok.vocab_size) == (2, 2, 50272)  # vocab_size: the model's, from config.json
    assert tok.fingerprint != "gpt2"
    assert tok.fingerprint == tokenization.load_tokenizer(opt_dirs["files" if kind == "json" else "json"]).fingerprint


# ---- LLaMA-style sentencepiece


@pytest.fixture(scope="module")
def llama_dirs(spm_model, tmp_path_factory):
    pytest.importorskip("google.protobuf")  # AutoTokenizer needs protobuf to read a tokenizer.model
    root = tmp_path_factory.mktemp("llama")
    dirs = {"spm": spm_dir(root / "spm", spm_model), "spm_legacy": spm_dir(root / "spm_legacy", spm_model, legacy=True)}
    auto(dirs["spm"]).save_pretrained(root / "json")  # tokenizer.json, as transformers 5 writes it
    dirs["json"] = root / "json"
    # Llama-2's own tokenizer.json (written by transformers 4): a legacy normalizer, no pre-tokenizer
    j = json.loads((root / "json" / "tokenizer.json").read_text(encoding="utf-8"))
    j["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}
    j["pre_tokenizer"] = None
    (root / "llama2").mkdir()
    write_json(root / "llama2" / "tokenizer.json", j)
    write_json(root / "llama2" / "tokenizer_config.json", llama_config())
    dirs["llama2"] = root / "llama2"
    return dirs


@pytest.mark.parametrize("kind", ["spm", "spm_legacy", "json", "llama2"])
def test_llama_matches_autotokenizer(llama_dirs, spm_model, kind):
    tok, hf = tokenization.load_tokenizer(llama_dirs[kind]), auto(llama_dirs[kind])
    assert "<sep>" in hf.get_vocab()
    for text in TEXTS + ["a<sep>b <sep> c", " <s> x"]:
        assert tok.encode(text) == hf_ids(hf, text), text
    assert (tok.bos, tok.eos, tok.vocab_size) == (1, 2, 800)
    # one mapping, whichever files hold it
    assert tok.fingerprint == tokenization.load_tokenizer(llama_dirs["spm"]).fingerprint != "gpt2"
    assert tok.decode(tok.encode(TEXTS[4])[1:]) == TEXTS[4]
    # and sentencepiece itself gives the same ids on texts that don't start with a space
    sp = sentencepiece.SentencePieceProcessor(model_proto=spm_model)
    for text in PLAIN:
        if not text.startswith(" "):
            assert tok.encode(text) == [1] + sp.encode(text), text


def test_llama_add_bos_token_false(spm_model, tmp_path):
    pytest.importorskip("google.protobuf")
    folder = spm_dir(tmp_path / "nobos", spm_model, add_bos_token=False)
    tok, hf = tokenization.load_tokenizer(folder), auto(folder)
    assert hf_ids(hf, "Hello")[0] != 1  # no <s> from AutoTokenizer, so our documents start with the eos </s>
    assert tok.bos == tok.eos == 2
    for text in TEXTS:
        assert tok.encode(text) == [2] + hf_ids(hf, text), text


def test_llama_bos_by_default(spm_model, tmp_path):
    # no add_bos_token key: LLaMA's tokenizer adds <s> (LlamaTokenizer's documented default, transformers 4);
    # transformers 5's AutoTokenizer adds none here, but a LLaMA model expects <s> at a document start
    cfg = {k: v for k, v in llama_config().items() if k != "add_bos_token"}
    folder = spm_dir(tmp_path / "nokey", spm_model)
    write_json(folder / "tokenizer_config.json", cfg)
    assert tokenization.load_tokenizer(folder).encode("Hello")[0] == 1


def test_sentencepiece_pieces(llama_dirs, spm_model):
    # every kind of piece of a tokenizer.model keeps its id: unknown, control (<s> </s>), user-defined (<sep>), bytes
    tok = tokenization.load_tokenizer(llama_dirs["spm"])
    sp = sentencepiece.SentencePieceProcessor(model_proto=spm_model)
    assert [sp.id_to_piece(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "<sep>"]
    assert tok.hf.get_vocab() == {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}  # all 800, no extras
    assert (tok.bos, tok.eos) == (1, 2)
    text = "x<sep>y 🙂"  # a user-defined piece inside a text, and a character only byte fallback can spell
    assert tok.encode(text) == [1] + sp.encode(text) and sum(sp.is_byte(i) for i in sp.encode(text)) == 4


# ---- prepare() with a checkpoint's tokenizer


DOCS = [{"text": t, "title": str(i)} for i, t in enumerate(TEXTS)]


def write_docs(path):
    path.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    return str(path)


def read_docs(out):
    meta = json.loads((out / "meta.json").read_text())
    found = {}
    for split in ("train", "val"):
        tokens = np.fromfile(out / f"{split}.bin", dtype=meta["dtype"])
        npz = np.load(out / f"{split}_docs.npz")
        for i, doc_id in enumerate(npz["ids"]):
            found[int(doc_id)] = tokens[npz["offsets"][i]:npz["offsets"][i + 1]].tolist()
    return meta, found


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_prepare_with_checkpoint_tokenizer(tmp_path, monkeypatch, family, request):
    folder = request.getfixturevalue("opt_dirs" if family == "opt" else "llama_dirs")["json"]
    monkeypatch.setattr(prepare_data, "REPO", tmp_path)  # default out_dir: tmp_path/data/<name>-<tokenizer>
    out = prepare_data.prepare(write_docs(tmp_path / "docs.jsonl"), tokenizer=str(folder), val_fraction=0.3)
    assert out == tmp_path / "data" / f"docs-{folder.name}"
    meta, found = read_docs(out)
    tok = tokenization.load_tokenizer(folder)
    bos = {"opt": 2, "llama": 1}[family]
    assert meta["tokenizer"] == folder.name and meta["tokenizer_fingerprint"] == tok.fingerprint
    assert (meta["vocab_size"], meta["bos"], meta["eot"], meta["dtype"]) == (tok.vocab_size, bos, 2, "uint16")
    assert found == {i: tok.encode(t) for i, t in enumerate(TEXTS) if t.strip()}  # [bos] + the tokenizer's ids
    assert all(doc[0] == bos for doc in found.values())


@pytest.fixture(scope="module")
def llama3_dirs(gpt2_dirs, tmp_path_factory):
    """Llama-3 style: a byte-level BPE tokenizer.json whose post-processor adds <|begin_of_text|>, a model
    vocab_size (128256) over 65536, and a tokenizer_class that does not say (or, as on some hub repos, says
    LlamaTokenizerFast although the file is byte-level)."""
    from tokenizers import Tokenizer, processors

    tok = Tokenizer.from_file(str(gpt2_dirs["json"] / "tokenizer.json"))
    tok.add_special_tokens(["<|begin_of_text|>"])
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B",
                                                       special_tokens=[("<|begin_of_text|>", 50257)])
    root, dirs = tmp_path_factory.mktemp("llama3"), {}
    for cls in ("PreTrainedTokenizerFast", "LlamaTokenizerFast"):
        dirs[cls] = folder = root / cls
        folder.mkdir()
        tok.save(str(folder / "tokenizer.json"))
        write_json(folder / "tokenizer_config.json", {"tokenizer_class": cls, "bos_token": "<|begin_of_text|>",
                                                      "eos_token": "<|endoftext|>"})
        write_json(folder / "config.json", {"model_type": "llama", "vocab_size": 128256})
    return dirs


@pytest.mark.parametrize("cls", ["PreTrainedTokenizerFast", "LlamaTokenizerFast"])
def test_llama3_style_matches_autotokenizer(llama3_dirs, cls):
    tok, hf = tokenization.load_tokenizer(llama3_dirs[cls]), auto(llama3_dirs[cls])
    for text in TEXTS:
        assert tok.encode(text) == hf_ids(hf, text), text
    assert (tok.bos, tok.eos, tok.vocab_size) == (50257, EOT, 128256)
    assert prepare_data.token_dtype(tok.vocab_size) == np.uint32


def test_prepare_uint32_for_a_big_vocabulary(llama3_dirs, tmp_path):
    # Llama-3's 128256 ids do not fit uint16; the dtype follows the model's vocab_size
    folder = llama3_dirs["PreTrainedTokenizerFast"]
    out = prepare_data.prepare(write_docs(tmp_path / "d.jsonl"), out_dir=tmp_path / "o", tokenizer=str(folder))
    meta, found = read_docs(out)
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 128256 and meta["bos"] == 50257
    assert found == {i: tokenization.load_tokenizer(folder).encode(t) for i, t in enumerate(TEXTS) if t.strip()}
    assert (out / "train.bin").stat().st_size == 4 * meta["train"]["tokens"]


def test_prepare_rejects_ids_beyond_the_model_vocab(llama_dirs, tmp_path):
    folder = tmp_path / "small"
    folder.mkdir()
    (folder / "tokenizer.json").write_bytes((llama_dirs["json"] / "tokenizer.json").read_bytes())
    write_json(folder / "config.json", {"vocab_size": 100})
    with pytest.raises(prepare_data.DataError, match="vocab_size is 100"):
        prepare_data.prepare(write_docs(tmp_path / "d.jsonl"), out_dir=tmp_path / "o", tokenizer=str(folder))
    assert not (tmp_path / "o").exists()


def test_gpt2_default_is_unchanged(tmp_path):
    out = prepare_data.prepare(write_docs(tmp_path / "d.jsonl"), out_dir=tmp_path / "o")
    meta, found = read_docs(out)
    assert (meta["tokenizer"], meta["tokenizer_fingerprint"], meta["vocab_size"]) == ("gpt2", "gpt2", 50257)
    assert meta["bos"] == meta["eot"] == EOT and meta["dtype"] == "uint16"
    enc = tokenization.gpt2_encoding()
    assert found == {i: [EOT] + enc.encode_ordinary(t) for i, t in enumerate(TEXTS) if t.strip()}


# ---- bad --tokenizer: one line on stderr, exit code 2


def run_cli(*args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(cwd / "hf")}
    return subprocess.run([sys.executable, str(REPO / "prepare_data.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("case", ["offline_hub_name", "missing_folder", "empty_folder"])
def test_bad_tokenizer(tmp_path, case):
    (tmp_path / "empty").mkdir()
    name = {"offline_hub_name": "some-org/some-model", "missing_folder": "./no/such/folder",
            "empty_folder": str(tmp_path / "empty")}[case]
    r = run_cli("--tokenizer", name, "--out_dir", str(tmp_path / "out"), cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("prepare_data.py: error:"), r.stderr
    assert not (tmp_path / "out").exists()
    if case == "offline_hub_name":
        assert "'some-org/some-model'" in lines[0] and "local folder" in lines[0]


def test_cli_with_a_checkpoint_folder(opt_dirs, tmp_path):
    r = run_cli("--dataset", write_docs(tmp_path / "d.jsonl"), "--tokenizer", str(opt_dirs["files"]),
                "--out_dir", str(tmp_path / "out"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["tokenizer"] == "files" and meta["bos"] == 2 and meta["vocab_size"] == 50272
