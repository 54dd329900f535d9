"""The `lmforge` command. It finds the verb, parses that verb's Config (preset + YAML + --a.b overrides) and
calls its run(cfg). No logic lives here; nothing imports this module.

Each verb is one row: the words that name it, "module:ConfigClass:run_function", and a one-line summary.
Modules load only when their verb runs, so `lmforge --help` stays instant.
"""

from __future__ import annotations

import os
import sys

COMMANDS: list[tuple[str, str, str]] = [
    ("prepare", "lmforge.pretrain.prepare:PrepareConfig:run", "corpus -> tokenizer -> token shards for pretraining (built-in corpus: default)"),
    ("pretrain", "lmforge.pretrain.train:PretrainConfig:run", "pretrain a model from scratch on prepared token shards"),
    ("data builtin", "lmforge.data.builtin_sets:BuiltinConfig:run", "write the built-in stdlib sets (SFT, preference, held-out QA and multiple choice) and the stdlib's reference docs as files"),
    ("finetune sft", "lmforge.finetune.sft:SFTConfig:run", "supervised finetuning on chat JSONL (full or --lora); --data builtin"),
    ("finetune dpo", "lmforge.finetune.dpo:DPOConfig:run", "preference tuning (DPO/IPO) on prompt/chosen/rejected JSONL (full or --lora)"),
    ("finetune kto", "lmforge.finetune.kto:KTOConfig:run", "preference tuning (KTO) on unpaired thumbs up/down: prompt/completion/label JSONL"),
    ("finetune cpt", "lmforge.finetune.cpt:CPTConfig:run", "continued pretraining of a model on prepared token shards"),
    ("feedback export", "lmforge.jobs.feedback:ExportConfig:run", "users' ratings of served replies -> KTO or DPO training data (JSONL)"),
    ("merge", "lmforge.finetune.merge:MergeConfig:run", "fold a LoRA adapter into its base: a full Hugging Face model directory"),
    ("generate", "lmforge.inference.generate:GenerateConfig:run", "generate text from a model (streams to stdout)"),
    ("chat", "lmforge.rag.chat:RagChatConfig:run", "chat with a model in the terminal (streaming, history)"),
    ("serve", "lmforge.serve.server:ServeConfig:run", "OpenAI-compatible API server and chat page"),
    ("tokenizer train", "lmforge.tokenizer.train:TrainTokenizerConfig:run", "train a byte-level BPE tokenizer on text files"),
    ("plan train", "lmforge.plan.commands:TrainPlanConfig:run_train", "pretraining cost: FLOPs, GPU-hours, wall-clock, $, memory per GPU"),
    ("plan finetune", "lmforge.plan.commands:FinetunePlanConfig:run_finetune", "finetuning cost (full, LoRA, QLoRA): time, $, memory and fit"),
    ("plan inference", "lmforge.plan.commands:InferencePlanConfig:run_inference", "cost per query and per month, latency, KV cache: API or self-hosted"),
    ("plan breakeven", "lmforge.plan.commands:BreakevenPlanConfig:run_breakeven", "queries until a one-off cost (e.g. a finetune) pays for itself"),
    ("plan compare", "lmforge.plan.commands:ComparePlanConfig:run_compare", "compare a scenario's options: costs, break-even volumes, chart, advice"),
    ("plan decide", "lmforge.plan.decide:DecidePlanConfig:run", "compare runs -> the decision: monthly cost at volumes, the finetune's one-off and break-even, a significance-aware recommendation (decision.md + chart)"),
    ("plan calibrate", "lmforge.plan.commands:CalibratePlanConfig:run_calibrate", "a run's measured tokens/s -> this machine's $ per 1M tokens"),
    ("rag index", "lmforge.rag.commands:IndexConfig:run_index", "build or update a RAG index of documents (faiss + MiniLM embeddings)"),
    ("rag search", "lmforge.rag.commands:SearchConfig:run_search", "retrieve the chunks of an index closest to a question, with scores"),
    ("eval perplexity", "lmforge.eval.perplexity:PerplexityConfig:run", "perplexity over a text file or prepared data, with a sliding window"),
    ("eval task", "lmforge.eval.task:TaskConfig:run", "accuracy on a JSONL task (exact / contains / choice), few-shot, RAG"),
    ("compare", "lmforge.eval.compare:CompareConfig:run", "run variants (base, few-shot, RAG, finetuned) on one task: accuracy, latency, cost"),
    ("doctor", "lmforge.eval.doctor:DoctorConfig:run", "check a model's chat template, end-of-turn, tokenizer and context for train/serve/export (exit 1 on a failure)"),
    ("export gguf", "lmforge.inference.convert:ExportGGUFConfig:run_export_gguf", "write a model as one GGUF file for llama.cpp (f16, q8_0, q4_0, ...; --adapter merges a LoRA first)"),
    ("export ollama", "lmforge.inference.convert:ExportOllamaConfig:run_export_ollama", "write a GGUF and an Ollama Modelfile; prints the `ollama create` line"),
    ("import gguf", "lmforge.inference.convert:ImportConfig:run_import", "turn a GGUF file (any quant type) into a Hugging Face model directory"),
]

TRAINING_VERBS = ("pretrain", "finetune", "tokenizer train", "prepare")  # allocation-heavy: no huge pages


def _usage() -> str:
    width = max(len(name) for name, _, _ in COMMANDS)
    lines = ["usage: lmforge VERB [options]   (lmforge VERB --help for a verb's options and defaults)", "",
             "Pretrain, finetune, evaluate and serve Llama-family language models.", "", "verbs:"]
    lines += [f"  {name:<{width}}  {summary}" for name, _, summary in COMMANDS]
    return "\n".join(lines)


def _find(argv: list[str]) -> tuple[tuple[str, str, str] | None, list[str]]:
    for n in (2, 1):
        words = " ".join(argv[:n])
        for row in COMMANDS:
            if row[0] == words:
                return row, argv[n:]
    return None, argv


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait on the network for a hub name
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        from lmforge import __version__

        print(f"lmforge {__version__}")
        return 0
    row, rest = _find(argv)
    if row is None:
        group = [r for r in COMMANDS if r[0].split()[0] == argv[0]]
        if group:
            print(f"usage: lmforge {argv[0]} {{{','.join(r[0].split()[1] for r in group)}}} [options]\n", file=sys.stderr)
            for name, _, summary in group:
                print(f"  {name:<22}  {summary}", file=sys.stderr)
            return 0 if len(argv) > 1 and argv[1] in ("-h", "--help") else 2
        print(f"lmforge: unknown verb {' '.join(argv[:2])!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    name, target, summary = row
    module_name, config_name, run_name = target.split(":")
    from importlib import import_module

    from lmforge import huge_pages

    huge_pages(not name.startswith(TRAINING_VERBS))  # before the verb's first tensor: torch reads it once

    from lmforge.config import parse_config
    from lmforge.errors import LmforgeError

    try:
        module = import_module(module_name)
        cfg = parse_config(getattr(module, config_name), rest, prog=f"lmforge {name}", description=summary)
        result = getattr(module, run_name)(cfg)
    except LmforgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
