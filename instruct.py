"""
Instruction data for `prepare_data.py --format instruct`: Alpaca-style `instruction`/`input`/`output` records or
chat `messages` -> documents [bos] + prompt + response + [eos] and their target masks, written by prepare_data.py
as {train,val}_mask.bin (uint8, one byte a token: 1 for the response tokens and the closing eos, 0 for the bos and
the prompt), so that train.py computes the loss on the response only. Pure functions of the records and a
tokenization.DocTokenizer; no file I/O.

Our plain template (one for both record shapes; empty sections are left out):
  Alpaca:  "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"   + response
  chat:    "### System:\n{content}\n\n### User:\n{content}\n\n" ... "### Assistant:\n"  + response
(chat: the last assistant message is the response, every message before it is the prompt, later ones are
ignored). With --chat_template the checkpoint's own template (tokenizer.apply_chat_template) renders the same
conversation instead (Alpaca records become one user message: instruction, a blank line, input). Prompt and
response are tokenized separately, so the boundary between them is exact. truncate() is the --max_len rule.
"""
import random

from tokenization import DataError  # (not prepare_data, which imports this file: no circle)


def messages_of(record):
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


def chat_template_renderer(tok):
    """The checkpoint's chat template, applied by its AutoTokenizer: (prompt messages, response) ->
    (prompt text, response text)."""
    if tok.hf is None:
        raise DataError("--chat_template needs --tokenizer <checkpoint folder or hub name> with a chat template")
    if not tok.hf.chat_template:
        raise DataError(f"{tok.name} has no chat template (tokenizer_config.json has no chat_template); "
                        "drop --chat_template to use our plain ### template")
    bos, eos = tok.decode([tok.bos]), tok.decode([tok.eos])

    def render(messages, response):
        try:
            prompt = tok.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            full = tok.hf.apply_chat_template(messages + [{"role": "assistant", "content": response}],
                                              tokenize=False)
        except Exception as e:  # the template's own raise_exception(), or a template error
            raise DataError(f"chat template of {tok.name}: {type(e).__name__}: {e}") from e
        if not full.startswith(prompt):
            raise DataError(f"chat template of {tok.name}: the conversation does not start with its prompt; "
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


def demo_records(scenes, seed=1337):
    """A small offline instruction set from the embedded Shakespeare scenes, the same every time: for each scene,
    "Which play is this passage from?" (input: 4 consecutive lines; output: the play) and "Continue this speech."
    (input: 3 lines; output: the next 2)."""
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


def documents(records, dataset, tok, max_len, chat_template):
    """records -> (meta entries, {source id: [bos] + prompt + response + [eos]}, {source id: target mask},
    titles or None); a record's source id is its position."""
    render = chat_template_renderer(tok) if chat_template else None
    if records and not any(("messages" in r) or ("instruction" in r and "output" in r) for r in records[:1]):
        raise DataError(f"records of {dataset!r} have neither instruction/output nor messages fields "
                        f"(fields: {sorted(records[0])}); pass Alpaca-style or chat data")
    keep, prompts, responses = [], [], []
    for i, r in enumerate(records):
        parsed = messages_of(r)
        if parsed is not None:
            messages, response = parsed
            prompt, response = render(messages, response) if render else (plain_prompt(r, messages), response)
            keep.append(i)
            prompts.append(prompt)
            responses.append(response)
    tokens, masks, n_trunc = {}, {}, 0
    for i, p, r in zip(keep, tok._encode_batch(prompts) if keep else [], tok._encode_batch(responses) if keep else []):
        p, r, eos, cut = truncate(p, r, max_len)
        if r:  # an example with no response left is dropped
            n_trunc += cut
            tokens[i] = [tok.bos] + p + r + ([tok.eos] if eos else [])
            masks[i] = [0] * (1 + len(p)) + [1] * (len(r) + eos)
    info = {"format": "instruct", "max_len": max_len, "template": "chat_template" if chat_template else "plain",
            "source": "embedded:shakespeare-instruct" if dataset is None else dataset, "source_docs": len(records),
            "truncated": n_trunc, "dropped": len(records) - len(tokens)}
    titles = [r.get("title") for r in records] if records and "title" in records[0] else None
    return info, tokens, masks, titles
