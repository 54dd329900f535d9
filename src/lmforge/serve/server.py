"""The `lmforge serve` verb: parse --model / --adapter specs, load them in the background, run uvicorn.

    lmforge serve --model runs/x/final                      # served as "final"
    lmforge serve --model chat=runs/x/final --model base=runs/y/final --adapter sql=base:runs/z/adapter

Every model and adapter gets its own Engine (an adapter is merged into its own copy of the base weights, so
it decodes at the base model's speed). The port answers /health with 503 while they load.

Browsers: requests whose Host is a name other than localhost, the machine's own (when listening beyond
loopback) or an --allowed-hosts one are refused, and so are other sites' pages unless --cors-origin names
them (serve/guard.py says why).

--jobs-dir holds the fine-tuning API's state (docs/jobs.md): a restarted server serves every earlier job's model
again and resumes the job that was running.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from lmforge.config import opt
from lmforge.errors import LmforgeError


@dataclass
class ServeConfig:
    model: list[str] = opt(help="model to serve (a directory, a .gguf file or a packaged model name), as DIR or "
                                "NAME=DIR (repeatable)", default_factory=list)
    adapter: list[str] = opt(help="LoRA adapter to serve, as NAME=BASE_NAME:ADAPTER_DIR (repeatable)",
                             default_factory=list)
    host: str = opt("127.0.0.1", "address to listen on (0.0.0.0 exposes the server to the network)")
    port: int = opt(8000, "port to listen on")
    api_key: str | None = opt(None, "require 'Authorization: Bearer KEY' on /v1 (default: $LMFORGE_API_KEY)")
    max_batch: int = opt(8, "requests decoded together per model (KV cache slots)")
    max_queue: int = opt(64, "requests that may wait for a slot before the server answers 429")
    max_len: int | None = opt(None, "context length served (default: the model's max_seq_len)")
    dtype: str = opt("float32", "weights and activations dtype", choices=["float32", "bfloat16", "float16"])
    quantize: str | None = opt(None, "weight-only quantization of every projection and the output head",
                               choices=["int8", "int4"])
    compile: bool = opt(True, "compile the decode step before serving (a model's first compile takes minutes, "
                              "cached after; --no-compile serves at once, slower)")
    max_body_mb: float = opt(2.0, "largest request body accepted, in MB (larger: 413)")
    prompt_timeout: float = opt(10.0, "seconds a request's chat template and tokenization may take (longer: 400)")
    allowed_hosts: list[str] = opt(help="a host name the server answers to besides IP addresses and localhost "
                                        "(repeatable; '*' = any). Other Host headers are refused: DNS rebinding",
                                   default_factory=list)
    cors_origin: list[str] = opt(help="a web origin (https://app.example) whose pages may call the API "
                                      "(repeatable; '*' = any). Other sites' browser requests are refused: 403",
                                 default_factory=list)
    threads: int = opt(0, "CPU threads for decode (0 = chosen for this machine)")
    prefill_threads: int = opt(0, "CPU threads for prompts (0 = chosen for this machine)")
    kv_cache_memory: str | None = opt(None, "KV cache budget per model, e.g. 2GB or 30% (of free memory); default: "
                                            "the context for every slot, up to 25% of free memory")
    rag: list[str] = opt(help="ground a served model's chat answers in a RAG index, as NAME=INDEX_DIR (repeatable); "
                              "answers then carry a `sources` field", default_factory=list)
    rag_top_k: int = opt(4, "chunks retrieved per question (with --rag)")
    jobs_dir: str = opt("runs/jobs", "where fine-tuning files, jobs, their runs and feedback live (SQLite + run "
                                     "directories); '' turns /v1/files, /v1/fine_tuning and /v1/feedback off")
    jobs_threads: int = opt(0, "CPU threads of a fine-tuning job's worker process (0: the recipe's choice)")
    jobs_checkpoint_every: int = opt(100, "steps between a job's checkpoints at most (also one per epoch)")
    jobs_lora_rank: int = opt(16, "LoRA rank of fine-tuning jobs")
    jobs_arg: list[str] = opt(help="one more finetune recipe flag for every job (repeatable, in order), e.g. "
                                   "--jobs-arg=--train.device --jobs-arg=cuda", default_factory=list)
    max_file_mb: float = opt(512.0, "largest fine-tuning file accepted by POST /v1/files, in MB")
    log_level: str = opt("info", "uvicorn log level", choices=["critical", "error", "warning", "info", "debug"])


def parse_specs(models: list[str], adapters: list[str]) -> list[tuple[str, Path, Path | None]]:
    """(name, model dir, adapter dir or None) for each served name; LmforgeError on anything unclear."""
    from lmforge.inference.load import check_model

    if not models:
        raise LmforgeError("give at least one --model DIR (or NAME=DIR)")
    out: list[tuple[str, Path, Path | None]] = []
    bases: dict[str, Path] = {}
    for spec in models:
        name, _, path = spec.partition("=") if "=" in spec else ("", "", spec)
        p = Path(path)
        name = name or p.resolve().name
        check_model(p, f"--model {spec}:")  # a directory, a .gguf file or a packaged model name
        if name in bases:
            raise LmforgeError(f"two models are named {name!r}; name them with --model NAME=DIR")
        bases[name] = p
        out.append((name, p, None))
    for spec in adapters:
        name, eq, rest = spec.partition("=")
        base, colon, path = rest.partition(":")
        if not (eq and colon and name and base and path):
            raise LmforgeError(f"--adapter {spec!r}: write it as NAME=BASE_NAME:ADAPTER_DIR")
        if base not in bases:
            raise LmforgeError(f"--adapter {spec}: no --model is named {base!r} (served: {', '.join(bases)})")
        if name in bases or any(n == name for n, _, _ in out):
            raise LmforgeError(f"--adapter {spec}: the name {name!r} is already taken")
        if not Path(path).is_dir():
            raise LmforgeError(f"--adapter {spec}: directory {path} does not exist")
        out.append((name, bases[base], Path(path)))
    return out


def make_loader(specs: list[tuple[str, Path, Path | None]], dtype: str, quantize: str | None):
    from lmforge.inference.load import load

    def loader():
        loaded = {}
        for name, path, adapter in specs:
            print(f"loading {name} from {path}" + (f" with adapter {adapter}" if adapter else ""), file=sys.stderr)
            loaded[name] = load(path, dtype=dtype, quantize=quantize, adapter=adapter, name=name)
        print(f"ready: {', '.join(loaded)}", file=sys.stderr)
        return loaded

    return loader


def rag_factories(specs: list[str], served: list[str], top_k: int) -> dict:
    """--rag NAME=INDEX -> {NAME: factory(tokenizer) -> retrieval hook}; the index opens when its model loads."""
    from lmforge.rag.chat import make_augment

    out = {}
    for spec in specs:
        name, sep, index = spec.partition("=")
        if not sep or not index:
            raise LmforgeError(f"--rag {spec!r}: write it as NAME=INDEX_DIR (NAME is a served model)")
        if name not in served:
            raise LmforgeError(f"--rag {spec}: no served model is named {name!r} (served: {', '.join(served)})")
        if not (Path(index) / "manifest.json").is_file():
            raise LmforgeError(f"--rag {spec}: {index} is not a RAG index (build one with `lmforge rag index`)")
        out[name] = lambda tok, index=index: make_augment(index, tok, top_k)
    return out


def run(cfg: ServeConfig) -> int:
    import uvicorn

    from lmforge.inference.engine import engine_kwargs
    from lmforge.serve.app import create_app
    from lmforge.serve.guard import machine_names
    from lmforge.serve.state import EngineOptions

    specs = parse_specs(cfg.model, cfg.adapter)
    key = cfg.api_key or os.environ.get("LMFORGE_API_KEY") or None
    engine = EngineOptions(max_batch=cfg.max_batch, max_queue=cfg.max_queue, max_len=cfg.max_len, compile=cfg.compile,
                           **engine_kwargs(cfg.threads, cfg.prefill_threads, cfg.kv_cache_memory))
    jobs = None
    if cfg.jobs_dir:
        from lmforge.jobs.spec import RunOptions
        from lmforge.serve.fine_tuning import JobsOptions

        run_opts = RunOptions(lora_rank=cfg.jobs_lora_rank, lora_alpha=2.0 * cfg.jobs_lora_rank,
                              checkpoint_every=cfg.jobs_checkpoint_every, threads=cfg.jobs_threads or None,
                              extra_args=tuple(cfg.jobs_arg))
        jobs = JobsOptions(Path(cfg.jobs_dir), run_opts, max_file_bytes=int(cfg.max_file_mb * 1e6))
    app = create_app(loader=make_loader(specs, cfg.dtype, cfg.quantize), api_key=key, engine=engine,
                     max_body_bytes=int(cfg.max_body_mb * 1e6), prompt_timeout=cfg.prompt_timeout,
                     allowed_hosts=machine_names(cfg.host) + cfg.allowed_hosts, cors_origins=cfg.cors_origin,
                     rag=rag_factories(cfg.rag, [name for name, _, _ in specs], cfg.rag_top_k), jobs=jobs)
    print(f"lmforge serve: http://{cfg.host}:{cfg.port}/ (chat page), OpenAI API at http://{cfg.host}:{cfg.port}/v1"
          + (" (API key required)" if key else ""), file=sys.stderr)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level)
    return 0
