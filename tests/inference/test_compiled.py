"""The compiled decode step (inference/decode.py) against eager decoding: the same greedy ids, alone and in a
batch (the wide-batch packages too), across a cache growth, with a kept prefix, while a larger batch size compiles
in the background; its packages come back from the on-disk compile cache.

Few and small on purpose: each bucket's package takes ~20-40 s to compile cold on 2 cores."""

import pytest
import torch

from lmforge.inference import decode
from lmforge.inference.decode import batch_buckets, can_compile
from lmforge.inference.engine import Engine
from lmforge.inference.sampling import SamplingParams
from lmforge.model.config import preset
from lmforge.model.transformer import Transformer

pytestmark = pytest.mark.skipif(can_compile(torch.device("cpu")) is not None, reason="no C++ compiler")


@pytest.fixture(autouse=True)
def compiling_on(monkeypatch):
    monkeypatch.setenv("LMFORGE_COMPILE", "1")  # the suite's conftest turns compiling off everywhere else


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = Transformer(preset("test").replace(max_seq_len=512))
    m.init_weights(0)
    with torch.no_grad():  # larger logits than the default init, so greedy picks are far from ties
        m.lm_head.weight.mul_(4.0)
    return m.eval()


def test_lmforge_compile_0_turns_compiling_off(model, monkeypatch):
    """What keeps the rest of the suite (servers and verbs that compile by default) from paying cold compiles."""
    monkeypatch.setenv("LMFORGE_COMPILE", "0")
    assert Engine(model, max_batch=1, compile=True).compiled is None


def test_buckets():
    assert batch_buckets(1) == [1] and batch_buckets(8) == [1, 2, 4, 8] and batch_buckets(6) == [1, 2, 4, 6]


def test_compiled_greedy_ids_equal_eager_fp32(model, monkeypatch):
    """The projections on lmforge's fp32 kernel where the machine has it, else batch 1 on the C++ GEMM template and
    batch 2 on aten's matmuls (the wide-batch path)."""
    from lmforge.model import cpu_kernels

    monkeypatch.setattr(decode, "WIDE_ROWS", 2)
    g = torch.Generator().manual_seed(1)
    ps = [torch.randint(0, 2048, (int(n),), generator=g).tolist() for n in (5, 30, 12)]
    long = SamplingParams(temperature=0.0, max_tokens=300, ignore_eos=True)  # 256 -> 512 positions: one growth
    short = long.replace(max_tokens=20)
    eager = Engine(model, max_batch=2)
    want_long = eager.generate(ps[:1], long)[0]
    want = [Engine(model, max_batch=1).generate([p], short)[0] for p in ps]

    eng = Engine(model, max_batch=2, compile=True)
    assert eng.compiled is not None and eng.cache.capacity == 256
    assert eng.compiled.inductor_options(torch.float32, 2)["max_autotune_gemm_backends"] == "ATEN"
    assert eng.compiled.inductor_options(torch.float32, 1)["max_autotune_gemm_backends"] == "CPP,ATEN"
    kernel = cpu_kernels.available()
    assert eng.compiled.f32 == kernel
    # as a server starts: batch 1 now, batch 2 compiling in the background while requests run (export traces a
    # twin of the model, so the engine's own forwards never meet the fake tensors it swaps in)
    eng.warmup(background=True)
    assert eng.generate(ps[:1], long)[0] == want_long and eng.cache.capacity == 512
    eng._warming.join()
    assert eng.compiled.is_warm(2, 2)
    # three requests on two slots: batches of 2 and of 1 (padded), slots reused, prefixes kept and reused
    assert eng.generate(ps, short) == want
    assert eng.generate([ps[1] + want[1]], short)[0] == Engine(model, max_batch=1).generate([ps[1] + want[1]],
                                                                                          short)[0]
    assert eng.stats.prompt_tokens_reused > 0
    assert (eng.compiled.cache_dir / "key.json").is_file()
    packages = {int(p.stem.split("-")[1].split("x")[1]): p for p in eng.compiled.cache_dir.glob("decode-2x*.pt2")}
    assert sorted(packages) == [1, 2]
    assert [calls_f32_kernel(packages[b]) for b in (1, 2)] == [kernel, kernel]
    # a second engine over the same model reuses the loaded packages (eval builds one per run)
    again = Engine(model, max_batch=2, compile=True)
    assert again.compiled is eng.compiled and again.warmup() < 5
    # a new process's start: the packages come from disk, nothing is compiled again
    fresh = decode.CompiledDecode(model, eng.compiled.options["cpp.threads"], eng.compiled.options["cpp.dynamic_threads"])
    fresh.warmup(2, [1, 2], torch.float32)
    assert fresh.compiled == 0 and fresh.is_warm(2, 1) and fresh.is_warm(2, 2)
    again.compiled = fresh
    assert again.generate(ps, short) == want


def calls_f32_kernel(package) -> bool:
    """Whether a package's compiled code calls lmforge's fp32 kernel (its C function's name, linked by name)."""
    import zipfile

    with zipfile.ZipFile(package) as z:
        return any(b"aoti_torch_cpu_lmforge_f32_mm" in z.read(n) for n in z.namelist() if n.endswith(".so"))


def test_compiled_int4_calls_lmforge_kernel_and_equals_eager(tmp_path, monkeypatch):
    """int4 layers in lmforge's q4 packing: the package calls the kernel's C function (linked by name, loaded
    before the package) and gives eager int4's greedy ids."""
    from lmforge.model import cpu_kernels
    from lmforge.model.quantize import quantize

    if not cpu_kernels.available():
        pytest.skip("needs AVX512-VNNI")
    monkeypatch.setenv("LMFORGE_COMPILE_CACHE", str(tmp_path))
    torch.manual_seed(3)
    m = Transformer(preset("test").replace(max_seq_len=256, intermediate_size=384))
    m.init_weights(3)
    with torch.no_grad():
        m.lm_head.weight.mul_(4.0)
    m.eval().fuse_projections()
    quantize(m, "int4")
    assert {mod.packing for mod in m.modules() if hasattr(mod, "packing")} == {"q4"}
    sp = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    want = Engine(m, max_batch=1).generate([[3, 1, 4, 1, 5]], sp)[0]
    eng = Engine(m, max_batch=1, compile=True)
    eng.warmup()
    assert eng.compiled.is_warm(1, 1)
    assert eng.generate([[3, 1, 4, 1, 5]], sp)[0] == want


def test_packages_of_other_code_are_not_loaded(model, monkeypatch):
    """A package runs the code it was built from: after an upgrade of lmforge's model code it must not load."""
    before = decode.CompiledDecode(model, 1).cache_dir
    monkeypatch.setattr(decode, "code_digest", lambda: "other")
    assert decode.CompiledDecode(model, 1).cache_dir != before


def test_twin_shares_the_tensors_but_not_the_modules(model):
    """What makes a background compile safe: export swaps the traced modules' parameters for fake tensors."""
    twin = decode._twin(model)
    assert twin is not model and twin.model.layers[0] is not model.model.layers[0]
    assert dict(twin.named_parameters()).keys() == dict(model.named_parameters()).keys()
    assert all(a is b for a, b in zip(twin.parameters(), model.parameters()))
    assert twin.lm_head.weight is twin.model.embed_tokens.weight or not model.cfg.tie_embeddings
    before = model.model.layers[0].mlp.up_proj.weight
    twin.model.layers[0].mlp.up_proj.weight = torch.nn.Parameter(torch.zeros_like(before))
    assert model.model.layers[0].mlp.up_proj.weight is before


def test_frozen_graphs_of_two_models_of_one_shape_keep_their_own_weights(tmp_path, monkeypatch):
    """The weights are frozen into the graphs (constants the C++ GEMM template packs), and a frozen graph's cache
    package holds them: a second model of the same shape, compiled against the same cache, must not get the
    first one's package (its name has a digest of the weights)."""
    from torch._dynamo.utils import counters

    monkeypatch.setenv("LMFORGE_COMPILE_CACHE", str(tmp_path))
    counters.clear()
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    sp = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    got = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        m = Transformer(preset("test").replace(max_seq_len=256))
        m.init_weights(seed)
        with torch.no_grad():
            m.lm_head.weight.mul_(4.0)
        m.eval()
        want = Engine(m, max_batch=1).generate([prompt], sp)[0]
        eng = Engine(m, max_batch=1, compile=True)
        eng.warmup()
        assert eng.compiled.is_warm(1, 1) and eng.compiled.compiled == 1
        got.append(eng.generate([prompt], sp)[0])
        assert got[-1] == want
    assert got[0] != got[1]  # two different models, or the test shows nothing
    assert counters["inductor"]["cpp_templated_kernel_counter"] > 0  # weights were constants: the template ran


def test_a_failed_compile_decodes_eagerly(model, monkeypatch, tmp_path, caplog):
    """A model export or Inductor cannot take costs speed, not the answer: the engine says so and runs eagerly."""
    monkeypatch.setenv("LMFORGE_COMPILE_CACHE", str(tmp_path))

    def broken(*args, **kwargs):
        raise RuntimeError("unsupported operator")

    monkeypatch.setattr(decode.CompiledDecode, "_compile", broken)
    sp = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    want = Engine(model, max_batch=2).generate([[5, 6, 7]], sp)[0]
    eng = Engine(model, max_batch=2, compile=True, threads=1)
    eng.compiled = decode.CompiledDecode(model, 1)  # not the shared one other tests filled
    with caplog.at_level("WARNING", logger="lmforge.engine"):
        eng.warmup()
    assert "unsupported operator" in caplog.text and "decode eagerly" in caplog.text
    assert not eng.compiled.is_warm(2, 1)
    assert eng.generate([[5, 6, 7]], sp)[0] == want
