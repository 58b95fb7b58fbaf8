"""The service's commands (``emguard serve``, ``emguard worker``, ``emguard keys``), registered by ``emguard.cli``."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated

import typer

DEFAULT_STATE = Path("emguard-state")
DatabaseUrl = Annotated[
    str | None,
    typer.Option(
        "--database-url",
        envvar="EMGUARD_DATABASE_URL",
        help="SQLAlchemy URL of a shared database (e.g. postgresql+psycopg://...); default: SQLite in --state.",
        show_default=False,
    ),
]
StateOption = Annotated[Path, typer.Option("--state", help="State directory: database, uploaded files, job runs.")]
PolicyOption = Annotated[
    Path | None, typer.Option("--policy", help="The provider's policy YAML (docs/service.md); default: built-in.")
]

keys_app = typer.Typer(help="API keys of the fine-tuning service.", no_args_is_help=True)


def serve_cmd(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    state: StateOption = DEFAULT_STATE,
    policy: PolicyOption = None,
    workers: Annotated[int, typer.Option(help="Local worker processes (0: workers run elsewhere).")] = 1,
    database_url: DatabaseUrl = None,
) -> None:
    """OpenAI-compatible fine-tuning service: every job screened, defended, evaluated and gated."""
    from emguard.service.server import serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    serve(host, port, state, policy, database_url, workers)


def worker_cmd(
    state: StateOption = DEFAULT_STATE,
    policy: PolicyOption = None,
    database_url: DatabaseUrl = None,
    poll: Annotated[float, typer.Option(help="Seconds between looks for a new job.")] = 1.0,
    exit_when_idle: Annotated[
        float | None, typer.Option(help="Exit after this many seconds without a job (cluster workers).")
    ] = None,
) -> None:
    """Run fine-tuning jobs of a service (started by `emguard serve`, or on other machines)."""
    from emguard.service.policy import load_policy
    from emguard.service.worker import run_worker

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s worker %(levelname)s %(message)s")
    run_worker(state, load_policy(policy), database_url, poll, exit_when_idle)


def submit_workers_cmd(
    count: Annotated[int, typer.Argument(help="Workers to submit (one GPU each).")],
    state: StateOption = DEFAULT_STATE,
    policy: PolicyOption = None,
    cluster: Annotated[
        str | None, typer.Option(help="slurm or local; default: Slurm when sbatch is available, else local.")
    ] = None,
    folder: Annotated[Path, typer.Option(help="submitit's folder for job scripts and logs.")] = Path("emguard-workers"),
    partition: Annotated[str | None, typer.Option(help="Slurm partition.")] = None,
    gpus: Annotated[int, typer.Option(help="GPUs per worker.")] = 1,
    timeout_min: Annotated[int, typer.Option(help="Time limit of each worker job, in minutes.")] = 240,
    exit_when_idle: Annotated[float, typer.Option(help="A worker exits after this many idle seconds.")] = 300.0,
) -> None:
    """Start service workers through a cluster scheduler (Slurm via submitit); prints the job ids."""
    from emguard.service.cluster import submit_workers

    handles = submit_workers(
        state,
        policy,
        count,
        folder=folder,
        cluster=cluster,
        idle_exit=exit_when_idle,
        timeout_min=timeout_min,
        gpus=gpus,
        partition=partition,
    )
    for handle in handles:
        typer.echo(handle.job_id)


@keys_app.command("create")
def keys_create(
    org: Annotated[str, typer.Argument(help="Organisation name (created with its first key).")],
    state: StateOption = DEFAULT_STATE,
    database_url: DatabaseUrl = None,
) -> None:
    """Create an API key for ORG; the key is printed once, as the last line, and stored only hashed."""
    from emguard.service.db import Database
    from emguard.service.db import database_url as default_url
    from emguard.service.keys import create_key

    state.mkdir(parents=True, exist_ok=True)
    organization, key = create_key(Database(default_url(state, database_url)), org)
    typer.echo(f"organisation {organization.name} ({organization.id}): new API key (shown once):", err=True)
    typer.echo(key)
