"""A seeded fuzz of the fine-tuning, files and feedback routes on a live server with a jobs directory.

The same rules as tests/serve/test_reliability.py: never a 5xx, errors in OpenAI's shape, strict JSON, and
the server healthy afterwards. Requests are drawn from value banks (valid values first, then edges, wrong
types, hostile strings) for every field of every route: multipart uploads (missing parts, wrong purpose, bad
JSON lines, non-UTF-8, over the size limit, hostile filenames), job creation (every hyperparameter's edges,
unknown methods, missing files), job actions and listings with hostile ids and query strings, and feedback.
Jobs that the fuzz creates are cancelled at the end, so nothing trains for long.
"""

import json
import random
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.jobs.conftest import KEY, chat_records, dpo_records
from tests.serve.test_reliability import HUGE, STRINGS, WRONG, strict_json

AUTH = {"Authorization": f"Bearer {KEY}"}
SEED = 20261201
IDS = ["", "x", "nope", "ftjob-0", "file-0", "\u00e9\u6771", "a" * 500, "%00", "..", "../../etc/passwd",
       "ftjob-" + "9" * 40, "%2e%2e%2f", " ", "a b", "<script>"]
QUERY = {"limit": ["1", "5", "100", "0", "-1", "--5", "\u00b2", "\u0663", "1e3", "1.5", "", "x", str(2**64), " 7"],
         "after": IDS, "order": ["asc", "desc", "", "up", "\u00e9"], "purpose": ["fine-tune", "batch", "", "\u00e9"],
         "metadata[team]": ["qa", "", "\u00e9" * 100]}
NUMBERS = [1, 2, 4, "auto", 0, -1, 0.5, 1e-9, 10, 51, 257, 2.0, float("inf")] + HUGE + WRONG


def upload_cases(rng: random.Random, good: bytes, dpo: bytes) -> dict:
    content = rng.choice([good, good, dpo, b"", b"{", b"not json\n", b"[1, 2]\n", b"\xff\xfe\x00",
                          b'{"messages": []}\n', b'{"messages": [{"role": "wizard", "content": "x"}]}\n',
                          b"\n\n\n", b'{"prompt": "a", "completion": "b"}\n', b"x" * 250_000,
                          json.dumps({"messages": [{"role": "user", "content": "\ud83d"}]}).encode() + b"\n"])
    name = rng.choice(["train.jsonl", "", "../../x.jsonl", "\u00e9\u6771.jsonl", "a" * 300, "x\x00y", "/etc/passwd"])
    purpose = rng.choice(["fine-tune", "fine-tune", "batch", "", "\u00e9", "fine-tune" * 100])
    files, data = {}, {}
    if rng.random() < 0.9:
        files["file"] = (name, content, rng.choice(["application/jsonl", "text/plain", "application/octet-stream"]))
    if rng.random() < 0.9:
        data["purpose"] = purpose
    if rng.random() < 0.1:
        data["extra"] = "field"
    if not files:  # httpx sends a urlencoded form without files: both must be answered
        return dict(data=data)
    return dict(files=files, data=data)


def pick(rng: random.Random, values: list, clean: bool, valid: int = 1):
    """One of the first `valid` values when clean, else any."""
    return rng.choice(values[:valid] if clean else values)


def hyperparameters(rng: random.Random, kind: object, clean: bool) -> dict | object:
    if not clean and rng.random() < 0.05:
        return rng.choice(WRONG)
    names = {"supervised": ["batch_size", "learning_rate_multiplier", "n_epochs"],
             "dpo": ["batch_size", "beta", "learning_rate_multiplier", "n_epochs"],
             "kto": ["batch_size", "beta", "learning_rate_multiplier", "n_epochs", "desirable_weight",
                     "undesirable_weight"]}.get(kind, ["batch_size"]) + ([] if clean else ["not_a_field"])
    return {n: pick(rng, NUMBERS, clean, 4) for n in names if rng.random() < 0.5}


def job_body(rng: random.Random, file_ids: dict[str, str]) -> dict:
    """Half the bodies are valid (every field from its valid values), half draw from the whole banks."""
    clean = rng.random() < 0.5
    kind = pick(rng, ["supervised", "dpo", "kto", "reinforcement", "", None, 5, "\u00e9"], clean, 3)
    body = {"model": pick(rng, ["tiny", "nope", "", None, 5, "x" * 300], clean),
            "training_file": file_ids["dpo" if kind == "dpo" else "chat"] if clean else rng.choice(
                list(file_ids.values()) + IDS + [None, 5, []])}
    if rng.random() < 0.3:
        body["validation_file"] = pick(rng, [file_ids["dpo" if kind == "dpo" else "chat"]] + IDS + [None, 5], clean)
    if rng.random() < 0.3:
        body["suffix"] = pick(rng, ["ok", "", "x" * 65, "a b", "\u00e9", None, 5], clean)
    if rng.random() < 0.3:
        body["seed"] = pick(rng, [0, 7, -1, 2**31, 1.5, "1", True] + HUGE, clean, 2)
    if rng.random() < 0.3:
        body["metadata"] = pick(rng, [{"team": "qa"}, {"k": 5}, {str(i): "v" for i in range(17)}, [], "x",
                                      {"x" * 65: "v"}, {"k": "v" * 513}], clean)
    if not clean and rng.random() < 0.2:
        body["hyperparameters"] = hyperparameters(rng, "supervised", clean)
    if clean or rng.random() < 0.9:
        section = {"hyperparameters": hyperparameters(rng, kind, clean)} if clean or rng.random() < 0.9 \
            else rng.choice(WRONG)
        body["method"] = {"type": kind, kind if isinstance(kind, str) else "x": section} if clean or \
            rng.random() < 0.95 else rng.choice(WRONG + ["supervised"])
        if clean and kind == "kto":
            section["hyperparameters"]["batch_size"] = 2  # KTO's KL estimate needs two or more
    if not clean and rng.random() < 0.3:
        body[rng.choice(["integrations", "not_a_field", "training_file"])] = rng.choice(WRONG + STRINGS[:3])
    return body


def feedback_body(rng: random.Random, reply_ids: list[str]) -> dict:
    body = {}
    if rng.random() < 0.95:
        body["response_id"] = rng.choice(reply_ids * 3 + IDS + [None, 5])
    for name, bank in (("rating", ["up", "down", "good", "bad", 1, -1, 0, 2, "meh", True, None, 1.0]),
                       ("corrected_text", ["Blue.", "", None, 5] + STRINGS),
                       ("choice_index", [0, 1, -1, 127, 128, 1.5, "0", True] + HUGE),
                       ("comment", ["fine", None, "x" * 4001, 5]), ("not_a_field", [1])):
        if rng.random() < (0.6 if name != "not_a_field" else 0.05):
            body[name] = rng.choice(bank)
    return body


def query(rng: random.Random, names: tuple[str, ...]) -> dict:
    return {n: rng.choice(QUERY[n]) for n in names if rng.random() < 0.5}


def check(method: str, path: str, r: httpx.Response) -> None:
    where = f"{method} {path} -> {r.status_code}: {r.text[:300]}"
    assert r.status_code < 500 and r.status_code != 422, where
    if r.status_code >= 400:
        err = strict_json(r.text)["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], where
    elif r.headers.get("content-type", "").startswith("application/json"):
        strict_json(r.text)


@pytest.fixture(scope="module")
def seeded(jobs_server):
    """Two valid files and a few remembered chat replies: the fuzz's valid ids."""
    url = jobs_server.url
    ids = {}
    for name, records in (("chat", chat_records()), ("dpo", dpo_records())):
        body = "".join(json.dumps(r) + "\n" for r in records).encode()
        r = httpx.post(url + "/v1/files", files={"file": (f"{name}.jsonl", body)}, data={"purpose": "fine-tune"},
                       headers=AUTH, timeout=60)
        assert r.status_code == 200, r.text
        ids[name] = r.json()["id"]
    replies = [httpx.post(url + "/v1/chat/completions", headers=AUTH, timeout=60, json={
        "model": "tiny", "messages": [{"role": "user", "content": f"Hi {i}"}], "max_tokens": 4, "temperature": 0,
        "n": 1 + i % 2}).json()["id"] for i in range(3)]
    return ids, replies


def test_seeded_fuzz_of_the_jobs_files_and_feedback_routes(jobs_server, seeded):
    file_ids, reply_ids = seeded
    rng = random.Random(SEED)
    good = "".join(json.dumps(r) + "\n" for r in chat_records()).encode()
    dpo = "".join(json.dumps(r) + "\n" for r in dpo_records()).encode()
    job_ids = ["ftjob-0"]
    todo: list[tuple[str, str, dict]] = []
    for _ in range(60):
        todo.append(("POST", "/v1/files", upload_cases(rng, good, dpo)))
    for _ in range(120):
        todo.append(("POST", "/v1/fine_tuning/jobs", dict(json=job_body(rng, file_ids))))
    for _ in range(80):
        todo.append(("POST", "/v1/feedback", dict(json=feedback_body(rng, reply_ids))))
    for _ in range(20):
        todo.append(("GET", "/v1/files", dict(params=query(rng, ("limit", "after", "order", "purpose")))))
        todo.append(("GET", "/v1/fine_tuning/jobs", dict(params=query(rng, ("limit", "after", "metadata[team]")))))
    for _ in range(40):
        fid = rng.choice(list(file_ids.values()) + IDS)
        todo.append((rng.choice(["GET", "GET", "DELETE"]), f"/v1/files/{fid}", {}))
        todo.append(("GET", f"/v1/files/{rng.choice(list(file_ids.values()) + IDS)}/content", {}))
    for method, body in ((m, b) for m in ("POST",) for b in (b"", b"{", b"null", b"[]", b'"x"', b"\xff", b"1e999")):
        todo.append((method, "/v1/fine_tuning/jobs", dict(content=body, headers={"content-type": "application/json"})))
        todo.append((method, "/v1/feedback", dict(content=body, headers={"content-type": "application/json"})))
        todo.append((method, "/v1/files", dict(content=body, headers={"content-type": "multipart/form-data"})))
        todo.append((method, "/v1/files", dict(content=body, headers={
            "content-type": "multipart/form-data; boundary=xyz"})))
    rng.shuffle(todo)
    # job actions go last, on real ids (created above) as well as hostile ones
    actions = []
    for _ in range(80):
        what = rng.choice(["", "/cancel", "/pause", "/resume", "/events", "/checkpoints"])
        actions.append((what, dict(params=query(rng, ("limit", "after")))))
    failures: list[str] = []
    statuses: dict[int, int] = {}
    local = threading.local()

    def one(case):
        method, path, kw = case
        client = getattr(local, "client", None)
        if client is None:
            client = local.client = httpx.Client(base_url=jobs_server.url, timeout=120, headers=AUTH)
        if "json" in kw:  # as json.dumps writes it: lone surrogates as escapes, inf as Infinity
            kw = dict(content=json.dumps(kw["json"]).encode(), headers={"content-type": "application/json"})
        try:
            r = client.request(method, path, **kw)
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            check(method, path, r)
            if path == "/v1/fine_tuning/jobs" and method == "POST" and r.status_code == 200:
                job_ids.append(r.json()["id"])
        except Exception as e:  # collected, reported below with the request
            failures.append(f"{method} {path} {str(kw)[:300]}: {type(e).__name__}: {str(e)[:400]}")

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(one, todo))
    assert len(job_ids) > 5, statuses  # valid creations happened
    action_cases = []
    for what, kw in actions:
        jid = rng.choice(job_ids * 2 + IDS)
        action_cases.append(("POST" if what in ("/cancel", "/pause", "/resume") else "GET",
                             f"/v1/fine_tuning/jobs/{jid}{what}", kw))
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(one, action_cases))
    assert not failures, "\n".join(failures[:10])
    print(f"jobs fuzz: {len(todo) + len(action_cases)} requests, statuses {sorted(statuses.items())}")
    assert statuses.get(200, 0) > 60 and statuses.get(400, 0) > 150 and statuses.get(404, 0) > 20
    with httpx.Client(base_url=jobs_server.url, headers=AUTH, timeout=60) as c:
        for jid in job_ids[1:]:  # stop what the fuzz started; an already final job answers 400, not 500
            assert c.post(f"/v1/fine_tuning/jobs/{jid}/cancel").status_code in (200, 400)
        assert c.get("/health").status_code == 200
        assert c.get("/v1/files/" + file_ids["chat"]).status_code in (200, 404)  # deleted by the fuzz, or kept
        r = c.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "Hi"}],
                                                  "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200
