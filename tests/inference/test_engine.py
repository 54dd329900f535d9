"""The Engine against a plain full-forward greedy loop: alone, in a busy batch, with slots reused, cancelled."""

import threading

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.inference.engine import ContextLengthExceeded, Engine, QueueFull
from lmforge.inference.sampling import SamplingParams
from lmforge.model.config import preset
from lmforge.model.transformer import Transformer


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = Transformer(preset("test").replace(max_seq_len=128))
    m.init_weights(0)
    return m.eval()


def reference_greedy(model, prompt, n):
    """No cache, no batch: argmax of a full forward over the whole sequence, n times."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def prompts(k, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 2048, (int(n),), generator=g).tolist()
            for n in torch.randint(3, 40, (k,), generator=g)]


GREEDY = SamplingParams(temperature=0.0, max_tokens=12)


def test_single_request_matches_full_forward(model):
    p = prompts(1)[0]
    out = Engine(model, max_batch=2).generate([p], GREEDY)[0]
    assert out == reference_greedy(model, p, 12)


def test_greedy_same_alone_and_in_busy_batch(model):
    ps = prompts(7)
    alone = [Engine(model, max_batch=1).generate([p], GREEDY)[0] for p in ps]
    # 3 slots for 7 requests: requests wait, join the running batch mid-flight, and reuse freed slots;
    # a small prefill chunk makes long prompts prefill across several steps while others decode
    eng = Engine(model, max_batch=3, prefill_chunk=8)
    mixed = [GREEDY.replace(max_tokens=m) for m in (12, 5, 12, 9, 12, 3, 12)]
    batched = eng.generate(ps, mixed)
    for a, b, sp in zip(alone, batched, mixed):
        assert b == a[:sp.max_tokens]
    assert eng.queue_stats() == {"waiting": 0, "running": 0, "compiling": 0}


def test_seeded_sampling_is_batch_invariant_and_reproducible(model):
    ps = prompts(4, seed=3)
    sp = [SamplingParams(temperature=0.9, top_k=50, top_p=0.9, seed=100 + i, max_tokens=10) for i in range(4)]
    alone = [Engine(model, max_batch=1).generate([p], s)[0] for p, s in zip(ps, sp)]
    together = Engine(model, max_batch=4).generate(ps, sp)
    assert alone == together
    other_seed = Engine(model, max_batch=1).generate([ps[0]], sp[0].replace(seed=7))[0]
    assert other_seed != alone[0]


def test_stop_on_eos_and_length(model):
    p = prompts(1, seed=5)[0]
    free = Engine(model).generate([p], GREEDY)[0]
    eos = free[4]
    eng = Engine(model, eos_ids=[eos])
    g = eng.submit(p, GREEDY)
    while not g.done:
        eng.step()
    assert g.output_ids == free[:free.index(eos) + 1] and g.finish_reason == "stop"
    g2 = eng.submit(p, GREEDY.replace(ignore_eos=True))
    assert eng.generate([p], GREEDY.replace(ignore_eos=True))[0] == free
    g2.cancel()
    # the context bounds the output: prompt + output never exceeds max_len
    short = Engine(model, max_len=len(p) + 3)
    g3 = short.submit(p, GREEDY)
    while not g3.done:
        short.step()
    assert len(g3.output_ids) == 3 and g3.finish_reason == "length"


def test_threaded_submit_cancel_and_slot_release(model):
    eng = Engine(model, max_batch=2).start()
    try:
        long = eng.submit(prompts(1)[0], SamplingParams(temperature=0.0, max_tokens=10_000, ignore_eos=True))
        it = iter(long)
        next(it)
        long.cancel()
        events = list(it)
        assert events[-1].finish_reason == "cancelled"
        # many concurrent submitters all finish
        outs, errs = [], []

        def worker(p):
            try:
                outs.append(eng.submit(p, GREEDY).result())
            except Exception as e:  # pragma: no cover - reported below
                errs.append(e)

        threads = [threading.Thread(target=worker, args=(p,)) for p in prompts(6, seed=9)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errs and len(outs) == 6 and all(len(o) == 12 for o in outs)
    finally:
        eng.stop()
    assert eng.queue_stats()["running"] == 0


def test_logprobs_are_raw_model_logprobs(model):
    p = prompts(1)[0]
    g = Engine(model).submit(p, GREEDY.replace(max_tokens=1, logprobs=True, top_logprobs=3))
    while not g.done:
        g.engine.step()
    ev = list(g)[-1]
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([p]))[0, -1], -1)
    assert ev.token == int(ref.argmax())
    assert abs(ev.logprob - float(ref.max())) < 1e-4
    assert [t for t, _ in ev.top_logprobs] == ref.topk(3).indices.tolist()


def test_bad_requests_raise_clear_errors(model):
    eng = Engine(model, max_len=32, max_queue=1)
    with pytest.raises(ContextLengthExceeded, match="32"):
        eng.submit(list(range(40)), GREEDY)
    with pytest.raises(LmforgeError, match="empty"):
        eng.submit([], GREEDY)
    with pytest.raises(LmforgeError, match="vocabulary"):
        eng.submit([5, 99999], GREEDY)
    with pytest.raises(LmforgeError, match="top_p"):
        eng.submit([5], SamplingParams(top_p=0.0))
    eng.submit([1, 2], GREEDY)
    with pytest.raises(QueueFull):
        eng.submit([1, 2], GREEDY)


def test_prompt_logprobs_match_a_full_forward_chunked_and_batched(model):
    """Each prompt token's logprob under the tokens before it, as one full forward gives it, while the prompt
    prefills in chunks beside other requests; max_tokens 0 scores without generating."""
    ps = prompts(4, seed=11)
    eng = Engine(model, max_batch=3, prefill_chunk=8)
    score = GREEDY.replace(max_tokens=0, prompt_logprobs=3)
    gens = [eng.submit(ps[0], GREEDY), eng.submit(ps[1], score), eng.submit(ps[2], GREEDY.replace(prompt_logprobs=0)),
            eng.submit(ps[3], GREEDY)]
    while not all(g.done for g in gens):
        eng.step()
    assert gens[0].prompt_logprobs is None and gens[3].prompt_logprobs is None  # only when asked
    assert gens[1].output_ids == [] and gens[1].finish_reason == "length"
    assert gens[2].output_ids == reference_greedy(model, ps[2], 12)  # scoring leaves generation as it was
    for g, k in ((gens[1], 3), (gens[2], 0)):
        p = g.prompt_ids
        with torch.no_grad():
            ref = torch.log_softmax(model(torch.tensor([p]))[0], -1)  # T V
        lps = g.prompt_logprobs
        assert [e.token for e in lps] == p and lps[0].logprob is None and lps[0].top_logprobs is None
        for j in range(1, len(p)):
            assert abs(lps[j].logprob - float(ref[j - 1, p[j]])) < 1e-4
            if k:
                assert [t for t, _ in lps[j].top_logprobs] == ref[j - 1].topk(k).indices.tolist()
            else:
                assert lps[j].top_logprobs is None
    # max_tokens 0 may fill the whole context: nothing is generated after it
    short = Engine(model, max_len=len(ps[1]))
    g = short.submit(ps[1], score)
    while not g.done:
        short.step()
    assert len(g.prompt_logprobs) == len(ps[1])
    with pytest.raises(ContextLengthExceeded):
        short.submit(ps[1], GREEDY)


def test_a_failing_request_ends_alone_and_its_batch_goes_on(model):
    """A request whose sampling (or prompt scoring) raises ends with an error event; every other request of the
    busy batch gets exactly the tokens it gets alone. The bad values are set after submit, past validation:
    they stand in for any bug one request's input could trigger in the step."""
    ps = prompts(6, seed=13)
    alone = [Engine(model, max_batch=1).generate([p], GREEDY)[0] for p in ps]
    eng = Engine(model, max_batch=4, prefill_chunk=8)
    gens = [eng.submit(p, GREEDY) for p in ps]
    bad_sampling = eng.submit(ps[0], SamplingParams(temperature=0.8, max_tokens=12))
    bad_sampling.params.temperature = "hot"  # not a number: the sampler's tensor of temperatures raises, mid-batch
    bad_scoring = eng.submit(ps[1], GREEDY.replace(prompt_logprobs=1))
    bad_scoring.params.prompt_logprobs = 10**6  # topk over more than the vocabulary: the prefill raises
    while not all(g.done for g in gens + [bad_sampling, bad_scoring]):
        eng.step()
    for g in (bad_sampling, bad_scoring):
        events = list(g)
        assert g.finish_reason == "error" and events[-1].error
    assert [g.finish_reason for g in gens] == ["length"] * 6
    assert [g.output_ids for g in gens] == alone
    assert eng.queue_stats() == {"waiting": 0, "running": 0, "compiling": 0}
    assert eng.generate([ps[2]], GREEDY)[0] == alone[2]  # and the engine serves on


def test_values_a_tensor_cannot_hold_are_refused(model):
    eng = Engine(model)
    for bad in (dict(top_k=2**63), dict(top_logprobs=True), dict(temperature=float("nan")), dict(seed=1.5),
                dict(stop_token_ids=[1.0]), dict(prompt_logprobs=-1), dict(max_tokens=-1)):
        with pytest.raises(LmforgeError, match=next(iter(bad))):
            eng.submit([1, 2], SamplingParams(**bad))
    assert eng.generate([[1, 2]], GREEDY.replace(top_k=10**9))[0] == eng.generate([[1, 2]], GREEDY)[0]


def test_prefix_reuse_skips_the_shared_prefill_and_changes_nothing(model):
    """A prompt that starts with what a free slot holds (the previous turn of a chat) prefills only the rest."""
    turn1 = prompts(1, seed=11)[0]
    eng = Engine(model, max_batch=2)
    reply1 = eng.generate([turn1], GREEDY)[0]
    turn2 = turn1 + reply1 + [7, 8, 9]  # the conversation so far, plus the next user message
    reply2 = eng.generate([turn2], GREEDY)[0]
    # everything fed to the model before is reused: the prompt and all but the last reply token
    assert eng.stats.prompt_tokens_reused == len(turn1) + len(reply1) - 1
    fresh = Engine(model, max_batch=2, prefix_reuse=False)
    assert reply2 == fresh.generate([turn2], GREEDY)[0] == reference_greedy(model, turn2, 12)
    assert fresh.stats.prompt_tokens_reused == 0


def test_a_free_slot_keeps_its_prefix_while_others_decode(model):
    """Slot 0 is free while slot 1 decodes (rows 0..1 run together): its kept prefix must survive that batch."""
    ps = prompts(3, seed=12)
    eng = Engine(model, max_batch=2)
    first = eng.generate([ps[0]], GREEDY.replace(max_tokens=3))[0]  # slot 0 now holds ps[0] + first[:2]
    a = eng.submit(ps[1], GREEDY)  # takes the empty slot 1 (slot 0's prefix does not match: kept)
    eng.step()
    assert a._slot == 1
    while not a.done:
        eng.step()  # decode batches of rows 0..1: slot 0 is a padding row
    again = ps[0] + first + [3]
    out = eng.generate([again], GREEDY)[0]
    assert eng.stats.prompt_tokens_reused == len(ps[0]) + 2
    assert out == reference_greedy(model, again, 12)


def test_kv_budget_bounds_the_context_and_the_cache_grows_into_it(model, monkeypatch):
    per_position = 2 * model.cfg.n_layers * model.cfg.n_kv_heads * model.cfg.head_size * 4 * 2  # 2 slots, fp32
    eng = Engine(model, max_batch=2, kv_memory=100 * per_position)
    assert eng.max_len == 100 and eng.cache.capacity == 100  # less than the initial 256: all of it
    with pytest.raises(LmforgeError, match="budget"):
        Engine(model, max_batch=2, max_len=128, kv_memory=100 * per_position)
    with pytest.raises(LmforgeError, match="less than 2 positions"):
        Engine(model, max_batch=2, kv_memory=per_position)
    big = Engine(model, max_batch=2)  # the model's context (128) allocated as it is used
    assert big.cache.capacity == 128 and "grows on demand to 2 x 128 positions" in big.cache_summary()
    p = prompts(1, seed=13)[0]
    monkeypatch.setattr("lmforge.inference.engine.INITIAL_CAPACITY", 8)
    small_first = Engine(model, max_batch=1)  # 8 positions at first: grows as the sequence does
    assert small_first.cache.capacity == 8
    assert small_first.generate([p], GREEDY.replace(max_tokens=40))[0] == reference_greedy(model, p, 40)
    assert small_first.cache.capacity >= len(p) + 40
