"""Single-stream decode speed and time to first token: lmforge's Engine against transformers' generate, on the
same random-weight Llama shapes, next to this machine's memory-bandwidth limit.

    python benchmarks/bench_decode.py                       # presets small and medium, fp32 / bf16 / int8
    python benchmarks/bench_decode.py --presets small --compile --threads 2 --json out.json

What is measured, per preset and variant (interleaved runs, best of --repeats, since shared CPUs are noisy; with
--threads 1 times are the main thread's CPU time, so other processes competing for the cores do not count):
  - read bandwidth: best GB/s of summing a 512 MB fp32 tensor (what decode is bound by on CPU);
  - bound: the bytes decode must read per token (every matrix once, one embedding row, the KV cache so far)
    divided by that bandwidth = the most tokens/s any implementation can reach at that precision;
  - lmforge: Engine.submit of a --prompt-len prompt, greedy, --new-tokens tokens (EOS ignored); TTFT and decode
    tokens/s from the request's own timestamps; plus the overhead of the Python engine loop per token, from a
    raw `model(...)` loop on the same cache;
  - framework overhead: ms per token of a model with the preset's depth but tiny widths (its matmuls cost
    ~nothing), i.e. what Python and small-op dispatch cost per token, and its share of a real decode step;
  - transformers: model.generate(do_sample=False, min_new_tokens=max_new_tokens) of the same weights; TTFT is
    generate with max_new_tokens=1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


CLOCK = time.perf_counter  # main() switches to time.thread_time with --threads 1 (see --clock)


def read_bandwidth(repeats: int = 5) -> float:
    import torch

    x = torch.ones(128 * 1024 * 1024, dtype=torch.float32)  # 512 MB, far beyond any cache
    best = float("inf")
    for _ in range(repeats):
        t = CLOCK()
        x.sum()
        best = min(best, CLOCK() - t)
    return x.numel() * 4 / best / 1e9


def bytes_per_token(model, context: int) -> int:
    """Weights read once per decode step (an embedding lookup reads one row) + the KV cache read up to context."""
    from lmforge.model.accounting import kv_bytes_per_token
    from lmforge.model.quantize import weight_bytes

    emb = model.model.embed_tokens.weight
    tied = model.lm_head.__class__.__name__ == "Linear" and model.lm_head.weight is emb
    total = weight_bytes(model)
    if not tied:  # an untied table is only looked up: one row per token
        total -= emb.numel() * emb.element_size() - emb.shape[1] * emb.element_size()
    return int(total + kv_bytes_per_token(model.cfg, emb.element_size()) * context)


def overhead_probe(preset: str, tokens: int = 200, compile: bool = False) -> float:
    """ms per decode token of a model with the preset's layer count but tiny widths: the matmuls cost ~nothing,
    so what remains is the per-token framework overhead (Python, dispatcher, small-op launches) of that depth."""
    import torch

    from lmforge.inference.engine import Engine
    from lmforge.inference.sampling import SamplingParams
    from lmforge.model.config import preset as get_preset
    from lmforge.model.transformer import Transformer

    cfg = get_preset(preset).replace(vocab_size=256, hidden_size=64, intermediate_size=64, n_heads=2, n_kv_heads=1)
    torch.manual_seed(0)
    m = Transformer(cfg)
    m.init_weights(0)
    eng = Engine(m, max_batch=1, max_len=tokens + 16, compile=compile)
    sp = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    eng.generate([[1, 2, 3]], sp.replace(max_tokens=8))
    best = float("inf")
    for _ in range(3):
        g = eng.submit([1, 2, 3], sp)
        eng.step()  # prefill and the first decode step
        t = CLOCK()
        steps = 0
        while not g.done:
            eng.step()
            steps += 1
        best = min(best, (CLOCK() - t) / steps)
    return best * 1e3


def overhead_probe_transformers(preset: str, root: Path, tokens: int = 200) -> float:
    """overhead_probe for transformers' generate: the same tiny-width model through AutoModelForCausalLM."""
    import torch
    import transformers

    from lmforge.checkpoint import save_model
    from lmforge.model.config import preset as get_preset
    from lmforge.model.transformer import Transformer

    cfg = get_preset(preset).replace(vocab_size=256, hidden_size=64, intermediate_size=64, n_heads=2, n_kv_heads=1)
    torch.manual_seed(0)
    m = Transformer(cfg)
    m.init_weights(0)
    save_model(m, root / f"{preset}-probe")
    model = transformers.AutoModelForCausalLM.from_pretrained(root / f"{preset}-probe").eval()
    ids = torch.tensor([[1, 2, 3]])
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    best = float("inf")
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=8, min_new_tokens=8, **kw)
        for _ in range(3):
            t = CLOCK()
            model.generate(ids, max_new_tokens=1, **kw)
            first = CLOCK() - t
            t = CLOCK()
            model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, **kw)
            best = min(best, (CLOCK() - t - first) / (tokens - 1))
    return best * 1e3


def make_dir(preset: str, root: Path) -> Path:
    import torch

    from lmforge.checkpoint import save_model
    from lmforge.model.config import preset as get_preset
    from lmforge.model.transformer import Transformer

    torch.manual_seed(0)
    m = Transformer(get_preset(preset))
    m.init_weights(0)
    out = root / preset
    save_model(m, out)
    return out


def time_lmforge(path: Path, variant: str, prompt: list[int], new: int, compile: bool) -> dict:
    import torch

    from lmforge.inference.engine import Engine
    from lmforge.inference.load import load
    from lmforge.inference.sampling import SamplingParams

    dtype = "bfloat16" if variant == "bf16" else "float32"
    lm = load(path, dtype=dtype, quantize="int8" if variant == "int8" else None)
    eng = Engine(lm.model, max_batch=1, max_len=len(prompt) + new + 8, compile=compile)
    sp = SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True)
    eng.generate([prompt], sp.replace(max_tokens=8))  # warm-up (and compile)

    def run(n: int) -> float:
        g = eng.submit(prompt, sp.replace(max_tokens=n))
        t = CLOCK()
        while not g.done:
            eng.step()
        return CLOCK() - t

    ttft = run(1)  # prefill + the first token's sampling
    total = run(new)
    # the bare model loop on the same cache: what the engine's bookkeeping costs per token
    with torch.inference_mode():
        tok = torch.tensor([[1]])
        n = len(prompt)
        t = CLOCK()
        for i in range(new):
            tok = eng._decode_forward(tok, input_pos=n + i, cache=eng.cache)[:, -1].argmax(-1, keepdim=True)
        raw = new / (CLOCK() - t)
    return {"ttft_ms": ttft * 1e3, "tokens_per_s": (new - 1) / max(total - ttft, 1e-9),
            "raw_model_loop_tokens_per_s": raw, "bytes_per_token": bytes_per_token(lm.model, len(prompt) + new // 2)}


def time_transformers(path: Path, variant: str, prompt: list[int], new: int) -> dict:
    import torch
    import transformers

    dtype = torch.bfloat16 if variant == "bf16" else torch.float32
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    ids = torch.tensor([prompt])
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=8, min_new_tokens=8, **kw)  # warm-up
        t = CLOCK()
        model.generate(ids, max_new_tokens=1, **kw)
        ttft = CLOCK() - t
        t = CLOCK()
        model.generate(ids, max_new_tokens=new, min_new_tokens=new, **kw)
        total = CLOCK() - t
    return {"ttft_ms": ttft * 1e3, "tokens_per_s": (new - 1) / max(total - ttft, 1e-9)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="small,medium")
    ap.add_argument("--variants", default="fp32,bf16,int8", help="fp32, bf16, int8 (int8: lmforge only)")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    ap.add_argument("--compile", action="store_true", help="also time lmforge with torch.compile (minutes)")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--clock", choices=["auto", "wall", "cpu"], default="auto",
                    help="cpu: the main thread's CPU time, immune to other processes taking the cores (only "
                         "meaningful with --threads 1); auto: cpu with --threads 1, else wall")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)

    import torch

    global CLOCK
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = args.clock if args.clock != "auto" else ("cpu" if torch.get_num_threads() == 1 else "wall")
    if clock == "cpu" and torch.get_num_threads() != 1:
        ap.error("--clock cpu needs --threads 1 (it times the main thread only)")
    CLOCK = time.thread_time if clock == "cpu" else time.perf_counter
    bw = read_bandwidth()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {clock} clock; read bandwidth {bw:.1f} GB/s "
          f"(best of 5, 512 MB sum); load average {os.getloadavg()[0]:.1f}", file=sys.stderr)
    results = {"bandwidth_gb_s": bw, "threads": torch.get_num_threads(), "clock": clock,
               "load_average": os.getloadavg()[0], "runs": []}
    prompt = [(7 * i + 3) % 8000 for i in range(args.prompt_len)]
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets.split(","):
            path = make_dir(preset, Path(tmp))
            for variant in args.variants.split(","):
                contenders = [("lmforge", False)]
                if args.compile:
                    contenders.append(("lmforge+compile", True))
                if not args.skip_transformers and variant != "int8":
                    contenders.append(("transformers", None))
                best: dict[str, dict] = {}
                for _ in range(args.repeats):  # interleave contenders so load spikes hit all alike
                    for name, comp in contenders:
                        r = (time_transformers(path, variant, prompt, args.new_tokens) if comp is None
                             else time_lmforge(path, variant, prompt, args.new_tokens, comp))
                        b = best.setdefault(name, r)
                        b["tokens_per_s"] = max(b["tokens_per_s"], r["tokens_per_s"])
                        b["ttft_ms"] = min(b["ttft_ms"], r["ttft_ms"])
                        if "raw_model_loop_tokens_per_s" in r:
                            b["raw_model_loop_tokens_per_s"] = max(b["raw_model_loop_tokens_per_s"],
                                                                   r["raw_model_loop_tokens_per_s"])
                overhead = {name: (overhead_probe(preset, compile=comp) if comp is not None
                                   else overhead_probe_transformers(preset, Path(tmp)))
                            for name, comp in contenders}
                for name, ms in overhead.items():
                    best[name]["overhead_ms_per_token"] = ms
                nbytes = best["lmforge"]["bytes_per_token"]
                bound = bw * 1e9 / nbytes
                for name, r in best.items():
                    row = {"preset": preset, "variant": variant, "impl": name, **r, "bound_tokens_per_s": bound,
                           "fraction_of_bound": r["tokens_per_s"] / bound}
                    results["runs"].append(row)
                    extra = ""
                    if "overhead_ms_per_token" in r:
                        ms = r["overhead_ms_per_token"]
                        extra += f"  framework overhead {ms:.2f} ms/token ({ms * r['tokens_per_s'] / 1e3:.0%} of a step)"
                    if "raw_model_loop_tokens_per_s" in r:
                        per_tok = 1e3 / r["tokens_per_s"] - 1e3 / r["raw_model_loop_tokens_per_s"]
                        extra += (f"  raw model loop {r['raw_model_loop_tokens_per_s']:7.1f} tok/s "
                                 f"(engine adds {per_tok:+.2f} ms/token)")
                    print(f"{preset:7s} {variant:5s} {name:16s} decode {r['tokens_per_s']:7.1f} tok/s  "
                          f"TTFT {r['ttft_ms']:7.1f} ms  bound {bound:6.0f} tok/s "
                          f"({r['tokens_per_s'] / bound:4.0%} of it; {nbytes / 1e6:.1f} MB/token){extra}")
                if "transformers" in best:
                    ratio = best["lmforge"]["tokens_per_s"] / best["transformers"]["tokens_per_s"]
                    print(f"{preset:7s} {variant:5s} lmforge / transformers decode: {ratio:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
