"""SFT data: record shapes, bad lines, and assistant-only loss masks under the default template and real templates of
the Llama 3, Qwen2 and Mistral styles (and a {% generation %} template); packing keeps examples apart."""

import json

import pytest
import torch

from lmforge.data.sft import (
    chat_renderer,
    collate,
    encode_chat,
    load_sft,
    plan_rows,
    to_messages,
)
from lmforge.errors import LmforgeError
from lmforge.model.config import preset
from lmforge.model.transformer import Transformer
from tests.finetune.fixtures import one_thread, tiny_tokenizer  # noqa: F401  (one_thread: autouse, torch on one thread)

LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
          "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
          "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
          "{% endif %}")
QWEN2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
         "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + "
         "message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
         "{{ '<|im_start|>assistant\n' }}{% endif %}")
MISTRAL = ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
           "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
           "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
           "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}"
           "{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")
# Mistral v0.3's shape: the system prompt goes into the LAST user turn, so earlier renderings are not prefixes
MISTRAL_V3 = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('After the optional system message, conversation roles must alternate') }}{%- endif %}"
    "{%- if message['role'] == 'user' %}{%- if loop.last and system_message is defined %}"
    "{{- '[INST] ' + system_message + '\n\n' + message['content'] + '[/INST]' }}{%- else %}"
    "{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content']|trim + eos_token}}{%- endif %}"
    "{%- endfor %}")
GENERATION = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}{% if m['role'] == 'assistant' %}"
              "{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}{% else %}"
              "{{ m['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
DROPS_ASSISTANT = "{% for m in messages %}{% if m['role'] != 'assistant' %}{{ m['content'] }}{% endif %}{% endfor %}"

CONV = [{"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What does join do?"},
        {"role": "assistant", "content": "It joins two paths."},
        {"role": "user", "content": "And split?"},
        {"role": "assistant", "content": "It splits the string."}]


def _trained_runs(tok, ex):
    """Decoded text of each maximal run of trained tokens."""
    runs, cur = [], []
    for i, t in zip(ex.ids, ex.train):
        if t:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tok.decode(r, skip_special_tokens=False) for r in runs]


@pytest.mark.parametrize("template, eot, messages", [
    (None, "<|im_end|>", CONV),
    (LLAMA3, "<|eot_id|>", CONV),
    (QWEN2, "<|im_end|>", CONV[1:]),
    (MISTRAL, "<|end_of_text|>", CONV[1:]),
    (MISTRAL_V3, "<|end_of_text|>", CONV),
    (GENERATION, "<|im_end|>", CONV),
], ids=["default-chatml", "llama3", "qwen2", "mistral", "mistral-v3", "generation-tags"])
def test_assistant_mask_covers_answers_and_end_of_turn_only(template, eot, messages):
    tok = tiny_tokenizer()
    render = chat_renderer(tok, template)
    ex = encode_chat(tok, render, messages)
    assert tok.decode(ex.ids, skip_special_tokens=False) == render(messages)  # the template's own text, whole
    assert ex.ids == tok.encode(render(messages), add_special_tokens=False)  # apply_chat_template's ids
    want = [m["content"] + eot for m in messages if m["role"] == "assistant"]
    got = _trained_runs(tok, ex)
    if template in (MISTRAL_V3,):  # the template puts a space before the answer, outside the content
        got = [g.lstrip() for g in got]
    assert got == want


def test_template_that_trims_content_falls_back_to_prefix_rendering():
    tok = tiny_tokenizer()
    msgs = [{"role": "user", "content": " Hi "}, {"role": "assistant", "content": "  Hello there.\n"}]
    ex = encode_chat(tok, chat_renderer(tok, LLAMA3), msgs)
    assert _trained_runs(tok, ex) == ["Hello there.<|eot_id|>"]


def test_templates_without_assistant_tokens_are_errors_not_empty_masks():
    tok = tiny_tokenizer()
    from lmforge.data.sft import RecordError
    with pytest.raises(RecordError, match="no assistant token"):
        encode_chat(tok, chat_renderer(tok, DROPS_ASSISTANT), CONV)
    # trims content AND is not prefix-stable: neither method can locate the turns
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "q"},
            {"role": "assistant", "content": " padded "}]
    with pytest.raises(RecordError, match="cannot locate"):
        encode_chat(tok, chat_renderer(tok, MISTRAL_V3), msgs)
    ex = encode_chat(tok, chat_renderer(tok, MISTRAL_V3), msgs, train_on_all=True)
    assert all(ex.train)


def test_record_shapes():
    want = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    assert to_messages({"messages": want}) == want
    assert to_messages({"prompt": "Q", "completion": "A"}) == want
    assert to_messages({"instruction": "Q", "input": "", "output": "A"}) == want
    assert to_messages({"instruction": "Q", "input": "x", "output": "A"})[0]["content"] == "Q\n\nx"
    assert to_messages({"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}) == want
    assert to_messages({"prompt": want[:1], "completion": want[1:]}, "prompt_completion") == want


def _write(path, lines):
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def test_bad_lines_name_file_and_line_or_are_skipped(tmp_path):
    tok = tiny_tokenizer()
    good = {"prompt": "What does join do?", "completion": "It joins paths."}
    f = _write(tmp_path / "d.jsonl", [good, "{not json", {"foo": 1}, "", {"prompt": "p", "chosen": "a", "rejected": "b"}])
    with pytest.raises(LmforgeError, match=r"d.jsonl line 2: not valid JSON"):
        load_sft(f, tok, seq_len=64)
    examples, stats = load_sft(f, tok, seq_len=64, skip_bad=True)
    assert len(examples) == 1 and stats.skipped_bad == 3 and stats.records == 1
    assert "finetune dpo" in " ".join(stats.bad_examples)
    g = _write(tmp_path / "e.jsonl", [good, {"messages": [{"role": "user", "content": "only a question"}]}])
    with pytest.raises(LmforgeError, match="e.jsonl line 2: .*no assistant turn"):
        load_sft(g, tok, seq_len=64)


def test_truncation_is_counted(tmp_path):
    tok = tiny_tokenizer()
    long = {"prompt": "Q", "completion": "word " * 200}
    short = {"prompt": "Q", "completion": "A"}
    huge_prompt = {"prompt": "word " * 200, "completion": "A"}
    f = _write(tmp_path / "t.jsonl", [long, short, huge_prompt])
    examples, stats = load_sft(f, tok, seq_len=32)
    assert stats.truncated == 2 and stats.dropped_empty == 1 and len(examples) == 2
    assert max(len(e) for e in examples) == 33


def test_packed_rows_equal_separate_forwards():
    tok = tiny_tokenizer()
    render = chat_renderer(tok)
    exs = [encode_chat(tok, render, [{"role": "user", "content": q}, {"role": "assistant", "content": a}])
           for q, a in [("Hi", "Hello!"), ("What does join do?", "It joins two paths."), ("Sum?", "a plus b")]]
    lengths = [len(e) for e in exs]
    rows = plan_rows(lengths, seq_len=sum(lengths), pack=True, seed=0, epoch=0)
    assert len(rows) == 1 and sorted(rows[0]) == [0, 1, 2]
    batch = collate(exs, rows, tok.pad_id)
    mask = batch["attn_mask"][0, 0]
    n0 = lengths[rows[0][0]] - 1
    assert torch.equal(mask[:n0, :n0], torch.ones(n0, n0, dtype=torch.bool).tril()) and not mask[n0:, :n0].any()  # later examples never see the first
    assert batch["input_pos"][0, n0].item() == 0
    torch.manual_seed(0)
    model = Transformer(preset("test").replace(vocab_size=512)).eval()
    with torch.no_grad():
        packed = model(batch["input_ids"], input_pos=batch["input_pos"], mask=batch["attn_mask"])
        t = 0
        for i in rows[0]:
            single = collate(exs, [[i]], tok.pad_id)
            alone = model(single["input_ids"])
            n = lengths[i] - 1
            assert (packed[0, t:t + n] - alone[0]).abs().max() < 1e-4
            assert torch.equal(batch["loss_mask"][0, t:t + n], single["loss_mask"][0])
            t += n
    # unpacked: one example per row, right-padded, padding never trained on
    plain = collate(exs, [[0], [1]], tok.pad_id)
    assert plain["attn_mask"] is None and not plain["loss_mask"][0, lengths[0] - 1:].any()
