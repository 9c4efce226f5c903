"""
Turn a text corpus into what train.py reads: tokens (GPT-2 BPE, characters, or a pretrained checkpoint's own
tokenizer) plus document boundaries.

    python prepare_data.py                                   # embedded Shakespeare -> data/shakespeare (offline)
    python prepare_data.py --tokenizer char                  # the same, one token per character: train.py's default
    python prepare_data.py --dataset my_corpus.jsonl.gz      # local text/json/jsonl/parquet file, folder or glob,
    python prepare_data.py --dataset roneneldan/TinyStories  #   a Hugging Face hub dataset (needs the network),
    python prepare_data.py --dataset saved_dir               #   or a folder written by datasets' save_to_disk
    python prepare_data.py --tokenizer ckpt/Sheared-LLaMA-1.3B  # a checkpoint's own tokenizer, a folder or a hub
                                                             # name -> data/shakespeare-Sheared-LLaMA-1.3B

Output, in <out_dir>:
    {train,val}.bin       every document of the split as [bos] + tokens, concatenated (numpy tofile; uint16, or
                          uint32 for a vocabulary over 65536 such as Llama-3's)
    {train,val}_docs.npz  offsets (ndocs+1,) int64: doc i = tokens[offsets[i]:offsets[i+1]];
                          ids (ndocs,) int64: the doc's index in the source dataset; sources (ndocs,) int64, only
                          with --source_field or several files: the doc's source (web, code...), an index into
                          meta.json's "sources" (see sources.py)
    titles.json           source records' "title" field, indexed by source id (only if the records have one)
    meta.json             tokenizer, counts and flags; written last, so a dir without it is unfinished
The split is by document (not by token), so a document's loss can be followed through training.

--format instruct: Alpaca-style or chat records; one example = one document [bos] + prompt + response + [eos],
and {train,val}_mask.bin (uint8, 1 where a token is a target: the response) beside the tokens. See instruct.py.
"""
import argparse
import codecs
import errno
import functools
import gzip
import inspect
import itertools
import json
import os
import re
import shlex
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

import sources  # the files a --dataset names, and where each document came from
from sources import kind, local_files
from tokenization import DataError, DocTokenizer, load_tokenizer  # the tokenizers: tokenization.py

REPO = Path(__file__).parent
EMBEDDED_CORPUS = REPO / "assets" / "shakespeare.jsonl.gz"  # 8 plays cut into scenes, see assets/NOTICE.md
DEFAULT_DATA_DIR = REPO / "data" / "shakespeare-char"  # train.py's default: characters, fast on a CPU
BUILT_IN = {DEFAULT_DATA_DIR: "char", REPO / "data" / "shakespeare": "gpt2"}  # prepared on first use


def token_dtype(vocab_size):
    # 2 bytes a token while every id fits, which halves disk and memory; bigger vocabularies need 4
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def looks_local(dataset):
    # a hub name is "name" or "owner/name"; anything path-like or with a file extension is meant to be local
    return (Path(dataset).expanduser().exists() or dataset.startswith((".", "/", "~")) or "\\" in dataset
            or dataset.count("/") > 1 or any(c in dataset for c in "*?[") or dataset.endswith(".gz")
            or kind(dataset) is not None)


def bad_json_line(files):
    """'FILE line N: ...' for the first line of a .jsonl file that is not JSON, or None."""
    for f in (f for f in files if f.endswith((".jsonl", ".jsonl.gz"))):
        with (gzip.open if f.endswith(".gz") else open)(f, "rt", encoding="utf-8", errors="replace") as lines:
            for i, line in enumerate(lines, 1):
                try:
                    line.strip() and json.loads(line)
                except ValueError as e:
                    return f"{f} line {i} is not JSON ({e})"
    return None


def not_utf8(files, block=1 << 20):
    """'FILE is not UTF-8 at byte N ...' for the first file holding bytes that are not UTF-8, or None. The byte is
    counted in the whole file (datasets' position counts within a block), uncompressed for a .gz."""
    for f in files:
        decoder, at = codecs.getincrementaldecoder("utf-8")(), 0
        with (gzip.open if f.endswith(".gz") else open)(f, "rb") as data:
            for chunk in itertools.chain(iter(functools.partial(data.read, block), b""), [None]):
                held = len(decoder.getstate()[0])  # the first bytes of a character cut by the previous chunk
                try:
                    decoder.decode(chunk or b"", final=chunk is None)
                except UnicodeDecodeError as e:
                    return (f"{f} is not UTF-8 at byte {at - held + e.start} ({e.object[e.start]:#04x}): re-encode "
                            "it as UTF-8 (e.g. iconv -f LATIN1 -t UTF-8, with the encoding it is in)")
                at += len(chunk or b"")
    return None


def read_jsonl_gz(path):
    """The records of a vendored .jsonl.gz (assets/), read directly: no datasets, no cache."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def load_texts(dataset, text_field, split, sample_by, max_docs, records=False, source_field=None):
    """Source records -> (texts, titles or None, source labels or None); a document's source id is its position.
    records=True: the records themselves (a list of dicts) instead, for --format instruct."""
    if dataset is None and records:
        import instruct

        return instruct.demo_records(read_jsonl_gz(EMBEDDED_CORPUS))[:max_docs]
    if dataset is None:
        # our own jsonl.gz: read it directly, so the default path needs neither datasets nor its cache
        records = read_jsonl_gz(EMBEDDED_CORPUS)[:max_docs]
        return pick(list(records[0]), lambda k: [r.get(k) for r in records], text_field, "embedded:shakespeare",
                    source_field)
    saved = Path(dataset).expanduser()
    saved = saved if (saved / "state.json").is_file() or (saved / "dataset_dict.json").is_file() else None
    files, builder = local_files(dataset) if looks_local(dataset) and not saved else (None, None)  # bad paths fail fast
    import datasets

    if saved:  # a folder written by Dataset(Dict).save_to_disk: arrow files plus json metadata, not json data
        ds = datasets.load_from_disk(str(saved))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"{dataset!r} has splits {sorted(ds)}, not {split!r}: pass --split with one of them")
            ds = ds[split]
        return pick_ds(ds, text_field, max_docs, dataset, records, source_field)
    if files is None:
        try:
            ds = datasets.load_dataset(dataset, split=split)
        except Exception as e:
            raise DataError(f"could not load hub dataset {dataset!r} split {split!r} ({type(e).__name__}: {e}); "
                            "offline, pass a local file or folder instead") from e
        return pick_ds(ds, text_field, max_docs, dataset, records, source_field)
    kw = {"sample_by": sample_by} if builder == "text" else {}
    # quiet (a failure comes back to us as one exception); a throwaway cache, as a local file can change
    # under the same name, and nothing piles up in ~/.cache
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory() as cache:
        try:
            ds = sources.load_files(datasets, builder, files, cache_dir=cache, **kw)  # several: labelled by file
            # copies the columns out before the cache goes; json's strings are decoded only here
            return pick_ds(ds, text_field, max_docs, dataset, records, source_field)
        except DataError:
            raise
        except Exception as e:
            e = e.__cause__ or e  # datasets wraps the parser's error; its row numbers count within a block
            why = ("no records (an empty file?)" if isinstance(e, StopIteration) else
                   isinstance(e, UnicodeDecodeError) and not_utf8(files) or
                   builder == "json" and bad_json_line(files) or f"{type(e).__name__}: {e}")
            raise DataError(f"could not read {dataset!r} as {builder}: {why}") from e


def pick_ds(ds, text_field, max_docs, dataset, records=False, source_field=None):
    if max_docs is not None:
        ds = ds.select(range(min(max_docs, len(ds))))
    if records:
        return ds.to_list()
    return pick(ds.column_names, lambda k: list(ds[k]), text_field, dataset, source_field)


def pick(fields, column, text_field, dataset, source_field=None):
    if text_field not in fields:
        raise DataError(f"text_field {text_field!r} is not in the records of {dataset!r} (fields: {fields}); "
                        "pass --text_field with one of them")
    return column(text_field), (column("title") if "title" in fields else None), sources.labels(fields, column,
                                                                                                source_field, dataset)


def default_name(dataset):
    """data/<name>: a file's stem, a folder's name, a glob's fixed folder, a hub name's last part."""
    if dataset is None:
        return "shakespeare"
    name = Path(re.split(r"[*?[]", dataset)[0] or ".").name
    return sources.stem(name) or "corpus"


def stage(path, write, staged):
    # written under a temporary name, renamed into place with the others once all are written (prepare)
    tmp = path.with_name(path.name + ".tmp")
    staged.append((tmp, path))
    write(tmp)


def write_npz(path, **arrays):
    # np.savez stamps the current time into the zip; a fixed date keeps reruns byte-identical. An array None is left out
    with zipfile.ZipFile(path, "w") as zf:
        for name, a in ((name, a) for name, a in arrays.items() if a is not None):
            with zf.open(zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0)), "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.ascontiguousarray(a), allow_pickle=False)


def split_by_document(ids, val_fraction, seed, what, fix):
    """A seeded shuffle of the ids: val gets round(val_fraction * n) (at least 1), train the rest; in source order."""
    n_val = max(1, round(val_fraction * len(ids)))
    if len(ids) - n_val < 1:
        raise DataError(f"{len(ids)} {what} cannot be split into train and val; give {fix}")
    perm = np.random.default_rng(seed).permutation(len(ids))
    return sorted(ids[j] for j in perm[n_val:]), sorted(ids[j] for j in perm[:n_val])


def write_splits(out_dir, meta, tokens, dtype, train_ids, val_ids, masks, doc_sources, staged):
    """{split}.bin, {split}_docs.npz (and {split}_mask.bin for instruction data), staged; counts go into meta."""
    for name, ids in (("train", train_ids), ("val", val_ids)):
        docs = [np.array(tokens[i], dtype=dtype) for i in ids]
        offsets = np.zeros(len(docs) + 1, dtype=np.int64)
        np.cumsum([len(d) for d in docs], out=offsets[1:])
        stage(out_dir / f"{name}.bin", lambda p: np.concatenate(docs).tofile(p), staged)
        stage(out_dir / f"{name}_docs.npz", lambda p: write_npz(p, offsets=offsets, ids=np.array(ids, dtype=np.int64),
              sources=None if doc_sources is None else doc_sources[ids]), staged)
        meta[name] = {"docs": len(docs), "tokens": int(offsets[-1])}
        if masks is not None:
            stage(out_dir / f"{name}_mask.bin",
                  lambda p: np.concatenate([np.array(masks[i], dtype=np.uint8) for i in ids]).tofile(p), staged)
            meta[name]["targets"] = int(sum(sum(masks[i]) for i in ids))


def prepare(dataset=None, out_dir=None, text_field="text", val_fraction=0.1, seed=1337, split="train",
            sample_by="document", max_docs=None, tokenizer="gpt2", format="text", max_len=512, chat_template=False,
            source_field=None):
    """Tokenize a corpus into out_dir (see the top of this file); returns out_dir.
    tokenizer: "gpt2", a checkpoint folder or hub name (see load_tokenizer), or a DocTokenizer.
    format: "text" (documents) or "instruct" (instruction/response examples, see instruct.py).
    source_field: the record field naming each document's source; None: with several files, the file (sources.py)."""
    if format not in ("text", "instruct"):
        raise DataError(f"format must be text or instruct, got {format!r}")
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if sample_by not in ("document", "paragraph", "line"):
        raise DataError(f"sample_by must be document, paragraph or line, got {sample_by!r}")
    if max_docs is not None and max_docs < 2:
        raise DataError(f"max_docs must be at least 2 (one for train and one for val), got {max_docs}")
    if format == "instruct" and max_len < 2:
        raise DataError(f"max_len must be at least 2 (bos and one response token), got {max_len}")
    tok = tokenizer if isinstance(tokenizer, DocTokenizer) else load_tokenizer(tokenizer)  # bad names fail fast
    if out_dir is None:
        # another tokenizer's tokens go elsewhere: data/shakespeare-Sheared-LLaMA-1.3B beside data/shakespeare
        suffix = "" if tok.name == "gpt2" else "-" + Path(tok.name).name
        out_dir = REPO / "data" / (default_name(dataset) + ("-instruct" if format == "instruct" else "") + suffix)
    out_dir = Path(out_dir)
    if format == "instruct":
        import instruct  # records -> prompt + response documents and their masks

        records = load_texts(dataset, None, split, "document", max_docs, records=True)
        info, tokens, masks, titles = instruct.documents(records, dataset, tok, max_len, chat_template)
        labels = sources.record_labels(records, source_field, dataset)
        what, fix = "usable example(s)", "more examples"
    else:
        info, tokens, masks, titles, labels = text_documents(dataset, text_field, split, sample_by, max_docs, tok,
                                                             source_field)
        what, fix = "non-empty document(s)", "a corpus with more documents (or --sample_by paragraph for one text file)"
    train_ids, val_ids = split_by_document(sorted(tokens), val_fraction, seed, what, fix)
    top = max(max(ids) for ids in tokens.values())
    if top >= tok.vocab_size:  # an added token beyond the model's embedding table would crash training later
        raise DataError(f"tokenizer {tok.name!r} produced id {top} but the model's vocab_size is {tok.vocab_size}")

    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tok.vocab_size)
    names, doc_sources = sources.index(labels)  # each source id's index into the names, or None: no sources
    meta = {"tokenizer": tok.name, "tokenizer_fingerprint": tok.fingerprint, "vocab_size": tok.vocab_size,
            "tokenizer_source": tok.source,  # where train.py's export loads it again
            "bos": tok.bos, "eot": tok.eos, "dtype": dtype.name, **info, "val_fraction": val_fraction, "seed": seed,
            "max_docs": max_docs, "source_field": source_field, "sources": names}
    # every file is written under a temporary name first: a folder prepared before stays whole until the new one is
    # complete, and an interrupted run (Ctrl-C, a full disk) leaves no partial file behind
    staged = []
    try:
        write_splits(out_dir, meta, tokens, dtype, train_ids, val_ids, masks, doc_sources, staged)
        if titles is not None:
            titles = ["" if t is None else str(t) for t in titles]
            stage(out_dir / "titles.json", lambda p: p.write_text(json.dumps(titles) + "\n"), staged)
            meta["titles"] = "titles.json"
        stage(out_dir / "meta.json", lambda p: p.write_text(json.dumps(meta, indent=2) + "\n"), staged)
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise
    for old in ("meta.json", "titles.json"):  # the dir is unfinished until meta.json is back, renamed last
        (out_dir / old).unlink(missing_ok=True)
    for tmp, path in staged:
        os.replace(tmp, path)

    print(f"prepared {meta['source']} -> {out_dir}")
    unit = "examples" if masks else "docs"
    for name in ("train", "val"):
        targets = f" {meta[name]['targets']:12,d} targets" if masks else ""
        print(f"  {name:5s} {meta[name]['docs']:7,d} {unit} {meta[name]['tokens']:12,d} tokens{targets}")
    if masks:
        print(f"  truncated {meta['truncated']:,d} examples to --max_len {max_len}, dropped {meta['dropped']:,d}")
    elif meta["empty_docs_dropped"]:
        print(f"  dropped {meta['empty_docs_dropped']:,d} empty docs")
    if names:  # the documents kept of each source, both splits
        counts = np.bincount(doc_sources[sorted(tokens)], minlength=len(names))
        print(f"  {len(names)} sources: " + ", ".join(f"{name} {c:,d} {unit}" for name, c in zip(names[:10], counts))
              + ", ..." * (len(names) > 10))
    return out_dir


def ensure_prepared(data_dir, processes=1):
    """train.py's --data: a built-in corpus (BUILT_IN) is prepared on first use; any other folder must be ready."""
    if data_dir.is_file():  # a corpus itself, not the folder prepare_data.py makes of it
        out = Path("data") / default_name(str(data_dir))
        one_text = " --sample_by paragraph" if kind(data_dir) == "text" else ""  # one document would not split
        fix = (f"prepare it first with python prepare_data.py --dataset {shlex.quote(str(data_dir))}{one_text} "
               f"--out_dir {shlex.quote(str(out))}, then pass --data {shlex.quote(str(out))}" if kind(data_dir) else
               "pass the folder that prepare_data.py wrote (its --out_dir)")
        raise FileNotFoundError(f"--data {data_dir} is a file, not a folder of prepared data: {fix}")
    if not (data_dir / "meta.json").exists():
        tokenizer = next((t for d, t in BUILT_IN.items() if d.resolve() == data_dir.resolve()), None)
        if tokenizer is None:
            raise FileNotFoundError(f"no prepared data in {data_dir} (meta.json missing): run "
                                    f"python prepare_data.py --dataset YOUR_DATA --out_dir {data_dir}")
        if processes > 1:  # several processes would write the same files at once
            raise FileNotFoundError(f"{data_dir} is not prepared yet: run python prepare_data.py --tokenizer "
                                    f"{tokenizer} once, then torchrun")
        prepare(tokenizer=tokenizer, out_dir=data_dir)
    return data_dir


def read_split(data_dir, split):
    """A prepared split, checked: (meta, tokens, document offsets, source ids, target mask or None, document sources
    or None: indices into meta["sources"]). Every file must be there and agree with the others, so that a folder
    damaged after it was written (a file cut short, lost, or copied from another preparation) is one line at load
    time, not an index error hundreds of steps into training."""
    try:
        meta = json.loads((data_dir / "meta.json").read_text())
    except ValueError as e:  # not JSON (or not UTF-8): no command to repeat can be read from it
        raise DataError(f"{data_dir / 'meta.json'} is damaged ({e}): prepare {data_dir} again with prepare_data.py "
                        "(--out_dir, with the --dataset and flags that wrote it)") from None
    again = f"prepare it again with {prepare_command(meta, data_dir)}"
    names = [f"{split}.bin", f"{split}_docs.npz"] + [f"{split}_mask.bin"] * (meta.get("format") == "instruct")
    bins, npz, *masks = paths = [data_dir / name for name in names]
    missing = next((path for path in paths if not path.is_file()), None)
    if missing:
        raise DataError(f"{missing} is missing, {data_dir} is incomplete: {again}")
    dtype = np.dtype(meta["dtype"])
    if bins.stat().st_size % dtype.itemsize:  # cut short mid-token: numpy's error would not say which file
        raise DataError(f"{bins} is not a whole number of {dtype} tokens (cut short?): {again}")
    tokens, mask = mapped(bins, dtype), mapped(masks[0], np.uint8) if masks else None
    try:
        with np.load(npz) as docs:
            offsets, ids, doc_sources = docs["offsets"], docs["ids"], docs.get("sources")  # sources: not always
    except Exception as e:  # not a zip, cut short, arrays missing
        raise DataError(f"{npz} is damaged ({type(e).__name__}: {e}): {again}") from None
    if len(offsets) != len(ids) + 1 or offsets[0] != 0 or (np.diff(offsets) < 0).any():
        raise DataError(f"{npz} is damaged (its offsets do not rise from 0 or are not one more than its {len(ids)} "
                        f"ids): {again}")
    if offsets[-1] != len(tokens):  # a file cut short by whole tokens, or the files of two preparations
        raise DataError(f"{bins} holds {len(tokens)} tokens but the documents of {npz.name} end at token "
                        f"{offsets[-1]} (cut short, or from another preparation): {again}")
    if mask is not None and len(mask) != len(tokens):
        raise DataError(f"{masks[0]} has {len(mask)} entries for the {len(tokens)} tokens of {bins.name}: {again}")
    sources.check(meta.get("sources"), doc_sources, len(ids), npz, again)
    return meta, tokens, offsets, ids, mask, doc_sources


def mapped(path, dtype):
    # mapped, not read: a large split costs no memory until used (numpy cannot map an empty file)
    return np.memmap(path, dtype=dtype, mode="r") if path.stat().st_size else np.zeros(0, dtype)


def prepare_command(meta, out_dir):
    """The prepare_data.py command that writes out_dir again as its meta.json describes it: prepare()'s
    arguments that differ from their defaults."""
    source = meta.get("source", "")
    given = dict(dataset=None if source.startswith("embedded:") else source, format=meta.get("format"),
                 tokenizer=meta.get("tokenizer_source") or meta.get("tokenizer"), text_field=meta.get("text_field"),
                 sample_by=meta.get("sample_by"), max_docs=meta.get("max_docs"), max_len=meta.get("max_len"),
                 val_fraction=meta.get("val_fraction"), seed=meta.get("seed"),
                 chat_template=meta.get("template") == "chat_template", source_field=meta.get("source_field"))
    defaults = {k: p.default for k, p in inspect.signature(prepare).parameters.items()}
    flags = [f"--{k}" if v is True else f"--{k} {shlex.quote(str(v))}" for k, v in given.items()
             if v is not None and v != defaults[k]]
    return " ".join(["python prepare_data.py", *flags, "--out_dir", shlex.quote(str(out_dir))])


def text_documents(dataset, text_field, split, sample_by, max_docs, tok, source_field=None):
    """Source documents -> (meta entries, {source id: [bos] + tokens}, no masks, titles or None, labels or None)."""
    texts, titles, labels = load_texts(dataset, text_field, split, sample_by, max_docs, source_field=source_field)
    # empty documents would be a lone bos token: nothing to learn from, so drop them (and count them)
    keep = [i for i, t in enumerate(texts) if isinstance(t, str) and t.strip()]
    # each document as [bos] + tokens (GPT-2: <|endoftext|>); the bos makes the first real token a target too
    tokens = dict(zip(keep, tok.encode_batch([texts[i] for i in keep]))) if keep else {}
    info = {"source": "embedded:shakespeare" if dataset is None else dataset, "text_field": text_field,
            "sample_by": sample_by, "source_docs": len(texts), "empty_docs_dropped": len(texts) - len(keep)}
    return info, tokens, None, titles, labels


def main(argv=None):
    p = argparse.ArgumentParser(prog="prepare_data.py", description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", default=None, help="hub dataset name, or a local text/json/jsonl/parquet file "
                   "(.gz ok except parquet), folder, glob or save_to_disk folder; None: the embedded Shakespeare")
    p.add_argument("--out_dir", default=None, help="where to write; None means data/<dataset name>")
    p.add_argument("--text_field", default="text", help="record field holding the document text")
    p.add_argument("--source_field", default=None, help="record field naming each document's source (web, code...), "
                   "for plot.py's weight share per source; None: with several files, the file each came from")
    p.add_argument("--sample_by", default="document", choices=["document", "paragraph", "line"], help="text files: a doc is")
    p.add_argument("--split", default="train", help="hub dataset split to read (local files have only train)")
    p.add_argument("--max_docs", type=int, default=None, help="use only the first N source documents; None means all")
    p.add_argument("--val_fraction", type=float, default=0.1, help="share of documents held out for val")
    p.add_argument("--seed", type=int, default=1337, help="seed of the document shuffle that picks val")
    p.add_argument("--tokenizer", default="gpt2", help="gpt2 (tiktoken, offline), or the tokenizer of a pretrained "
                   "checkpoint: its local folder, or its hub name (downloads only the tokenizer files)")
    p.add_argument("--format", default="text", choices=["text", "instruct"], help="text: documents; instruct: "
                   "instruction/response records (Alpaca-style or chat messages), loss on the response only; "
                   "with no --dataset, a small instruction set built from the embedded Shakespeare scenes")
    p.add_argument("--max_len", type=int, default=512, help="instruct: most tokens per example, bos..eos; longer "
                   "prompts are cut from the left, then over-long responses at the end")
    p.add_argument("--chat_template", action="store_true", help="instruct: render prompts with the checkpoint's "
                   "own chat template (tokenizer_config.json) instead of our plain ### template")
    args = p.parse_args(argv)
    try:
        prepare(**vars(args))
    except DataError as e:
        print(f"prepare_data.py: error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C: prepare() has removed what it had begun to write
        print(f"prepare_data.py: {INTERRUPTED}", file=sys.stderr)
        sys.exit(130)  # 128 + SIGINT, as a shell reports a process that SIGINT ended
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        print(f"prepare_data.py: error: {no_space(e)}", file=sys.stderr)
        sys.exit(2)


INTERRUPTED = "interrupted: no partial files are left, and a folder prepared before is as it was"


def no_space(e):
    """The one line of a full disk while preparing (prepare() has removed what it had begun to write)."""
    where = f" writing {e.filename}" if e.filename else ""
    return (f"no space left on device{where}: no partial files are left, and a folder prepared before is as it was; "
            "free some space, or choose another --out_dir")


if __name__ == "__main__":
    main()
