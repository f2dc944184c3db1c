"""Fan a sweep's specs out over several workers (one per GPU) with torch.multiprocessing.spawn.

Every worker loads the model on its own device, rebuilds the same token stream and evaluates its
share of the specs (round robin), writing one JSON line per finished spec to its own file, so a worker
that dies loses only the spec it was on. The parent then collects every file; specs with no result
(worker died or raised) are retried once on a fresh set of workers, and whatever still fails is
reported with its error, never dropped. Per-token NLLs travel back so the paired bootstrap against
the fp16 row is computed in the parent exactly as in a single-process run.
"""

from __future__ import annotations

import json
import tempfile
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Job:
    """What a worker needs to rebuild the run's setup (all plain data, so it pickles for spawn)."""

    backend: str
    model: str
    data: str
    max_tokens: int
    context: int
    stride: int | None
    chunk: int
    lastword: int
    seed: int
    specs: tuple[str, ...]
    devices: tuple[str, ...]
    bases_path: str | None
    out_dir: str


def _worker(rank: int, job: Job) -> None:
    """One spawned worker: evaluate specs[rank::workers] on devices[rank]."""
    import kvspec

    from . import bases as basis_store
    from . import experiment

    out = Path(job.out_dir) / f"worker{rank}.jsonl"
    if job.devices[rank].startswith("cuda:"):
        import torch

        torch.cuda.set_device(job.devices[rank])  # so nothing of this worker's lands on cuda:0
    runner = experiment.backends.runner(job.backend, job.model, device=job.devices[rank])
    setup = experiment.make_setup(runner, job.data, job.max_tokens, job.context, job.stride, job.chunk, job.lastword, job.seed)
    bases = basis_store.load(Path(job.bases_path), runner.fingerprint) if job.bases_path else None
    for text in job.specs[rank :: len(job.devices)]:
        try:
            row, nll = experiment.run_spec(setup, kvspec.parse(text), bases)
            record = {"spec": text, "row": row, "nll": nll.tolist(), "device": job.devices[rank]}
        except Exception as e:  # reported to the parent, which retries once
            record = {"spec": text, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc(limit=5)}
        with out.open("a") as f:
            f.write(json.dumps(record) + "\n")


def _spawn(job: Job) -> str | None:
    """Run the workers; returns a description of a crash (results written so far are kept)."""
    import torch.multiprocessing as mp

    try:
        mp.spawn(_worker, args=(job,), nprocs=len(job.devices), join=True)
    except Exception as e:  # a worker died (OOM, segfault) or raised outside a spec
        return f"{type(e).__name__}: {e}"
    return None


def _collect(out_dir: Path) -> dict[str, dict[str, Any]]:
    records: dict[str, dict[str, Any]] = {}
    for path in sorted(out_dir.glob("worker*.jsonl")):
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            if "row" in rec or rec["spec"] not in records:
                records[rec["spec"]] = rec
    return records


def run(job: Job, log) -> tuple[list[tuple[dict[str, Any], np.ndarray]], list[dict[str, str]]]:
    """Evaluate job.specs over job.devices: (results in spec order, failures after one retry)."""
    done: dict[str, dict[str, Any]] = {}
    todo = list(job.specs)
    for attempt in (1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            workers = tuple(job.devices[: max(1, min(len(job.devices), len(todo)))])
            crash = _spawn(Job(**{**asdict(job), "specs": tuple(todo), "devices": workers, "out_dir": tmp}))
            records = _collect(Path(tmp))
        if crash:
            log(f"attempt {attempt}: a worker failed ({crash})")
        for text in todo:
            rec = records.get(text)
            if rec and "row" in rec:
                done[text] = rec
            elif rec:
                log(f"attempt {attempt}: {text} failed: {rec['error']}")
        todo = [t for t in todo if t not in done]
        if not todo:
            break
        if attempt == 1:
            log(f"retrying {len(todo)} spec(s) once: {', '.join(todo)}")
    failures = [{"spec": t, "error": (records.get(t) or {}).get("error", "no result (worker died)")} for t in todo]
    results = [(done[t]["row"], np.asarray(done[t]["nll"])) for t in job.specs if t in done]
    return results, failures
