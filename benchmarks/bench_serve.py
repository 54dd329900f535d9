"""Server throughput: total generated tokens/s at 1, 4 and 16 concurrent streaming clients, against a real
`lmforge serve` process on a loopback port.

    python benchmarks/bench_serve.py                          # preset small, 64 new tokens per request
    python benchmarks/bench_serve.py --preset medium --concurrency 1,4,16 --seconds 20 --quantize int8

The model is a random-weight Llama of the preset's shape with a byte-level BPE tokenizer trained on the
Python standard library (so every id decodes). Each client streams /v1/completions requests back to back
(greedy, EOS ignored, so every request yields exactly --new-tokens tokens) for --seconds. Reported per level:
total tokens/s (all clients), requests finished, mean time to first token and mean per-stream decode tokens/s,
as the clients saw them. The server's own /metrics are printed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import json
import os
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def make_model(preset: str, out: Path) -> Path:
    import torch

    from lmforge.checkpoint import save_model
    from lmforge.model.config import preset as get_preset
    from lmforge.model.transformer import Transformer
    from lmforge.tokenizer import train_bpe

    cfg = get_preset(preset)
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    tok = train_bpe((open(f, encoding="utf-8", errors="replace").read() for f in files), vocab_size=cfg.vocab_size)
    torch.manual_seed(0)
    m = Transformer(cfg.replace(vocab_size=tok.vocab_size))
    m.init_weights(0)
    save_model(m, out, tokenizer=tok)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(done, server: subprocess.Popen, seconds: float, every: float = 0.2) -> bool:
    """Poll done() (an HTTP check; a refused connection counts as not yet) until it is true: True; False if the
    server exits or `seconds` pass first."""
    import httpx

    deadline = time.time() + seconds
    while True:
        try:
            if done():
                return True
        except httpx.TransportError:
            pass
        if time.time() > deadline or server.poll() is not None:
            return False
        time.sleep(every)


def wait_ready(base: str, server: subprocess.Popen, seconds: float) -> None:
    """Until GET /health answers 200; SystemExit if the server exits or `seconds` pass first."""
    import httpx

    if not wait_until(lambda: httpx.get(base + "/health", timeout=5).status_code == 200, server, seconds):
        raise SystemExit("the server did not become ready")


def wait_compiled(base: str, server: subprocess.Popen, seconds: float) -> None:
    """Until /metrics says no decode graph is compiling in the background any more."""
    import httpx

    t0 = time.time()
    if not wait_until(lambda: 'lmforge_compiling{model="m"} 1' not in httpx.get(base + "/metrics", timeout=5).text,
                      server, seconds, every=1.0):
        raise SystemExit("the server's background compile did not finish")
    print(f"background compile finished {time.time() - t0:.1f} s after ready", file=sys.stderr)


async def one_request(client, url: str, body: dict) -> tuple[float, float, int]:
    """(ttft s, decode s, completion tokens) of one streamed completion."""
    t0 = time.perf_counter()
    first = None
    tokens = 0
    async with client.stream("POST", url, json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and first is None and chunk["choices"][0].get("text"):
                first = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    first = first or end
    return first - t0, end - first, tokens


async def level(url: str, concurrency: int, seconds: float, body: dict) -> dict:
    import httpx

    results: list[tuple[float, float, int]] = []
    deadline = time.perf_counter() + seconds

    async def client_loop(client):
        while time.perf_counter() < deadline:
            results.append(await one_request(client, url, body))

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        t = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        wall = time.perf_counter() - t
    total = sum(r[2] for r in results)
    return {"concurrency": concurrency, "requests": len(results), "tokens": total, "seconds": wall,
            "total_tokens_per_s": total / wall,
            "mean_ttft_ms": 1e3 * sum(r[0] for r in results) / max(len(results), 1),
            "mean_stream_tokens_per_s": sum((r[2] - 1) / r[1] for r in results if r[1] > 0) / max(len(results), 1)}


def main(argv: list[str] | None = None) -> int:
    import httpx

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--seconds", type=float, default=15.0, help="per concurrency level")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--quantize", default=None, choices=[None, "int8", "int4"])
    ap.add_argument("--threads", type=int, default=0, help="0: the server's default (auto)")
    ap.add_argument("--no-compile", action="store_true", help="serve with --no-compile")
    ap.add_argument("--json")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        path = make_model(args.preset, Path(tmp) / args.preset)
        port = free_port()
        cmd = [sys.executable, "-m", "lmforge.cli", "serve", "--model", f"m={path}", "--port", str(port),
               "--max-batch", str(args.max_batch), "--max-queue", "512", "--log-level", "warning"]
        if args.quantize:
            cmd += ["--quantize", args.quantize]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        if args.no_compile:
            cmd += ["--no-compile"]
        t_start = time.time()
        server = subprocess.Popen(cmd)
        try:
            base = f"http://127.0.0.1:{port}"
            wait_ready(base, server, 1800)  # a cold compile of the decode step takes minutes
            if not args.no_compile:  # measure the server at full speed: larger batches compile in the background
                wait_compiled(base, server, 1800)
            print(f"ready after {time.time() - t_start:.1f} s", file=sys.stderr)
            body = {"model": "m", "prompt": "def parse_args(argv):\n    \"\"\"Parse the command line.\"\"\"\n",
                    "max_tokens": args.new_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
                    "stream_options": {"include_usage": True}}
            url = base + "/v1/completions"
            asyncio.run(level(url, 1, 3.0, body))  # warm-up
            rows = []
            print(f"load average {os.getloadavg()[0]:.2f}", file=sys.stderr)
            for c in [int(x) for x in args.concurrency.split(",")]:
                r = asyncio.run(level(url, c, args.seconds, body))
                rows.append(r)
                print(f"{args.preset} {args.quantize or 'fp32'} concurrency {c:3d}: {r['total_tokens_per_s']:7.1f} "
                      f"tokens/s total, {r['requests']:4d} requests, TTFT {r['mean_ttft_ms']:7.1f} ms, "
                      f"{r['mean_stream_tokens_per_s']:6.1f} tokens/s per stream")
            one = next((r for r in rows if r["concurrency"] == 1), None)
            for r in rows:
                if one is not None and r is not one:
                    print(f"concurrency {r['concurrency']}: {r['total_tokens_per_s'] / one['total_tokens_per_s']:.2f}x "
                          f"the tokens/s of one stream")
            print(f"load average {os.getloadavg()[0]:.2f}", file=sys.stderr)
            metrics = httpx.get(base + "/metrics").text
            print("\n".join(line for line in metrics.splitlines()
                            if line.startswith(("lmforge_generation_tokens_total", "lmforge_requests_total",
                                                "lmforge_decode_tokens_per_second_avg",
                                                "lmforge_time_to_first_token_seconds_sum",
                                                "lmforge_time_to_first_token_seconds_count"))))
            if args.json:
                Path(args.json).write_text(json.dumps(rows, indent=2))
        finally:
            server.terminate()
            server.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
