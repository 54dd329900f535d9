"""Preference pairs: every accepted shape, masks only on the responses, errors name the line."""

import json

import pytest

from lmforge.data.preference import load_preferences, to_preference
from lmforge.data.sft import RecordError
from lmforge.errors import LmforgeError
from tests.finetune.fixtures import one_thread, tiny_tokenizer  # noqa: F401  (one_thread: autouse, torch on one thread)

U = {"role": "user", "content": "What does join do?"}
A1 = {"role": "assistant", "content": "It joins two paths."}
A2 = {"role": "assistant", "content": "Return the sum."}


def test_shapes():
    assert to_preference({"prompt": "What does join do?", "chosen": "It joins two paths.",
                          "rejected": "Return the sum."}) == ([U], [A1], [A2])
    assert to_preference({"prompt": [U], "chosen": [A1], "rejected": [A2]}) == ([U], [A1], [A2])
    assert to_preference({"chosen": [U, A1], "rejected": [U, A2]}) == ([U], [A1], [A2])
    assert to_preference({"prompt": [U], "chosen": [U, A1], "rejected": [U, A2]}) == ([U], [A1], [A2])
    with pytest.raises(RecordError, match="identical"):
        to_preference({"prompt": "q", "chosen": "a", "rejected": "a"})
    with pytest.raises(RecordError, match="share no prompt"):
        to_preference({"chosen": [A1], "rejected": [A2]})


def test_masks_cover_responses_only(tmp_path):
    tok = tiny_tokenizer()
    hist = [U, A1, {"role": "user", "content": "And sum?"}]
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": hist, "chosen": "Return the sum.", "rejected": "It splits."}) + "\n"
                 + json.dumps({"prompt": "q", "chosen": "yes"}) + "\n")
    with pytest.raises(LmforgeError, match=r"p.jsonl line 2: .*'rejected'"):
        load_preferences(f, tok, seq_len=128)
    pairs, stats = load_preferences(f, tok, seq_len=128, skip_bad=True)
    assert stats.skipped_bad == 1 and len(pairs) == 1
    c = pairs[0].chosen
    trained = tok.decode([i for i, t in zip(c.ids, c.train) if t], skip_special_tokens=False)
    assert trained == "Return the sum.<|im_end|>"  # the history's assistant turn is prompt, not response
    r = pairs[0].rejected
    assert tok.decode([i for i, t in zip(r.ids, r.train) if t], skip_special_tokens=False) == "It splits.<|im_end|>"
    # the prompt tokens are shared exactly
    n = c.train.index(True)
    assert c.ids[:n] == r.ids[:n]
