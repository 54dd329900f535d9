"""The GPU check: what lmforge does on one CUDA machine, in under ten minutes, as one table.

    bash benchmarks/gpu_check.sh                 # on a GPU machine (runs this file)
    python benchmarks/gpu_check.py --cpu-smoke   # the same commands at toy sizes on CPU: tests the plumbing only

Every stage runs lmforge's own command line in a child process (the path users take, so a renamed flag fails
here), in a scratch folder (--work; deleted at the end unless --keep):

  env       torch, CUDA, the GPU, bf16, its datasheet bf16 peak and HBM bandwidth (lmforge/plan/prices.yaml)
  prepare   the built-in corpus -> an 8192-token BPE and token shards
  pretrain  a ~120M Llama (12 x 768, 12 heads, SwiGLU 3072, vocab 8192) for --steps steps at seq 1024 (compiled,
            bf16 autocast, fused AdamW, flash SDPA): tokens/s, MFU against the datasheet peak, loss first -> last
  ddp/fsdp  with 2+ GPUs: the same model for 30 steps under torchrun, DDP and FSDP2 on NCCL (tokens/s)
  sft-lora  LoRA SFT of that model on the built-in instruction set (packed rows): tokens/s, loss
  decode    one stream from `lmforge serve` (bf16, EOS ignored): tokens/s against the HBM bandwidth bound
            (bandwidth / bytes read per token, lmforge.model.accounting.decode_bytes_per_token)
  serve     total tokens/s at 1, 16 and 64 concurrent streaming clients, time to first token

A stage that fails is reported as failed (with the end of its log) and the others still run. Exit status 1 if
any stage failed. --json writes the table's rows.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_serve import free_port, level, wait_until  # noqa: E402  (the same streaming client and levels)

ROWS: list[dict] = []
FAILED: list[str] = []


def row(stage: str, metric: str, value, bound: str = "", note: str = "") -> None:
    ROWS.append({"stage": stage, "metric": metric, "value": value, "bound": bound, "note": note})
    print(f"[{stage}] {metric}: {value} {bound} {note}".rstrip(), file=sys.stderr, flush=True)


def lmforge(args: list[str], log: Path, timeout: float, env: dict | None = None, torchrun: int = 0) -> str:
    """Run `lmforge ARGS` (under torchrun with `torchrun` processes); its stdout; raise with the log's tail."""
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}",
               "-m", "lmforge.cli", *args]
    else:
        cmd = [sys.executable, "-m", "lmforge.cli", *args]
    print("$ lmforge " + " ".join(args), file=sys.stderr, flush=True)
    with open(log, "w") as err:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, timeout=timeout,
                           env=dict(os.environ, **(env or {})))
    if p.returncode:
        raise RuntimeError(f"exit {p.returncode}: ...{log.read_text()[-1500:]}")
    return p.stdout


def stage(name: str):
    """Decorator: run the stage, record a failure instead of stopping."""
    def wrap(fn):
        def run(*a, **kw):
            t = time.perf_counter()
            try:
                out = fn(*a, **kw)
                row(name, "wall time", f"{time.perf_counter() - t:.0f} s")
                return out
            except Exception as e:  # a failed stage is a result, not the end of the check
                FAILED.append(name)
                row(name, "FAILED", type(e).__name__, note=str(e)[-600:].replace("\n", " | "))
                return None
        return run
    return wrap


def metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


def gpu_table() -> dict:
    """name -> {bf16_tflops, bandwidth_gb_s} from lmforge's price table (a data file; read without lmforge.plan)."""
    import yaml

    import lmforge

    table = yaml.safe_load((Path(lmforge.__file__).parent / "plan" / "prices.yaml").read_text())
    return table.get("gpus", {})


def match_gpu(device_name: str) -> dict | None:
    """The price-table entry whose name matches the CUDA device name best (most shared words)."""
    words = set(device_name.lower().replace("-", " ").split())
    best, score = None, 0
    for key, g in gpu_table().items():
        cand = set(str(g.get("name", key)).lower().replace("-", " ").split()) | {key.split("-")[0]}
        s = len(words & cand)
        if "pcie" in cand and "pcie" not in words:
            s -= 1
        if s > score and (key.split("-")[0] in device_name.lower().replace(" ", "")):
            best, score = g, s
    return best


# ---- stages -----------------------------------------------------------------------------------------------------
@stage("env")
def check_env(a) -> dict:
    import torch

    from lmforge.training.monitor import datasheet_peak

    info = {"device": "cpu", "peak": None, "bandwidth": None, "gpus": 0}
    row("env", "torch", torch.__version__, note=f"CUDA {torch.version.cuda}")
    if a.cpu_smoke:
        row("env", "device", "cpu (smoke: plumbing only, figures mean nothing)")
        return info
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device visible (use --cpu-smoke to test the plumbing on CPU)")
    name = torch.cuda.get_device_name(0)
    info.update(device="cuda", gpus=torch.cuda.device_count(), name=name)
    entry = match_gpu(name) or {}
    info["peak"] = datasheet_peak(name) or (entry.get("bf16_tflops", 0) * 1e12 or None)
    info["bandwidth"] = entry.get("bandwidth_gb_s", 0) * 1e9 or None
    row("env", "GPU", f"{info['gpus']} x {name}", note=f"bf16 {'yes' if torch.cuda.is_bf16_supported() else 'NO'}")
    row("env", "datasheet", f"{(info['peak'] or 0) / 1e12:.0f} TFLOP/s bf16, "
        f"{(info['bandwidth'] or 0) / 1e9:.0f} GB/s", note="" if entry else "GPU not in plan/prices.yaml")
    free, total = torch.cuda.mem_get_info(0)
    row("env", "memory", f"{total / 2**30:.0f} GiB ({free / 2**30:.0f} free)")
    return info


@stage("prepare")
def prepare(a, work: Path) -> Path:
    data = work / "data"
    args = ["prepare", "--corpus", "default", "--out", str(data), "--vocab-size", str(a.vocab)]
    if a.cpu_smoke:
        args += ["--builtin-bytes", "200000"]
    lmforge(args, work / "prepare.log", 600)
    manifest = json.loads((data / "manifest.json").read_text())
    row("prepare", "train tokens", f"{manifest['splits']['train']['tokens']:,}" if "splits" in manifest else "?")
    return data


def model_flags(a) -> list[str]:
    if a.cpu_smoke:
        return ["--preset", "test", "--model.hidden-size", "64", "--model.n-layers", "2", "--model.n-heads", "4",
                "--model.n-kv-heads", "2", "--model.intermediate-size", "128", "--model.max-seq-len", "128"]
    return ["--preset", "medium", "--model.hidden-size", "768", "--model.n-layers", "12", "--model.n-heads", "12",
            "--model.n-kv-heads", "12", "--model.intermediate-size", "3072", "--model.max-seq-len", "1024"]


def train_shape(a) -> list[str]:
    if a.cpu_smoke:
        return ["--seq-len", "64", "--batch-size", "4"]
    return ["--seq-len", "1024", "--batch-size", str(a.batch_size)]


def common(a) -> list[str]:
    dev = ["--train.device", "cpu", "--train.threads", "2"] if a.cpu_smoke else []
    return dev + ["--train.samples", "0", "--train.log-every", "10" if not a.cpu_smoke else "2"]


def rates(records: list[dict], skip: int) -> tuple[float, float | None]:
    """Median tokens/s and MFU over the logged records after the first `skip` steps (compile, warmup)."""
    rs = [r for r in records if "tokens_per_s" in r and r["step"] > skip] or [r for r in records if "tokens_per_s" in r]
    tps = statistics.median(r["tokens_per_s"] for r in rs)
    mfus = [r["mfu"] for r in rs if r.get("mfu")]
    return tps, statistics.median(mfus) if mfus else None


@stage("pretrain")
def pretrain(a, work: Path, data: Path, info: dict) -> Path:
    out = work / "pretrain"
    args = ["pretrain", "--data", str(data), "--out", str(out), *model_flags(a), *train_shape(a), *common(a),
            "--max-steps", str(a.steps), "--eval-every", "0", "--save-every", "0", "--lr", "1e-3",
            "--train.warmup-steps", "30" if not a.cpu_smoke else "2",
            "--compile" if a.compile else "--no-compile"]
    if info.get("peak"):
        args += ["--train.peak-flops", str(info["peak"])]
    lmforge(args, work / "pretrain.log", 900)
    recs = metrics(out)
    losses = [r for r in recs if "loss" in r]
    tps, mfu = rates(recs, skip=20 if not a.cpu_smoke else 0)
    summary = json.loads((out / "summary.json").read_text())
    row("pretrain", "parameters", f"{summary['model']['parameters'] / 1e6:.1f}M",
        note=f"{summary['training']['tokens_per_step']:,} tokens/step, {summary['training']['precision']}")
    row("pretrain", "tokens/s", f"{tps:,.0f}", note="median of the logged steps after the first 20 (compiling)")
    row("pretrain", "MFU", f"{mfu:.1%}" if mfu else "—", bound="of the datasheet bf16 peak")
    falling = losses[-1]["loss"] < losses[0]["loss"] - 0.5
    row("pretrain", "loss", f"{losses[0]['loss']:.2f} -> {losses[-1]['loss']:.2f}",
        note=("falling" if falling else "NOT FALLING") + f"; val {summary['results']['final_val_loss']:.2f}")
    if not falling and not a.cpu_smoke:
        raise RuntimeError("the loss did not fall")
    return out / "final"


@stage("parallel")
def parallel(a, work: Path, data: Path, info: dict) -> None:
    n = info.get("gpus", 0)
    if n < 2:
        row("parallel", "DDP / FSDP2", "skipped", note=f"{n} GPU(s): needs 2+")
        return
    for mode in ("ddp", "fsdp"):
        out = work / f"pretrain-{mode}"
        lmforge(["pretrain", "--data", str(data), "--out", str(out), *model_flags(a), *train_shape(a), *common(a),
                 "--max-steps", "30", "--eval-every", "0", "--save-every", "0", "--train.parallel", mode,
                 "--no-compile"], work / f"{mode}.log", 600, torchrun=n)
        tps, _ = rates(metrics(out), skip=10)
        row("parallel", f"{mode} on {n} GPUs (NCCL)", f"{tps:,.0f} tokens/s", note="eager, 30 steps")


@stage("sft-lora")
def sft(a, work: Path, base: Path) -> None:
    out = work / "sft"
    args = ["finetune", "sft", "--base", str(base), "--data", "builtin", "--out", str(out), "--lora", "--pack",
            "--max-steps", str(a.sft_steps), "--eval-every", "0", "--heldout-mc", "0", "--val-max", "16",
            *common(a), "--lr", "1e-3", "--no-lora.merge", "--compile" if a.compile else "--no-compile"]
    args += ["--batch-size", "4", "--seq-len", "64"] if a.cpu_smoke else ["--batch-size", "16", "--seq-len", "1024"]
    lmforge(args, work / "sft.log", 600)
    recs = metrics(out)
    tps, _ = rates(recs, skip=10 if not a.cpu_smoke else 0)
    losses = [r["loss"] for r in recs if "loss" in r]
    row("sft-lora", "tokens/s", f"{tps:,.0f}", note="packed rows, LoRA r16 on every projection, bf16 base")
    row("sft-lora", "loss", f"{losses[0]:.2f} -> {losses[-1]:.2f}")


@stage("serve")
def serve(a, work: Path, model: Path, info: dict) -> None:
    import httpx

    from lmforge import checkpoint
    from lmforge.model.accounting import decode_bytes_per_token

    port = free_port()
    levels = [1, 2, 4] if a.cpu_smoke else [1, 16, 64]
    cmd = [sys.executable, "-m", "lmforge.cli", "serve", "--model", f"m={model}", "--port", str(port),
           "--max-batch", str(max(levels)), "--max-queue", "512", "--dtype", "bfloat16", "--log-level", "warning"]
    if a.cpu_smoke:
        cmd += ["--threads", "2"]
    if a.serve_compile:
        cmd += ["--compile"]
    print("$ " + " ".join(cmd[2:]), file=sys.stderr, flush=True)
    log = open(work / "serve.log", "w")
    server = subprocess.Popen(cmd, stdout=log, stderr=log)
    try:
        base = f"http://127.0.0.1:{port}"
        if not wait_until(lambda: httpx.get(base + "/health", timeout=5).status_code == 200, server, 300, every=0.5):
            raise RuntimeError(f"the server did not become ready: ...{(work / 'serve.log').read_text()[-1500:]}")
        new = 32 if a.cpu_smoke else 256
        body = {"model": "m", "prompt": "def parse_args(argv):\n", "max_tokens": new, "temperature": 0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        url = base + "/v1/completions"
        asyncio.run(level(url, 1, 2.0 if a.cpu_smoke else 5.0, body))  # warm-up (and compile)
        cfg = checkpoint.load_model(model).cfg
        for n in levels:
            r = asyncio.run(level(url, n, a.serve_seconds, body))
            if n == 1:
                bound = ""
                if info.get("bandwidth"):
                    per_token = decode_bytes_per_token(cfg, bytes_per_param=2, context=new // 2)
                    limit = info["bandwidth"] / per_token
                    bound = f"of {limit:,.0f} tokens/s HBM bound ({r['mean_stream_tokens_per_s'] / limit:.1%})"
                row("decode", "1 stream tokens/s", f"{r['mean_stream_tokens_per_s']:,.0f}", bound=bound,
                    note=f"bf16, {new} new tokens, TTFT {r['mean_ttft_ms']:.0f} ms")
            row("serve", f"{n} streams", f"{r['total_tokens_per_s']:,.0f} tokens/s total",
                note=f"{r['requests']} requests, TTFT {r['mean_ttft_ms']:.0f} ms, {r['mean_stream_tokens_per_s']:.0f}/stream")
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-smoke", action="store_true", help="toy sizes on CPU: checks the plumbing, not the speed")
    ap.add_argument("--steps", type=int, default=None, help="pretraining steps (default 300; smoke 6)")
    ap.add_argument("--sft-steps", type=int, default=None, help="LoRA SFT steps (default 100; smoke 3)")
    ap.add_argument("--batch-size", type=int, default=32, help="pretraining sequences of 1024 tokens per step")
    ap.add_argument("--vocab", type=int, default=None, help="BPE vocabulary (default 8192; smoke 512)")
    ap.add_argument("--no-compile", dest="compile", action="store_false", help="train eagerly")
    ap.add_argument("--serve-compile", action="store_true", help="also torch.compile the server's decode step")
    ap.add_argument("--serve-seconds", type=float, default=None, help="per concurrency level (default 15; smoke 2)")
    ap.add_argument("--work", default="", help="scratch folder (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder")
    ap.add_argument("--json", default="", help="also write the rows here")
    a = ap.parse_args()
    smoke = a.cpu_smoke
    a.steps = a.steps or (6 if smoke else 300)
    a.sft_steps = a.sft_steps or (3 if smoke else 100)
    a.vocab = a.vocab or (512 if smoke else 8192)
    a.serve_seconds = a.serve_seconds or (2.0 if smoke else 15.0)
    if smoke:
        a.compile = False  # the plumbing, not a cold compile on 2 cores

    work = Path(a.work or tempfile.mkdtemp(prefix="lmforge-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        info = check_env(a) or {}
        if info.get("device") or smoke:
            data = prepare(a, work)
            if data:
                final = pretrain(a, work, data, info)
                parallel(a, work, data, info)
                if final:
                    sft(a, work, final)
                    serve(a, work, final, info)
    finally:
        if not a.keep and not a.work:
            shutil.rmtree(work, ignore_errors=True)
    total = time.perf_counter() - t0
    print(f"\n# lmforge GPU check{' (CPU smoke: plumbing only)' if smoke else ''}: {total / 60:.1f} min"
          + (f"; FAILED: {', '.join(FAILED)}" if FAILED else "; every stage passed"))
    print("\n| stage | metric | value | bound | note |\n|---|---|---|---|---|")
    for r in ROWS:
        print(f"| {r['stage']} | {r['metric']} | {r['value']} | {r['bound']} | {r['note']} |")
    if a.json:
        Path(a.json).write_text(json.dumps({"rows": ROWS, "failed": FAILED, "minutes": total / 60}, indent=2))
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
