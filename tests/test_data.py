"""prepare_data.py: offline GPT-2 tokenizer, document boundaries, determinism, input formats, errors."""
import gzip
import hashlib
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

DOCS = [  # index = source id; id 2 is empty and must be dropped
    {"text": "Hello world", "title": "a"},
    {"text": "First line.\nSecond line, with  two spaces.\n", "title": "b"},
    {"text": "   \n", "title": "c"},
    {"text": "A literal <|endoftext|> inside a document is plain text.", "title": "d"},
    {"text": "Unicode: café, naïve, 東京 — and emoji 🙂.", "title": "e"},
    {"text": " leading space and trailing newline\n\n", "title": "f"},
    {"text": "x", "title": "g"},
    {"text": "The quick brown fox jumps over the lazy dog. " * 20, "title": "h"},
]


@pytest.fixture(autouse=True)
def hf_offline(tmp_path, monkeypatch):
    # datasets must never try the network nor write into the real ~/.cache
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def load_split(out_dir, split):
    meta = json.loads((out_dir / "meta.json").read_text())
    tokens = np.fromfile(out_dir / f"{split}.bin", dtype=meta["dtype"])
    docs = np.load(out_dir / f"{split}_docs.npz")
    return meta, tokens, docs["offsets"], docs["ids"]


def decoded_docs(out_dir):
    """{source id: decoded text} over both splits, checking the layout on the way."""
    enc = tokenization.gpt2_encoding()
    found = {}
    for split in ("train", "val"):
        meta, tokens, offsets, ids = load_split(out_dir, split)
        assert offsets.dtype == np.int64 and ids.dtype == np.int64
        assert len(offsets) == len(ids) + 1 and offsets[0] == 0 and offsets[-1] == len(tokens)
        assert np.all(np.diff(offsets) >= 1) and np.all(np.diff(ids) > 0)  # sorted ids: source order
        assert meta[split] == {"docs": len(ids), "tokens": len(tokens)}
        for i, doc_id in enumerate(ids):
            doc = tokens[offsets[i]:offsets[i + 1]]
            assert doc[0] == meta["bos"] == 50256
            assert 50256 not in doc[1:]  # the literal "<|endoftext|>" text is not the special token
            assert int(doc_id) not in found  # train and val are disjoint
            found[int(doc_id)] = enc.decode(doc[1:].tolist())
    return found


# ---- tokenizer


def test_vendored_gpt2_file_checksum():
    raw = gzip.decompress(tokenization.GPT2_RANKS.read_bytes())
    assert hashlib.sha256(raw).hexdigest() == tokenization.GPT2_SHA256
    assert len(raw.splitlines()) == 50256


def test_offline_fallback_gives_gpt2_ids(monkeypatch):
    import tiktoken

    def no_network(name):
        raise ConnectionError("offline")

    monkeypatch.setattr(tiktoken, "get_encoding", no_network)
    enc = tokenization.gpt2_encoding.__wrapped__()  # bypass the cache: always build from assets/
    assert enc.name == "gpt2" and enc.n_vocab == 50257 and enc.eot_token == 50256
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert enc.encode("<|endoftext|>", allowed_special="all") == [50256]
    assert enc.encode_ordinary("<|endoftext|>") == [27, 91, 437, 1659, 5239, 91, 29]
    assert enc.encode_ordinary(" the") == [262] and enc.encode_ordinary("\n\n") == [628]
    text = "Some text: 'tis 1,234 naïve 東京\n\n  spaces"
    assert enc.decode(enc.encode_ordinary(text)) == text
    cached = tokenization.gpt2_encoding()  # whichever path the cache holds gives the same ids
    assert cached.encode_ordinary(text) == enc.encode_ordinary(text)


def test_checksum_mismatch_is_an_error(monkeypatch, tmp_path):
    import tiktoken

    bad = tmp_path / "gpt2.tiktoken.gz"
    bad.write_bytes(gzip.compress(b"IQ== 0\n"))
    monkeypatch.setattr(tokenization, "GPT2_RANKS", bad)
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: 1 / 0)
    with pytest.raises(prepare_data.DataError, match="gpt2.tiktoken.gz: sha256 mismatch"):
        tokenization.gpt2_encoding.__wrapped__()


def test_token_dtype():
    assert prepare_data.token_dtype(50257) == np.uint16
    assert prepare_data.token_dtype(65536) == np.uint16
    assert prepare_data.token_dtype(65537) == np.uint32
    assert prepare_data.token_dtype(128256) == np.uint32


# ---- layout


def test_document_boundaries(tmp_path):
    src = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    out = prepare_data.prepare(str(src), out_dir=tmp_path / "out", val_fraction=0.3)
    found = decoded_docs(out)
    assert found == {i: d["text"] for i, d in enumerate(DOCS) if d["text"].strip()}  # exact round trip
    meta = json.loads((out / "meta.json").read_text())
    assert meta["val"]["docs"] == 2 and meta["train"]["docs"] == 5  # round(0.3 * 7) = 2
    assert meta["empty_docs_dropped"] == 1 and meta["source_docs"] == 8
    assert meta["tokenizer"] == "gpt2" and meta["vocab_size"] == 50257 and meta["dtype"] == "uint16"
    assert meta["source"] == str(src) and meta["text_field"] == "text" and meta["seed"] == 1337
    assert json.loads((out / "titles.json").read_text()) == [d["title"] for d in DOCS]
    assert not list(out.glob("*.tmp"))


def test_deterministic_and_seeded(tmp_path):
    src = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    a = prepare_data.prepare(str(src), out_dir=tmp_path / "a", val_fraction=0.3)
    b = prepare_data.prepare(str(src), out_dir=tmp_path / "b", val_fraction=0.3)
    names = sorted(p.name for p in a.iterdir())
    assert names == ["meta.json", "titles.json", "train.bin", "train_docs.npz", "val.bin", "val_docs.npz"]
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    c = prepare_data.prepare(str(src), out_dir=tmp_path / "c", val_fraction=0.3, seed=1)
    vals = [set(np.load(d / "val_docs.npz")["ids"].tolist()) for d in (a, c)]
    assert vals[0] != vals[1]  # the seed picks val (7 choose 2 = 21 ways; 1337 and 1 differ)


def test_default_out_dir_name():
    assert prepare_data.default_name(None) == "shakespeare"
    assert prepare_data.default_name("some/dir/corpus.jsonl.gz") == "corpus"
    assert prepare_data.default_name("texts/*.txt") == "texts"
    assert prepare_data.default_name("roneneldan/TinyStories") == "TinyStories"


# ---- input formats


def test_text_files_by_document_and_paragraph(tmp_path):
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "a.txt").write_text("Para one,\nline two.\n\nPara two.\n")
    (tmp_path / "txt" / "b.txt").write_text("Other file.\n")
    out = prepare_data.prepare(str(tmp_path / "txt"), out_dir=tmp_path / "doc", val_fraction=0.5)
    assert sorted(decoded_docs(out).values()) == ["Other file.\n", "Para one,\nline two.\n\nPara two.\n"]
    out = prepare_data.prepare(str(tmp_path / "txt" / "*.txt"), out_dir=tmp_path / "par", val_fraction=0.3,
                               sample_by="paragraph")
    texts = sorted(t.strip() for t in decoded_docs(out).values())
    assert texts == ["Other file.", "Para one,\nline two.", "Para two."]
    assert not (out / "titles.json").exists()


def test_jsonl_gz_custom_field_and_max_docs(tmp_path):
    recs = [{"body": d["text"], "n": i} for i, d in enumerate(DOCS)]
    src = tmp_path / "c.jsonl.gz"
    src.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in recs).encode()))
    out = prepare_data.prepare(str(src), out_dir=tmp_path / "o", text_field="body", max_docs=5)
    assert decoded_docs(out) == {i: DOCS[i]["text"] for i in (0, 1, 3, 4)}
    meta = json.loads((out / "meta.json").read_text())
    assert meta["text_field"] == "body" and meta["source_docs"] == 5 and meta["val"]["docs"] == 1


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": [d["text"] for d in DOCS]}), tmp_path / "p.parquet")
    out = prepare_data.prepare(str(tmp_path / "p.parquet"), out_dir=tmp_path / "o", text_field="content")
    assert decoded_docs(out) == {i: d["text"] for i, d in enumerate(DOCS) if d["text"].strip()}


def test_save_to_disk_folders(tmp_path):
    # a Dataset.save_to_disk folder holds arrow files plus json metadata: the records come from the arrow files
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list([{"text": d["text"], "title": f"t{i}"} for i, d in enumerate(DOCS)])
    ds.save_to_disk(str(tmp_path / "saved"))
    want = {i: d["text"] for i, d in enumerate(DOCS) if d["text"].strip()}
    out = prepare_data.prepare(str(tmp_path / "saved"), out_dir=tmp_path / "o")
    assert decoded_docs(out) == want
    assert json.loads((out / "titles.json").read_text()) == [f"t{i}" for i in range(len(DOCS))]
    # a DatasetDict folder: the --split is picked; a missing split is one line naming the ones there
    datasets.DatasetDict(train=ds, test=ds.select([0, 1])).save_to_disk(str(tmp_path / "dict"))
    assert decoded_docs(prepare_data.prepare(str(tmp_path / "dict"), out_dir=tmp_path / "o2")) == want
    with pytest.raises(prepare_data.DataError, match=r"splits \['test', 'train'\], not 'validation'"):
        prepare_data.prepare(str(tmp_path / "dict"), out_dir=tmp_path / "o3", split="validation")


def test_embedded_corpus(tmp_path):
    out = prepare_data.prepare(out_dir=tmp_path / "shakespeare")
    meta = json.loads((out / "meta.json").read_text())
    assert meta["source"] == "embedded:shakespeare"
    assert meta["train"]["docs"] > 100 and meta["val"]["docs"] >= 5
    assert 250_000 <= meta["train"]["tokens"] + meta["val"]["tokens"] <= 400_000
    titles = json.loads((out / "titles.json").read_text())
    assert len(titles) == meta["source_docs"] and "Hamlet 3.1" in titles
    _, tokens, offsets, ids = load_split(out, "val")
    assert (tokens[offsets[:-1]] == 50256).all()
    assert prepare_data.BUILT_IN[REPO / "data" / "shakespeare"] == "gpt2"


def test_char_tokenizer_is_the_corpus_characters(tmp_path):
    # assets/char (made by assets/make_assets.py): <|bos|> = 0, <|unk|> = 1, then every character of the
    # embedded corpus in sorted order, loaded by transformers' AutoTokenizer like any checkpoint's tokenizer
    texts = [r["text"] for r in prepare_data.read_jsonl_gz(prepare_data.EMBEDDED_CORPUS)]
    chars = sorted(set("".join(texts)))
    tok = tokenization.load_tokenizer("char")
    assert tok.hf.get_vocab() == {"<|bos|>": 0, "<|unk|>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    assert (tok.name, tok.bos, tok.vocab_size, tok.source) == ("char", 0, len(chars) + 2, "char")
    for text in texts[:5] + ["  two spaces,\ttab and\nnewline  "]:
        assert tok.encode(text) == [0] + [2 + chars.index(c) if c in chars else 1 for c in text]
    assert tok.decode(tok.encode(texts[3])[1:]) == texts[3]
    out = prepare_data.prepare(out_dir=tmp_path / "c", tokenizer="char")
    meta = json.loads((out / "meta.json").read_text())
    assert meta["tokenizer"] == "char" and meta["tokenizer_source"] == "char"
    _, tokens, offsets, _ = load_split(out, "train")
    assert (tokens[offsets[:-1]] == 0).all() and tokens.max() < len(chars) + 2
    assert sum(len(t) for t in texts) == meta["train"]["tokens"] + meta["val"]["tokens"] - meta["source_docs"]
    assert prepare_data.DEFAULT_DATA_DIR == REPO / "data" / "shakespeare-char"
    assert prepare_data.BUILT_IN[prepare_data.DEFAULT_DATA_DIR] == "char"


def test_milton_asset_is_readable():
    with gzip.open(REPO / "assets" / "milton.jsonl.gz", "rt") as f:
        recs = [json.loads(line) for line in f]
    assert len(recs) > 20 and all(r["text"].strip() and r["title"].startswith("Paradise Lost") for r in recs)


# ---- bad input: one line on stderr, exit code 2


def run_cli(*args, cwd):
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(REPO / "prepare_data.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("case", ["missing", "field", "too_few", "val_fraction", "extension", "empty", "bad_json",
                                  "latin1_text", "latin1_json", "source_field"])
def test_bad_input(tmp_path, case):
    src = write_jsonl(tmp_path / "d.jsonl", DOCS)
    one = write_jsonl(tmp_path / "one.jsonl", DOCS[:1])
    (tmp_path / "d.csv").write_text("text\nhi\n")
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"text": "b"\n{"text": "c"}\n')
    (tmp_path / "latin1.txt").write_bytes("Para one.\n\nCaf\u00e9 two.\n\nThree.\n".encode("latin-1"))
    (tmp_path / "latin1.jsonl").write_bytes("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in DOCS[:4])
                                            .encode("utf-8") + '{"text": "caf\u00e9"}\n'.encode("latin-1"))
    args = {"missing": ["--dataset", "/nonexistent"],
            "empty": ["--dataset", str(tmp_path / "empty.jsonl")],
            "bad_json": ["--dataset", str(tmp_path / "bad.jsonl")],
            "latin1_text": ["--dataset", str(tmp_path / "latin1.txt"), "--sample_by", "paragraph"],
            "latin1_json": ["--dataset", str(tmp_path / "latin1.jsonl")],
            "field": ["--dataset", str(src), "--text_field", "body"],
            "source_field": ["--dataset", str(src), "--source_field", "lang"],
            "too_few": ["--dataset", str(one)],
            "val_fraction": ["--dataset", str(src), "--val_fraction", "1.5"],
            "extension": ["--dataset", str(tmp_path / "d.csv")]}[case]
    r = run_cli(*args, "--out_dir", str(tmp_path / "out"), cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("prepare_data.py: error:"), r.stderr
    assert not (tmp_path / "out" / "meta.json").exists()
    if case == "field":
        assert "'body'" in lines[0] and "--text_field" in lines[0]
    if case == "source_field":
        assert "source_field 'lang' is not in the records" in lines[0] and "['text', 'title']" in lines[0]
    if case == "empty":
        assert "no records" in lines[0]
    if case == "bad_json":  # the file's own line number (datasets reports "row 1", counted within a block)
        assert "bad.jsonl line 2 is not JSON" in lines[0]
    if case.startswith("latin1"):  # the file, the byte and the fix, not the codec's position within a block
        utf8 = len("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in DOCS[:4]).encode())
        name, at = ("latin1.txt", 14) if case == "latin1_text" else ("latin1.jsonl", utf8 + len('{"text": "caf'))
        assert f"{tmp_path / name} is not UTF-8 at byte {at} (0xe9): re-encode it as UTF-8" in lines[0], lines[0]


def test_not_utf8_counts_bytes_across_blocks(tmp_path):
    (tmp_path / "a.txt").write_bytes("ab\u00e9cd".encode() + b"\xe9x")  # an é split by the blocks, then latin-1
    for block in (1, 2, 3, 1 << 20):
        assert prepare_data.not_utf8([str(tmp_path / "a.txt")], block).startswith(f"{tmp_path / 'a.txt'} is not "
                                                                                  "UTF-8 at byte 6 (0xe9)")
    (tmp_path / "b.txt").write_bytes("ok \u00e9".encode()[:-1])  # cut in the middle of its last character
    assert "at byte 3 (0xc3)" in prepare_data.not_utf8([str(tmp_path / "b.txt")], 2)
    (tmp_path / "c.txt").write_bytes("all \u00e9 fine".encode())
    assert prepare_data.not_utf8([str(tmp_path / "c.txt")], 2) is None


# ---- sources: where each document came from (sources.py)


def sources_of(out_dir):
    """{source id: the name of its source} over both splits, read back through read_split."""
    found = {}
    for split in ("train", "val"):
        meta, _, _, ids, _, doc_sources = prepare_data.read_split(out_dir, split)
        found.update({int(i): meta["sources"][s] for i, s in zip(ids, doc_sources)})
    return found


def test_several_files_are_a_source_each_and_one_file_is_none(tmp_path):
    code = [{"text": f"def f{i}(): return {i}", "title": f"f{i}"} for i in range(3)]  # the columns of DOCS
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "code.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in code).encode()))
    write_jsonl(tmp_path / "in" / "web.jsonl", DOCS[:5])
    out = prepare_data.prepare(str(tmp_path / "in"), out_dir=tmp_path / "out", val_fraction=0.3)
    # the files in order (code, then web): source ids 0-2 are code's records, 3-7 web's (5, an empty one, dropped)
    assert json.loads((out / "meta.json").read_text())["sources"] == ["code", "web"]
    assert sources_of(out) == {0: "code", 1: "code", 2: "code", 3: "web", 4: "web", 6: "web", 7: "web"}
    assert decoded_docs(out) == {**{i: r["text"] for i, r in enumerate(code)},
                                 **{3 + i: d["text"] for i, d in enumerate(DOCS[:5]) if i != 2}}
    # a source is a sub-folder of the files' common folder, however many files it holds
    for part, docs in (("web/a", DOCS[:3]), ("web/b", DOCS[3:6]), ("books", DOCS[6:])):
        (tmp_path / "nested" / part).parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(tmp_path / "nested" / f"{part}.jsonl", docs)
    out = prepare_data.prepare(str(tmp_path / "nested"), out_dir=tmp_path / "nested_out", val_fraction=0.3)
    assert sources_of(out) == {0: "books", 1: "books", 2: "web", 3: "web", 5: "web", 6: "web", 7: "web"}
    # one file: no sources, and read_split says so
    out = prepare_data.prepare(str(tmp_path / "in" / "web.jsonl"), out_dir=tmp_path / "one", val_fraction=0.3)
    assert json.loads((out / "meta.json").read_text())["sources"] is None
    assert prepare_data.read_split(out, "train")[5] is None and "sources" not in np.load(out / "train_docs.npz")


def test_a_record_field_names_the_source(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [dict(d, lang=["en", "fr", None][i % 3]) for i, d in enumerate(DOCS)])
    r = run_cli("--dataset", str(src), "--source_field", "lang", "--out_dir", str(tmp_path / "out"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "3 sources: (none) 1 docs, en 3 docs, fr 3 docs" in r.stdout
    out = tmp_path / "out"
    meta = json.loads((out / "meta.json").read_text())
    assert meta["sources"] == ["(none)", "en", "fr"] and meta["source_field"] == "lang"
    assert sources_of(out) == {i: ["en", "fr", "(none)"][i % 3] for i in range(len(DOCS)) if i != 2}
    assert "--source_field lang" in prepare_data.prepare_command(meta, out)
    # the field wins over the files; and instruction data has sources too
    write_jsonl(tmp_path / "more.jsonl", [dict(d, lang="de") for d in DOCS])
    out = prepare_data.prepare(str(tmp_path / "*.jsonl"), out_dir=tmp_path / "glob", source_field="lang")
    assert set(sources_of(out).values()) == {"de", "en", "fr", "(none)"}
    examples = [{"instruction": f"Say {i}.", "output": f"{i}", "lang": ["en", "fr"][i % 2]} for i in range(6)]
    out = prepare_data.prepare(str(write_jsonl(tmp_path / "ex.jsonl", examples)), out_dir=tmp_path / "instruct",
                               format="instruct", source_field="lang")
    assert sources_of(out) == {i: ["en", "fr"][i % 2] for i in range(6)}


@pytest.mark.parametrize("how, problem", [
    ("cut short", "is damaged (its sources are not one of the 2 sources meta.json names for each of its 3 documents)"),
    ("out of range", "is damaged (its sources are not one of the 2 sources"),
    ("lost", "has no sources for the 2 sources meta.json names (from another preparation?)"),
])
def test_a_damaged_sources_array_is_one_line_naming_the_command_that_writes_it_again(how, problem, tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [dict(d, lang=["en", "fr"][i % 2]) for i, d in enumerate(DOCS)])
    out = prepare_data.prepare(str(src), out_dir=tmp_path / "out", val_fraction=0.4, source_field="lang")
    with np.load(out / "val_docs.npz") as docs:
        offsets, ids, doc_sources = docs["offsets"], docs["ids"], docs["sources"]
    assert len(ids) == 3
    damaged = {"cut short": doc_sources[:-1], "out of range": doc_sources + 2, "lost": None}[how]
    prepare_data.write_npz(out / "val_docs.npz", offsets=offsets, ids=ids, sources=damaged)
    prepare_data.read_split(out, "train")  # the other split is whole
    with pytest.raises(prepare_data.DataError) as e:
        prepare_data.read_split(out, "val")
    message = str(e.value)
    assert message.startswith(f"{out / 'val_docs.npz'} {problem}") and "\n" not in message, message
    assert message.endswith(f"prepare it again with python prepare_data.py --dataset {src} --val_fraction 0.4 "
                            f"--source_field lang --out_dir {out}")


# ---- a prepared folder damaged later: one line at load time, naming the file and the command that writes it again


def damage(folder, how):
    if how == "val.bin missing":
        (folder / "val.bin").unlink()
    elif how == "train_docs.npz missing":
        (folder / "train_docs.npz").unlink()
    elif how == "train.bin cut by whole tokens":  # passes the size check: only the offsets can tell
        (folder / "train.bin").write_bytes((folder / "train.bin").read_bytes()[:-20])
    elif how == "val_docs.npz not a zip":
        (folder / "val_docs.npz").write_bytes(b"PK\x03\x04 torn")
    elif how == "offsets of another preparation":
        with np.load(folder / "val_docs.npz") as docs:
            np.savez(folder / "val_docs.npz", offsets=docs["offsets"][::-1], ids=docs["ids"])


@pytest.mark.parametrize("how, problem", [
    ("val.bin missing", "val.bin is missing, {out} is incomplete"),
    ("train_docs.npz missing", "train_docs.npz is missing"),
    ("train.bin cut by whole tokens", "train.bin holds {n} tokens but the documents of train_docs.npz end at token"),
    ("val_docs.npz not a zip", "val_docs.npz is damaged (BadZipFile"),
    ("offsets of another preparation", "val_docs.npz is damaged (its offsets do not rise from 0"),
])
def test_a_damaged_folder_names_the_file_and_the_command_that_writes_it_again(how, problem, tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", DOCS)
    out = prepare_data.prepare(dataset=str(src), out_dir=tmp_path / "out", val_fraction=0.3, seed=7)
    whole = {p.name: p.read_bytes() for p in out.iterdir()}
    damage(out, how)
    n = (out / "train.bin").stat().st_size // 2
    for split in ("train", "val"):
        try:
            prepare_data.read_split(out, split)
        except prepare_data.DataError as e:
            message = str(e)
            break
    else:
        pytest.fail(f"{how}: read without an error")
    assert message.startswith(str(out / problem.format(out=out, n=n).split(" ")[0])) and \
        problem.format(out=out, n=n) in message and "\n" not in message
    command = message.split("prepare it again with ")[1]
    assert command == f"python prepare_data.py --dataset {src} --val_fraction 0.3 --seed 7 --out_dir {out}"
    r = subprocess.run([sys.executable, *command.split()[1:]], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == whole  # the advice restores the folder as it was
    prepare_data.read_split(out, "train")


def test_a_corpus_file_given_as_data_names_the_command_that_prepares_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # as a user passes it: a path relative to where they are
    (tmp_path / "notes.md").write_text("\n\n".join(f"Paragraph {i} of my notes." for i in range(12)))
    (tmp_path / "ckpt.pt").write_bytes(b"")
    with pytest.raises(FileNotFoundError) as e:
        prepare_data.ensure_prepared(tmp_path / "ckpt.pt")
    assert str(e.value).endswith("is a file, not a folder of prepared data: pass the folder that prepare_data.py "
                                 "wrote (its --out_dir)")
    with pytest.raises(FileNotFoundError) as e:
        prepare_data.ensure_prepared(Path("notes.md"))
    assert str(e.value) == ("--data notes.md is a file, not a folder of prepared data: prepare it first with python "
                            "prepare_data.py --dataset notes.md --sample_by paragraph --out_dir data/notes, then pass "
                            "--data data/notes")
    r = run_cli("--dataset", "notes.md", "--sample_by", "paragraph", "--out_dir", "data/notes", cwd=tmp_path)
    assert r.returncode == 0, r.stderr  # following the advice works: one text file, split into paragraphs
    data = prepare_data.ensure_prepared(tmp_path / "data" / "notes")
    assert len(prepare_data.read_split(data, "val")[3]) >= 1


FAULT_WHILE_VAL_IS_WRITTEN = """
import errno, os, signal, sys
sys.path.insert(0, {root!r})
import prepare_data
write_npz = prepare_data.write_npz
def fault(path, **arrays):  # while the val split is being written (train's files are written): {fault}
    if path.name.startswith("val"):
        {fault}
    write_npz(path, **arrays)
prepare_data.write_npz = fault
prepare_data.main(sys.argv[1:])
"""
# Ctrl-C (saying which files were staged when it struck), and a full disk
INTERRUPTED = FAULT_WHILE_VAL_IS_WRITTEN.replace("{fault}", "print(sorted(p.name for p in path.parent.glob('*.tmp')), "
                                                 "flush=True); os.kill(os.getpid(), signal.SIGINT)")
FULL_DISK = FAULT_WHILE_VAL_IS_WRITTEN.replace("{fault}", "raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "
                                               "str(path))")


def prepared_again_with_a_fault(tmp_path, script):
    """A folder prepared once, then prepared again (another seed) by `script`, which faults on the way:
    -> (the corpus, the folder, its files as they were, the second run)."""
    src = write_jsonl(tmp_path / "d.jsonl", DOCS)
    out = prepare_data.prepare(dataset=str(src), out_dir=tmp_path / "out", val_fraction=0.3)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    r = subprocess.run([sys.executable, "-c", script.format(root=str(REPO)), "--dataset", str(src), "--out_dir",
                        str(out), "--seed", "1"], capture_output=True, text=True, timeout=120)
    return src, out, before, r


def test_ctrl_c_is_one_line_exit_130_and_leaves_no_partial_files(tmp_path):
    src, out, before, r = prepared_again_with_a_fault(tmp_path, INTERRUPTED)
    assert r.stdout.splitlines()[0] == "['train.bin.tmp', 'train_docs.npz.tmp', 'val.bin.tmp']"  # when it struck
    assert r.returncode == 130 and r.stderr == ("prepare_data.py: interrupted: no partial files are left, and a "
                                                "folder prepared before is as it was\n"), r.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the earlier preparation, whole
    r = subprocess.run([sys.executable, "-c", INTERRUPTED.format(root=str(REPO)), "--dataset", str(src), "--out_dir",
                        str(tmp_path / "new")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 130 and r.stderr.count("\n") == 1 and not list((tmp_path / "new").iterdir())


def test_a_full_disk_is_one_line_exit_2_and_leaves_no_partial_files(tmp_path):
    _, out, before, r = prepared_again_with_a_fault(tmp_path, FULL_DISK)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith(f"prepare_data.py: error: no space left on device writing {out / 'val_docs.npz.tmp'}")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the earlier preparation, whole


def test_ctrl_c_while_train_py_prepares_the_built_in_corpus_is_one_line(tmp_path, monkeypatch, capsys):
    import train

    def interrupted(**kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(prepare_data, "BUILT_IN", {tmp_path / "corpus": "char"})
    monkeypatch.setattr(prepare_data, "prepare", interrupted)
    with pytest.raises(SystemExit) as e:
        train.main(["--data", str(tmp_path / "corpus"), "--device", "cpu", "--out_dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert e.value.code == 130 and err == f"train.py: {prepare_data.INTERRUPTED}\n" and not (tmp_path / "o").exists()
