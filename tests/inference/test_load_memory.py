"""A quantized load never holds the whole model at full precision: blocks are fused and quantized as they load.

Measured as a user's `top` would show the process, minus the file cache: the peak of RssAnon (anonymous memory,
sampled every millisecond in a thread) above what the process held before the load, in a fresh interpreter.
Loading everything at fp32 first (the old way) puts the peak at the fp32 weights and more (the fused q/k/v and
gate/up copies); block by block it stays near the quantized model plus one block.
"""

import json
import subprocess
import sys

import pytest

from tests.inference.tiny import make_model_dir

PROBE = r"""
import json, sys, threading, time
def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
import torch
from lmforge import checkpoint
from lmforge.inference.load import load
from lmforge.model import quantize, transformer
from lmforge.model.quantize import weight_bytes
# the modules' own memory is not the model's: the first model built on the meta device loads torch's meta
# kernels and decompositions (~65 MB of Python objects, once per process), so build one before measuring
checkpoint.load_tokenizer(sys.argv[1])
with torch.device("meta"):
    transformer.Transformer(checkpoint.config_from_hf(json.load(open(sys.argv[1] + "/config.json")), "")
                            .replace(n_layers=1))
base, peak, stop = anon(), [0], [False]
def watch():
    while not stop[0]:
        peak[0] = max(peak[0], anon()); time.sleep(0.001)
t = threading.Thread(target=watch, daemon=True); t.start()
lm = load(sys.argv[1], quantize=sys.argv[2])
stop[0] = True; t.join()
print(json.dumps({"peak": max(peak[0], anon()) - base, "weights": weight_bytes(lm.model)}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_load_peak_stays_below_the_full_precision_model(tmp_path, method):
    # 8 layers of hidden 512 (27M parameters, 108 MB in fp32): the layers dominate, as in real models
    d = make_model_dir(tmp_path / "m", hidden_size=512, n_layers=8, n_heads=8, n_kv_heads=4, intermediate_size=1376)
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 8 and cfg["hidden_size"] == 512
    fp32_bytes = (d / "model.safetensors").stat().st_size
    out = subprocess.run([sys.executable, "-c", PROBE, str(d), method], capture_output=True, text=True, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["weights"] < 0.5 * fp32_bytes
    # loading at fp32 and then fusing measured 1.3-1.5x the fp32 bytes here; block by block ~0.5x
    assert got["peak"] < 0.8 * fp32_bytes, (got, fp32_bytes)
