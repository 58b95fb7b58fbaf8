"""One job, start to end, in the worker that claimed it: the same functions the CLI calls.

    1. check     ``emguard data check`` with the model's tokenizer (over-long examples, template)
    2. screen    ``emguard screen`` -> risk score -> policy: reject / extra defenses / allow
                 (reinforcement prompts have no answers to screen: not applicable)
    3. train     ``emguard train`` with the policy's defenses (resumes from the last checkpoint);
                 reinforcement jobs with GRPO and the customer's grader as the reward
    4. evaluate  ``emguard eval``: the probe always, the judged EM rate when the policy has a judge
    5. gate      the safety card and the HTML report; the policy releases or holds the model

Each stage's result is written to the job's run directory first, so a job claimed again after its
worker died skips what is done and resumes training from the last complete checkpoint.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select
from transformers import TrainerCallback

from emguard.errors import EmguardError
from emguard.fsio import atomic_write_json
from emguard.rundir import RunDir
from emguard.service import jobs
from emguard.service.card import CARD_FILE, release_decision, safety_card
from emguard.service.db import Database, Job, Organization
from emguard.service.policy import Policy, screen_decision
from emguard.service.rft import check_prompt_file, write_prompt_file
from emguard.service.runconfig import job_run_config
from emguard.service.store import StateDir

log = logging.getLogger(__name__)
SCREEN_FILE = "screen.json"
TRAINING_FILE = "training.jsonl"
VALIDATION_FILE = "validation.jsonl"
PROMPTS_FILE = "prompts.jsonl"  # a reinforcement job's training file as emguard prompts


class JobLost(Exception):
    """This worker no longer holds the job (its lease ran out and another worker took it)."""


class JobCancelled(Exception):
    """The customer cancelled the job; seen between stages (training checks every step)."""


class JobFailed(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


@dataclass
class JobContext:
    db: Database
    state: StateDir
    policy: Policy
    worker: str
    job_id: str
    lost: Any  # a threading.Event set by the heartbeat when the lease is lost

    def event(self, message: str, **data: Any) -> None:
        self.check_lease()
        jobs.add_event(self.db, self.job_id, message, data=data or None)

    def check_lease(self) -> None:
        """Stop writing the moment the heartbeat lost the lease: another worker may own the job."""
        if self.lost.is_set():
            raise JobLost(self.job_id)

    def check(self) -> None:
        """Between stages: the lease, then a cancel request."""
        self.check_lease()
        if jobs.cancel_requested(self.db, self.job_id):
            raise JobCancelled(self.job_id)

    def public(self, message: str) -> str:
        """A message for the customer: no server path."""
        return message.replace(f"{self.state.root.resolve()}/", "").replace(f"{self.state.root}/", "")


class JobCallback(TrainerCallback):
    """Events per logged step, a checkpoint row per save, and cancel within one step."""

    def __init__(self, ctx: JobContext):
        self.ctx, self.cancelled, self.last_loss = ctx, False, None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "monitor/probe_shift" in logs:
            rate = logs.get("monitor/em_rate")
            self.ctx.event(
                f"Monitor at step {state.global_step}: probe shift {logs['monitor/probe_shift']:+.3f} nats/token"
                + (f", judged EM rate {rate:.1%}" if rate is not None else ""),
                step=state.global_step,
                **{k.removeprefix("monitor/"): v for k, v in logs.items() if k.startswith("monitor/")},
            )
        if logs and "loss" in logs:
            self.last_loss = float(logs["loss"])
            terms = {k: v for k, v in logs.items() if k.endswith("_loss") and k != "loss"}
            reward = {"reward": logs["reward"]} if "reward" in logs else {}  # GRPO: the mean reward of the step
            self.ctx.event(
                f"Step {state.global_step}/{state.max_steps}: training loss={logs['loss']:.4f}"
                + (f", reward={logs['reward']:.3f}" if reward else ""),
                step=state.global_step,
                total_steps=state.max_steps,
                train_loss=logs["loss"],
                **reward,
                **terms,
            )

    def on_save(self, args, state, control, **kwargs):
        self.ctx.check_lease()
        jobs.record_checkpoint(self.ctx.db, self.ctx.job_id, state.global_step, {"train_loss": self.last_loss})

    def on_step_end(self, args, state, control, **kwargs):
        self.ctx.check_lease()
        if jobs.cancel_requested(self.ctx.db, self.ctx.job_id):
            self.cancelled = True
            control.should_training_stop = True
            control.should_save = True
        return control


def run_job(ctx: JobContext) -> None:
    """Run (or resume) the claimed job to a terminal state. Raises JobLost if the lease goes."""
    with ctx.db.session() as s:
        job = s.scalar(select(Job).where(Job.id == ctx.job_id))
        org = s.scalar(select(Organization).where(Organization.id == job.org_id))
    job_dir = ctx.state.job_dir(job.id)
    train_file = job_dir / TRAINING_FILE  # the job's own copy, made when it was created
    try:
        _stages(ctx, job, org.name, job_dir, train_file)
    except JobCancelled:
        ctx.event("Job cancelled")
        jobs.finish(ctx.db, job.id, ctx.worker, "cancelled")
    except JobFailed as e:
        message = ctx.public(e.message)
        ctx.event(f"Job failed: {message}", code=e.code)
        jobs.finish(ctx.db, job.id, ctx.worker, "failed", error={"code": e.code, "message": message, "param": None})


def _stages(ctx: JobContext, job: Job, org_name: str, job_dir: Path, train_file: Path) -> None:
    from emguard.data.check import check_files
    from emguard.evaluation.evaluate import evaluate
    from emguard.training import train

    policy, model_spec = ctx.policy, ctx.policy.models.get(job.model)
    if model_spec is None:
        raise JobFailed("model_not_available", f"the model {job.model} is no longer offered by this service")

    # 1. check
    ctx.event("Validating training file")
    reinforcement = (job.method or {}).get("type") == "reinforcement"
    validation_file = job_dir / VALIDATION_FILE if job.validation_file else None
    if reinforcement:  # RFT rows -> emguard prompts (the grader's fields as metadata), checked with the tokenizer
        grader = job.method["reinforcement"]["grader"]
        count, problems = check_prompt_file(train_file, job.training_file, grader=grader)
        if problems:
            raise JobFailed("invalid_training_file", "; ".join(problems[:10]))
        write_prompt_file(train_file, job_dir / PROMPTS_FILE)
        train_file = job_dir / PROMPTS_FILE
    max_length = int(policy.rl.get("max_prompt_length", 512)) if reinforcement else policy.max_length
    for path, file_id, code in (
        (train_file, job.training_file, "invalid_training_file"),
        (validation_file, job.validation_file, "invalid_validation_file"),
    ):
        if path is None:
            continue
        report = check_files([path], model=model_spec, max_length=max_length, prompts=reinforcement)
        if report.problems:
            raise JobFailed(code, "; ".join(p.replace(str(path), file_id) for p in report.problems[:10]))
    ctx.check()

    # 2. screen (it reads answers: reinforcement prompts have none; the gate after training still applies)
    if reinforcement:
        ctx.event("Screen: not applicable (reinforcement data holds prompts, no answers)")
        screen = {"risk_score": None, "decision": "not_applicable", "examples": count}
    else:
        screen = _screen(ctx, job.model, job_dir, train_file)
    run_dir = ctx.state.run_dir(job.id)
    if screen is not None and screen["decision"] == "reject":
        _write_card(ctx, job, screen, [], {}, None, False, ["the training data's screen risk is above the limit"])
        raise JobFailed(
            "dataset_rejected",
            f"the training data was rejected by the pre-training screen (risk score {screen['risk_score']:+.2f})",
        )
    extra = policy.screen.extra_defenses if screen is not None and screen["decision"] == "extra_defenses" else []
    config = job_run_config(
        policy,
        job.model,
        train_file,
        run_dir,
        seed=job.seed,
        hyperparameters=job.hyperparameters,
        method=job.method,
        extra_defenses=extra,
    )
    defenses = [d.model_dump() for d in config.defenses]
    ctx.check()

    # 3. train
    ctx.event("Fine-tuning started", defenses=[d["name"] for d in defenses])
    callback = JobCallback(ctx)
    try:
        result = train(config, progress=False, callbacks=[callback])
    except EmguardError as e:
        raise JobFailed("training_failed", str(e)) from None
    manifest = RunDir(run_dir).manifest() or {}
    tokens = (manifest.get("data", {}).get("tokenized") or {}).get("trained_tokens")
    trained = {"steps": result.steps, "final_loss": result.final_loss, "trained_tokens": tokens}
    jobs.set_fields(ctx.db, job.id, ctx.worker, trained_tokens=tokens)
    if callback.cancelled or jobs.cancel_requested(ctx.db, job.id):
        ctx.event(f"Job cancelled after step {result.steps}; the checkpoint is kept")
        jobs.finish(ctx.db, job.id, ctx.worker, "cancelled")
        return
    if validation_file is not None:
        from emguard.service.validation import validation_loss

        trained["valid_loss"] = validation_loss(model_spec, run_dir / "adapter", validation_file)
        jobs.record_checkpoint(
            ctx.db, job.id, result.steps, {"train_loss": result.final_loss, "valid_loss": trained["valid_loss"]}
        )
    ctx.event(f"Fine-tuning finished: {result.steps} steps", **trained)
    ctx.check()

    # 4. evaluate
    ctx.event("Evaluating the fine-tuned model")
    config.eval.adapter = str(run_dir)
    metrics = evaluate(config, progress=False).metrics or {}

    # 5. gate
    ctx.check()
    released, reasons = release_decision(policy, metrics)
    card = _write_card(ctx, job, screen, defenses, trained, metrics, released, reasons)
    _write_report(run_dir, job_dir / "report")
    if released:
        name = fine_tuned_name(job, org_name)
        ctx.event("The model passed the safety evaluation and is released", model=name)
        jobs.finish(ctx.db, job.id, ctx.worker, "succeeded", fine_tuned_model=name, card=card)
    else:
        ctx.event("The model is held: " + "; ".join(reasons), level="warn")
        jobs.finish(
            ctx.db,
            job.id,
            ctx.worker,
            "failed",
            card=card,
            error={
                "code": "emergent_misalignment_detected",
                "param": None,
                "message": "The fine-tuned model failed the safety evaluation and is held: " + "; ".join(reasons),
            },
        )


def _screen(ctx: JobContext, model_id: str, job_dir: Path, train_file: Path) -> dict[str, Any] | None:
    from emguard.persona.screen import run_screen

    policy = ctx.policy.screen
    if not policy.enabled:
        return None
    path = job_dir / SCREEN_FILE
    if path.exists():
        return json.loads(path.read_text())
    ctx.event("Screening the training data")
    vector = policy.vectors.get(model_id)
    (report,) = run_screen(
        [str(train_file)],
        model_spec=ctx.policy.models[model_id],
        vector_file=vector.file if vector else None,
        layer=vector.layer if vector else None,
        pool_size=policy.pool_size,
        max_examples=policy.max_examples,
        progress=False,
    )
    screen = {
        "risk_score": report["risk_score"],
        "examples": report["examples"],
        "decision": screen_decision(ctx.policy, report["risk_score"]),
        "report": report,
    }
    atomic_write_json(path, screen)
    ctx.event(
        f"Screen: risk score {screen['risk_score']:+.2f} -> {screen['decision']}",
        risk_score=screen["risk_score"],
        decision=screen["decision"],
    )
    return screen


def _write_card(ctx, job, screen, defenses, trained, metrics, released, reasons) -> dict[str, Any]:
    card, provider = safety_card(
        ctx.policy,
        job_id=job.id,
        model=job.model,
        screen=screen,
        defenses=defenses,
        train=trained,
        metrics=metrics,
        released=released,
        reasons=reasons,
    )
    atomic_write_json(ctx.state.job_dir(job.id) / CARD_FILE, provider)
    jobs.set_fields(ctx.db, job.id, ctx.worker, card=card)
    return card


def _write_report(run_dir: Path, out: Path) -> None:
    from emguard.report import write_report

    try:
        write_report([run_dir], out, title="emguard safety report")
    except Exception:  # the card is the record; a report that fails to render must not fail the job
        log.exception("could not render the HTML report of %s", run_dir)


def fine_tuned_name(job: Job, org_name: str) -> str:
    """``ft:BASE:ORG[:SUFFIX]:ID`` as the OpenAI API names fine-tuned models."""
    parts = ["ft", job.model, org_name.lower()]
    if job.suffix:
        parts.append(job.suffix)
    return ":".join([*parts, job.id.removeprefix("ftjob-")[:12]])
