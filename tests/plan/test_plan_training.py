"""Training and finetuning estimates against published figures and the memory arithmetic."""

import pytest

from lmforge.errors import LmforgeError
from lmforge.model import accounting
from lmforge.plan import shape, training
from lmforge.plan.commands import FinetunePlanConfig, TrainPlanConfig, run_finetune, run_train
from lmforge.plan.prices import load_prices


def test_gpt3_training_flops():
    sh = shape.resolve(None, 175e9)
    flops = training.training_flops(sh, 300e9, 2048)["total"]
    assert flops == pytest.approx(3.15e23, rel=0.01)  # the GPT-3 paper reports 3.14e23


@pytest.mark.parametrize("model,reported_gpu_hours", [
    ("llama-2-7b", 184_320), ("llama-2-70b", 1_720_320),  # Llama 2 paper, table 2: A100-80GB, 2T tokens
    (13e9, 368_640), (34e9, 1_038_336),
])
def test_published_llama2_runs_within_a_factor_of_two(model, reported_gpu_hours, capsys):
    cfg = TrainPlanConfig(tokens=2e12, gpu="a100-80gb", gpus=2048, json=True)
    if isinstance(model, str):
        cfg.preset = model
    else:
        cfg.params = model
    res = run_train(cfg)
    capsys.readouterr()
    ratio = res["gpu_hours"] / reported_gpu_hours
    assert 0.5 < ratio < 2.0, f"{model}: estimated {res['gpu_hours']:.0f} GPU-hours, reported {reported_gpu_hours}"


def test_attention_term_only_with_a_known_shape():
    known = shape.resolve("llama-2-7b", None)
    fl = training.training_flops(known, 1e9, 4096)
    assert fl["per_token"] == accounting.flops_per_token_train(known.cfg, 4096)
    assert fl["attention_per_token"] > 0
    bare = shape.resolve(None, 7e9)
    assert training.training_flops(bare, 1e9, 4096)["per_token"] == 6 * 7e9
    # LoRA skips the frozen weights' gradient matmuls: 4N instead of 6N
    assert training.training_flops(bare, 1e9, 4096, "lora")["per_token"] == 4 * 7e9


def test_time_and_cost():
    gpu = load_prices().gpu("h100")
    t = training.compute_time(989e12 * 0.5 * 3600 * 10, gpu, gpus=5, mfu=0.5)
    assert t["gpu_hours"] == pytest.approx(10)
    assert t["wall_hours"] == pytest.approx(2)
    assert t["usd"] == pytest.approx(10 * gpu.usd_per_hour)
    assert training.compute_time(1e20, gpu, 1, 0.4, usd_per_hour=1.0)["usd_per_gpu_hour"] == 1.0
    with pytest.raises(LmforgeError, match="mfu"):
        training.compute_time(1e20, gpu, 1, 1.5)


def test_chinchilla():
    assert training.chinchilla_tokens(70e9) == pytest.approx(1.4e12)


def test_memory_fits_and_sharding():
    table = load_prices()
    a100 = table.gpu("a100")  # alias of the 80 GB part
    assert a100.memory_gb == 80
    sh = shape.resolve("llama-3-8b", None)
    full = training.memory(sh, a100, 8, "full", micro_batch=1, seq_len=2048, checkpointing=True)
    # 16 bytes per parameter does not fit one 80 GB GPU, and does when sharded over 8
    assert full["unsharded"]["weights"] + full["unsharded"]["gradients"] + full["unsharded"]["optimizer"] == \
        pytest.approx(16 * accounting.n_params(sh.cfg))
    assert not full["fits_unsharded"] and full["fits_sharded"]
    assert full["min_gpus_sharded"] == 2
    assert full["sharded"]["optimizer"] == pytest.approx(full["unsharded"]["optimizer"] / 8)
    lora = training.memory(sh, a100, 1, "lora", 1, 2048, True)
    qlora = training.memory(sh, table.gpu("t4"), 1, "qlora", 1, 2048, True)
    assert lora["fits_unsharded"] and qlora["fits_unsharded"]
    assert qlora["unsharded"]["weights"] < lora["unsharded"]["weights"] / 3
    assert "shard" in training.memory_advice(full)


def test_finetune_command(capsys):
    res = run_finetune(FinetunePlanConfig(params=8e9, examples=10000, tokens_per_example=500, epochs=3,
                                          method="qlora", gpu="a100"))
    out = capsys.readouterr().out
    assert res["tokens"] == 15e6
    assert res["flops"] == pytest.approx(4 * 8e9 * 15e6)
    assert res["memory"]["fits_unsharded"]
    assert "qlora" in out and "GPU-hours" in out and "fits" in out


def test_shape_estimate_lands_near_the_requested_size():
    for n in (1e8, 1e9, 7e9, 70e9):
        cfg = shape.estimate_config(n)
        assert abs(accounting.n_params(cfg) / n - 1) < 0.1
        cfg.validate()
    with pytest.raises(LmforgeError, match="not both"):
        shape.resolve("llama-2-7b", 7e9)
    with pytest.raises(LmforgeError, match="--params"):
        shape.resolve(None, None)
