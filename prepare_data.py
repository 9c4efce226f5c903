"""
Turn a text corpus into what train.py reads: GPT-2 BPE tokens plus document boundaries.

    python prepare_data.py                                   # embedded Shakespeare -> data/shakespeare (offline)
    python prepare_data.py --dataset my_corpus.jsonl.gz      # local text/json/jsonl/parquet file, folder or glob
    python prepare_data.py --dataset roneneldan/TinyStories  # a Hugging Face hub dataset (needs the network)

Output, in <out_dir>:
    {train,val}.bin       every document of the split as [bos] + tokens, concatenated (numpy tofile, uint16)
    {train,val}_docs.npz  offsets (ndocs+1,) int64: doc i = tokens[offsets[i]:offsets[i+1]];
                          ids (ndocs,) int64: the doc's index in the source dataset
    titles.json           source records' "title" field, indexed by source id (only if the records have one)
    meta.json             tokenizer, counts and flags; written last, so a dir without it is unfinished
The split is by document (not by token), so a document's loss can be followed through training.
"""
import argparse
import base64
import functools
import glob
import gzip
import hashlib
import json
import os
import re
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).parent
DEFAULT_DATA_DIR = REPO / "data" / "shakespeare"
EMBEDDED_CORPUS = REPO / "assets" / "shakespeare.jsonl.gz"  # 8 plays cut into scenes, see assets/NOTICE.md
GPT2_RANKS = REPO / "assets" / "gpt2.tiktoken.gz"  # tiktoken's r50k_base ranks, vendored from openai-whisper
GPT2_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"  # of the uncompressed file
# GPT-2's pre-tokenizer regex, as tiktoken had it before it switched to possessive quantifiers (same splits)
GPT2_PAT_STR = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# local file types and the datasets builder for each; datasets decompresses .gz itself (parquet is compressed inside)
BUILDERS = {".txt": "text", ".md": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet",
            ".txt.gz": "text", ".md.gz": "text", ".json.gz": "json", ".jsonl.gz": "json"}


class DataError(ValueError):
    """Bad input. main() prints it as one line and exits with status 2."""


@functools.cache
def gpt2_encoding():
    """GPT-2 BPE: tiktoken's own (downloads once, then cached) or, offline, the same one from assets/."""
    import tiktoken

    try:
        return tiktoken.get_encoding("gpt2")
    except Exception:
        pass  # no network and no tiktoken cache: build the identical encoding from the vendored ranks
    raw = gzip.decompress(GPT2_RANKS.read_bytes())
    if hashlib.sha256(raw).hexdigest() != GPT2_SHA256:
        raise DataError(f"{GPT2_RANKS}: sha256 mismatch, the file is damaged; restore it from git")
    ranks = {base64.b64decode(tok): int(rank) for tok, rank in (line.split() for line in raw.splitlines() if line)}
    try:
        from tiktoken_ext.openai_public import r50k_pat_str as pat_str
    except ImportError:
        pat_str = GPT2_PAT_STR
    return tiktoken.Encoding(name="gpt2", pat_str=pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256}, explicit_n_vocab=50257)


def token_dtype(vocab_size):
    # 2 bytes a token while every id fits, which halves disk and memory; bigger vocabularies need 4
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def local_files(dataset):
    """The files a local --dataset names (file, folder or glob), and the datasets builder that reads them."""
    if any(c in dataset for c in "*?["):
        files = sorted(glob.glob(os.path.expanduser(dataset), recursive=True))
    elif Path(dataset).expanduser().is_dir():
        files = sorted(str(p) for p in Path(dataset).expanduser().rglob("*") if p.is_file() and kind(p))
    else:
        files = [os.path.expanduser(dataset)] if Path(dataset).expanduser().is_file() else []
    if not files:
        raise DataError(f"no such file, folder or matching files: {dataset!r}; check the path")
    kinds = {kind(f) for f in files}
    if None in kinds:
        bad = next(f for f in files if kind(f) is None)
        raise DataError(f"unknown file type {bad!r}; use .txt, .json, .jsonl (optionally .gz) or .parquet")
    if len(kinds) > 1:
        raise DataError(f"{dataset!r} mixes file types {sorted(kinds)}; point --dataset at one kind")
    return files, kinds.pop()


def kind(path):
    return next((b for ext, b in BUILDERS.items() if str(path).lower().endswith(ext)), None)


def looks_local(dataset):
    # a hub name is "name" or "owner/name"; anything path-like or with a file extension is meant to be local
    return (Path(dataset).expanduser().exists() or dataset.startswith((".", "/", "~")) or "\\" in dataset
            or dataset.count("/") > 1 or any(c in dataset for c in "*?[") or dataset.endswith(".gz")
            or kind(dataset) is not None)


def load_texts(dataset, text_field, split, sample_by, max_docs):
    """Source records -> (texts, titles or None); position in the lists is the document's source id."""
    if dataset is None:
        # our own jsonl.gz: read it directly, so the default path needs neither datasets nor its cache
        with gzip.open(EMBEDDED_CORPUS, "rt", encoding="utf-8") as f:
            records = [json.loads(line) for line in f][:max_docs]
        return pick(list(records[0]), lambda k: [r.get(k) for r in records], text_field, "embedded:shakespeare")
    files, builder = local_files(dataset) if looks_local(dataset) else (None, None)  # bad paths fail fast
    import datasets

    if files is None:
        try:
            ds = datasets.load_dataset(dataset, split=split)
        except Exception as e:
            raise DataError(f"could not load hub dataset {dataset!r} split {split!r} ({type(e).__name__}: {e}); "
                            "offline, pass a local file or folder instead") from e
        return pick_ds(ds, text_field, max_docs, dataset)
    kw = {"sample_by": sample_by} if builder == "text" else {}
    # quiet while reading local files (a failure comes back to us as one exception), then as it was;
    # a throwaway cache, as a local file can change under the same name, and nothing piles up in ~/.cache
    verbosity, bars = datasets.logging.get_verbosity(), datasets.is_progress_bar_enabled()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    datasets.disable_progress_bars()
    try:
        with tempfile.TemporaryDirectory() as cache:
            try:
                ds = datasets.load_dataset(builder, data_files=files, split="train", cache_dir=cache, **kw)
            except Exception as e:
                e = e.__cause__ or e  # datasets wraps the parser's error, which is the useful one
                raise DataError(f"could not read {dataset!r} as {builder}: {type(e).__name__}: {e}") from e
            return pick_ds(ds, text_field, max_docs, dataset)  # copies the columns out before the cache goes
    finally:
        datasets.logging.set_verbosity(verbosity)
        if bars:
            datasets.enable_progress_bars()


def pick_ds(ds, text_field, max_docs, dataset):
    if max_docs is not None:
        ds = ds.select(range(min(max_docs, len(ds))))
    return pick(ds.column_names, lambda k: list(ds[k]), text_field, dataset)


def pick(fields, column, text_field, dataset):
    if text_field not in fields:
        raise DataError(f"text_field {text_field!r} is not in the records of {dataset!r} (fields: {fields}); "
                        "pass --text_field with one of them")
    return column(text_field), (column("title") if "title" in fields else None)


def default_name(dataset):
    """data/<name>: a file's stem, a folder's name, a glob's fixed folder, a hub name's last part."""
    if dataset is None:
        return "shakespeare"
    name = Path(re.split(r"[*?[]", dataset)[0] or ".").name
    ext = next((ext for ext in BUILDERS if name.lower().endswith(ext)), "")
    return name[:len(name) - len(ext)] or "corpus"


def write_atomic(path, write):
    # write under a temporary name, then rename: a reader never sees half a file
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def write_npz(path, **arrays):
    # np.savez stamps the current time into the zip; a fixed date keeps reruns byte-identical
    with zipfile.ZipFile(path, "w") as zf:
        for name, a in arrays.items():
            with zf.open(zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0)), "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.ascontiguousarray(a), allow_pickle=False)


def prepare(dataset=None, out_dir=None, text_field="text", val_fraction=0.1, seed=1337, split="train",
            sample_by="document", max_docs=None):
    """Tokenize a corpus into out_dir (see the top of this file); returns out_dir."""
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if sample_by not in ("document", "paragraph", "line"):
        raise DataError(f"sample_by must be document, paragraph or line, got {sample_by!r}")
    if max_docs is not None and max_docs < 2:
        raise DataError(f"max_docs must be at least 2 (one train and one val document), got {max_docs}")
    if out_dir is None:
        out_dir = REPO / "data" / default_name(dataset)
    out_dir = Path(out_dir)
    texts, titles = load_texts(dataset, text_field, split, sample_by, max_docs)

    # empty documents would be a lone bos token: nothing to learn from, so drop them (and count them)
    keep = [i for i, t in enumerate(texts) if isinstance(t, str) and t.strip()]
    n_val = max(1, round(val_fraction * len(keep)))
    if len(keep) - n_val < 1:
        raise DataError(f"{len(keep)} non-empty document(s) cannot be split into train and val; "
                        "give a corpus with more documents (or --sample_by paragraph for one text file)")
    perm = np.random.default_rng(seed).permutation(len(keep))
    val_ids = sorted(keep[j] for j in perm[:n_val])  # sorted: within a split, source order
    train_ids = sorted(keep[j] for j in perm[n_val:])

    enc = gpt2_encoding()
    bos = enc.eot_token  # GPT-2 has one special token; at a document's start it makes token 1 a target
    dtype = token_dtype(enc.n_vocab)
    # encode_ordinary: "<|endoftext|>" written inside a text is just text, never a document boundary
    tokens = dict(zip(keep, enc.encode_ordinary_batch([texts[i] for i in keep])))

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "meta.json").unlink(missing_ok=True)  # the dir is unfinished until meta.json is back
    meta = {"tokenizer": "gpt2", "vocab_size": enc.n_vocab, "bos": bos, "eot": bos, "dtype": dtype.name,
            "source": "embedded:shakespeare" if dataset is None else dataset, "text_field": text_field,
            "val_fraction": val_fraction, "seed": seed, "sample_by": sample_by, "max_docs": max_docs,
            "source_docs": len(texts), "empty_docs_dropped": len(texts) - len(keep)}
    for name, ids in (("train", train_ids), ("val", val_ids)):
        docs = [np.array([bos] + tokens[i], dtype=dtype) for i in ids]
        offsets = np.zeros(len(docs) + 1, dtype=np.int64)
        np.cumsum([len(d) for d in docs], out=offsets[1:])
        write_atomic(out_dir / f"{name}.bin", lambda p: np.concatenate(docs).tofile(p))
        write_atomic(out_dir / f"{name}_docs.npz",
                     lambda p: write_npz(p, offsets=offsets, ids=np.array(ids, dtype=np.int64)))
        meta[name] = {"docs": len(docs), "tokens": int(offsets[-1])}
    if titles is not None:
        titles = ["" if t is None else str(t) for t in titles]
        write_atomic(out_dir / "titles.json", lambda p: p.write_text(json.dumps(titles) + "\n"))
        meta["titles"] = "titles.json"
    write_atomic(out_dir / "meta.json", lambda p: p.write_text(json.dumps(meta, indent=2) + "\n"))

    print(f"prepared {meta['source']} -> {out_dir}")
    for name in ("train", "val"):
        print(f"  {name:5s} {meta[name]['docs']:7,d} docs {meta[name]['tokens']:12,d} tokens")
    if meta["empty_docs_dropped"]:
        print(f"  dropped {meta['empty_docs_dropped']:,d} empty docs")
    return out_dir


def main(argv=None):
    p = argparse.ArgumentParser(prog="prepare_data.py", description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", default=None, help="hub dataset name, or a local text/json/jsonl/parquet file "
                   "(.gz ok except parquet), folder or glob; None means the embedded Shakespeare corpus")
    p.add_argument("--out_dir", default=None, help="where to write; None means data/<dataset name>")
    p.add_argument("--text_field", default="text", help="record field holding the document text")
    p.add_argument("--sample_by", default="document", choices=["document", "paragraph", "line"],
                   help="for plain-text files: what one document is")
    p.add_argument("--split", default="train", help="hub dataset split to read (local files have only train)")
    p.add_argument("--max_docs", type=int, default=None, help="use only the first N source documents; None means all")
    p.add_argument("--val_fraction", type=float, default=0.1, help="share of documents held out for val")
    p.add_argument("--seed", type=int, default=1337, help="seed of the document shuffle that picks val")
    args = p.parse_args(argv)
    try:
        prepare(**vars(args))
    except DataError as e:
        print(f"prepare_data.py: error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
