"""Byte-level BPE training, lossless round trips, special tokens, save/load of HF tokenizer files, streaming decode."""

import json
import random

import pytest

from lmforge.errors import LmforgeError
from lmforge.tokenizer import Tokenizer, train_bpe
from lmforge.tokenizer.bpe import BOS, EOS, IM_END, IM_START, MIN_VOCAB_SIZE, PAD
from lmforge.tokenizer.chat import DEFAULT_CHAT_TEMPLATE

HARD_STRINGS = [
    "",
    " ",
    "   leading and trailing   ",
    "Hello, world!",
    "👍🏽 👨‍👩‍👧‍👦 🇯🇵 🏳️‍🌈 😀😃😄",  # skin tone, ZWJ family, flag, ZWJ + variation selector
    "中文字符和日本語のテキスト、한국어 텍스트",
    "e\u0301 a\u0308 n\u0303 \u0915\u094d\u0937 \u1100\u1161\u11a8",  # combining marks, Devanagari conjunct, jamo
    "".join(chr(c) for c in range(32)) + "\x7f\x80\x9f",  # every C0 control, DEL, C1 controls
    "tabs\tand\r\nwindows\rnewlines\n\n\n",
    "\ufeffBOM, zero\u200bwidth, \u202eRTL override\u202c, \u00a0nbsp",
    "\ufffd replacement char and \U0010ffff last code point and \U0001d11e clef",
    "مرحبا بالعالم שלום עולם",
    "x" * 500,
    "12345678901234567890 3.14159e-10",
]


def _random_strings(n: int, seed: int = 0) -> list[str]:
    """Random strings over all of Unicode (surrogates excluded: they cannot be encoded as UTF-8)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        chars = []
        for _ in range(rng.randint(1, 40)):
            plane = rng.random()
            if plane < 0.3:
                c = rng.randint(0, 0x7F)
            elif plane < 0.6:
                c = rng.randint(0x80, 0xFFFF)
            else:
                c = rng.randint(0x10000, 0x10FFFF)
            if 0xD800 <= c <= 0xDFFF:
                c = 0xFFFD
            chars.append(chr(c))
        out.append("".join(chars))
    return out


@pytest.mark.parametrize("text", HARD_STRINGS)
def test_round_trip_is_lossless(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_round_trip_random_unicode(tok):
    texts = _random_strings(300)
    for text, ids in zip(texts, tok.encode_batch(texts)):
        assert tok.decode(ids) == text


def test_vocabulary_and_special_tokens(tok, corpus):
    assert tok.vocab_size == 400
    assert [tok.token_to_id(t) for t in (BOS, EOS, PAD, IM_START, IM_END)] == [0, 1, 2, 3, 4]
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    assert tok.special_ids == {0, 1, 2, 3, 4}
    assert tok.stop_ids == [1, 4]  # EOS, and <|im_end|> which ends assistant turns in the default template
    assert tok.chat_template == DEFAULT_CHAT_TEMPLATE
    # All 256 bytes are tokens, so nothing is ever unknown.
    assert all(tok.token_to_id(chr(c)) is not None for c in range(ord("!"), ord("~") + 1))
    # Merges were learned: the training text takes far fewer tokens than bytes.
    ids = tok.encode(corpus)
    assert len(ids) < 0.6 * len(corpus.encode())
    # No BOS is added by encode; special tokens written in text are single ids; skipped on decode.
    assert tok.encode("hi") == tok.encode("hi", add_special_tokens=False)
    ids = tok.encode(f"{IM_START}user\nhi{IM_END}")
    assert ids[0] == 3 and ids[-1] == 4
    assert tok.decode(ids) == "user\nhi"
    assert tok.decode(ids, skip_special_tokens=False) == f"{IM_START}user\nhi{IM_END}"


def test_training_is_deterministic(corpus, tok):
    again = train_bpe(iter([corpus]), 400)
    assert again.backend.to_str() == tok.backend.to_str()


def test_train_from_files_txt_and_jsonl(tmp_path, corpus):
    (tmp_path / "a.txt").write_text(corpus, encoding="utf-8")
    lines = [json.dumps({"text": line}, ensure_ascii=False) for line in corpus.splitlines()]
    (tmp_path / "b.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    t = train_bpe([str(tmp_path / "a.txt"), tmp_path / "b.jsonl"], 300)
    assert t.vocab_size == 300
    assert t.decode(t.encode("机器学习 🎉")) == "机器学习 🎉"


def test_small_corpus_gives_smaller_vocabulary():
    t = train_bpe(iter(["ab ab ab"]), 5000)
    assert MIN_VOCAB_SIZE < t.vocab_size < 5000


@pytest.mark.parametrize("source, vocab, message", [
    (iter(["some text"]), 100, "too small"),
    (iter(["some text"]), "big", "must be an integer"),
    (iter([]), 300, "no text"),
    (iter(["   \n\n  "]), 300, "no text"),
    (["/nonexistent/file.txt"], 300, "does not exist"),
    (["a list of texts is not a list of files " * 20], 300, r"iter\(texts\)"),
    ("just a string", 300, "not a single string"),
    (iter([b"bytes"]), 300, "give strings"),
])
def test_train_errors(source, vocab, message):
    with pytest.raises(LmforgeError, match=message):
        train_bpe(source, vocab)


def test_train_file_errors(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(LmforgeError, match="not UTF-8"):
        train_bpe([str(tmp_path / "latin1.txt")], 300)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(LmforgeError, match="no text"):
        train_bpe([str(tmp_path / "empty.txt")], 300)
    (tmp_path / "bad.jsonl").write_text('{"content": "x"}\n')
    with pytest.raises(LmforgeError, match="bad.jsonl:1"):
        train_bpe([str(tmp_path / "bad.jsonl")], 300)


def test_save_load_round_trip(tok, tmp_path):
    tok.model_max_length = 2048
    try:
        tok.save(tmp_path)
    finally:
        tok.model_max_length = None
    assert {p.name for p in tmp_path.iterdir()} == {"tokenizer.json", "tokenizer_config.json",
                                                   "special_tokens_map.json"}
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["clean_up_tokenization_spaces"] is False
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == (BOS, EOS, PAD)
    assert config["chat_template"] == DEFAULT_CHAT_TEMPLATE
    assert config["model_max_length"] == 2048
    assert config["added_tokens_decoder"]["4"]["content"] == IM_END
    assert config["added_tokens_decoder"]["4"]["special"] is True

    loaded = Tokenizer.load(tmp_path)
    assert loaded.model_max_length == 2048
    assert (loaded.vocab_size, loaded.bos_id, loaded.eos_id, loaded.pad_id) == (400, 0, 1, 2)
    assert loaded.chat_template == tok.chat_template
    for text in HARD_STRINGS + [f"{IM_START}user\nhi{IM_END}"]:
        assert loaded.encode(text) == tok.encode(text)
    assert Tokenizer.load(tmp_path / "tokenizer.json").encode("hello") == tok.encode("hello")


def _write_dir(tok, d, config_update=None, drop=(), files=None):
    """Save `tok`, then edit its tokenizer_config.json the way other tools write it."""
    tok.save(d)
    path = d / "tokenizer_config.json"
    config = json.loads(path.read_text())
    for key in drop:
        config.pop(key, None)
    config.update(config_update or {})
    path.write_text(json.dumps(config))
    for name, text in (files or {}).items():
        (d / name).parent.mkdir(exist_ok=True)
        (d / name).write_text(text)
    return d


def test_load_config_variants(tok, tmp_path):
    # Special tokens as AddedToken dicts; a pad token the vocabulary lacks is appended, as transformers does.
    d = _write_dir(tok, tmp_path / "dicts", {
        "bos_token": {"__type": "AddedToken", "content": BOS, "special": True},
        "eos_token": {"content": IM_END}, "pad_token": "<|new_pad|>"})
    t = Tokenizer.load(d)
    assert (t.bos_id, t.eos_id, t.pad_id, t.vocab_size) == (0, 4, 400, 401)
    assert t.decode(t.encode("a<|new_pad|>b")) == "ab"

    # added_tokens_decoder entries missing from tokenizer.json are added.
    d = _write_dir(tok, tmp_path / "added", {"added_tokens_decoder": {
        "400": {"content": "<tool_call>", "special": False, "normalized": False},
        "401": {"content": "<|eot_id|>", "special": True}}})
    t = Tokenizer.load(d)
    assert (t.token_to_id("<tool_call>"), t.token_to_id("<|eot_id|>")) == (400, 401)
    assert t.decode(t.encode("<tool_call><|eot_id|>")) == "<tool_call>"

    # Legacy special_tokens_map.json fills what the config leaves out.
    d = _write_dir(tok, tmp_path / "legacy", drop=("bos_token", "eos_token", "pad_token"))
    assert Tokenizer.load(d).eos_id == 1

    # BOS comes from tokenizer.json's post-processor, as in HF Llama-3 directories.
    from tokenizers import processors

    d = tmp_path / "bos"
    tok.save(d)
    data = json.loads((d / "tokenizer.json").read_text())
    data["post_processor"] = json.loads(processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, 0)]).__getstate__())
    (d / "tokenizer.json").write_text(json.dumps(data))
    t = Tokenizer.load(d)
    assert t.encode("hi") == [0] + tok.encode("hi") and t.encode("hi", add_special_tokens=False) == tok.encode("hi")


def test_load_chat_template_sources(tok, tmp_path):
    # chat_template.jinja wins over the config's template.
    d = _write_dir(tok, tmp_path / "jinja", {"chat_template": "config"}, files={"chat_template.jinja": "file"})
    assert Tokenizer.load(d).chat_template == "file"
    # A list of named templates: "default" is the template; others are picked by name or by tools.
    d = _write_dir(tok, tmp_path / "list", {"chat_template": [
        {"name": "default", "template": "D{{ messages[0].content }}"},
        {"name": "tool_use", "template": "T{{ tools | length }}"}]})
    t = Tokenizer.load(d)
    msgs = [{"role": "user", "content": "x"}]
    assert t.chat_template == "D{{ messages[0].content }}"
    assert t.apply_chat_template(msgs) == "Dx"
    assert t.apply_chat_template(msgs, tools=[{"name": "f"}]) == "T1"
    assert t.apply_chat_template(msgs, chat_template="tool_use", tools=[]) == "T0"
    # Named files in chat_templates/ sit beside chat_template.jinja; saving keeps the files in step.
    d = _write_dir(tok, tmp_path / "dir", files={"chat_template.jinja": "A", "chat_templates/tool_use.jinja": "B"})
    t = Tokenizer.load(d)
    assert t.chat_templates == {"default": "A", "tool_use": "B"}
    t.chat_template = "C"
    t.save(d)
    assert Tokenizer.load(d).chat_templates == {"default": "C", "tool_use": "B"}
    # No template at all: a clear error.
    d = _write_dir(tok, tmp_path / "none", drop=("chat_template",))
    with pytest.raises(LmforgeError, match="no chat template"):
        Tokenizer.load(d).apply_chat_template(msgs)


def test_load_errors(tmp_path, tok):
    with pytest.raises(LmforgeError, match="does not exist"):
        Tokenizer.load(tmp_path / "missing")
    (tmp_path / "spm").mkdir()
    (tmp_path / "spm" / "tokenizer.model").write_bytes(b"\0")
    with pytest.raises(LmforgeError, match="SentencePiece"):
        Tokenizer.load(tmp_path / "spm")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text("{not json")
    with pytest.raises(LmforgeError, match="not a valid tokenizer.json"):
        Tokenizer.load(tmp_path / "bad")
    d = _write_dir(tok, tmp_path / "badcfg", {"eos_token": 5})
    with pytest.raises(LmforgeError, match="eos_token"):
        Tokenizer.load(d)
    with pytest.raises(LmforgeError, match="outside"):
        tok.decode([tok.vocab_size])


def _stream(tok, ids, skip=True):
    dec = tok.stream_decoder(skip_special_tokens=skip)
    pieces = [dec.push(i) for i in ids]
    return pieces, dec.flush()


@pytest.mark.parametrize("text", [
    "🎉 party 🎉🎉 👨‍👩‍👧‍👦 done",
    "机器学习是人工智能 and 東京 and 한국어",
    "e\u0301\u0301 combining, Привет",
    "\U0010ffff\U0001d11e\x00\x01 end",
])
def test_stream_decoder_never_splits_characters(tok, text):
    ids = tok.encode(text)
    pieces, rest = _stream(tok, ids)
    assert "".join(pieces) + rest == tok.decode(ids) == text
    assert rest == ""
    assert not any("\ufffd" in p for p in pieces)
    # Each character's bytes really were split across tokens, and the decoder held text back.
    assert len(ids) > len(text.encode("utf-8")) / 4
    if any(ord(c) > 0x7F for c in text):
        assert "" in pieces


def test_stream_decoder_with_special_tokens_and_partial_end(tok):
    ids = tok.encode(f"{IM_START}assistant\n好的 🎉{IM_END}")
    for skip in (True, False):
        pieces, rest = _stream(tok, ids, skip)
        assert "".join(pieces) + rest == tok.decode(ids, skip_special_tokens=skip)
    # A generation that stops inside a character: flush shows what decode shows.
    ids = tok.encode("ok 🎉")[:-1]
    pieces, rest = _stream(tok, ids)
    assert "".join(pieces) == "ok " and rest == tok.decode(ids)[3:] and rest.startswith("\ufffd")
