"""The arithmetic and checks of a job request, without a server: "auto", batches, names, ranges, the store's
pages."""

import pytest

from lmforge.jobs import spec
from lmforge.jobs.store import Store


def test_auto_rules_and_batches():
    assert [spec.auto_epochs(n) for n in (5, 10, 34, 100, 8333, 10_000, 100_000)] == [20, 10, 3, 3, 3, 2, 1]
    assert [spec.auto_batch_size(n) for n in (10, 1000, 1001, 10**6)] == [1, 2, 3, 256]
    for b in (1, 4, 7, 12, 13, 256):
        micro, accum = spec.micro_batch(b)
        assert micro * accum == b and micro <= 8
    hp = spec.resolve("dpo", {"batch_size": "auto", "n_epochs": "auto", "learning_rate_multiplier": 2.0,
                              "beta": "auto"}, 40)
    assert hp == {"batch_size": 1, "n_epochs": 3, "learning_rate_multiplier": 2.0, "beta": 0.1}
    assert spec.total_steps(40, {"n_epochs": 3, "batch_size": 16}) == 9
    r = spec.recipe("dpo", hp, 40, base_path="b", train_path="t", val_path=None, run_dir="r", seed=1,
                    options=spec.RunOptions())
    assert r["verb"] == "dpo" and r["total_steps"] == 120 and "--beta" in r["argv"]
    assert r["argv"][r["argv"].index("--lr") + 1] == repr(2 * spec.BASE_LR["dpo"])
    assert spec.model_name("tiny", None, "ftjob-abc") == "ft:tiny::abc"
    assert spec.resolve("kto", {"batch_size": "auto", "n_epochs": 1, "learning_rate_multiplier": "auto",
                                "beta": "auto", "desirable_weight": "auto", "undesirable_weight": 2.0}, 20) == {
        "batch_size": 2, "n_epochs": 1, "learning_rate_multiplier": 1.0, "beta": 0.1, "desirable_weight": 1.0,
        "undesirable_weight": 2.0}
    with pytest.raises(spec.JobError) as e:
        spec.parse_create({"model": "m", "training_file": "f",
                           "method": {"type": "kto", "kto": {"hyperparameters": {"batch_size": 1}}}})
    assert e.value.param == "method.kto.hyperparameters.batch_size"


def test_create_request_checks():
    ok = spec.parse_create({"model": "m", "training_file": "file-1"})
    assert ok.method == "supervised" and 0 <= ok.seed < 2**31 and ok.hyperparameters["n_epochs"] == "auto"
    legacy = spec.parse_create({"model": "m", "training_file": "f", "hyperparameters": {"n_epochs": 2}})
    assert legacy.hyperparameters["n_epochs"] == 2
    for body, param in (({"training_file": "f"}, "model"),
                        ({"model": "m", "training_file": "f", "seed": -1}, "seed"),
                        ({"model": "m", "training_file": "f", "suffix": "x" * 65}, "suffix"),
                        ({"model": "m", "training_file": "f", "metadata": {"k": 1}}, "metadata"),
                        ({"model": "m", "training_file": "f", "method": {"type": "rl"}}, "method.type"),
                        ({"model": "m", "training_file": "f",
                          "method": {"type": "supervised", "supervised": {"hyperparameters": {"beta": 1}}}},
                         "method.supervised.hyperparameters.beta"),
                        ({"model": "m", "training_file": "f",
                          "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1.5}}}},
                         "method.supervised.hyperparameters.n_epochs")):
        with pytest.raises(spec.JobError) as e:
            spec.parse_create(body)
        assert e.value.param == param


def test_store_pages_newest_first(tmp_path):
    store = Store(tmp_path / "db.sqlite")
    for i in range(5):
        store.add_event("job", f"e{i}")
    first, more = store.events("job", limit=2)
    assert [e["message"] for e in first] == ["e4", "e3"] and more
    rest, more = store.events("job", after=first[-1]["id"], limit=10)
    assert [e["message"] for e in rest] == ["e2", "e1", "e0"] and not more
    store.keep_responses = 2
    for i in range(4):
        store.remember_response(f"r{i}", "m", [], [str(i)])
    assert store.response("r0") is None and store.response("r3")["choices"] == ["3"]
