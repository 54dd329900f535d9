"""Does the server stay responsive while a fine-tuning job trains? Chat latency and /health latency of a real
`lmforge serve` process, idle and then while one of its jobs trains a LoRA adapter in the worker process, side
by side in one run.

    python benchmarks/bench_jobs.py                       # preset tiny, 20 requests per phase
    python benchmarks/bench_jobs.py --preset small --requests 40 --server-threads 1 --job-threads 1

The model is bench_serve.py's (a random-weight Llama of the preset's shape with a stdlib-trained BPE tokenizer).
Each phase sends --requests non-streaming chat completions one after another (greedy, 16 tokens, EOS ignored)
and as many GET /health, and reports the median and 90th percentile. The job: --records chat examples, batch 4,
enough epochs to outlast the measurement; its tokens/s while measured comes from its own metrics events.
On a machine with fewer cores than server + job threads the two share cores: that is the point of the test.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_serve import free_port, make_model, wait_ready  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def percentiles(xs: list[float]) -> tuple[float, float]:
    xs = sorted(xs)
    return statistics.median(xs), xs[min(len(xs) - 1, int(0.9 * len(xs)))]


def phase(client, http, base: str, n: int) -> dict:
    chat, health = [], []
    for i in range(n):
        t = time.perf_counter()
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": f"Question {i}?"}],
                                       max_tokens=16, temperature=0, extra_body={"ignore_eos": True})
        chat.append(time.perf_counter() - t)
        t = time.perf_counter()
        http.get(base + "/health").raise_for_status()
        health.append(time.perf_counter() - t)
    (c50, c90), (h50, h90) = percentiles(chat), percentiles(health)
    return {"chat_p50_ms": 1e3 * c50, "chat_p90_ms": 1e3 * c90, "health_p50_ms": 1e3 * h50,
            "health_p90_ms": 1e3 * h90}


def main(argv: list[str] | None = None) -> int:
    import httpx
    import openai

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--records", type=int, default=200)
    ap.add_argument("--server-threads", type=int, default=1)
    ap.add_argument("--job-threads", type=int, default=1)
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        path = make_model(args.preset, Path(tmp) / args.preset)
        port, base = free_port(), ""
        cmd = [sys.executable, "-m", "lmforge.cli", "serve", "--model", f"m={path}", "--port", str(port),
               "--jobs-dir", str(Path(tmp) / "jobs"), "--threads", str(args.server_threads),
               "--jobs-threads", str(args.job_threads), "--log-level", "warning"]
        server = subprocess.Popen(cmd)
        try:
            base = f"http://127.0.0.1:{port}"
            wait_ready(base, server, 180)
            client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=600)
            http = httpx.Client(timeout=600)
            phase(client, http, base, 3)  # warm-up
            idle = phase(client, http, base, args.requests)
            data = Path(tmp) / "train.jsonl"
            data.write_text("".join(json.dumps({"messages": [
                {"role": "user", "content": f"What is {i} plus {i % 7}?"},
                {"role": "assistant", "content": f"{i} plus {i % 7} is {i + i % 7}."}]}) + "\n"
                for i in range(args.records)))
            f = client.files.create(file=open(data, "rb"), purpose="fine-tune")
            job = client.fine_tuning.jobs.create(model="m", training_file=f.id, method={
                "type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 20, "batch_size": 4}}})
            while not [e for e in client.fine_tuning.jobs.list_events(job.id, limit=5).data if e.type == "metrics"]:
                assert client.fine_tuning.jobs.retrieve(job.id).status not in ("failed", "cancelled")
                time.sleep(0.2)
            t0 = time.time()
            training = phase(client, http, base, args.requests)
            events = [e for e in client.fine_tuning.jobs.list_events(job.id, limit=1000).data
                      if e.type == "metrics" and e.created_at >= t0 - 1]
            rates = [e.data["tokens_per_s"] for e in events if e.data.get("tokens_per_s")]
            status = client.fine_tuning.jobs.retrieve(job.id).status
            client.fine_tuning.jobs.cancel(job.id)
        finally:
            server.terminate()
            server.wait(60)
    print(f"preset {args.preset}, server threads {args.server_threads}, job threads {args.job_threads}, "
          f"{args.requests} requests per phase; job {status} during the measurement, "
          f"{statistics.median(rates) if rates else float('nan'):.0f} training tokens/s (median of its metrics)")
    print(f"{'':<22}{'chat p50':>10}{'chat p90':>10}{'health p50':>12}{'health p90':>12}")
    for name, r in (("idle", idle), ("while a job trains", training)):
        print(f"{name:<22}{r['chat_p50_ms']:>8.0f}ms{r['chat_p90_ms']:>8.0f}ms{r['health_p50_ms']:>10.1f}ms"
              f"{r['health_p90_ms']:>10.1f}ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
