"""compare's timing protocol on synthetic workloads: warm-up before any timed chunk, variants taking turns item by
item in a rotating order, the thread count set before every chunk and read back after it, medians and ranges."""

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.eval.timing import agreement, measure, rotation, summarize_passes


def _recorder(log, name, tokens=10):
    def run(items):
        log.append((name, tuple(items)))
        return [{"prompt_tokens": tokens, "output_tokens": 2, "latency_s": 0.001} for _ in items]
    return run


def test_warm_up_then_interleaved_rotating_turns():
    log = []
    res = measure({"a": _recorder(log, "a"), "b": _recorder(log, "b"), "c": _recorder(log, "c")}, [0, 1, 2], passes=2,
                  threads=1)
    assert log[:3] == [("a", (0, 1, 2)), ("b", (0, 1, 2)), ("c", (0, 1, 2))]  # one untimed pass each, first
    timed = log[3:]
    assert len(timed) == 2 * 3 * 3 and all(len(items) == 1 for _, items in timed)
    # round 0: item 0 a b c, item 1 b c a, item 2 c a b; round 1 starts one further along
    assert [n for n, _ in timed[:9]] == list("abc" "bca" "cab")
    assert [n for n, _ in timed[9:12]] == list("bca")
    for name in "abc":
        v = res["variants"][name]
        assert [p["queries"] for p in v["passes"]] == [3, 3] and [p["tokens"] for p in v["passes"]] == [36, 36]
        assert v["threads"] == [1]
    assert (res["warmup"], res["passes"], res["items"], res["chunk"]) == (1, 2, 3, 1)


def test_a_pass_at_concurrency_is_one_chunk():
    log = []
    measure({"a": _recorder(log, "a"), "b": _recorder(log, "b")}, [0, 1, 2, 3], passes=3, threads=1, chunk=4)
    assert [n for n, items in log[2:]] == list("ab" "ba" "ab") and all(len(i) == 4 for _, i in log)


def test_threads_are_set_before_every_chunk_and_a_change_is_recorded():
    before = torch.get_num_threads()
    seen = []

    def sneaky(items):  # something inside a variant changes the thread count
        seen.append(torch.get_num_threads())
        torch.set_num_threads(2)
        return [{"prompt_tokens": 1, "output_tokens": 0, "latency_s": 0.0} for _ in items]

    try:
        res = measure({"a": _recorder([], "a"), "b": sneaky}, [0, 1], passes=2, threads=1)
        assert set(seen) == {1}  # reset to the fixed count before each of b's chunks
        assert res["variants"]["a"]["threads"] == [1]
        assert res["variants"]["b"]["threads"] == [2]  # the record shows b ran at another count
    finally:
        torch.set_num_threads(before)


def test_medians_ranges_and_machine_time():
    from lmforge.eval.timing import Pass

    passes = [Pass(r, seconds=s, cpu_s=c, tokens=100, queries=10, latency_s=s / 10, threads=2)
              for r, (s, c) in enumerate([(1.0, 1.0), (2.0, 1.2), (4.0, 1.1)])]
    v = summarize_passes(passes)
    assert v["tokens_per_s"] == 50 and v["tokens_per_s_range"] == [25, 100] and v["spread"] == pytest.approx(1.5)
    assert v["latency_s"] == 0.2 and v["latency_s_range"] == [0.1, 0.4]
    # machine time: CPU seconds over the 2 threads: 0.5, 0.6, 0.55 s for 10 queries
    assert v["machine_s_per_query"] == pytest.approx(0.055) and v["machine_tokens_per_s"] == pytest.approx(100 / 0.55)
    assert agreement({"x": 90.0}, {"x": 110.0}, "x") == pytest.approx(0.2)
    assert rotation(["a", "b", "c"], 4) == ["b", "c", "a"]


def test_errors():
    with pytest.raises(LmforgeError, match="timing-passes"):
        measure({"a": _recorder([], "a")}, [0], passes=0, threads=1)
    with pytest.raises(LmforgeError, match="thread count"):
        measure({"a": _recorder([], "a")}, [0], passes=1, threads=0)
