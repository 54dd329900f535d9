"""The chat REPL as a user meets it: each turn's prompt is the whole conversation through the model's chat
template, /reset and /system start over, and a greedy reply is the engine's own greedy answer to that prompt."""

import io

import pytest

from lmforge.cli import main
from lmforge.inference.chat import ChatConfig, repl
from lmforge.inference.engine import Engine
from lmforge.inference.generate import chat_ids
from lmforge.inference.load import load
from lmforge.inference.sampling import SamplingOptions, SamplingParams
from tests.inference.tiny import make_model_dir


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return load(make_model_dir(tmp_path_factory.mktemp("c") / "tiny"))


class RecordingEngine(Engine):
    """The real engine, keeping each submitted prompt and its sampling parameters."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.submitted: list[tuple[list[int], SamplingParams]] = []

    def submit(self, prompt_ids, params=None):
        self.submitted.append((list(prompt_ids), params))
        return super().submit(prompt_ids, params)


def greedy_reply(lm, ids: list[int], max_tokens: int) -> str:
    """The engine's own greedy answer to `ids`, as text (the end-of-turn token is not part of it)."""
    out = Engine(lm.model, eos_ids=lm.eos_ids).generate([ids], SamplingParams(temperature=0.0,
                                                                              max_tokens=max_tokens))[0]
    return lm.tokenizer.decode([i for i in out if i not in lm.eos_ids])


def test_repl_keeps_history_and_commands(lm):
    script = "hello\nagain\n/reset\nfresh\n/system be terse\nlast\n/exit\nnever\n"
    out = io.StringIO()
    cfg = ChatConfig(sampling=SamplingOptions(temperature=0.0), max_new_tokens=6, stats=False)
    with RecordingEngine(lm.model, eos_ids=lm.eos_ids) as eng:
        repl(eng, lm.tokenizer, cfg, stdin=io.StringIO(script), stdout=out)
    tok = lm.tokenizer
    seen = [tok.decode(ids, skip_special_tokens=False) for ids, _ in eng.submitted]
    assert len(seen) == 4  # /exit ended it before "never"
    assert "hello" in seen[1] and "again" in seen[1]  # the second turn carries the first
    assert "hello" not in seen[2] and "fresh" in seen[2]  # /reset forgot it
    assert "be terse" in seen[3] and "fresh" not in seen[3]  # /system set it and reset
    assert out.getvalue().count("\n") == 4  # one streamed reply line per turn

    # each prompt is exactly the conversation so far through the template; each reply the engine's greedy one
    r1 = greedy_reply(lm, chat_ids(tok, [{"role": "user", "content": "hello"}]), 6)
    r2 = greedy_reply(lm, chat_ids(tok, [{"role": "user", "content": "hello"}, {"role": "assistant", "content": r1},
                                         {"role": "user", "content": "again"}]), 6)
    expected = [
        [{"role": "user", "content": "hello"}],
        [{"role": "user", "content": "hello"}, {"role": "assistant", "content": r1},
         {"role": "user", "content": "again"}],
        [{"role": "user", "content": "fresh"}],
        [{"role": "system", "content": "be terse"}, {"role": "user", "content": "last"}],
    ]
    prompts = [chat_ids(tok, m) for m in expected]
    assert [ids for ids, _ in eng.submitted] == prompts
    assert seen[0] == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"  # the model's own template
    replies = [r1, r2] + [greedy_reply(lm, ids, 6) for ids in prompts[2:]]
    assert out.getvalue() == "".join(r + "\n" for r in replies)
    assert all(p.temperature == 0.0 and p.max_tokens == 6 for _, p in eng.submitted)


def test_chat_verb_reads_stdin(lm, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("hi there\n"))
    assert main(["chat", "--model", str(lm.path), "--temperature", "0", "--max-new-tokens", "4"]) == 0
    printed = capsys.readouterr()
    assert "tokens/s" in printed.err
    assert printed.out == greedy_reply(lm, chat_ids(lm.tokenizer, [{"role": "user", "content": "hi there"}]), 4) + "\n"


def test_chat_verb_samples_without_top_k_by_default(lm, monkeypatch):
    """`--top-k` is sampling's (default 0: off); retrieval's chunk count is `--rag-top-k` and never reaches
    the sampler (it once did: every chat sampled with top_k=4)."""
    submitted = []
    real_submit = Engine.submit

    def record(self, ids, params=None):
        submitted.append(params)
        return real_submit(self, ids, params)

    monkeypatch.setattr(Engine, "submit", record)
    for flags, top_k in [([], 0), (["--top-k", "3", "--rag-top-k", "2"], 3), (["--rag-top-k", "7"], 0)]:
        monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))
        assert main(["chat", "--model", str(lm.path), "--max-new-tokens", "2", "--seed", "1", "--no-compile",
                     *flags]) == 0
        p = submitted.pop()
        assert p.top_k == top_k and p.temperature == 0.7 and p.top_p == 0.95 and p.seed == 1, flags
