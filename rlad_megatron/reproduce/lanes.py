"""Run the reproduction's jobs in `lanes` parallel single-rank subprocesses, in priority order, each once its
prerequisites are done; a finished job may add jobs (the tuning grid's second stage, the final runs)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from rlad_megatron.reproduce.recipe import ENV, ROOT


@dataclass
class Job:
    """One subprocess: `argv` run from the repository root, output to `<out>/logs/<name>.log`; skipped when `done()`
    is already true (a resumed invocation); `then()` runs after it and returns follow-up jobs."""

    name: str
    argv: list[str]
    done: Callable[[], bool]
    needs: tuple[str, ...] = ()
    then: Callable[[], list[Job]] = field(default=list)
    clean: tuple[Path, ...] = ()  # outputs of an interrupted earlier attempt, removed before the job starts
    shown: list[str] | None = None  # the command to record when `argv` only waits for it to finish elsewhere


class Lanes:
    """Keeps `<out>/jobs.json`: every job's command and seconds (`reused` when found done)."""

    def __init__(self, out: Path, lanes: int):
        self.out, self.lanes = out, lanes
        self.record_path = out / "jobs.json"
        self.record: dict[str, dict] = json.loads(self.record_path.read_text()) if self.record_path.exists() else {}

    def _save(self) -> None:
        tmp = self.record_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.record, indent=1))
        tmp.replace(self.record_path)

    def _run(self, job: Job) -> None:
        entry = self.record.setdefault(job.name, {})
        entry["command"] = "OMP_NUM_THREADS=1 " + shlex.join(job.shown or job.argv)
        if job.shown:
            entry["waited_for"] = True
        if job.done():
            entry.setdefault("seconds", None)
            entry["reused"] = True
            print(f"[reproduce] {job.name}: done earlier, reused", flush=True)
            return
        for path in job.clean:
            shutil.rmtree(path, ignore_errors=True)
        log = self.out / "logs" / f"{job.name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **ENV, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        print(f"[reproduce] {job.name} ...", flush=True)
        t0 = time.perf_counter()
        with log.open("w") as f:
            rc = subprocess.run(job.argv, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, check=False).returncode
        entry.update(seconds=time.perf_counter() - t0, reused=False)
        if rc != 0 or not job.done():
            tail = log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"job {job.name} failed (exit {rc}); its log {log}:\n{tail}")
        print(f"[reproduce] {job.name}: {entry['seconds']:.0f} s", flush=True)

    def run(self, jobs: list[Job]) -> None:
        """Run `jobs` and everything they add; the first failure stops new starts and is raised."""
        pending, finished = list(jobs), set()
        running: dict[Future, Job] = {}
        with ThreadPoolExecutor(self.lanes) as pool:
            while pending or running:
                for job in [j for j in pending if set(j.needs) <= finished][: self.lanes - len(running)]:
                    pending.remove(job)
                    running[pool.submit(self._run, job)] = job
                if not running:
                    raise RuntimeError(f"jobs wait on jobs that never run: {[(j.name, j.needs) for j in pending]}")
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in done:
                    job = running.pop(fut)
                    fut.result()
                    self._save()
                    finished.add(job.name)
                    pending.extend(job.then())
