"""plan as users meet it: the `lmforge plan ...` verbs through the CLI, JSON output, errors, and no torch."""

import json
import subprocess
import sys

import pytest

from lmforge.cli import main


def test_importing_plan_loads_no_torch():
    code = ("import sys, lmforge.plan, lmforge.plan.commands, lmforge.plan.decision, lmforge.plan.calibrate; "
            "assert 'torch' not in sys.modules, 'torch'; assert 'matplotlib' not in sys.modules, 'matplotlib'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_verbs_through_the_cli(capsys):
    assert main(["plan", "inference", "--model", "gpt-4", "--queries-per-month", "100000", "--input-tokens", "500",
                 "--output-tokens", "500", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["usd_per_query"] == pytest.approx(0.045) and res["usd_per_month"] == pytest.approx(4500)
    assert main(["plan", "train", "--params", "175e9", "--tokens", "300e9", "--gpu", "a100", "--gpus", "1024"]) == 0
    out = capsys.readouterr().out
    assert "3.15e23" in out and "Chinchilla" in out and "GPU-hours" in out
    assert main(["plan", "breakeven", "--one-off", "2000", "--saving-per-query", "0.02"]) == 0
    assert "100,000 queries" in capsys.readouterr().out
    assert main(["plan", "finetune", "--preset", "llama-3-8b", "--method", "qlora", "--gpu", "t4"]) == 0
    assert "4-bit" in capsys.readouterr().out


def test_user_errors_print_without_traceback(capsys):
    assert main(["plan", "inference", "--model", "gpt-9"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "gpt-4o" in err and "Traceback" not in err
    assert main(["plan", "train", "--params", "7e9", "--gpu", "abacus"]) == 2
    assert "no GPU named 'abacus'" in capsys.readouterr().err


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit) as e:
        main(["plan", "finetune", "--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps to the terminal width
    assert "--tokens-per-example" in out and "(default: lora)" in out and "(default: a100-80gb)" in out


def test_every_plan_report_names_its_command(capsys):
    argv = ["plan", "breakeven", "--one-off", "100", "--saving-per-query", "0.5"]
    assert main(argv) == 0
    assert "command: lmforge plan breakeven --one-off 100 --saving-per-query 0.5" in capsys.readouterr().out
    assert main(argv + ["--json"]) == 0
    assert json.loads(capsys.readouterr().out)["command"] == "lmforge " + " ".join(argv + ["--json"])
    # called from Python, a report names the equivalent command
    from lmforge.plan.commands import BreakevenPlanConfig, run_breakeven

    res = run_breakeven(BreakevenPlanConfig(one_off=100.0, saving_per_query=0.5, json=True))
    capsys.readouterr()
    assert res["command"] == "lmforge plan breakeven --one-off 100.0 --saving-per-query 0.5 --json"
