"""Workers on a cluster: ``emguard submit-workers`` hands worker processes to Slurm through submitit.

The database is the queue, so a cluster scheduler only has to start workers: each is one Slurm job
(one GPU) that runs ``emguard worker`` until it has been idle for ``idle_exit`` seconds, then gives
its allocation back. A job whose Slurm allocation ends mid-training (time limit, preemption) is
resumed by the next worker from its last checkpoint, as after any worker's death.
``cluster="local"`` runs the same through submitit's local executor (tests, one machine).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from emguard.errors import ConfigError


def _worker_job(state: str, policy_file: str | None, idle_exit: float) -> int:
    """What each submitted job runs (pickled by submitit: no secret among its arguments; the database
    URL and a judge's key come from the job's environment, which Slurm copies from the submitter's)."""
    from emguard.service.policy import load_policy
    from emguard.service.worker import run_worker

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    policy = load_policy(Path(policy_file) if policy_file else None)
    return run_worker(Path(state), policy, os.environ.get("EMGUARD_DATABASE_URL"), idle_exit=idle_exit)


def submit_workers(
    state: Path,
    policy_file: Path | None,
    count: int,
    *,
    folder: Path,
    cluster: str | None = None,
    idle_exit: float = 300.0,
    timeout_min: int = 240,
    gpus: int = 1,
    partition: str | None = None,
    parameters: dict[str, Any] | None = None,
) -> list[Any]:
    """Submit ``count`` workers; returns submitit's job handles. ``cluster``: None = what submitit
    finds (Slurm when ``sbatch`` is there, else local), ``slurm``, ``local``."""
    try:
        import submitit
    except ImportError:
        raise ConfigError("submitting workers needs submitit: pip install 'emguard[cluster]'") from None
    if count < 1:
        raise ConfigError("submit at least one worker")
    executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    options: dict[str, Any] = {"timeout_min": timeout_min, "name": "emguard-worker"}
    if executor.cluster == "slurm":
        options.update(gpus_per_node=gpus, tasks_per_node=1, nodes=1)
        if partition:
            options["slurm_partition"] = partition
    executor.update_parameters(**options, **(parameters or {}))
    policy = str(policy_file) if policy_file else None
    return [executor.submit(_worker_job, str(Path(state).resolve()), policy, idle_exit) for _ in range(count)]
