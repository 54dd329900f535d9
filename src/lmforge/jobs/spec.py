"""What a fine-tuning job asks for, and the finetune recipe run that does it.

Owns: reading `POST /v1/fine_tuning/jobs`' body (model, training_file, validation_file, suffix, seed, metadata,
method with its hyperparameters; the deprecated top-level `hyperparameters` means supervised), OpenAI's ranges,
resolving "auto", the job object's `method` / `hyperparameters` fields, the fine-tuned model's name
(`ft:BASE:SUFFIX:JOB`), and the recipe's command line (`recipe`), which the worker parses and runs.

Methods: supervised -> `finetune sft`, dpo -> `finetune dpo`, kto (an lmforge extension) -> `finetune kto`; always
with LoRA (the adapter is what the server hot-loads on its base). "auto" resolves when the job is validated,
from the number of training records n:
  n_epochs                 3, raised so that n * epochs >= 100 examples are seen, lowered so that at most 25,000
                           are, within [1, 25] (the rule OpenAI's data-preparation guide publishes)
  batch_size               0.2% of n, rounded up, within [1, 256] (OpenAI's documented default)
  learning_rate_multiplier 1.0, i.e. the recipe's LoRA learning rate below; a number scales it
  beta                     0.1 (DPO and KTO)
A batch of B examples runs as micro-batches of the largest divisor of B that is at most 8 (accumulated), so
the optimizer sees exactly B examples per step whatever B is.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from typing import Any

from lmforge.errors import LmforgeError

METHODS = ("supervised", "dpo", "kto")
VERBS = {"supervised": "sft", "dpo": "dpo", "kto": "kto"}
FILE_KIND = {"supervised": "supervised", "dpo": "dpo", "kto": "kto"}
BASE_LR = {"supervised": 1e-3, "dpo": 1e-4, "kto": 1e-4}  # LoRA learning rates (multiplier 1.0)
HYPERPARAMETERS = {
    "supervised": ("batch_size", "learning_rate_multiplier", "n_epochs"),
    "dpo": ("batch_size", "beta", "learning_rate_multiplier", "n_epochs"),
    "kto": ("batch_size", "beta", "learning_rate_multiplier", "n_epochs", "desirable_weight", "undesirable_weight"),
}
# name -> (type, low, high, low inclusive): OpenAI's ranges where it documents them
RANGES = {"batch_size": (int, 1, 256, True), "n_epochs": (int, 1, 50, True),
          "learning_rate_multiplier": (float, 0.0, 10.0, False), "beta": (float, 0.0, 2.0, False),
          "desirable_weight": (float, 0.0, 10.0, False), "undesirable_weight": (float, 0.0, 10.0, False)}
SUFFIX = re.compile(r"[A-Za-z0-9._-]{1,64}")


class JobError(LmforgeError):
    """A request the API refuses: the message, and the parameter at fault."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


@dataclass
class Request:
    """A checked create request (files are looked up by the caller)."""

    model: str
    training_file: str
    validation_file: str | None
    suffix: str | None
    seed: int
    metadata: dict | None
    method: str
    hyperparameters: dict  # name -> value or "auto"


def parse_create(body: dict) -> Request:
    """The create request's fields, checked; JobError naming the parameter otherwise."""
    for key in ("model", "training_file"):
        if not isinstance(body.get(key), str) or not body[key]:
            raise JobError(f"Missing required parameter: '{key}'.", key, "missing_required_parameter")
    validation = body.get("validation_file")
    if validation is not None and (not isinstance(validation, str) or not validation):
        raise JobError("'validation_file' must be a file id.", "validation_file")
    suffix = body.get("suffix")
    if suffix is not None and (not isinstance(suffix, str) or not SUFFIX.fullmatch(suffix)):
        raise JobError("'suffix' must be 1 to 64 letters, digits, '.', '_' or '-'.", "suffix")
    seed = body.get("seed")
    if seed is None:
        seed = random.SystemRandom().randrange(2**31)  # OpenAI generates one and reports it
    elif not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**31:
        raise JobError("'seed' must be an integer in [0, 2147483647].", "seed")
    metadata = body.get("metadata")
    if metadata is not None:
        if (not isinstance(metadata, dict) or len(metadata) > 16
                or any(not isinstance(k, str) or len(k) > 64 or not isinstance(v, str) or len(v) > 512
                       for k, v in metadata.items())):
            raise JobError("'metadata' holds at most 16 string keys (up to 64 characters) with string values (up "
                           "to 512 characters).", "metadata")
    method, hp = _method(body)
    return Request(body["model"], body["training_file"], validation, suffix, seed, metadata, method, hp)


def _method(body: dict) -> tuple[str, dict]:
    method = body.get("method")
    if method is None:  # the deprecated top-level hyperparameters: a supervised job
        return "supervised", _hyperparameters("supervised", body.get("hyperparameters") or {},
                                              "hyperparameters")
    if not isinstance(method, dict) or method.get("type") not in METHODS:
        got = method.get("type") if isinstance(method, dict) else method
        raise JobError(f"'method.type' must be one of {', '.join(METHODS)} (got {got!r}); reinforcement "
                       "fine-tuning is not supported.", "method.type")
    kind = method["type"]
    section = method.get(kind) or {}
    if not isinstance(section, dict):
        raise JobError(f"'method.{kind}' must be an object.", f"method.{kind}")
    if body.get("hyperparameters"):
        raise JobError("Give hyperparameters in 'method', not also at the top level.", "hyperparameters")
    where = f"method.{kind}.hyperparameters"
    hp = _hyperparameters(kind, section.get("hyperparameters") or {}, where)
    if kind == "kto" and hp["batch_size"] == 1:  # its KL estimate pairs each prompt with another's completion
        raise JobError("KTO needs a batch_size of 2 or more.", f"{where}.batch_size")
    return kind, hp


def _hyperparameters(kind: str, given: Any, where: str) -> dict:
    if not isinstance(given, dict):
        raise JobError(f"'{where}' must be an object.", where)
    unknown = sorted(set(given) - set(HYPERPARAMETERS[kind]))
    if unknown:
        raise JobError(f"Unknown hyperparameter '{unknown[0]}' for {kind}; known: "
                       f"{', '.join(HYPERPARAMETERS[kind])}.", f"{where}.{unknown[0]}")
    out = {}
    for name in HYPERPARAMETERS[kind]:
        v = given.get(name, "auto")
        if v != "auto":
            typ, lo, hi, inclusive = RANGES[name]
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (typ is float or float(v).is_integer())
            if ok:
                v = typ(v)
                ok = (lo <= v if inclusive else lo < v) and v <= hi
            if not ok:
                low = "[" if inclusive else "("
                raise JobError(f"'{name}' must be \"auto\" or {'an integer' if typ is int else 'a number'} in "
                               f"{low}{lo}, {hi}] (got {v!r}).", f"{where}.{name}")
        out[name] = v
    return out


# ---- "auto" ------------------------------------------------------------------------------------------------
def auto_epochs(n: int) -> int:
    epochs = 3
    if n * epochs < 100:
        epochs = min(25, 100 // max(n, 1))
    elif n * epochs > 25_000:
        epochs = max(1, 25_000 // n)
    return max(1, epochs)


def auto_batch_size(n: int) -> int:
    return min(256, max(1, math.ceil(0.002 * n)))


def resolve(method: str, hp: dict, n_records: int) -> dict:
    """Every hyperparameter as a value (for the job object and the recipe)."""
    out = dict(hp)
    if out.get("n_epochs") == "auto":
        out["n_epochs"] = auto_epochs(n_records)
    if out.get("batch_size") == "auto":
        out["batch_size"] = auto_batch_size(n_records) if method != "kto" else max(2, auto_batch_size(n_records))
    out["batch_size"] = min(out["batch_size"], n_records)  # a batch larger than the data is the data
    if out.get("learning_rate_multiplier") == "auto":
        out["learning_rate_multiplier"] = 1.0
    for name in ("beta",):
        if out.get(name) == "auto":
            out[name] = 0.1
    for name in ("desirable_weight", "undesirable_weight"):
        if out.get(name) == "auto":
            out[name] = 1.0
    return out


def micro_batch(batch_size: int, most: int = 8) -> tuple[int, int]:
    """(micro-batch, accumulation steps) with micro * accumulation == batch_size exactly."""
    micro = max(d for d in range(1, min(batch_size, most) + 1) if batch_size % d == 0)
    return micro, batch_size // micro


def total_steps(n_records: int, hp: dict) -> int:
    """Optimizer steps of the run: n_epochs passes of ceil(n / batch) steps (the recipes' own count)."""
    return max(1, math.ceil(hp["n_epochs"] * math.ceil(n_records / hp["batch_size"])))


def method_object(method: str, hp: dict) -> dict:
    return {"type": method, method: {"hyperparameters": hp}}


def model_name(base: str, suffix: str | None, job_id: str) -> str:
    return f"ft:{base}:{suffix or ''}:{job_id.removeprefix('ftjob-')}"


@dataclass
class RunOptions:
    """How the server runs jobs (the same for every job): LoRA shape, checkpointing, threads, extra flags."""

    lora_rank: int = 16
    lora_alpha: float = 32.0
    checkpoint_every: int = 100  # steps between checkpoints at most (besides one per epoch)
    keep_checkpoints: int = 3  # OpenAI keeps the last three
    threads: int | None = None
    seq_len: int = 1024
    extra_args: tuple[str, ...] = ()  # more recipe flags for every job (e.g. --train.device cuda)


def recipe(method: str, hp: dict, n_records: int, *, base_path: str, train_path: str, val_path: str | None,
           run_dir: str, seed: int, options: RunOptions) -> dict:
    """{"verb", "argv", "total_steps"}: the finetune recipe's command line for this job."""
    steps = total_steps(n_records, hp)
    per_epoch = max(1, math.ceil(n_records / hp["batch_size"]))
    micro, accum = micro_batch(hp["batch_size"])
    save_every = max(1, min(per_epoch, options.checkpoint_every))
    argv = ["--base", base_path, "--data", train_path, "--out", run_dir, "--lora",
            "--lora.rank", str(options.lora_rank), "--lora.alpha", str(options.lora_alpha), "--no-lora.merge",
            "--val-fraction", "0", "--val-data", val_path or "",
            "--max-steps", str(steps), "--batch-size", str(micro), "--train.grad-accum", str(accum),
            "--seq-len", str(options.seq_len), "--lr", repr(BASE_LR[method] * hp["learning_rate_multiplier"]),
            "--seed", str(seed), "--train.warmup-steps", str(min(10, steps // 10)),
            "--save-every", str(save_every), "--train.keep-last", str(options.keep_checkpoints),
            "--eval-every", str(save_every if val_path else 0),
            "--train.log-every", str(max(1, steps // 200)), "--train.samples", "0"]
    if options.threads:
        argv += ["--train.threads", str(options.threads)]
    if method in ("dpo", "kto"):
        argv += ["--beta", repr(float(hp["beta"]))]
    if method == "kto":
        argv += ["--desirable-weight", repr(float(hp["desirable_weight"])),
                 "--undesirable-weight", repr(float(hp["undesirable_weight"]))]
    return {"verb": VERBS[method], "argv": argv + list(options.extra_args), "total_steps": steps}


# ---- the API's objects -------------------------------------------------------------------------------------
def job_object(row: dict) -> dict:
    """OpenAI's fine_tuning.job object (plus `paused`, an lmforge extension: see docs/jobs.md)."""
    method = row["method"]
    hp = method[method["type"]]["hyperparameters"]
    running = row["status"] == "running" and not row["paused"]
    return {
        "id": row["id"], "object": "fine_tuning.job", "created_at": row["created_at"], "error": row["error"],
        "fine_tuned_model": row["fine_tuned_model"], "finished_at": row["finished_at"],
        "hyperparameters": {k: hp[k] for k in ("batch_size", "learning_rate_multiplier", "n_epochs")},
        "model": row["model"], "organization_id": "org-lmforge", "result_files": row["result_files"],
        "seed": row["seed"], "status": row["status"], "trained_tokens": row["trained_tokens"],
        "training_file": row["training_file"], "validation_file": row["validation_file"],
        "estimated_finish": row["estimated_finish"] if running else None, "integrations": [],
        "metadata": row["metadata"], "method": method, "user_provided_suffix": row["suffix"],
        "paused": bool(row["paused"]),
    }


def event_object(row: dict) -> dict:
    return {"id": row["id"], "object": "fine_tuning.job.event", "created_at": row["created_at"],
            "level": row["level"], "message": row["message"], "data": row["data"], "type": row["type"]}


def checkpoint_object(row: dict, job: dict) -> dict:
    name = job["fine_tuned_model"] or model_name(job["model"], job["suffix"], job["id"])
    return {"id": row["id"], "object": "fine_tuning.job.checkpoint", "created_at": row["created_at"],
            "fine_tuned_model_checkpoint": f"{name}:ckpt-step-{row['step']}", "fine_tuning_job_id": job["id"],
            "metrics": row["metrics"], "step_number": row["step"]}
