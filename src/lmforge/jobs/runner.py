"""The job queue: creates jobs, moves them through OpenAI's statuses, and runs them one at a time, each in a worker
process (worker.py), from a thread of the server.

    validating_files -> queued -> running -> succeeded | failed | cancelled

Owns every status change (the worker only reports progress): creation (the files exist and are of the job's
kind; they are linked into the run directory at once, so deleting an upload later cannot hurt the job),
validation (enough records, "auto" resolved, the recipe's command line), the queue (oldest first), starting and watching the worker, and what its exit means. On success the
`on_success` callback (the server's hot-load) runs before the status says succeeded, so a client that sees
`succeeded` can use `fine_tuned_model` at once.

Pause and resume (OpenAI's endpoints; its statuses have no "paused"): pausing a running job asks the worker to
stop (SIGTERM: the step finishes and a checkpoint is written); the job then shows status `queued` with
`paused: true` and is not started again until it is resumed, when it continues from that checkpoint. Pausing a
job that has not started holds it in the queue the same way. Cancel kills the worker at once.

After a restart (a server killed with -9 included) every job is where the database says: jobs that were
`running` are started again first, and their recipe resumes from the newest checkpoint in their run directory.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from lmforge.jobs import files as jfiles
from lmforge.jobs import spec
from lmforge.jobs.store import ACTIVE, FINAL, Store, new_id, now

log = logging.getLogger("lmforge.jobs")
DB_NAME = "lmforge.sqlite"
DATA_FILES = (("training_file", "train.jsonl"), ("validation_file", "validation.jsonl"))


class JobRunner:
    def __init__(self, root: str | Path, options: spec.RunOptions | None = None,
                 on_success: Callable[[dict], None] | None = None, python: str = sys.executable):
        self.root = Path(root)
        (self.root / "files").mkdir(parents=True, exist_ok=True)
        (self.root / "runs").mkdir(parents=True, exist_ok=True)
        jfiles.clean_partial(self.root / "files")
        self.store = Store(self.root / DB_NAME)
        self.options = options or spec.RunOptions()
        self.on_success = on_success
        self.python = python
        self._lock = threading.RLock()  # status changes of the running job, the worker handle
        self._wake = threading.Event()
        self._stopping = False
        self._current: tuple[str, subprocess.Popen] | None = None
        self._thread: threading.Thread | None = None

    @property
    def files_dir(self) -> Path:
        return self.root / "files"

    # ---- the loop -------------------------------------------------------------------------------------------
    def start(self) -> JobRunner:
        self._thread = threading.Thread(target=self._loop, name="lmforge-jobs", daemon=True)
        self._thread.start()
        return self

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout: float = 60.0) -> None:
        """Stop the running worker as a pause would (checkpoint, exit); the job stays `running` and resumes at
        the next start."""
        with self._lock:
            self._stopping = True
            current = self._current
        self._wake.set()
        if current is not None:
            _, proc = current
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if self._thread is not None:
            self._thread.join(5)
        self.store.close()

    def _loop(self) -> None:
        while not self._stopping:
            try:
                self.step()
            except Exception:
                log.exception("job queue step failed")
            self._wake.wait(0.5)
            self._wake.clear()

    def step(self) -> None:
        """One pass: validate new jobs, notice a finished worker, start the next job."""
        for job in self.store.jobs_with_status("validating_files"):
            self._validate(job)
        ended = None
        with self._lock:
            if self._stopping:
                return
            if self._current is not None:
                job_id, proc = self._current
                rc = proc.poll()
                if rc is None:
                    return
                self._current = None
                ended = job_id, rc
        if ended is not None:  # outside the lock: the hot-load takes seconds, and cancel/pause must not wait
            self._finished(*ended)
        with self._lock:
            if self._stopping or self._current is not None:
                return
            waiting = [j for j in self.store.jobs_with_status("running", "queued") if not j["paused"]]
            waiting.sort(key=lambda j: (j["status"] != "running", j["seq"]))  # interrupted ones first
            if waiting:
                self._launch(waiting[0])

    # ---- creation and validation ----------------------------------------------------------------------------
    def create(self, body: dict, base_path: Callable[[str], str]) -> dict:
        """A new job from a create request (spec.parse_create); `base_path(model)` names the base's directory
        or raises JobError. The job starts in validating_files."""
        req = spec.parse_create(body)
        base = base_path(req.model)
        kind = spec.FILE_KIND[req.method]
        for param, file_id in (("training_file", req.training_file), ("validation_file", req.validation_file)):
            if file_id is None:
                continue
            f = self.store.file(file_id)
            if f is None or not Path(f["path"]).is_file():
                raise spec.JobError(f"No such file: '{file_id}'.", param, "file_not_found")
            if f["purpose"] != "fine-tune":
                raise spec.JobError(f"File '{file_id}' has purpose '{f['purpose']}'; upload it with purpose "
                                    "'fine-tune'.", param, "invalid_file_purpose")
            if f["kind"] != kind:
                raise spec.JobError(f"File '{file_id}' holds {jfiles.KINDS[f['kind']]}s, but a {req.method} job "
                                    f"needs {jfiles.KINDS[kind]}s.", param, "invalid_file_format")
        job_id = new_id("ftjob-")
        run_dir = self.root / "runs" / job_id
        for param, name in DATA_FILES:  # the job's own link to the bytes: deleting the upload cannot hurt it
            file_id = getattr(req, param)
            if file_id is not None:
                _link(Path(self.store.file(file_id)["path"]), run_dir / "data" / name)
        row = self.store.add_job({
            "id": job_id, "model": req.model, "base_path": base, "training_file": req.training_file,
            "validation_file": req.validation_file, "suffix": req.suffix, "seed": req.seed, "metadata": req.metadata,
            "method": spec.method_object(req.method, req.hyperparameters), "status": "validating_files",
            "run_dir": str(run_dir)})
        self.store.add_event(job_id, f"Created fine-tuning job: {job_id}")
        self.store.add_event(job_id, f"Validating training file: {req.training_file}"
                             + (f" and validation file: {req.validation_file}" if req.validation_file else ""))
        job = self.store.job(row["id"])  # as created: the queue may move it on the moment it wakes
        self.wake()
        return job

    def _validate(self, job: dict) -> None:
        method = job["method"]["type"]
        run_dir = Path(job["run_dir"])
        try:
            paths = {param: run_dir / "data" / name for param, name in DATA_FILES if job[param] is not None}
            for param, path in paths.items():
                if not path.is_file():
                    raise spec.JobError(f"The job's copy of file '{job[param]}' is missing from {path.parent}.",
                                        param, "file_not_found")
            _, n = jfiles.validate(paths["training_file"])  # the records count, as uploaded (validated then)
            if n < jfiles.MIN_RECORDS:
                raise spec.JobError(f"Training file '{job['training_file']}' has {n} example(s); at least "
                                    f"{jfiles.MIN_RECORDS} are required.", "training_file", "invalid_training_file")
            hp = spec.resolve(method, job["method"][method]["hyperparameters"], n)
            recipe = spec.recipe(method, hp, n, base_path=job["base_path"], train_path=str(paths["training_file"]),
                                 val_path=str(paths["validation_file"]) if "validation_file" in paths else None,
                                 run_dir=str(run_dir), seed=job["seed"], options=self.options)
        except (spec.JobError, jfiles.FileInvalid) as e:
            e = e if isinstance(e, spec.JobError) else spec.JobError(str(e), "training_file", "invalid_training_file")
            if self.store.transition(job["id"], ("validating_files",), "failed", finished_at=now(),
                                     error={"code": e.code or "invalid_training_file", "message": str(e),
                                            "param": e.param}):
                self.store.add_event(job["id"], str(e), level="error")
            return
        if self.store.transition(job["id"], ("validating_files",), "queued",
                                 method=spec.method_object(method, hp), recipe=recipe,
                                 total_steps=recipe["total_steps"]):
            self.store.add_event(job["id"], "Files validated, moving job to queued state")

    # ---- running ---------------------------------------------------------------------------------------------
    def _launch(self, job: dict) -> None:
        if job["status"] == "queued" and not self.store.transition(job["id"], ("queued",), "running"):
            return  # cancelled meanwhile
        run_dir = Path(job["run_dir"])
        run_dir.mkdir(parents=True, exist_ok=True)
        logf = open(run_dir / "worker.log", "ab")
        cmd = [self.python, "-m", "lmforge.jobs.worker", "--db", str(self.store.path), "--job", job["id"],
               "--parent", str(os.getpid())]
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                    start_new_session=True)  # a Ctrl-C at the server's terminal is not the job's
        finally:
            logf.close()
        self._current = (job["id"], proc)
        log.info("job %s: worker %d started", job["id"], proc.pid)

    def _finished(self, job_id: str, rc: int) -> None:
        job = self.store.job(job_id)
        if job is None or job["status"] != "running":
            return  # cancelled while it ran
        if rc == 0:
            name = spec.model_name(job["model"], job["suffix"], job_id)
            job = {**job, "fine_tuned_model": name}
            if self.on_success is not None:
                try:
                    self.on_success(job)
                except Exception as e:  # the job did succeed; say why the model is not served
                    log.exception("loading %s failed", name)
                    self.store.add_event(job_id, f"The fine-tuned model could not be loaded into the server: {e}",
                                         level="warn")
            if self.store.transition(job_id, ("running",), "succeeded", fine_tuned_model=name, finished_at=now(),
                                     estimated_finish=None):
                self.store.add_event(job_id, f"New fine-tuned model created: {name}")
                self.store.add_event(job_id, "The job has successfully completed")
        elif rc == 130 and job["paused"]:
            if self.store.transition(job_id, ("running",), "queued", estimated_finish=None):
                self.store.add_event(job_id, f"Fine-tuning job paused at step {job['step']}.")
        elif rc == 130:
            pass  # stopped without a pause (shutdown): still running, it goes on from its checkpoint
        else:
            error = job["error"] or {"code": "job_failed", "param": None,
                                     "message": f"The training process exited with status {rc}: "
                                                f"{_tail(Path(job['run_dir']) / 'worker.log')}"}
            if self.store.transition(job_id, ("running",), "failed", error=error, finished_at=now(),
                                     estimated_finish=None):
                self.store.add_event(job_id, f"Fine-tuning job failed: {error['message']}", level="error")

    # ---- requests on a job ----------------------------------------------------------------------------------
    def get(self, job_id: str) -> dict:
        job = self.store.job(job_id)
        if job is None:
            raise spec.JobError(f"No fine-tuning job found with id '{job_id}'.", "fine_tuning_job_id",
                                "job_not_found")
        return job

    def cancel(self, job_id: str) -> dict:
        with self._lock:
            job = self.get(job_id)
            if job["status"] in FINAL:
                raise spec.JobError(f"Job {job_id} has already {job['status']}; only an active job can be "
                                    "cancelled.", "fine_tuning_job_id", "job_not_active")
            if self._current is not None and self._current[0] == job_id:
                proc = self._current[1]
                proc.kill()  # nothing of a cancelled job is needed: no checkpoint to wait for
                proc.wait()
                self._current = None
            if self.store.transition(job_id, ACTIVE, "cancelled", finished_at=now(), estimated_finish=None):
                self.store.add_event(job_id, "Fine-tuning job cancelled.")
        self.wake()
        return self.get(job_id)

    def pause(self, job_id: str) -> dict:
        with self._lock:
            job = self.get(job_id)
            if job["status"] in FINAL:
                raise spec.JobError(f"Job {job_id} has already {job['status']}; only an active job can be paused.",
                                    "fine_tuning_job_id", "job_not_active")
            if not job["paused"]:
                self.store.update_job(job_id, paused=1)
                self.store.add_event(job_id, "Pause requested: the job stops after its current step and keeps a "
                                             "checkpoint.")
                if self._current is not None and self._current[0] == job_id:
                    self._current[1].send_signal(signal.SIGTERM)
                elif self.store.transition(job_id, ("running",), "queued"):  # interrupted, not restarted yet
                    self.store.add_event(job_id, f"Fine-tuning job paused at step {job['step']}.")
        return self.get(job_id)

    def resume(self, job_id: str) -> dict:
        with self._lock:
            job = self.get(job_id)
            if not job["paused"] or job["status"] in FINAL:
                raise spec.JobError(f"Job {job_id} is not paused.", "fine_tuning_job_id", "job_not_paused")
            self.store.update_job(job_id, paused=0)
            self.store.add_event(job_id, "Fine-tuning job resumed.")
        self.wake()
        return self.get(job_id)

    def succeeded(self) -> list[dict]:
        """Jobs whose model the server should serve (their adapter is on disk)."""
        return [j for j in self.store.jobs_with_status("succeeded")
                if j["adapter"] and Path(j["adapter"]).is_dir() and j["fine_tuned_model"]]


def _link(src: Path, dst: Path) -> Path:
    """dst names src's bytes (a hard link: free, and it outlives a deleted upload; a copy across filesystems)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not dst.exists():
        tmp = dst.parent / f".{dst.name}.part"
        tmp.unlink(missing_ok=True)
        try:
            os.link(src, tmp)
        except OSError:
            import shutil

            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    return dst


def _tail(path: Path, n: int = 400) -> str:
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        return "(no log)"
    return text[-n:] if text else "(no log)"
