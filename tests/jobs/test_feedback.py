"""The feedback loop as users meet it: replies rated through POST /v1/feedback (openai client's replies, streamed
or not) and on the chat page in headless Chromium, `lmforge feedback export` to KTO and DPO data, and that data
back through /v1/files into a KTO fine-tuning job whose model the server then serves."""

import json

import httpx
import pytest

from lmforge.cli import main
from tests.jobs.conftest import KEY
from tests.jobs.test_api import wait_for
from tests.serve.test_chat_page import CHROMIUM, DRIVER, browser  # noqa: F401  (the browser fixture)

AUTH = {"Authorization": f"Bearer {KEY}"}


def post(server, body):
    return httpx.post(server.url + "/v1/feedback", json=body, headers=AUTH, timeout=30)


def export(server, fmt, path):
    root = server.app.state.lmforge.jobs.root
    assert main(["feedback", "export", "--jobs-dir", str(root), "--format", fmt, "--out", str(path)]) == 0
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_feedback_api_export_and_a_kto_job(jobs_server, client, tmp_path):
    msgs = [{"role": "user", "content": "Name a colour."}]
    whole = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, temperature=0)
    streamed = list(client.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, temperature=0,
                                                   stream=True))
    sid = streamed[0].id
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == \
        whole.choices[0].message.content
    r = post(jobs_server, {"response_id": whole.id, "rating": "up"})
    assert r.status_code == 200 and r.json()["object"] == "feedback" and r.json()["rating"] == "up"
    assert post(jobs_server, {"response_id": sid, "rating": "down"}).status_code == 200
    assert post(jobs_server, {"response_id": sid, "corrected_text": "Blue."}).json()["rating"] == "down"  # kept
    bad = post(jobs_server, {"response_id": "chatcmpl-nope", "rating": "up"})
    assert bad.status_code == 404 and bad.json()["error"]["param"] == "response_id"
    assert post(jobs_server, {"response_id": whole.id}).json()["error"]["param"] == "rating"
    assert post(jobs_server, {"response_id": whole.id, "rating": "meh"}).status_code == 400

    kto = export(jobs_server, "kto", tmp_path / "kto.jsonl")
    reply = whole.choices[0].message.content
    assert {"prompt": msgs, "completion": [{"role": "assistant", "content": reply}], "label": True} in kto
    assert {"prompt": msgs, "completion": [{"role": "assistant", "content": reply}], "label": False} in kto
    assert {"prompt": msgs, "completion": [{"role": "assistant", "content": "Blue."}], "label": True} in kto
    dpo = export(jobs_server, "dpo", tmp_path / "dpo.jsonl")
    assert {"input": {"messages": msgs}, "preferred_output": [{"role": "assistant", "content": "Blue."}],
            "non_preferred_output": [{"role": "assistant", "content": reply}]} in dpo

    # the loop closes: more ratings, exported, uploaded, a KTO job (an lmforge extension) trains on them
    for i in range(8):
        q = [{"role": "user", "content": f"Count to {i}."}]
        c = client.chat.completions.create(model="tiny", messages=q, max_tokens=6, temperature=0)
        assert post(jobs_server, {"response_id": c.id, "rating": "up" if i % 2 else "down"}).status_code == 200
    path = tmp_path / "ratings.jsonl"
    assert len(export(jobs_server, "kto", path)) == 11
    f = client.files.create(file=open(path, "rb"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model="tiny", training_file=f.id, suffix="fb", method={
        "type": "kto", "kto": {"hyperparameters": {"n_epochs": 1, "batch_size": 4, "beta": 0.2}}})
    done = wait_for(client, job.id)
    assert done.status == "succeeded", done.error
    assert done.method.type == "kto" and done.method.model_extra["kto"]["hyperparameters"]["beta"] == 0.2
    out = client.chat.completions.create(model=done.fine_tuned_model, messages=msgs, max_tokens=4, temperature=0)
    assert out.model == done.fine_tuned_model


@pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="no chromium/chromedriver installed")
def test_chat_page_rating_reaches_export(jobs_server, browser, tmp_path):  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    wait = WebDriverWait(browser, 30)
    browser.get(jobs_server.url + "/")
    key = browser.find_element(By.ID, "api-key")
    key.send_keys(KEY)
    browser.execute_script("arguments[0].dispatchEvent(new Event('change'))", key)
    wait.until(lambda d: "tiny" in [o.get_attribute("value") for o in Select(d.find_element(By.ID, "model")).options])
    Select(browser.find_element(By.ID, "model")).select_by_value("tiny")
    max_tokens = browser.find_element(By.ID, "max-tokens")
    max_tokens.clear()
    max_tokens.send_keys("16")
    browser.find_element(By.ID, "prompt").send_keys("Rate this one")
    browser.find_element(By.ID, "send").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-done='1'] .fb-up"))
    bubble = browser.find_element(By.CSS_SELECTOR, ".msg.assistant[data-done='1']")
    bubble.find_element(By.CSS_SELECTOR, ".fb-up").click()
    wait.until(lambda d: bubble.get_attribute("data-feedback") == "up")
    bubble.find_element(By.CSS_SELECTOR, ".fb-edit").click()
    box = bubble.find_element(By.CSS_SELECTOR, ".fb-text")
    box.clear()
    box.send_keys("A better reply.")
    bubble.find_element(By.CSS_SELECTOR, ".fb-save").click()
    wait.until(lambda d: bubble.get_attribute("data-feedback") == "edited")
    asked = [{"role": "user", "content": "Rate this one"}]
    kto = export(jobs_server, "kto", tmp_path / "kto.jsonl")
    mine = [r for r in kto if r["prompt"] == asked]
    assert {"prompt": asked, "completion": [{"role": "assistant", "content": "A better reply."}], "label": True} in mine
    assert [r["label"] for r in mine] == [True, True]  # rated up, then edited: both desirable
    dpo = export(jobs_server, "dpo", tmp_path / "dpo.jsonl")
    assert [r["preferred_output"][0]["content"] for r in dpo if r["input"]["messages"] == asked] == ["A better reply."]
