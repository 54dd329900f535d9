"""The chat REPL driven through text streams: history is kept, /reset and /system work, replies stream."""

import io

import pytest

from lmforge.cli import main
from lmforge.inference.chat import ChatConfig, repl
from lmforge.inference.engine import Engine
from lmforge.inference.load import load
from tests.inference.tiny import make_model_dir


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return load(make_model_dir(tmp_path_factory.mktemp("c") / "tiny"))


def test_repl_keeps_history_and_commands(lm, monkeypatch):
    seen = []
    real_submit = Engine.submit

    def spy(self, ids, params=None):
        seen.append(lm.tokenizer.decode(ids, skip_special_tokens=False))
        return real_submit(self, ids, params)

    monkeypatch.setattr(Engine, "submit", spy)
    script = "hello\nagain\n/reset\nfresh\n/system be terse\nlast\n/exit\nnever\n"
    out = io.StringIO()
    cfg = ChatConfig(temperature=0.0, max_new_tokens=6, stats=False)
    with Engine(lm.model, eos_ids=lm.eos_ids) as eng:
        repl(eng, lm.tokenizer, cfg, stdin=io.StringIO(script), stdout=out)
    assert len(seen) == 4  # /exit ended it before "never"
    assert "hello" in seen[1] and "again" in seen[1]  # the second turn carries the first
    assert "hello" not in seen[2] and "fresh" in seen[2]  # /reset forgot it
    assert "be terse" in seen[3] and "fresh" not in seen[3]  # /system set it and reset
    assert out.getvalue().count("\n") == 4  # one streamed reply line per turn


def test_chat_verb_reads_stdin(lm, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("hi there\n"))
    assert main(["chat", "--model", str(lm.path), "--temperature", "0", "--max-new-tokens", "4"]) == 0
    assert "tokens/s" in capsys.readouterr().err
