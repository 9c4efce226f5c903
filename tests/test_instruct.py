"""Instruction tuning (prepare_data.py --format instruct): prompt-masked per-sample loss, templates, truncation."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import instruct
import prepare_data
import tokenization
import train
from model import GPT, GPTConfig, IGNORE_INDEX

RECORDS = [
    {"instruction": "Name the play.", "input": "To be, or not to be", "output": "Hamlet"},
    {"instruction": "Say hello.", "output": "Hello there, friend."},
    {"instruction": "Count to three.", "input": "", "output": "one two three"},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who wrote Lear?"},
                  {"role": "assistant", "content": "Shakespeare."}, {"role": "user", "content": "When?"},
                  {"role": "assistant", "content": "Around 1606."}]},
]
PROMPTS = [
    "### Instruction:\nName the play.\n\n### Input:\nTo be, or not to be\n\n### Response:\n",
    "### Instruction:\nSay hello.\n\n### Response:\n",
    "### Instruction:\nCount to three.\n\n### Response:\n",
    "### System:\nBe brief.\n\n### User:\nWho wrote Lear?\n\n### Assistant:\nShakespeare.\n\n### User:\nWhen?\n\n"
    "### Assistant:\n",
]
RESPONSES = ["Hamlet", "Hello there, friend.", "one two three", "Around 1606."]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def examples(data_dir):
    """{source id: (tokens, mask)} over both splits, read straight from the files."""
    meta = json.loads((data_dir / "meta.json").read_text())
    out = {}
    for split in ("train", "val"):
        tokens = np.fromfile(data_dir / f"{split}.bin", dtype=meta["dtype"]).astype(np.int64)
        mask = np.fromfile(data_dir / f"{split}_mask.bin", dtype=np.uint8)
        assert len(mask) == len(tokens)
        docs = np.load(data_dir / f"{split}_docs.npz")
        for k, i in enumerate(docs["ids"]):
            a, b = docs["offsets"][k], docs["offsets"][k + 1]
            out[int(i)] = tokens[a:b], mask[a:b]
    return out


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("instruct")
    alpaca = write_jsonl(tmp / "alpaca.jsonl", RECORDS[:3] * 2)
    chat = write_jsonl(tmp / "chat.jsonl", RECORDS[3:] * 2)
    return (prepare_data.prepare(dataset=str(alpaca), out_dir=tmp / "a", format="instruct", val_fraction=0.3, max_len=65),
            prepare_data.prepare(dataset=str(chat), out_dir=tmp / "c", format="instruct", val_fraction=0.5, max_len=65))


def test_both_shapes_mask_exactly_the_response_and_eos(shapes):
    tok = tokenization.load_tokenizer()
    for data_dir, offset in zip(shapes, (0, 3)):
        meta = json.loads((data_dir / "meta.json").read_text())
        assert meta["format"] == "instruct" and meta["max_len"] == 65
        for i, (tokens, mask) in examples(data_dir).items():
            j = offset + i % (3 if offset == 0 else 1)
            assert tokens[0] == tok.bos and mask[0] == 0 and tokens[-1] == tok.eos and mask[-1] == 1
            assert tok.decode(tokens[mask == 1].tolist()) == RESPONSES[j] + "<|endoftext|>"
            assert tok.decode(tokens[1:][mask[1:] == 0].tolist()) == PROMPTS[j]
            assert (np.diff(mask.astype(int)) >= 0).all()  # 0 ... 0 1 ... 1


def test_get_batch_ignores_prompt_targets_and_loss_is_mean_over_response(shapes):
    data = train.load_split(shapes[0], "train", 64)
    samples = list(range(len(data["start"])))
    x, y = train.get_batch(data, samples, 64, torch.device("cpu"))
    # prompt targets (mask 0) are ignored, response targets (mask 1) are the tokens
    changed = dict(data, tokens=np.where(data["mask"] == 0, 7, np.asarray(data["tokens"])))
    x2, y2 = train.get_batch(changed, samples, 64, torch.device("cpu"))
    assert torch.equal(y, y2) and not torch.equal(x, x2)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=50304, n_layer=1, n_head=2, n_embd=32)).eval()
    with torch.no_grad():
        logits, loss = model.logits(x), model(x, y)[1]
        # arbitrary ids at the prompt positions change nothing once masked as the data says
        y_other = torch.where(y == IGNORE_INDEX, IGNORE_INDEX, y)
        assert torch.equal(model(x, y_other)[1], loss)
    logp = F.log_softmax(logits.float(), dim=-1)
    for row, s in enumerate(samples):
        a, b = data["start"][s], data["end"][s]
        tokens, mask = np.asarray(data["tokens"][a:b]).astype(np.int64), np.asarray(data["mask"][a:b])
        pos = np.nonzero(mask[1:])[0]  # position t predicts token t+1
        manual = -logp[row, pos, tokens[1:][pos]].mean()
        assert abs(manual.item() - loss[row].item()) < 1e-5
        assert (y[row, :len(tokens) - 1][torch.from_numpy(mask[1:] == 0)] == IGNORE_INDEX).all()
        assert (y[row, len(tokens) - 1:] == IGNORE_INDEX).all()


def test_truncation_rule():
    p, r = list(range(10)), list(range(100, 105))
    assert instruct.truncate(p, r, 17) == (p, r, True, False)  # 1 + 10 + 5 + 1 fits
    assert instruct.truncate(p, r, 12) == (p[-5:], r, True, True)  # prompt cut from the left
    assert instruct.truncate(p, r, 7) == ([], r, True, True)  # just fits without the prompt
    assert instruct.truncate(p, r, 5) == ([], r[:4], False, True)  # response cut at the end, no eos


def test_truncation_counts(tmp_path):
    tok = tokenization.load_tokenizer()
    long_prompt = {"instruction": " ".join(["word"] * 40), "output": "yes"}
    long_reply = {"instruction": "Talk.", "output": " ".join(["blah"] * 40)}
    records = [{"instruction": "Hi.", "output": "ok"}, long_prompt, long_reply,
               {"instruction": "Nothing.", "output": ""}, {"instruction": "Hi again.", "output": "ok"}]
    out = prepare_data.prepare(dataset=str(write_jsonl(tmp_path / "r.jsonl", records)), out_dir=tmp_path / "d",
                               format="instruct", max_len=20, val_fraction=0.25)
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["truncated"], meta["dropped"]) == (2, 1)
    ex = examples(out)
    assert set(ex) == {0, 1, 2, 4} and all(len(t) <= 20 for t, _ in ex.values())
    tokens, mask = ex[1]  # the prompt lost its start: ends "... word\n\n### Response:\n", then "yes" + eos
    assert len(tokens) == 20 and tok.decode(tokens[mask == 1].tolist()) == "yes<|endoftext|>"
    assert tok.decode(tokens[1:][mask[1:] == 0].tolist()).endswith("word word\n\n### Response:\n")
    full_prompt = tok.encode(instruct.plain_prompt(long_prompt, None))[1:]
    assert tokens[1:][mask[1:] == 0].tolist() == full_prompt[-(20 - 2 - (mask == 1).sum() + 1):]
    tokens, mask = ex[2]  # the response alone is too long: its first 19 tokens, no prompt, no eos
    assert len(tokens) == 20 and mask[1:].all() and tokens[-1] != tok.eos
    assert tokens[1:].tolist() == tok.encode(long_reply["output"])[1:20]


def test_text_format_unchanged(tiny_data):
    assert not list(tiny_data.glob("*_mask.bin"))
    assert "format" not in json.loads((tiny_data / "meta.json").read_text())
    assert train.load_split(tiny_data, "train", 32)["mask"] is None


def test_demo_set_and_block_size_check(tmp_path, capsys):
    scenes = prepare_data.read_jsonl_gz(prepare_data.EMBEDDED_CORPUS)
    a = instruct.demo_records(scenes)
    assert a == instruct.demo_records(scenes) and 200 <= len(a) <= 1000
    out = prepare_data.prepare(out_dir=tmp_path / "d", format="instruct", max_len=513, max_docs=30)
    assert (out / "train_mask.bin").stat().st_size == (out / "train.bin").stat().st_size // 2
    # an example is one sample, never chunked: --block_size must hold the longest example's targets (its
    # tokens - 1), read here from the document boundaries, whatever --max_len the data was prepared with
    longest = {}
    for split in ("train", "val"):
        docs = np.load(out / f"{split}_docs.npz")
        n_targets = np.diff(docs["offsets"]) - 1
        longest[split] = int(docs["ids"][n_targets.argmax()]), int(n_targets.max())
    block = max(n for _, n in longest.values())
    assert block < 512  # the old rule (--block_size >= max_len - 1) refused every block size below 512
    for split in ("train", "val"):
        assert train.load_split(out, split, block)["mask"] is not None
    with pytest.raises(SystemExit) as e:
        train.main(["--data", str(out), "--block_size", str(block - 1), "--device", "cpu", "--out_dir",
                    str(tmp_path / "o")])
    refused, n = next((longest[s] for s in ("train", "val") if longest[s][1] > block - 1))  # train is loaded first
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    assert f"example {refused} has {n} targets" in err[0] and f"raise --block_size to {n}" in err[0], err


def test_chat_template(tmp_path, spm_model):
    from conftest import spm_dir
    template = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% if m['role'] == "
                "'assistant' %}{{ eos_token }}{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>"
                "{% endif %}")
    folder = spm_dir(tmp_path / "ckpt", spm_model, chat_template=template)
    src = write_jsonl(tmp_path / "r.jsonl", RECORDS[3:] * 2)
    out = prepare_data.prepare(dataset=str(src), out_dir=tmp_path / "d", format="instruct", tokenizer=str(folder),
                               chat_template=True, val_fraction=0.5)
    tok = tokenization.load_tokenizer(folder)
    for tokens, mask in examples(out).values():
        assert tokens[0] == tok.bos and tokens[-1] == tok.eos and (tokens[mask == 1] == tok.eos).sum() == 1
        assert tok.decode(tokens[mask == 1].tolist()).strip() == "Around 1606.</s>"
        assert tok.decode(tokens[1:][mask[1:] == 0].tolist()).endswith("<|assistant|>")
    plain = spm_dir(tmp_path / "plain", spm_model)
    with pytest.raises(prepare_data.DataError, match="no chat template"):
        prepare_data.prepare(dataset=str(src), out_dir=tmp_path / "e", format="instruct", tokenizer=str(plain),
                             chat_template=True)


def test_pretrained_instruction_tuning_runs(tmp_path, tiny_llama_ckpt):
    folder = tiny_llama_ckpt
    data = prepare_data.prepare(out_dir=tmp_path / "data", format="instruct", tokenizer=str(folder), max_len=33,
                                max_docs=40, val_fraction=0.2)
    out = tmp_path / "run"
    res = train.main(["--pretrained", str(folder), "--data", str(data), "--method", "irdro", "--tau", "1.0",
                      "--max_iters", "3", "--block_size", "32", "--batch_size", "4", "--eval_samples", "8",
                      "--device", "cpu", "--no-compile", "--out_dir", str(out)])
    weights = [json.loads(line) for line in (out / "weights.jsonl").read_text().splitlines()]
    assert len(weights) == 3 and res["model"] is not None
