"""Text over the engine: stop strings cut across token boundaries, EOS text dropped, the generate verb."""

import io

import pytest

from lmforge.cli import main
from lmforge.inference.engine import Engine, TokenEvent
from lmforge.inference.generate import TextAssembler, chat_ids, read_prompt, stream_text
from lmforge.inference.load import load
from lmforge.inference.sampling import SamplingParams
from tests.inference.tiny import make_model_dir


class PieceTokenizer:
    """Token id i decodes to PIECES[i] (enough of the Tokenizer API for TextAssembler)."""

    PIECES = ["Hel", "lo ", "wo", "rld", "!", "<eos>"]

    def stream_decoder(self):
        pieces = self.PIECES

        class D:
            def push(self, i):
                return pieces[i]

            def flush(self):
                return ""

        return D()


def run_assembler(ids, stop, stop_ids=(5,)):
    asm = TextAssembler(PieceTokenizer(), stop, stop_ids)
    out, reason = [], None
    for n, i in enumerate(ids):
        end = "stop" if i in stop_ids else ("length" if n == len(ids) - 1 else None)
        d = asm.feed(TokenEvent(i, finish_reason=end))
        if d is not None:
            out.append(d.text)
            if d.finish_reason:
                reason = d.finish_reason
                break
    return out, reason, asm.n_tokens


def test_stop_string_split_across_tokens_is_never_emitted():
    out, reason, n = run_assembler([0, 1, 2, 3, 4], ["o w"])
    assert "".join(out) == "Hell" and reason == "stop" and n == 3
    assert out == ["Hel", "l", ""]  # "o " was held back while it could still start "o w"
    out, reason, _ = run_assembler([0, 1, 2, 3, 4], ["xyz"])
    assert "".join(out) == "Hello world!" and reason == "length"
    out, reason, n = run_assembler([0, 1, 5], [])
    assert "".join(out) == "Hello " and reason == "stop" and n == 3  # EOS counted, not shown
    out, _, _ = run_assembler([0, 1, 2], ["lo wo", "Hello"])
    assert "".join(out) == ""  # the earliest match wins


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return load(make_model_dir(tmp_path_factory.mktemp("m") / "tiny"))


def test_stream_text_with_real_tokenizer(lm):
    eng = Engine(lm.model, eos_ids=lm.eos_ids).start()
    try:
        greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
        ids = chat_ids(lm.tokenizer, [{"role": "user", "content": "Hello there"}])
        full = "".join(d.text for d in stream_text(eng.submit(ids, greedy), lm.tokenizer))
        assert full == lm.tokenizer.decode(eng.submit(ids, greedy).result())
        stop = full[len(full) // 2: len(full) // 2 + 3]
        deltas = list(stream_text(eng.submit(ids, greedy), lm.tokenizer, [stop]))
        text = "".join(d.text for d in deltas)
        assert text == full[:full.index(stop)] and deltas[-1].finish_reason == "stop"
    finally:
        eng.stop()


def test_generate_verb_streams_to_stdout(lm, capsys):
    rc = main(["generate", "--model", str(lm.path), "--prompt", "The quick", "--temperature", "0",
               "--max-new-tokens", "8", "--seed", "1"])
    assert rc == 0
    printed = capsys.readouterr()
    eng = Engine(lm.model, eos_ids=lm.eos_ids)
    ids = eng.generate([lm.tokenizer.encode("The quick")], SamplingParams(temperature=0.0, max_tokens=8))[0]
    expect = lm.tokenizer.decode([i for i in ids if i not in lm.eos_ids])
    assert printed.out == expect + "\n"
    assert "tokens/s" in printed.err
    assert main(["generate", "--model", str(lm.path.parent / "nope"), "--prompt", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_generate_prompt_from_stdin_drops_the_shells_newline(lm, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("The quick\n"))  # as `echo "The quick" | lmforge generate` sends it
    assert main(["generate", "--model", str(lm.path), "--prompt", "-", "--temperature", "0",
                 "--max-new-tokens", "8"]) == 0
    printed = capsys.readouterr()
    ids = lm.tokenizer.encode("The quick")
    assert f"[{len(ids)} prompt tokens," in printed.err
    out = Engine(lm.model, eos_ids=lm.eos_ids).generate([ids], SamplingParams(temperature=0.0, max_tokens=8))[0]
    assert printed.out == lm.tokenizer.decode([i for i in out if i not in lm.eos_ids]) + "\n"
    for sent, prompt in [("a\r\n", "a"), ("a\n\n", "a\n"), ("a", "a"), ("", "")]:
        monkeypatch.setattr("sys.stdin", io.StringIO(sent))
        assert read_prompt("-") == prompt
    assert read_prompt("b\n") == "b\n"  # a prompt given as text is taken as it is


@pytest.mark.parametrize("verb", ["generate", "chat", "serve"])
def test_help_lists_dtype_and_quantize_choices(verb, capsys):
    with pytest.raises(SystemExit):
        main([verb, "--help"])
    out = capsys.readouterr().out
    assert "--dtype {float32,bfloat16,float16}" in out and "--quantize {int8,int4}" in out


def test_generate_sizes_the_kv_cache_by_memory(tmp_path, capsys):
    """A 1M-parameter model declaring a 2**31-position context: by default the cache gets what the budget buys
    (and says so); a context asked for explicitly that cannot fit is one clear error with the fix, not torch's."""
    d = make_model_dir(tmp_path / "long", max_seq_len=2**31 - 1)
    assert main(["generate", "--model", str(d), "--prompt", "The quick", "--max-new-tokens", "2",
                 "--temperature", "0"]) == 0
    err = capsys.readouterr().err
    assert "KV cache: 1 sequence(s) x 256 positions allocated" in err and "of free memory" in err
    assert "raise --kv-cache-memory for more" in err
    assert main(["generate", "--model", str(d), "--prompt", "The quick", "--max-new-tokens", "2",
                 "--max-len", "2147483647"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the KV cache for 1 sequence(s) of 2147483647 positions needs")
    assert "max_position_embeddings) is 2147483647" in err and "--max-len" in err and "Traceback" not in err
    # the fixes it names work
    assert main(["generate", "--model", str(d), "--prompt", "The quick", "--max-new-tokens", "2",
                 "--max-len", "64", "--temperature", "0"]) == 0
    assert main(["generate", "--model", str(d), "--prompt", "The quick", "--max-new-tokens", "2",
                 "--kv-cache-memory", "1MB", "--temperature", "0"]) == 0
    err = capsys.readouterr().err
    assert "budget: --kv-cache-memory" in err
    assert main(["generate", "--model", str(d), "--prompt", "x", "--kv-cache-memory", "lots"]) == 2
    assert "is not a size" in capsys.readouterr().err


def test_generate_exits_non_zero_on_bad_values_and_hostile_templates(lm, tmp_path, capsys):
    """A top_k no tensor holds once failed the generation and still exited 0; a template whose range() passes
    the sandbox's limit was a traceback. Both are now errors that say what is wrong, with a non-zero status."""
    assert main(["generate", "--model", str(lm.path), "--prompt", "x", "--top-k", str(2**63)]) != 0
    assert "top_k" in capsys.readouterr().err
    import json
    import shutil

    d = tmp_path / "hostile"
    shutil.copytree(lm.path, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{% for i in range(10**7) %}x{% endfor %}"
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert main(["generate", "--model", str(d), "--prompt", "hi", "--chat", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert "Range too big" in err and "Traceback" not in err
