"""`lmforge serve` killed with -9 in the middle of a job: the restarted server has every file and job, the job
resumes from its last checkpoint and succeeds, and its model is served. The server is a real process here."""

import os
import signal
import subprocess
import sys
import time

import httpx
import openai

from tests.jobs.conftest import KEY, RECIPE_ARGS, chat_records, jsonl
from tests.jobs.test_api import wait_for
from tests.serve.conftest import free_port


def start(base, jobs_dir, port, log):
    cmd = [sys.executable, "-m", "lmforge.cli", "serve", "--model", f"tiny={base}", "--port", str(port),
           "--api-key", KEY, "--jobs-dir", str(jobs_dir), "--jobs-threads", "1", "--jobs-checkpoint-every", "5",
           "--jobs-lora-rank", "4", "--threads", "1", "--log-level", "warning",
           *[f"--jobs-arg={a}" for a in RECIPE_ARGS]]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 90
    while time.time() < deadline:
        assert proc.poll() is None, "the server exited"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError("the server never became ready")


def test_kill_9_mid_job_then_restart_finishes_it(base_dir, tmp_path):
    jobs_dir, port = tmp_path / "jobs", free_port()
    log = open(tmp_path / "server.log", "ab")
    server = start(base_dir, jobs_dir, port, log)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=2, timeout=60)
    try:
        f = client.files.create(file=open(jsonl(tmp_path / "t.jsonl", chat_records(20)), "rb"), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(model="tiny", training_file=f.id, suffix="k9", method={
            "type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 8, "batch_size": 1}}})
        deadline = time.time() + 120
        while not client.fine_tuning.jobs.checkpoints.list(job.id).data:
            assert time.time() < deadline and client.fine_tuning.jobs.retrieve(job.id).status != "failed"
            time.sleep(0.1)
        os.kill(server.pid, signal.SIGKILL)  # no shutdown of any kind
        server.wait()
        server = start(base_dir, jobs_dir, port, log)
        assert [x.id for x in client.files.list().data] == [f.id]
        done = wait_for(client, job.id, timeout=300)
        assert done.status == "succeeded", done.error
        events = client.fine_tuning.jobs.list_events(job.id, limit=1000).data
        resumed = [e.data["resumed_from_step"] for e in events if e.message.startswith("Fine-tuning job resumed")]
        assert len(resumed) == 1 and 0 < resumed[0] < 160  # from a checkpoint, not from scratch
        steps = [e.data["step"] for e in events if e.type == "metrics"][::-1]
        assert steps == list(range(1, 161))  # each step reported once, across both servers
        reply = client.chat.completions.create(model=done.fine_tuned_model, max_tokens=4, temperature=0,
                                               messages=[{"role": "user", "content": "What is 1 plus 1?"}])
        assert reply.model == done.fine_tuned_model
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
