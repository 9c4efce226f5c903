"""
Turn a text corpus into what train.py reads: tokens (GPT-2 BPE, or a pretrained checkpoint's own tokenizer)
plus document boundaries.

    python prepare_data.py                                   # embedded Shakespeare -> data/shakespeare (offline)
    python prepare_data.py --dataset my_corpus.jsonl.gz      # local text/json/jsonl/parquet file, folder or glob
    python prepare_data.py --dataset roneneldan/TinyStories  # a Hugging Face hub dataset (needs the network)
    python prepare_data.py --tokenizer ckpt/Sheared-LLaMA-1.3B  # a checkpoint's own tokenizer (local folder)
                                                             #   -> data/shakespeare-Sheared-LLaMA-1.3B
    python prepare_data.py --tokenizer facebook/opt-125m     # hub name: downloads its tokenizer files only

Output, in <out_dir>:
    {train,val}.bin       every document of the split as [bos] + tokens, concatenated (numpy tofile; uint16, or
                          uint32 for a vocabulary over 65536 such as Llama-3's)
    {train,val}_docs.npz  offsets (ndocs+1,) int64: doc i = tokens[offsets[i]:offsets[i+1]];
                          ids (ndocs,) int64: the doc's index in the source dataset
    titles.json           source records' "title" field, indexed by source id (only if the records have one)
    meta.json             tokenizer, counts and flags; written last, so a dir without it is unfinished
The split is by document (not by token), so a document's loss can be followed through training.

--format instruct: instruction tuning data (Alpaca-style `instruction`/`input`/`output` records, or chat
`messages`); each example is one document [bos] + prompt + response + [eos], and beside the tokens
    {train,val}_mask.bin  uint8, one byte a token: 1 where the token is a target (response tokens and the closing
                          eos), 0 for the bos and the prompt; train.py then computes the loss on the response only
See instruct_prompt() for the template and truncate() for the --max_len rule.
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


# ---- tokenizers: GPT-2 (tiktoken, above) or a pretrained checkpoint's own
#
# A checkpoint must see the ids of its own tokenizer, exactly as `transformers.AutoTokenizer` gives them (that is
# also what lm-evaluation-harness feeds it), so a folder's tokenizer is rebuilt here the way transformers 5 builds it,
# with the `tokenizers` package (the Rust library inside AutoTokenizer), not with transformers itself:
#   tokenizer.json          loaded as is, its post-processor says whether a bos is added;
#   vocab.json + merges.txt GPT-2 / OPT byte-level BPE, a bos only if tokenizer_config.json has add_bos_token: true
#                           (OPT's has: it starts each text with </s> = 2; GPT-2's HF tokenizer adds nothing);
#   tokenizer.model         sentencepiece (LLaMA-1/2, Sheared-LLaMA): its pieces become a byte-fallback BPE, as
#                           transformers 5 converts it; a bos (<s> = 1) unless add_bos_token: false (where the
#                           key is missing, transformers 5 adds none, but a LLaMA model expects its <s>).
# LLaMA's sentencepiece-style tokenizers (tokenizer_class LlamaTokenizer) get transformers 5's pre-tokenizer in
# every case: spaces -> "▁" and one "▁" in front of the text unless it starts with a space (prepend_scheme
# "first"; a legacy: true config prepends after special tokens too), no normalizer; a tokenizer.json's own
# normalizer is ignored, as transformers 5 ignores it. (sentencepiece itself, and transformers 4, put "▁▁" before a
# text that starts with a space; texts that don't start with one get the same ids everywhere.)
# Special tokens written inside a text ("</s>", "<|endoftext|>") are parsed as the special token, because
# AutoTokenizer does that by default; the default GPT-2 path keeps tiktoken's encode_ordinary (plain text), as before.
# Our format starts every document with one bos: the one the tokenizer adds, or, where it adds none (GPT-2), its eos.
# A trailing eos that a tokenizer may add (add_eos_token) is left out: the bos alone marks where a document starts.
TOKENIZER_FILES = ["tokenizer.json", "vocab.json", "merges.txt", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json", "config.json"]
NAMED_SPECIALS = ["bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"]
# the fingerprint of GPT-2's own vocabulary with bos 50256: an HF GPT-2 folder is then interchangeable with "gpt2"
GPT2_HF_FINGERPRINT = "434bbe7089eae415"


class DocTokenizer:
    """What prepare() and train.py need of a tokenizer: whole documents -> ids, each starting with `bos`.
    fingerprint: a short hash of the token -> id mapping (special and added tokens included) and of the bos,
    so that data can be matched to a model; "gpt2" for GPT-2's."""

    def __init__(self, name, fingerprint, vocab_size, bos, eos, encode_batch, decode):
        self.name, self.fingerprint, self.vocab_size, self.bos, self.eos = name, fingerprint, vocab_size, bos, eos
        self._encode_batch = encode_batch  # texts -> ids without the bos
        self.decode = decode  # ids -> text, special tokens included

    def encode(self, text):
        return self.encode_batch([text])[0]

    def encode_batch(self, texts):
        return [[self.bos] + ids for ids in self._encode_batch(list(texts))]

    def __repr__(self):
        return (f"DocTokenizer({self.name!r}, vocab_size={self.vocab_size}, bos={self.bos}, eos={self.eos}, "
                f"fingerprint={self.fingerprint!r})")


def load_tokenizer(name_or_dir="gpt2"):
    """"gpt2": GPT-2 BPE via tiktoken (offline, vendored); else a folder with a checkpoint's tokenizer files, or a
    Hugging Face hub name whose tokenizer files are downloaded (only those)."""
    if name_or_dir == "gpt2":
        enc = gpt2_encoding()
        # encode_ordinary: "<|endoftext|>" written inside a text is just text, never a document boundary
        return DocTokenizer("gpt2", "gpt2", enc.n_vocab, enc.eot_token, enc.eot_token, enc.encode_ordinary_batch,
                           enc.decode)
    path = Path(name_or_dir).expanduser()
    if path.is_dir():
        return hf_tokenizer(path, path.resolve().name)
    return hf_tokenizer(hub_snapshot(str(name_or_dir)), str(name_or_dir))


def hub_snapshot(name):
    """A hub name (name or owner/name) -> a local folder with its tokenizer files (and config.json), downloaded."""
    path = Path(name).expanduser()
    hub_name = re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) and not name.startswith(".")
    if path.exists() or not hub_name:
        raise DataError(f"tokenizer {name!r} is neither a folder nor a hub name; pass a checkpoint folder holding "
                        "tokenizer.json, vocab.json + merges.txt or tokenizer.model")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, allow_patterns=TOKENIZER_FILES + ["chat_template.jinja"]))
    except Exception as e:  # offline, no such repo, gated, ...: one message, as the fix is the same
        raise DataError(f"could not download the tokenizer of {name!r} from the Hugging Face hub "
                        f"({type(e).__name__}); download the checkpoint where there is a network and pass its "
                        "local folder to --tokenizer") from e


def read_json(path):
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except ValueError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from e


def hf_tokenizer(folder, name):
    """A checkpoint folder's tokenizer, built as transformers 5's AutoTokenizer builds it (see the notes above)."""
    try:
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    except ImportError as e:
        raise DataError("a checkpoint's tokenizer needs the tokenizers package: pip install tokenizers") from e
    cfg = read_json(folder / "tokenizer_config.json")
    for key, value in read_json(folder / "special_tokens_map.json").items():
        if key in NAMED_SPECIALS or key == "additional_special_tokens":
            cfg[key] = value  # as in transformers: special_tokens_map.json has the last word on these
    model_cfg = read_json(folder / "config.json")
    cls = str(cfg.get("tokenizer_class") or model_cfg.get("tokenizer_class") or "").removesuffix("Fast")
    files = {f: folder / f for f in TOKENIZER_FILES if (folder / f).is_file()}

    try:
        if "tokenizer.json" in files:
            text = files["tokenizer.json"].read_text(encoding="utf-8")
            tok = Tokenizer.from_str(text)
            # Llama-3 style (byte-level BPE, though the class may say LlamaTokenizer) is used as the file says
            llama = cls == "LlamaTokenizer" and '"ByteLevel"' not in text
            add_bos = None  # the file's post-processor decides (transformers 5 ignores add_bos_token here)
        elif "vocab.json" in files and "merges.txt" in files:
            # byte-level BPE configured like transformers' GPT2Tokenizer (which OPT uses too)
            tok = Tokenizer(models.BPE.from_file(str(files["vocab.json"]), str(files["merges.txt"]), dropout=None,
                                                 continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=bool(cfg.get("add_prefix_space", False)))
            tok.decoder = decoders.ByteLevel()
            llama, add_bos, cls = False, bool(cfg.get("add_bos_token", False)), "GPT2Tokenizer"
        elif "tokenizer.model" in files:
            tok = sentencepiece_tokenizer(files["tokenizer.model"])
            llama, add_bos = True, bool(cfg.get("add_bos_token", True))
        else:
            raise DataError(f"{folder} holds no tokenizer.json, vocab.json + merges.txt or tokenizer.model; "
                            "pass the folder of a Hugging Face checkpoint")
    except DataError:
        raise
    except Exception as e:  # a damaged or foreign file: say which folder, in one line
        raise DataError(f"{folder}: could not read its tokenizer files ({type(e).__name__}: {e})") from e
    if llama:
        # transformers 5's LlamaTokenizer: no normalizer, spaces -> "▁", one "▁" in front (see the notes above)
        prepend = "never" if cfg.get("add_prefix_space") is False else "always" if cfg.get("legacy") else "first"
        tok.normalizer = None
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prepend, split=False)
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(content=" ", left=1 if prepend != "never" else 0)])

    # special tokens: the config's added tokens at their ids, then the named ones (bos, eos, unk, pad, ...),
    # which then count as special tokens inside a text too, as in transformers
    # (with the defaults of the tokenizer classes transformers would use)
    defaults = ("<s>", "</s>", "<unk>") if llama else ("<|endoftext|>",) * 3 if cls == "GPT2Tokenizer" else ()
    for key, value in zip(("bos_token", "eos_token", "unk_token"), defaults):
        cfg.setdefault(key, value)
    added = tok.get_added_tokens_decoder()
    have = {t.content for t in added.values()}
    for i, spec in sorted(((int(i), t) for i, t in (cfg.get("added_tokens_decoder") or {}).items())):
        if spec["content"] not in have:
            tok.add_tokens([added_token(AddedToken, spec, special=spec.get("special", False))])
        if tok.token_to_id(spec["content"]) != i:
            raise DataError(f"{folder}: added token {spec['content']!r} should have id {i} but gets "
                            f"{tok.token_to_id(spec['content'])}; the tokenizer files disagree")
    extra = cfg.get("additional_special_tokens") or cfg.get("extra_special_tokens") or []
    for spec in [cfg.get(k) for k in NAMED_SPECIALS] + (list(extra) if isinstance(extra, list) else []):
        content = spec.get("content") if isinstance(spec, dict) else spec
        if content and content not in {t.content for t in tok.get_added_tokens_decoder().values()}:
            tok.add_special_tokens([added_token(AddedToken, spec, special=True)])

    def token_id(key):
        spec = cfg.get(key)
        content = spec.get("content") if isinstance(spec, dict) else spec
        return None if content is None else tok.token_to_id(content)

    eos = token_id("eos_token")
    if add_bos is None:  # what the post-processor puts in front of a text
        plain = tok.encode("a", add_special_tokens=False).ids
        full = tok.encode("a", add_special_tokens=True).ids
        prefix = next(full[:k] for k in range(len(full) - len(plain) + 1) if full[k:k + len(plain)] == plain)
        if len(prefix) > 1:
            raise DataError(f"{folder}: the tokenizer puts {len(prefix)} tokens before a text, not one bos")
    else:
        prefix = [token_id("bos_token")] if add_bos else []
    bos = prefix[0] if prefix else eos  # no bos added (GPT-2): the eos starts each document, as for "gpt2"
    if bos is None:
        raise DataError(f"{folder}: cannot tell which token starts a document (no bos is added and no eos_token "
                        "is known); add bos_token/eos_token to tokenizer_config.json")

    vocab = tok.get_vocab(with_added_tokens=True)
    vocab_size = int(model_cfg.get("vocab_size") or tok.get_vocab_size(with_added_tokens=True))
    mapping = json.dumps([bos, sorted((i, t) for t, i in vocab.items())], ensure_ascii=False)
    fingerprint = hashlib.sha256(mapping.encode()).hexdigest()[:16]
    fingerprint = "gpt2" if fingerprint == GPT2_HF_FINGERPRINT else fingerprint
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # _fast: skips the offsets we don't need
    return DocTokenizer(name, fingerprint, vocab_size, bos, eos,
                        lambda texts: [e.ids for e in encode(texts, add_special_tokens=False)],
                        lambda ids: tok.decode(list(ids), skip_special_tokens=False))


def added_token(AddedToken, spec, special):
    if isinstance(spec, str):  # a bare string in a config is a special token that is matched as written
        return AddedToken(spec, special=special, normalized=False)
    keys = ("single_word", "lstrip", "rstrip", "normalized")
    return AddedToken(spec["content"], special=special, **{k: spec[k] for k in keys if k in spec})


def sentencepiece_tokenizer(path):
    """A sentencepiece BPE model (tokenizer.model) -> a `tokenizers` byte-fallback BPE with the same pieces and ids,
    and its control / user-defined pieces as added tokens; the merges come from the vocabulary as in transformers 5
    (every split of a piece into two pieces, ordered by the merged piece's id)."""
    from tokenizers import AddedToken, Tokenizer, models

    try:
        import sentencepiece
    except ImportError as e:
        raise DataError(f"{path} needs the sentencepiece package: pip install sentencepiece") from e
    sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    types, model_type = spm_piece_types(path.read_bytes())
    if model_type != 2:
        raise DataError(f"{path} is a sentencepiece unigram model; only BPE models (LLaMA's kind) are supported: "
                        "pass a folder with the tokenizer.json that transformers saves for it")
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    merges = []
    for piece, i in vocab.items():
        pairs = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
        merges += [(a, b, i) for a, b in sorted(pairs, key=lambda p: (vocab[p[0]], vocab[p[1]]))]
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(a, b) for a, b, _ in merges], fuse_unk=True,
                               byte_fallback=True, dropout=None))
    tok.add_tokens([AddedToken(sp.id_to_piece(i), special=t == 3, normalized=False)
                    for i, t in enumerate(types) if t in (3, 4)])  # 3 control (<s>, </s>), 4 user-defined
    return tok


def spm_piece_types(model):
    """sentencepiece's ModelProto, read off the protobuf wire format (protobuf is not a dependency and
    sentencepiece's API does not tell user-defined pieces apart): the type of each piece (1 normal, 2 unknown,
    3 control, 4 user-defined, 5 unused, 6 byte) and the model type (1 unigram, 2 BPE)."""
    def fields(buf):
        i = 0
        while i < len(buf):
            key, i = varint(buf, i)
            wire = key & 7
            if wire == 0:
                value, i = varint(buf, i)
            elif wire == 2:
                n, i = varint(buf, i)
                value, i = buf[i:i + n], i + n
            elif wire in (1, 5):
                value, i = None, i + (8 if wire == 1 else 4)
            else:
                raise DataError("tokenizer.model is not a sentencepiece model")
            yield key >> 3, value

    def varint(buf, i):
        value = shift = 0
        while True:
            value |= (buf[i] & 0x7F) << shift
            shift += 7
            i += 1
            if buf[i - 1] < 0x80:
                return value, i

    types, model_type = [], 1
    for field, value in fields(model):
        if field == 1:  # pieces: {1: piece, 2: score, 3: type (default normal)}
            types.append(next((v for f, v in fields(value) if f == 3), 1))
        elif field == 2:  # trainer_spec: {3: model_type (default unigram)}
            model_type = next((v for f, v in fields(value) if f == 3), 1)
    return types, model_type


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


def read_jsonl_gz(path):
    """The records of a vendored .jsonl.gz (assets/), read directly: no datasets, no cache."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def load_texts(dataset, text_field, split, sample_by, max_docs, records=False):
    """Source records -> (texts, titles or None); position in the lists is the document's source id.
    records=True: the records themselves (a list of dicts) instead, for --format instruct."""
    if dataset is None and records:
        return demo_instruct_records()[:max_docs]
    if dataset is None:
        # our own jsonl.gz: read it directly, so the default path needs neither datasets nor its cache
        records = read_jsonl_gz(EMBEDDED_CORPUS)[:max_docs]
        return pick(list(records[0]), lambda k: [r.get(k) for r in records], text_field, "embedded:shakespeare")
    files, builder = local_files(dataset) if looks_local(dataset) else (None, None)  # bad paths fail fast
    import datasets

    if files is None:
        try:
            ds = datasets.load_dataset(dataset, split=split)
        except Exception as e:
            raise DataError(f"could not load hub dataset {dataset!r} split {split!r} ({type(e).__name__}: {e}); "
                            "offline, pass a local file or folder instead") from e
        return pick_ds(ds, text_field, max_docs, dataset, records)
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
            return pick_ds(ds, text_field, max_docs, dataset, records)  # copies the columns out before the cache goes
    finally:
        datasets.logging.set_verbosity(verbosity)
        if bars:
            datasets.enable_progress_bars()


def pick_ds(ds, text_field, max_docs, dataset, records=False):
    if max_docs is not None:
        ds = ds.select(range(min(max_docs, len(ds))))
    if records:
        return ds.to_list()
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


def split_by_document(ids, val_fraction, seed, what, fix):
    """A seeded shuffle of the source ids: val gets round(val_fraction * n) of them (at least 1), train the
    rest; each split keeps source order."""
    n_val = max(1, round(val_fraction * len(ids)))
    if len(ids) - n_val < 1:
        raise DataError(f"{len(ids)} {what} cannot be split into train and val; give {fix}")
    perm = np.random.default_rng(seed).permutation(len(ids))
    return sorted(ids[j] for j in perm[n_val:]), sorted(ids[j] for j in perm[:n_val])


def write_splits(out_dir, meta, tokens, dtype, train_ids, val_ids, masks=None):
    """{split}.bin, {split}_docs.npz (and {split}_mask.bin for instruction data); counts go into meta."""
    for name, ids in (("train", train_ids), ("val", val_ids)):
        docs = [np.array(tokens[i], dtype=dtype) for i in ids]
        offsets = np.zeros(len(docs) + 1, dtype=np.int64)
        np.cumsum([len(d) for d in docs], out=offsets[1:])
        write_atomic(out_dir / f"{name}.bin", lambda p: np.concatenate(docs).tofile(p))
        write_atomic(out_dir / f"{name}_docs.npz",
                     lambda p: write_npz(p, offsets=offsets, ids=np.array(ids, dtype=np.int64)))
        meta[name] = {"docs": len(docs), "tokens": int(offsets[-1])}
        if masks is not None:
            write_atomic(out_dir / f"{name}_mask.bin",
                         lambda p: np.concatenate([np.array(masks[i], dtype=np.uint8) for i in ids]).tofile(p))
            meta[name]["targets"] = int(sum(sum(masks[i]) for i in ids))


def prepare(dataset=None, out_dir=None, text_field="text", val_fraction=0.1, seed=1337, split="train",
            sample_by="document", max_docs=None, tokenizer="gpt2", format="text", max_len=512, chat_template=False):
    """Tokenize a corpus into out_dir (see the top of this file); returns out_dir.
    tokenizer: "gpt2", a checkpoint folder or hub name (see load_tokenizer), or a DocTokenizer.
    format: "text" (documents) or "instruct" (instruction/response examples, see prepare_instruct)."""
    if format == "instruct":
        return prepare_instruct(dataset, out_dir, val_fraction, seed, split, max_docs, tokenizer, max_len,
                                chat_template)
    if format != "text":
        raise DataError(f"format must be text or instruct, got {format!r}")
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if sample_by not in ("document", "paragraph", "line"):
        raise DataError(f"sample_by must be document, paragraph or line, got {sample_by!r}")
    if max_docs is not None and max_docs < 2:
        raise DataError(f"max_docs must be at least 2 (one train and one val document), got {max_docs}")
    tok = tokenizer if isinstance(tokenizer, DocTokenizer) else load_tokenizer(tokenizer)  # bad names fail fast
    if out_dir is None:
        # another tokenizer's tokens go elsewhere: data/shakespeare-Sheared-LLaMA-1.3B beside data/shakespeare
        suffix = "" if tok.name == "gpt2" else "-" + Path(tok.name).name
        out_dir = REPO / "data" / (default_name(dataset) + suffix)
    out_dir = Path(out_dir)
    texts, titles = load_texts(dataset, text_field, split, sample_by, max_docs)

    # empty documents would be a lone bos token: nothing to learn from, so drop them (and count them)
    keep = [i for i, t in enumerate(texts) if isinstance(t, str) and t.strip()]
    train_ids, val_ids = split_by_document(keep, val_fraction, seed, "non-empty document(s)",
                                           "a corpus with more documents (or --sample_by paragraph for one text file)")

    # each document as [bos] + tokens (GPT-2: <|endoftext|>); the bos makes the first real token a target too
    dtype = token_dtype(tok.vocab_size)
    tokens = dict(zip(keep, tok.encode_batch([texts[i] for i in keep])))
    top = max(max(ids) for ids in tokens.values())
    if top >= tok.vocab_size:  # an added token beyond the model's embedding table would crash training later
        raise DataError(f"tokenizer {tok.name!r} produced id {top} but the model's vocab_size is {tok.vocab_size}")

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "meta.json").unlink(missing_ok=True)  # the dir is unfinished until meta.json is back
    meta = {"tokenizer": tok.name, "tokenizer_fingerprint": tok.fingerprint, "vocab_size": tok.vocab_size,
            "bos": tok.bos, "eot": tok.eos, "dtype": dtype.name,
            "source": "embedded:shakespeare" if dataset is None else dataset, "text_field": text_field,
            "val_fraction": val_fraction, "seed": seed, "sample_by": sample_by, "max_docs": max_docs,
            "source_docs": len(texts), "empty_docs_dropped": len(texts) - len(keep)}
    write_splits(out_dir, meta, tokens, dtype, train_ids, val_ids)
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


# ---- instruction tuning (--format instruct)
#
# Our plain template (one for both record shapes; empty sections are left out):
#   Alpaca:  "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"   + response
#   chat:    "### System:\n{content}\n\n### User:\n{content}\n\n" ... "### Assistant:\n"  + response
# (chat: the last assistant message is the response, every message before it is the prompt, later ones are
# ignored). With --chat_template the checkpoint's own template renders the same conversation instead (Alpaca
# records become one user message: instruction, a blank line, input). Prompt and response are tokenized
# separately, so the boundary between them is exact: document = [bos] + prompt + response + [eos].

def instruct_messages(record):
    """A record -> (prompt messages, response text), or None where it holds no response."""
    if "messages" in record and record["messages"] is not None:
        msgs = list(record["messages"])
        last = max((i for i, m in enumerate(msgs) if m.get("role") == "assistant"), default=None)
        if last is None or not str(msgs[last].get("content") or "").strip():
            return None
        return [{"role": m["role"], "content": str(m.get("content") or "")} for m in msgs[:last]], \
            str(msgs[last]["content"])
    output = record.get("output")
    if not isinstance(output, str) or not output.strip():
        return None
    user = str(record.get("instruction") or "")
    if record.get("input"):
        user += "\n\n" + str(record["input"])
    return [{"role": "user", "content": user}], output


def plain_prompt(record, messages):
    """Our template (see above)."""
    if "messages" not in record or record["messages"] is None:
        text = f"### Instruction:\n{record.get('instruction') or ''}\n\n"
        if record.get("input"):
            text += f"### Input:\n{record['input']}\n\n"
        return text + "### Response:\n"
    return "".join(f"### {m['role'].title()}:\n{m['content']}\n\n" for m in messages) + "### Assistant:\n"


def chat_template_renderer(tokenizer, tok):
    """The checkpoint's chat template, rendered with jinja2 as transformers renders it:
    (prompt messages, response) -> (prompt text, response text)."""
    if tokenizer == "gpt2" or isinstance(tokenizer, DocTokenizer):
        raise DataError("--chat_template needs --tokenizer <checkpoint folder or hub name> with a chat template")
    path = Path(tokenizer).expanduser()
    folder = path if path.is_dir() else hub_snapshot(str(tokenizer))
    template = read_json(folder / "tokenizer_config.json").get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if not template and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if not template:
        raise DataError(f"{tokenizer} has no chat template (tokenizer_config.json has no chat_template); "
                        "drop --chat_template to use our plain ### template")
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise DataError(f"chat template of {tokenizer}: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    compiled = env.from_string(template)
    bos, eos = tok.decode([tok.bos]), tok.decode([tok.eos])

    def render(messages, response):
        kw = dict(bos_token=bos, eos_token=eos)
        prompt = compiled.render(messages=messages, add_generation_prompt=True, **kw)
        full = compiled.render(messages=messages + [{"role": "assistant", "content": response}],
                               add_generation_prompt=False, **kw)
        if not full.startswith(prompt):
            raise DataError(f"chat template of {tokenizer}: the conversation does not start with its prompt; "
                            "drop --chat_template to use our plain ### template")
        reply = full[len(prompt):]
        prompt = prompt[len(bos):] if bos and prompt.startswith(bos) else prompt  # our own bos comes first
        if eos and reply.rstrip().endswith(eos):  # our own eos closes the response
            reply = reply.rstrip()[:-len(eos)]
        return prompt, reply
    return render


def truncate(prompt, response, max_len):
    """[bos] + prompt + response + [eos] in at most max_len tokens: the response and eos are kept whole and the
    prompt is cut from the left; if the response with bos and eos alone does not fit, the prompt goes entirely
    and the response keeps its first max_len - 1 tokens (no eos). -> (prompt, response, eos?, truncated?);
    response is empty (drop the example) when nothing of it remains."""
    if 2 + len(prompt) + len(response) <= max_len:
        return prompt, response, True, False
    if 2 + len(response) <= max_len:
        keep = max_len - 2 - len(response)
        return prompt[len(prompt) - keep:], response, True, True
    return prompt[:0], response[:max_len - 1], False, True


def demo_instruct_records(seed=1337):
    """A small offline instruction set from the embedded Shakespeare scenes, the same every time: for each scene,
    "Which play is this passage from?" (input: 4 consecutive lines; output: the play) and "Continue this speech."
    (input: 3 lines; output: the next 2)."""
    import random

    scenes = read_jsonl_gz(EMBEDDED_CORPUS)
    rng = random.Random(seed)
    out = []
    for scene in scenes:
        lines = [x.strip() for x in scene["text"].splitlines() if len(x.strip()) > 20]
        play = scene["title"].rsplit(" ", 1)[0]
        if len(lines) < 8 or scene["title"].endswith(" 0.0"):  # 0.0: the list of persons, no speech
            continue
        for _ in range(2):
            i = rng.randrange(len(lines) - 4)
            out.append({"instruction": "Which play is this passage from?", "input": "\n".join(lines[i:i + 4]),
                        "output": play, "title": scene["title"]})
            i = rng.randrange(len(lines) - 5)
            out.append({"instruction": "Continue this speech.", "input": "\n".join(lines[i:i + 3]),
                        "output": "\n".join(lines[i + 3:i + 5]), "title": scene["title"]})
    return out


def prepare_instruct(dataset, out_dir, val_fraction, seed, split, max_docs, tokenizer, max_len, chat_template):
    """--format instruct: records -> [bos] + prompt + response + [eos] documents and their target masks."""
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if max_docs is not None and max_docs < 2:
        raise DataError(f"max_docs must be at least 2 (one train and one val example), got {max_docs}")
    if max_len < 2:
        raise DataError(f"max_len must be at least 2 (bos and one response token), got {max_len}")
    tok = tokenizer if isinstance(tokenizer, DocTokenizer) else load_tokenizer(tokenizer)
    render = chat_template_renderer(tokenizer, tok) if chat_template else None
    if out_dir is None:
        suffix = "" if tok.name == "gpt2" else "-" + Path(tok.name).name
        out_dir = REPO / "data" / (default_name(dataset) + "-instruct" + suffix)
    out_dir = Path(out_dir)
    records = load_texts(dataset, None, split, "document", max_docs, records=True)
    if records and not any(("messages" in r) or ("instruction" in r and "output" in r) for r in records[:1]):
        raise DataError(f"records of {dataset!r} have neither instruction/output nor messages fields "
                        f"(fields: {sorted(records[0])}); pass Alpaca-style or chat data")

    prompts, responses, keep = [], [], []
    for i, r in enumerate(records):
        parsed = instruct_messages(r)
        if parsed is None:
            continue
        messages, response = parsed
        prompt, response = render(messages, response) if render else (plain_prompt(r, messages), response)
        prompts.append(prompt)
        responses.append(response)
        keep.append(i)
    ptoks = tok._encode_batch(prompts) if prompts else []
    rtoks = tok._encode_batch(responses) if responses else []
    tokens, masks, n_trunc, kept = {}, {}, 0, []
    for i, p, r in zip(keep, ptoks, rtoks):
        p, r, eos, cut = truncate(p, r, max_len)
        if not r:
            continue
        n_trunc += cut
        tokens[i] = [tok.bos] + p + r + ([tok.eos] if eos else [])
        masks[i] = [0] * (1 + len(p)) + [1] * (len(r) + eos)
        kept.append(i)
    dropped = len(records) - len(kept)
    train_ids, val_ids = split_by_document(kept, val_fraction, seed, "usable example(s)", "more examples")
    dtype = token_dtype(tok.vocab_size)
    top = max(max(ids) for ids in tokens.values())
    if top >= tok.vocab_size:
        raise DataError(f"tokenizer {tok.name!r} produced id {top} but the model's vocab_size is {tok.vocab_size}")

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "meta.json").unlink(missing_ok=True)
    meta = {"tokenizer": tok.name, "tokenizer_fingerprint": tok.fingerprint, "vocab_size": tok.vocab_size,
            "bos": tok.bos, "eot": tok.eos, "dtype": dtype.name, "format": "instruct", "max_len": max_len,
            "template": "chat_template" if chat_template else "plain",
            "source": "embedded:shakespeare-instruct" if dataset is None else dataset,
            "val_fraction": val_fraction, "seed": seed, "max_docs": max_docs, "source_docs": len(records),
            "truncated": n_trunc, "dropped": dropped}
    write_splits(out_dir, meta, tokens, dtype, train_ids, val_ids, masks)
    if records and "title" in records[0]:
        titles = ["" if r.get("title") is None else str(r["title"]) for r in records]
        write_atomic(out_dir / "titles.json", lambda p: p.write_text(json.dumps(titles) + "\n"))
        meta["titles"] = "titles.json"
    else:
        (out_dir / "titles.json").unlink(missing_ok=True)
    write_atomic(out_dir / "meta.json", lambda p: p.write_text(json.dumps(meta, indent=2) + "\n"))

    print(f"prepared {meta['source']} (instruct, max_len {max_len}) -> {out_dir}")
    for name in ("train", "val"):
        print(f"  {name:5s} {meta[name]['docs']:7,d} examples {meta[name]['tokens']:12,d} tokens "
              f"{meta[name]['targets']:12,d} targets")
    print(f"  truncated {n_trunc:,d} examples, dropped {dropped:,d} (no response left)")
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


if __name__ == "__main__":
    main()
