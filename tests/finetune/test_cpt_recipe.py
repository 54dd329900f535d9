"""`lmforge finetune cpt`: continued pretraining of a base on prepared shards lowers the domain loss; a data
directory made with another tokenizer is refused."""

import json

from lmforge.cli import main
from tests.finetune.fixtures import TEXT, tiny_base


def test_cpt_lowers_domain_loss_and_checks_tokenizer(tmp_path):
    base = tiny_base(tmp_path / "base", seed=2)
    corpus = tmp_path / "domain.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"{TEXT[i % 4]} ({i})"}) + "\n" for i in range(200)))
    data = tmp_path / "data"
    assert main(["prepare", "--corpus", str(corpus), "--tokenizer", str(base), "--out", str(data),
                 "--val-fraction", "0.1"]) == 0
    out = tmp_path / "cpt"
    common = ["--train.peak-flops", "1e12", "--train.dtype", "fp32", "--batch-size", "4", "--seq-len", "64",
              "--lr", "3e-3", "--train.warmup-steps", "2", "--train.eval-tokens", "512"]
    assert main(["finetune", "cpt", "--base", str(base), "--data", str(data), "--out", str(out), "--max-steps", "10",
                 "--lora", "--lora.rank", "4", *common]) == 0
    res = json.loads((out / "summary.json").read_text())["results"]
    assert res["val_loss_finetuned"] < res["val_loss_base"] - 0.1
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "final" / "config.json").is_file()

    other = tmp_path / "other"
    assert main(["prepare", "--corpus", str(corpus), "--out", str(other), "--vocab-size", "300",
                 "--val-fraction", "0.1"]) == 0
    assert main(["finetune", "cpt", "--base", str(base), "--data", str(other), "--out", str(tmp_path / "x"),
                 "--max-steps", "1", *common]) == 2
