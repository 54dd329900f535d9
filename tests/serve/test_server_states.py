"""Loading, a full queue, and the serve verb's argument checks."""

import threading
import time

import httpx
import pytest

from lmforge.errors import LmforgeError
from lmforge.inference.load import load
from lmforge.serve.app import create_app
from lmforge.serve.server import parse_specs
from lmforge.serve.state import EngineOptions
from tests.serve.conftest import LiveServer


def test_health_is_503_while_loading_then_200(model_dirs):
    base, _ = model_dirs
    release = threading.Event()

    def slow_loader():
        release.wait(30)
        return {"tiny": load(base, name="tiny")}

    server = LiveServer(create_app(loader=slow_loader, engine=EngineOptions(max_batch=1, max_queue=1))).start()
    try:
        r = httpx.get(server.url + "/health")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        r = httpx.get(server.url + "/v1/models")
        assert r.status_code == 503 and r.json()["error"]["code"] == "loading"
        release.set()
        server.wait_ready()
        assert httpx.get(server.url + "/health").json() == {"status": "ok", "models": ["tiny"]}
        # one slot, one queue place: a third concurrent request is told to come back later
        engine = server.app.state.lmforge.engines["tiny"]
        real_step = engine.step

        def slow_step():  # keep the first request running while the others arrive
            time.sleep(0.05)
            return real_step()

        engine.step = slow_step
        body = {"model": "tiny", "prompt": "x", "max_tokens": 200, "ignore_eos": True}
        with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}) as first:
            lines = first.iter_lines()  # keep the iterator: dropping it closes the response (and cancels)
            next(lines)  # running in the only slot
            second = threading.Thread(target=httpx.post, args=(server.url + "/v1/completions",),
                                      kwargs=dict(json=body, timeout=60))
            second.start()
            deadline = time.time() + 20
            while engine.queue_stats()["waiting"] < 1 and time.time() < deadline:
                time.sleep(0.01)
            third = httpx.post(server.url + "/v1/completions", json=body)
            assert third.status_code == 429 and third.json()["error"]["type"] == "rate_limit_error"
            engine.step = real_step
        second.join(60)
        metrics = httpx.get(server.url + "/metrics").text
        assert 'lmforge_http_requests_total{endpoint="/v1/completions",status="429"} 1' in metrics
    finally:
        release.set()
        server.stop()


def test_loading_failure_is_reported(tmp_path):
    def broken():
        raise LmforgeError("model directory x does not exist")

    server = LiveServer(create_app(loader=broken)).start()
    try:
        for _ in range(100):
            r = httpx.get(server.url + "/health")
            if r.json()["status"] == "error":
                break
        assert r.status_code == 503 and "does not exist" in r.json()["error"]
    finally:
        server.stop()


def test_serve_specs(model_dirs, tmp_path):
    base, adapter = model_dirs
    assert parse_specs([str(base)], []) == [("tiny", base, None)]
    specs = parse_specs([f"a={base}", f"b={base}"], [f"a-sql=a:{adapter}"])
    assert [(n, a) for n, _, a in specs] == [("a", None), ("b", None), ("a-sql", adapter)]
    for models, adapters, msg in [([], [], "at least one"), ([str(tmp_path / "no")], [], "does not exist"),
                                  ([f"a={base}", f"a={base}"], [], "two models"),
                                  ([f"a={base}"], ["nope"], "NAME=BASE_NAME:ADAPTER_DIR"),
                                  ([f"a={base}"], [f"x=zz:{adapter}"], "no --model is named"),
                                  ([f"a={base}"], [f"a=a:{adapter}"], "already taken")]:
        with pytest.raises(LmforgeError, match=msg):
            parse_specs(models, adapters)
