"""The thread chooser: it runs the count measured fastest, and finds the other again when the machine changes."""

from lmforge.inference import threads as th
from lmforge.inference.threads import ThreadChooser


def drive(chooser, cost, steps, clock):
    """Run `steps` steps whose seconds per step at n threads is cost(n); return how many ran at each count."""
    ran = {}
    for _ in range(steps):
        n = chooser.pick("decode")
        ran[n] = ran.get(n, 0) + 1
        clock[0] += cost(n)
        chooser.record("decode", n, cost(n))
    return ran


def test_runs_the_faster_count_and_follows_a_change(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(th.time, "monotonic", lambda: clock[0])
    c = ThreadChooser([1, 2])
    quiet = {1: 0.010, 2: 0.006}.__getitem__  # an idle machine: two threads win
    ran = drive(c, quiet, 500, clock)
    assert c.best["decode"] == 2 and ran[1] < 25  # probes of the slower count stay few
    busy = {1: 0.012, 2: 0.300}.__getitem__  # the cores taken by others: two threads wait at every barrier
    ran = drive(c, busy, 500, clock)
    assert c.best["decode"] == 1 and ran[2] < 10  # found within a few steps; probed rarely (5% of the time)
    t0 = clock[0]
    drive(c, busy, 2000, clock)
    assert c.best["decode"] == 1
    ran = drive(c, quiet, 3000, clock)  # quiet again: back to two threads within a probe period or two
    assert c.best["decode"] == 2 and clock[0] > t0


def test_a_fixed_count_never_probes():
    c = ThreadChooser([3])
    assert c.fixed and all(c.pick(k) == 3 for k in range(5))
    c.record(0, 3, 1.0)
    assert not c.samples


def test_the_verbs_default_is_auto_and_an_auto_engine_gives_the_fixed_engines_ids():
    import pytest
    import torch

    from lmforge.errors import LmforgeError
    from lmforge.inference.engine import Engine, engine_kwargs
    from lmforge.inference.sampling import SamplingParams
    from lmforge.model.config import preset
    from lmforge.model.transformer import Transformer
    from lmforge.serve.server import ServeConfig

    assert ServeConfig().threads == 0 and engine_kwargs(0, 0) == {"threads": "auto", "prefill_threads": "auto"}
    assert engine_kwargs(1, 2) == {"threads": 1, "prefill_threads": 2}
    torch.manual_seed(0)
    m = Transformer(preset("test"))
    m.init_weights(0)
    auto = Engine(m, max_batch=2, **engine_kwargs(0, 0))
    assert auto._decode_threads.candidates == sorted({1, th.cpu_cores()})
    sp = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    ps = [[1, 2, 3, 4], [9, 8, 7]]
    before = torch.get_num_threads()
    assert auto.generate(ps, sp) == Engine(m, max_batch=2, threads=1, prefill_threads=1).generate(ps, sp)
    if th.cpu_cores() > 1:  # both counts were measured while it ran
        assert {n for (_, n) in auto._decode_threads.samples} == {1, th.cpu_cores()}
    torch.set_num_threads(before)
    with pytest.raises(LmforgeError, match="threads must be"):
        Engine(m, threads=0)
