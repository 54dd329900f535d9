"""The shared report renderer, the metrics writer (resume truncation) and the loss plot."""

import json

from lmforge.training.metrics import MetricsWriter, plot_loss, plot_title, read_metrics
from lmforge.training.report import render_file, render_report, write_summary


def test_render_report_sections_and_formats(tmp_path):
    summary = {"stage": "pretrain", "title": "T", "status": "done",
               "model": {"parameters": 5_401_856, "layers": 6}, "data": {"sources": ["default"]},
               "compute": {"training_flops": 45600473088000, "mfu": 0.1419, "hours": 0.2064},
               "results": {"final_val_loss": 4.79163}, "extra": {"seed": 1337},
               "samples": [{"prompt": "def", "text": "def f():\n    return 1"}], "plots": ["loss.png"],
               "notes": ["a note"]}
    md = render_report(summary)
    assert md.index("## Data") < md.index("## Model") < md.index("## Compute") < md.index("## Results") < md.index("## Extra")
    for piece in ("| parameters | 5,401,856 |", "| layers | 6 |", "| training flops | 4.56e+13 |", "| mfu | 14.2% |",
                  "| final val loss | 4.792 |", "| seed | 1337 |", "![loss](loss.png)", "def f():", "- a note"):
        assert piece in md, piece
    sj, report = write_summary(tmp_path, summary)
    assert json.loads(sj.read_text())["title"] == "T" and report.read_text() == md


def test_report_names_the_command_that_produced_it(tmp_path):
    from lmforge.config import command_line

    summary = {"stage": "pretrain", "title": "T", "model": {"layers": 2}}
    sj, report = write_summary(tmp_path, summary)
    stored = json.loads(sj.read_text())["command"]
    assert stored == command_line() and f"**command:** `{stored}`" in report.read_text()
    assert render_file(sj) == report.read_text()  # rendered again later: still the run's own command
    own = write_summary(tmp_path / "b", {**summary, "command": "lmforge pretrain --out runs/b"})[1].read_text()
    assert "**command:** `lmforge pretrain --out runs/b`" in own


def test_plot_title_does_not_repeat_the_stage():
    assert plot_title("pretrain pretrain") == "pretrain"  # runs/pretrain
    assert plot_title("SFT sft") == "SFT" and plot_title("DPO dpo") == "DPO"
    assert plot_title("pretrain tiny-1") == "pretrain tiny-1" and plot_title("loss") == "loss"


def test_metrics_writer_truncates_on_resume_and_plots(tmp_path):
    w = MetricsWriter(tmp_path)
    for step in range(1, 7):
        w.write({"step": step, "tokens": step * 10, "loss": 5.0 - step * 0.1, "mfu": float("nan")})
    w.write({"step": 6, "tokens": 60, "val_loss": 4.0})
    w.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "tok')  # a line torn by a kill
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6, 6]
    assert read_metrics(tmp_path / "metrics.jsonl")[0]["mfu"] is None  # NaN is written as null
    w = MetricsWriter(tmp_path, resume_step=4)
    w.write({"step": 5, "tokens": 50, "loss": 1.0})
    w.close()
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5] and records[-1]["loss"] == 1.0
    png = plot_loss(tmp_path / "metrics.jsonl", tmp_path / "loss.png")
    assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"
