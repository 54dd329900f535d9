"""plan calibrate on a metrics.jsonl the test writes, as a training run would."""

import json

import pytest
import yaml

from lmforge.errors import LmforgeError
from lmforge.model import accounting
from lmforge.model.config import preset
from lmforge.plan.commands import CalibratePlanConfig, run_calibrate


def _run(tmp_path, speeds, extra_lines=()):
    run = tmp_path / "runs" / "demo"
    run.mkdir(parents=True)
    with open(run / "metrics.jsonl", "w") as f:
        for i, s in enumerate(speeds, 1):
            f.write(json.dumps({"step": i * 10, "tokens": i * 10 * 2048, "loss": 6 - i * 0.2, "tokens_per_s": s,
                                "mfu": 0.01}) + "\n")
        for line in extra_lines:
            f.write(line + "\n")
    return run


def test_measured_speed_and_cost(tmp_path, capsys):
    # the first record (warm-up) is slow and dropped; one slow step (a checkpoint save) does not move the median
    run = _run(tmp_path, [100, 1000, 1000, 1000, 200, 1000], extra_lines=['{"step": 60, "val_loss": 5.1}'])
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"preset": "tiny"}, "seed": 0}))
    res = run_calibrate(CalibratePlanConfig(run=str(run), usd_per_hour=0.10, tokens=1e9))
    out = capsys.readouterr().out
    assert res["tokens_per_s"] == 1000
    assert res["warmup_dropped"] == 1 and res["records"] == 7
    assert res["usd_per_1m_tokens"] == pytest.approx(0.10 / 3.6)  # 3.6M tokens an hour at $0.10
    assert res["projection"]["hours"] == pytest.approx(1e9 / 1000 / 3600)
    assert res["final_loss"] == pytest.approx(6 - 6 * 0.2) and res["steps"] == 60
    assert res["model"]["params"] == accounting.n_params(preset("tiny"))
    assert "cost per 1M tokens" in out and "$0.0278" in out


def test_price_from_gpu_table_and_truncated_line(tmp_path, capsys):
    run = _run(tmp_path, [500, 500], extra_lines=['{"step": 30, "tok'])
    res = run_calibrate(CalibratePlanConfig(run=str(run), gpu="cpu-2core", json=True))
    captured = capsys.readouterr()
    assert "cut short" in captured.err
    assert json.loads(captured.out)["tokens_per_s"] == 500
    assert res["usd_per_hour"] > 0


@pytest.mark.parametrize("lines,match", [
    (["not json", '{"step": 1, "tokens_per_s": 5}'], "not a JSON object"),
    (['{"step": 1, "loss": 3.0}'], "no record with a positive tokens_per_s"),
])
def test_bad_metrics(tmp_path, lines, match):
    run = _run(tmp_path, [], extra_lines=lines)
    with pytest.raises(LmforgeError, match=match):
        run_calibrate(CalibratePlanConfig(run=str(run), usd_per_hour=1))


def test_missing_inputs(tmp_path):
    with pytest.raises(LmforgeError, match="does not exist"):
        run_calibrate(CalibratePlanConfig(run=str(tmp_path / "nope"), usd_per_hour=1))
    with pytest.raises(LmforgeError, match="usd-per-hour"):
        run_calibrate(CalibratePlanConfig(run=str(tmp_path)))
    with pytest.raises(LmforgeError, match="--run"):
        run_calibrate(CalibratePlanConfig(usd_per_hour=1))
