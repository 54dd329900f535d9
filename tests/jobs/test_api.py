"""The fine-tuning API as users meet it: the official openai client against a live loopback server that trains
LoRA adapters on a tiny model in a worker process and serves each result the moment its job succeeds."""

import json
import time

import httpx
import openai
import pytest

from lmforge.finetune.merge import merge_adapter
from lmforge.inference.engine import Engine
from lmforge.inference.generate import chat_ids
from lmforge.inference.load import load
from lmforge.inference.sampling import SamplingParams
from tests.jobs.conftest import KEY, chat_records, dpo_records, jsonl

TERMINAL = ("succeeded", "failed", "cancelled")


def wait_for(client, job_id, statuses=TERMINAL, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses:
            return job
        assert job.status not in TERMINAL, (job.status, job.error)
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} never reached {statuses}: {job.status}")


def wait_step(client, job_id, step, timeout=120):
    """Until the job has reported training step `step` (its worker is past loading)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        events = client.fine_tuning.jobs.list_events(job_id, limit=5).data
        if any(e.type == "metrics" and e.data["step"] >= step for e in events):
            return
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} never reached step {step}")


def greedy_local(model_dir, adapter, messages, out, max_tokens=16) -> str:
    merged = load(merge_adapter(model_dir, adapter, out))
    ids = chat_ids(merged.tokenizer, messages)
    got = Engine(merged.model, eos_ids=merged.eos_ids).generate([ids], SamplingParams(temperature=0.0,
                                                                                      max_tokens=max_tokens))[0]
    return merged.tokenizer.decode([i for i in got if i not in merged.eos_ids])


def test_whole_flow_supervised(client, jobs_server, base_dir, tmp_path):
    f = client.files.create(file=open(jsonl(tmp_path / "train.jsonl", chat_records()), "rb"), purpose="fine-tune")
    assert f.object == "file" and f.purpose == "fine-tune" and f.filename == "train.jsonl" and f.bytes > 0
    assert client.files.retrieve(f.id).id == f.id
    assert f.id in [x.id for x in client.files.list().data]
    assert client.files.content(f.id).read() == (tmp_path / "train.jsonl").read_bytes()
    v = client.files.create(file=open(jsonl(tmp_path / "val.jsonl", chat_records(5)), "rb"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model="tiny", training_file=f.id, validation_file=v.id, suffix="support", seed=7, metadata={"team": "qa"},
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 4}}})
    assert job.status == "validating_files" and job.model == "tiny" and job.seed == 7
    assert job.method.type == "supervised" and job.metadata == {"team": "qa"}
    # a DPO job waits its turn: one job trains at a time
    d = client.files.create(file=open(jsonl(tmp_path / "d.jsonl", dpo_records()), "rb"), purpose="fine-tune")
    second = client.fine_tuning.jobs.create(model="tiny", training_file=d.id, method={
        "type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 1, "batch_size": 6, "beta": 0.5}}})
    # the upload may go now: the job holds its own link to the bytes
    assert client.files.delete(f.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(f.id)
    done = wait_for(client, job.id)
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model == f"ft:tiny:support:{job.id.removeprefix('ftjob-')}"
    assert done.hyperparameters.n_epochs == 2 and done.hyperparameters.batch_size == 4
    assert done.hyperparameters.learning_rate_multiplier == 1.0  # "auto" resolved
    assert done.trained_tokens > 0 and done.finished_at >= done.created_at
    assert [j.id for j in client.fine_tuning.jobs.list(limit=5).data] == [second.id, job.id]  # newest first
    assert [j.id for j in client.fine_tuning.jobs.list(extra_query={"metadata[team]": "qa"}).data] == [job.id]

    events = list(client.fine_tuning.jobs.list_events(job.id, limit=3))  # pages through `after`
    messages = [e.message for e in events]
    assert messages[0] == "The job has successfully completed" and messages[-1].startswith("Created fine-tuning job")
    metrics = [e for e in events if e.type == "metrics"]
    assert [e.data["step"] for e in metrics][::-1] == list(range(1, 7))  # newest first; 2 epochs x 3 steps
    assert all(e.data["total_steps"] == 6 and e.data["train_loss"] > 0 for e in metrics)
    ckpts = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in ckpts][0] == 6 and len(ckpts) >= 2
    assert ckpts[0].fine_tuned_model_checkpoint == done.fine_tuned_model + ":ckpt-step-6"
    assert ckpts[0].metrics.train_loss > 0 and ckpts[0].metrics.valid_loss > 0
    assert [e.data["step"] for e in metrics if "valid_loss" in e.data] == [6, 4, 2]  # at each checkpoint
    csv = client.files.content(done.result_files[0]).text.splitlines()
    assert csv[0].startswith("step,train_loss") and len(csv) == 7

    # served at once, as an adapter on its base: the same greedy reply as the merged adapter
    assert done.fine_tuned_model in [m.id for m in client.models.list().data]
    msgs = [{"role": "user", "content": "What is 2 plus 1?"}]
    reply = client.chat.completions.create(model=done.fine_tuned_model, messages=msgs, max_tokens=16, temperature=0)
    run_dir = jobs_server.app.state.lmforge.jobs.root / "runs" / job.id
    assert reply.choices[0].message.content == greedy_local(base_dir, run_dir / "adapter", msgs, tmp_path / "m")
    base = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=16, temperature=0)
    assert base.choices[0].message.content != reply.choices[0].message.content

    dpo = wait_for(client, second.id)
    assert dpo.status == "succeeded", dpo.error
    started = [e for e in client.fine_tuning.jobs.list_events(second.id, limit=100).data
               if e.message == "Fine-tuning job started."]
    assert started[0].created_at >= done.finished_at
    assert dpo.method.dpo.hyperparameters.beta == 0.5 and dpo.hyperparameters.n_epochs == 1
    assert [c.step_number for c in client.fine_tuning.jobs.checkpoints.list(second.id).data] == [2]  # final
    assert dpo.fine_tuned_model in [m.id for m in client.models.list().data]


def test_bad_files_name_the_line(client, tmp_path):
    bad = tmp_path / "bad.jsonl"
    recs = chat_records(3)
    bad.write_text("\n".join([json.dumps(recs[0]), "{not json", ""]))
    with pytest.raises(openai.BadRequestError) as e:
        client.files.create(file=open(bad, "rb"), purpose="fine-tune")
    assert e.value.body["param"] == "file" and "line 2" in e.value.body["message"]
    no_answer = {"messages": [{"role": "user", "content": "hi"}]}
    with pytest.raises(openai.BadRequestError) as e:
        client.files.create(file=open(jsonl(tmp_path / "x.jsonl", [recs[0], recs[1], no_answer]), "rb"),
                            purpose="fine-tune")
    assert "line 3" in e.value.body["message"] and "assistant" in e.value.body["message"]
    mixed = jsonl(tmp_path / "mixed.jsonl", [recs[0], dpo_records(1)[0]])
    with pytest.raises(openai.BadRequestError) as e:
        client.files.create(file=open(mixed, "rb"), purpose="fine-tune")
    assert "line 2" in e.value.body["message"] and "one kind" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.files.create(file=open(jsonl(tmp_path / "ok.jsonl", recs), "rb"), purpose="assistants")
    assert e.value.body["param"] == "purpose"
    big = tmp_path / "big.jsonl"
    big.write_text("".join(json.dumps(recs[0]) + "\n" for _ in range(2000)))  # over 200 kB
    with pytest.raises(openai.APIStatusError) as e:
        client.files.create(file=open(big, "rb"), purpose="fine-tune")
    assert e.value.status_code == 413
    # a DPO file for a supervised job; too few examples; unknown files and models; bad hyperparameters
    dpo = client.files.create(file=open(jsonl(tmp_path / "d.jsonl", dpo_records()), "rb"), purpose="fine-tune")
    with pytest.raises(openai.BadRequestError) as e:
        client.fine_tuning.jobs.create(model="tiny", training_file=dpo.id)
    assert e.value.body["param"] == "training_file" and "DPO" in e.value.body["message"]
    for kw, param in ((dict(training_file="file-nope"), "training_file"),
                      (dict(training_file=dpo.id, model="gpt-4o"), "model"),
                      (dict(training_file=dpo.id, method={"type": "dpo", "dpo": {"hyperparameters": {"beta": -1}}}),
                       "method.dpo.hyperparameters.beta"),
                      (dict(training_file=dpo.id, suffix="a:b"), "suffix")):
        with pytest.raises(openai.BadRequestError) as e:
            client.fine_tuning.jobs.create(**{"model": "tiny", **kw})
        assert e.value.body["param"] == param, e.value.body
    small = client.files.create(file=open(jsonl(tmp_path / "s.jsonl", recs), "rb"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model="tiny", training_file=small.id)
    failed = wait_for(client, job.id)
    assert failed.status == "failed" and failed.error.param == "training_file" and "at least 10" in failed.error.message
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.retrieve("ftjob-nope")
    r = httpx.post(f"{client.base_url}fine_tuning/jobs", headers={"Authorization": f"Bearer {KEY}"},
                   content=b"{")
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"


def test_cancel_pause_resume(client, tmp_path):
    f = client.files.create(file=open(jsonl(tmp_path / "t.jsonl", chat_records(20)), "rb"), purpose="fine-tune")
    long = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 50, "batch_size": 1}}}
    job = client.fine_tuning.jobs.create(model="tiny", training_file=f.id, method=long)
    wait_step(client, job.id, 2)
    running = client.fine_tuning.jobs.retrieve(job.id)
    assert running.status == "running" and running.estimated_finish >= running.created_at  # measured speed
    paused = client.fine_tuning.jobs.pause(job.id)
    assert paused.paused
    held = wait_for(client, job.id, ("queued",))
    assert held.paused and held.estimated_finish is None
    steps = {c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job.id).data}
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.create(model="tiny", training_file=f.id, method={"type": "reinforcement"})
    resumed = client.fine_tuning.jobs.resume(job.id)
    assert not resumed.paused
    wait_for(client, job.id, ("running",))
    events = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data]
    assert any(m.startswith("Fine-tuning job paused at step") for m in events)
    deadline = time.time() + 60
    while not [e for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data
               if e.message.startswith("Fine-tuning job resumed from the checkpoint at step")]:
        assert time.time() < deadline
        time.sleep(0.2)
    assert steps  # pausing kept a checkpoint to resume from
    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled" and cancelled.fine_tuned_model is None
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.cancel(job.id)
    assert client.fine_tuning.jobs.retrieve(job.id).status == "cancelled"
    # a queued job can be cancelled before it starts
    a = client.fine_tuning.jobs.create(model="tiny", training_file=f.id, method=long)
    b = client.fine_tuning.jobs.create(model="tiny", training_file=f.id, method=long)
    wait_for(client, a.id, ("running",))
    assert client.fine_tuning.jobs.retrieve(b.id).status in ("validating_files", "queued")
    assert client.fine_tuning.jobs.cancel(b.id).status == "cancelled"
    assert client.fine_tuning.jobs.cancel(a.id).status == "cancelled"
