"""The worker process: runs one fine-tuning job's finetune recipe and reports its progress to the jobs database.

    python -m lmforge.jobs.worker --db JOBS_DIR/lmforge.sqlite --job ftjob-...

The scheduler (a thread of the server) starts one worker per job and owns the job's status; the worker owns
what happens inside the run: it parses the recipe command line the job stored (spec.recipe) and calls the
recipe's run() on its main thread, so the recipe's own graceful stop works (SIGTERM: finish the step, save a
resumable checkpoint, exit 130). A side thread turns the run directory into API objects as they appear:
metrics.jsonl lines -> `metrics` events (and `estimated_finish`), checkpoints/step-N -> checkpoint rows.
At the end it records trained_tokens and the results file (OpenAI's CSV of step metrics).

Why a process and not a thread: training holds the GIL and the CPU for minutes to hours; the server must stay
responsive. Why the worker exits when the server dies: a server killed with -9 cannot stop it, so the worker
watches its parent and, once orphaned, stops itself as the recipe stops on SIGTERM (a checkpoint at the current
step); the restarted server resumes the job from there. An exclusive lock on the run directory makes a
restarted worker wait until the old one is gone, so two never write one run.

Exit status: 0 done, 130 stopped (pause, shutdown, orphaned), 2 the job's input is at fault (its message is
stored as the job's error), 1 a bug (traceback in the run's worker.log).
"""

from __future__ import annotations

import argparse
import fcntl
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

from lmforge import huge_pages
from lmforge.errors import LmforgeError
from lmforge.jobs.files import write_atomic
from lmforge.jobs.store import Store, new_id, now

RECIPES = {"sft": ("lmforge.finetune.sft", "SFTConfig"), "dpo": ("lmforge.finetune.dpo", "DPOConfig"),
           "kto": ("lmforge.finetune.kto", "KTOConfig")}
RESULT_COLUMNS = ("step", "train_loss", "valid_loss", "learning_rate", "tokens", "tokens_per_s", "seconds")


def read_metrics(path: Path) -> list[dict]:
    import json

    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            continue
    return out


def openai_metrics(record: dict, total: int | None) -> dict:
    """A metrics.jsonl record in the names OpenAI's metrics events and checkpoints use."""
    out = {"step": record.get("step")}
    if record.get("loss") is not None:
        out["train_loss"] = record["loss"]
    if record.get("val_loss") is not None:
        out["valid_loss"] = out["full_valid_loss"] = record["val_loss"]
    for k, name in (("lr", "learning_rate"), ("tokens_per_s", "tokens_per_s"), ("tokens", "tokens"),
                    ("seconds", "seconds"), ("reward_margin", "reward_margin"), ("kl", "kl")):
        if record.get(k) is not None:
            out[name] = record[k]
    if total:
        out["total_steps"] = total
    return out


class Progress:
    """Turns what the recipe writes into the run directory into events, checkpoint rows and estimates."""

    def __init__(self, store: Store, job: dict, run_dir: Path):
        self.store, self.job_id, self.run_dir = store, job["id"], run_dir
        self.total = job.get("total_steps")
        self.reported = job.get("step") or 0

    def by_step(self) -> dict[int, dict]:
        merged: dict[int, dict] = {}
        for r in read_metrics(self.run_dir / "metrics.jsonl"):
            if isinstance(r.get("step"), int):
                merged.setdefault(r["step"], {}).update(r)
        return merged

    def poll(self) -> None:
        steps = self.by_step()
        for step in sorted(s for s in steps if s > self.reported):
            r = steps[step]
            data = openai_metrics(r, self.total)
            msg = f"Step {step}/{self.total}: training loss={r.get('loss', float('nan')):.4f}"
            if "valid_loss" in data:
                msg += f", validation loss={data['valid_loss']:.4f}"
            self.store.add_event(self.job_id, msg, type="metrics", data=data)
            self.reported = step
            fields = {"step": step}
            if r.get("seconds") and self.total:
                left = (self.total - step) * r["seconds"] / step  # measured seconds per step x steps left
                fields["estimated_finish"] = now() + int(round(left))
            self.store.update_job(self.job_id, **fields)
        self.checkpoints(steps)

    def checkpoints(self, steps: dict[int, dict]) -> None:
        on_disk = checkpoints_on_disk(self.run_dir)
        known = self.store.checkpoint_steps(self.job_id)
        for step in sorted(set(on_disk) - known):
            metrics = openai_metrics(steps.get(step, {"step": step}), None)
            if self.store.add_checkpoint(self.job_id, step, metrics, str(on_disk[step])):
                self.store.add_event(self.job_id, f"Checkpoint created at step {step}.", data={"step": step})
        for step in known - set(on_disk):  # pruned by the recipe (it keeps the newest few)
            self.store.delete_checkpoint(self.job_id, step)


def checkpoints_on_disk(run_dir: Path) -> dict[int, Path]:
    """step -> directory of every complete, resumable adapter checkpoint of a run."""
    root, out = run_dir / "checkpoints", {}
    if root.is_dir():
        for d in root.iterdir():
            name = d.name.removeprefix("step-")
            if name.isdigit() and (d / "adapter_config.json").is_file() and (d / "trainer_state").is_dir():
                out[int(name)] = d
    return out


def results_csv(steps: dict[int, dict]) -> bytes:
    lines = [",".join(RESULT_COLUMNS)]
    for step in sorted(steps):
        m = openai_metrics(steps[step], None)
        lines.append(",".join("" if m.get(c) is None else str(m[c]) for c in RESULT_COLUMNS))
    return ("\n".join(lines) + "\n").encode()


class Stopped(BaseException):
    """SIGTERM before the recipe's loop has its own handler (loading, tokenizing): nothing to save yet."""


def _stop_now(signum, frame) -> None:
    raise Stopped


def watch_parent(parent: int) -> None:
    """Stop the run (as SIGTERM stops it) once the process that started this worker is gone."""
    def loop():
        while os.getppid() == parent:
            time.sleep(0.5)
        print("the server is gone: stopping at the end of this step", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=loop, name="lmforge-parent-watch", daemon=True).start()


def run_job(store: Store, job_id: str, files_dir: Path) -> int:
    from importlib import import_module

    from lmforge.config import parse_config

    job = store.job(job_id)
    if job is None:
        print(f"no job {job_id}", file=sys.stderr)
        return 2
    run_dir = Path(job["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = open(run_dir / ".worker.lock", "w")
    fcntl.flock(lock, fcntl.LOCK_EX)  # an earlier worker of this job (a killed server's) finishes first
    job = store.job(job_id)  # as that worker left it (the steps it reported)
    recipe = job["recipe"]
    module_name, config_name = RECIPES[recipe["verb"]]
    progress = Progress(store, job, run_dir)
    stop = threading.Event()

    def monitor():
        while not stop.wait(0.5):
            try:
                progress.poll()
            except Exception:  # a half-written file; the next poll reads it whole
                traceback.print_exc()

    resumed = max(checkpoints_on_disk(run_dir), default=0)
    store.add_event(job_id, f"Fine-tuning job resumed from the checkpoint at step {resumed}." if resumed else
                    "Fine-tuning job started.", data={"resumed_from_step": resumed} if resumed else None)
    thread = threading.Thread(target=monitor, name="lmforge-progress", daemon=True)
    thread.start()
    try:
        module = import_module(module_name)
        cfg = parse_config(getattr(module, config_name), recipe["argv"], prog=f"lmforge finetune {recipe['verb']}")
        rc = module.run(cfg)
    except Stopped:
        return 130
    except LmforgeError as e:
        store.update_job(job_id, error={"code": "invalid_training_file" if "line" in str(e) else "job_failed",
                                        "message": str(e), "param": None})
        return 2
    finally:
        stop.set()
        thread.join()
        progress.poll()
    if rc != 0:
        return rc
    summary = _summary(run_dir)
    training = summary.get("training", {})
    trained = training.get("trained_tokens", training.get("tokens"))
    result_id = new_id("file-")
    path = files_dir / f"{result_id}.csv"
    data = results_csv(progress.by_step())
    write_atomic(path, data)
    store.add_file({"id": result_id, "filename": "step_metrics.csv", "purpose": "fine-tune-results",
                    "bytes": len(data), "kind": "results", "records": None, "path": str(path)})
    final = max(progress.by_step(), default=0)
    store.add_checkpoint(job_id, final, openai_metrics(progress.by_step().get(final, {"step": final}), None),
                         str(run_dir / "adapter"))
    store.update_job(job_id, trained_tokens=trained, result_files=[result_id], adapter=str(run_dir / "adapter"),
                     estimated_finish=None)
    return 0


def _summary(run_dir: Path) -> dict:
    import json

    try:
        return json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return {}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lmforge.jobs.worker")
    p.add_argument("--db", required=True)
    p.add_argument("--job", required=True)
    p.add_argument("--parent", type=int, default=None, help="stop when this process is gone")
    args = p.parse_args(argv)
    huge_pages(False)  # jobs train (lmforge/__init__.py: huge pages slow training's allocations)
    signal.signal(signal.SIGTERM, _stop_now)  # the recipe's StopRequest replaces it while it trains
    if args.parent:
        watch_parent(args.parent)
    store = Store(args.db)
    try:
        return run_job(store, args.job, Path(args.db).parent / "files")
    except Exception:
        traceback.print_exc()
        return 1
    finally:
        store.close()


if __name__ == "__main__":
    sys.exit(main())
