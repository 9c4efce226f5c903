"""
The tokenizers of the data: GPT-2 BPE (tiktoken; offline from the vendored ranks), characters (assets/char), or a
pretrained checkpoint's own (transformers.AutoTokenizer), each as a DocTokenizer whose documents start with one bos,
and the fingerprint that matches data to a model. prepare_data.py tokenizes with them; train.py and hf.py check and
export them.
"""
import functools
import gzip
import hashlib
import json
import base64
from pathlib import Path

REPO = Path(__file__).parent
CHAR_TOKENIZER = REPO / "assets" / "char"  # one token per character of the corpus (a Hugging Face tokenizer folder)
GPT2_RANKS = REPO / "assets" / "gpt2.tiktoken.gz"  # tiktoken's r50k_base ranks, vendored from openai-whisper
GPT2_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"  # of the uncompressed file


class DataError(ValueError):
    """Bad input to the data pipeline (here, its lowest file). prepare_data.main() prints it as one line, exit 2."""


@functools.cache
def gpt2_encoding():
    """GPT-2 BPE: tiktoken's own (downloads once, then cached) or, offline, the same one from assets/."""
    import tiktoken

    try:
        return tiktoken.get_encoding("gpt2")
    except Exception:
        pass  # no network and no tiktoken cache: build the identical encoding from the vendored ranks
    raw = gpt2_ranks_text()
    ranks = {base64.b64decode(tok): int(rank) for tok, rank in (line.split() for line in raw.splitlines() if line)}
    return tiktoken.Encoding(name="gpt2", pat_str=gpt2_pattern(), mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256}, explicit_n_vocab=50257)


def gpt2_ranks_text():
    """The vendored ranks as tiktoken stores them (a base64 token and its rank a line), checked by their sha256."""
    raw = gzip.decompress(GPT2_RANKS.read_bytes())
    if hashlib.sha256(raw).hexdigest() != GPT2_SHA256:
        raise DataError(f"{GPT2_RANKS}: sha256 mismatch, the file is damaged; restore it from git")
    return raw


def gpt2_pattern():
    """GPT-2's pre-tokenizer: the regex that splits a text into the pieces BPE then encodes one by one."""
    try:
        from tiktoken_ext.openai_public import r50k_pat_str
        return r50k_pat_str
    except ImportError:  # tiktoken < 0.8: its pattern before possessive quantifiers (the same splits)
        return r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


# ---- tokenizers: GPT-2 (tiktoken, above), or transformers.AutoTokenizer (characters, or a checkpoint's own)
#
# A checkpoint must see the ids of its own tokenizer, exactly as AutoTokenizer gives them (and lm-eval feeds it),
# with its defaults: special tokens written in a text ("</s>") are parsed as such; tiktoken's path encodes plain text.
# Our format starts every document with one bos: the one the tokenizer adds, or, where it adds none (GPT-2), its eos.
# A trailing eos that a tokenizer may add (add_eos_token) is left out: the bos alone marks where a document starts.
# the fingerprint of GPT-2's own vocabulary with bos 50256: an HF GPT-2 folder is then interchangeable with "gpt2"
GPT2_HF_FINGERPRINT = "434bbe7089eae415"


class DocTokenizer:
    """What prepare() and train.py need of a tokenizer: whole documents -> ids, each starting with `bos`.
    fingerprint: a short hash of the token -> id mapping (special and added tokens included) and of the bos,
    so that data can be matched to a model; "gpt2" for GPT-2's. hf: the AutoTokenizer behind it, if any; source:
    what load_tokenizer() loads it from again ("gpt2", "char", a folder, a hub name), None if it cannot."""

    def __init__(self, name, fingerprint, vocab_size, bos, eos, encode_batch, decode, hf=None, source=None):
        self.name, self.fingerprint, self.vocab_size, self.bos, self.eos = name, fingerprint, vocab_size, bos, eos
        self._encode_batch = encode_batch  # texts -> ids without the bos
        self.decode = decode  # ids -> text, special tokens included
        self.hf, self.source = hf, source

    def encode(self, text):
        return self.encode_batch([text])[0]

    def encode_batch(self, texts):
        return [[self.bos] + ids for ids in self._encode_batch(list(texts))]


def tokenizer_id(meta):
    """What identifies a data folder's tokenizer (its meta.json): the fingerprint of its vocabulary where recorded."""
    return meta.get("tokenizer_fingerprint") or meta["tokenizer"]


def load_tokenizer(name_or_dir="gpt2"):
    """"gpt2": GPT-2 BPE via tiktoken (offline, vendored); "char": characters (assets/char); else a folder with a
    checkpoint's tokenizer files, or a Hugging Face hub name whose tokenizer files are downloaded, loaded with
    transformers.AutoTokenizer."""
    if name_or_dir == "gpt2":
        enc = gpt2_encoding()
        # encode_ordinary: "<|endoftext|>" written inside a text is just text, never a document boundary
        return DocTokenizer("gpt2", "gpt2", enc.n_vocab, enc.eot_token, enc.eot_token, enc.encode_ordinary_batch,
                            enc.decode, source="gpt2")
    hf, config = auto_tokenizer(str(name_or_dir))
    path = Path(hf.name_or_path)  # the folder auto_tokenizer read ("char": assets/char), or a hub name
    name = path.resolve().name if path.is_dir() else str(name_or_dir)
    source = "char" if name_or_dir == "char" else str(path.resolve()) if path.is_dir() else str(name_or_dir)
    plain, full = hf("a", add_special_tokens=False)["input_ids"], hf("a")["input_ids"]
    prefix = next(full[:k] for k in range(len(full) - len(plain) + 1) if full[k:k + len(plain)] == plain)
    if len(prefix) > 1:
        raise DataError(f"{name}: the tokenizer puts {len(prefix)} tokens before a text, not one bos")
    if not prefix and type(hf).__name__ == "LlamaTokenizer" and "add_bos_token" not in hf.init_kwargs:
        # transformers 5 adds no <s> where tokenizer_config.json has no add_bos_token key (though its docs say
        # LlamaTokenizer does, as transformers 4 did), but a LLaMA model expects <s> at a document start
        prefix = [hf.bos_token_id]
    bos = prefix[0] if prefix else hf.eos_token_id  # no bos added (GPT-2): the eos starts each document
    if bos is None:
        raise DataError(f"{name}: cannot tell which token starts a document (no bos is added and no eos_token "
                        "is known); add bos_token/eos_token to tokenizer_config.json")
    mapping = json.dumps([bos, sorted((i, t) for t, i in hf.get_vocab().items())], ensure_ascii=False)
    fingerprint = hashlib.sha256(mapping.encode()).hexdigest()[:16]
    # the model's vocab_size (config.json) can be bigger than the tokenizer's (OPT, Llama-3): its embedding table
    vocab_size = int(config.get("vocab_size") or len(hf))
    return DocTokenizer(name, "gpt2" if fingerprint == GPT2_HF_FINGERPRINT else fingerprint, vocab_size, bos,
                        hf.eos_token_id, lambda texts: hf(texts, add_special_tokens=False, verbose=False)["input_ids"],
                        lambda ids: hf.decode(list(ids), skip_special_tokens=False), hf, source)


def auto_tokenizer(name_or_dir):
    """transformers.AutoTokenizer of a folder or hub name, and the model's config.json ({} if none)."""
    try:
        import transformers
    except ImportError as e:
        raise DataError("a checkpoint's tokenizer needs transformers: pip install transformers") from e
    folder = Path(CHAR_TOKENIZER if name_or_dir == "char" else name_or_dir).expanduser()
    source = str(folder) if folder.is_dir() else name_or_dir
    try:
        hf = transformers.AutoTokenizer.from_pretrained(source)
    except Exception as e:  # offline, no such repo, gated, damaged files, ...: one line
        if folder.is_dir():
            raise DataError(f"{folder}: AutoTokenizer could not load its tokenizer ({type(e).__name__}: {e}); "
                            "pass the folder of a Hugging Face checkpoint") from e
        raise DataError(f"tokenizer {source!r} is no local folder, and loading it from the Hugging Face hub failed "
                        f"({type(e).__name__}); download the checkpoint where there is a network and pass its local "
                        "folder to --tokenizer") from e
    try:
        return hf, transformers.PretrainedConfig.get_config_dict(source)[0]
    except Exception:  # no config.json: a tokenizer-only folder
        return hf, {}
