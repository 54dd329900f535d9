"""The price table: every figure dated and sourced, aliases, user overrides and their errors."""

import pytest

from lmforge.errors import LmforgeError
from lmforge.plan.prices import load_prices


def test_every_entry_is_dated_and_sourced():
    table = load_prices()
    assert table.date
    assert {"gpt-4", "gpt-4o", "gpt-4o-mini"} <= set(table.api_models)
    for m in table.api_models.values():
        assert m.date and m.source, m.name
        assert m.input_usd_per_1m > 0 and m.output_usd_per_1m > 0
    assert {"h100", "h200", "a100-80gb", "a100-40gb", "l4", "a10g", "t4", "rtx4090", "cpu-2core"} <= set(table.gpus)
    for g in table.gpus.values():
        assert g.date and g.spec_source and g.price_source, g.key
        assert g.bf16_tflops > 0 and g.memory_gb > 0 and g.bandwidth_gb_s > 0 and g.usd_per_hour > 0
    assert "historical" in table.model("gpt-4").note
    assert table.gpu("H100").key == "h100" and table.gpu("a100").key == "a100-80gb"


def test_user_file_overrides_and_extends(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("gpus:\n  h100: {usd_per_hour: 2.0}\n  mygpu: {bf16_tflops: 100, memory_gb: 32, bandwidth_gb_s: 900,"
                 " usd_per_hour: 0.5, aliases: [mine]}\n"
                 "api_models:\n  my-model: {input_usd_per_1k: 0.001, output_usd_per_1k: 0.002}\n")
    table = load_prices(f)
    h100 = table.gpu("h100")
    assert h100.usd_per_hour == 2.0 and h100.bf16_tflops == 989  # merged field by field
    assert str(f) in h100.price_source and "NVIDIA" in h100.spec_source
    assert table.gpu("mine").memory_gb == 32
    m = table.model("my-model")
    assert (m.input_usd_per_1m, m.output_usd_per_1m) == (1.0, 2.0)
    assert str(f) in m.source


@pytest.mark.parametrize("text,match", [
    ("gpus:\n  newgpu: {usd_per_hour: 1}\n", "needs bf16_tflops"),
    ("api_models:\n  x: {input_usd_per_1m: -1, output_usd_per_1m: 1}\n", "non-negative"),
    ("api_models:\n  x: {input: 1}\n", "unknown keys"),
    ("models: {}\n", "unknown top-level"),
    ("gpus: [h100]\n", "must map names"),
    ("gpus: {h100: {usd_per_hour: [}\n", "not valid YAML"),
])
def test_bad_price_files(tmp_path, text, match):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(LmforgeError, match=match):
        load_prices(f)


def test_unknown_names_list_what_is_known(tmp_path):
    table = load_prices()
    with pytest.raises(LmforgeError, match="gpt-4o"):
        table.model("gpt-5000")
    with pytest.raises(LmforgeError, match="h100"):
        table.gpu("tpu-v9")
    with pytest.raises(LmforgeError, match="does not exist"):
        load_prices(tmp_path / "missing.yaml")
