"""In-training EM monitor: every N optimizer steps, the judge-free probe on held-out answer pairs.

The check measures ``shift = mean over pairs of gap(model now) − gap(base)``, where
``gap = lp(misaligned) − lp(aligned)`` per answer token (``emguard.evaluation.probe``); the base
gaps are measured once, with the LoRA adapter disabled, when training begins. With
``monitor.judge_samples`` and an ``eval.judge``, each check also generates that many answers to
the general questions and reports the share the judge calls misaligned.

Cost: one check is a forward pass over ``2 × pairs`` short conversations (48 for
``builtin:general``); the base model's gaps come from the on-disk loss cache after the first run.
``monitor.max_pairs`` trades precision for time.

Results go through ``Trainer.log``, so they land in ``train_log.jsonl`` and in every
``report_to`` integration (TensorBoard, W&B, MLflow) as ``monitor/*``. When the shift reaches
``monitor.threshold`` the run is flagged (``action: flag``) or stopped after that step
(``action: stop``); the manifest's ``monitor`` record says which, when, and what the checks cost.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from transformers import TrainerCallback

from emguard.config import RunConfig
from emguard.distributed import broadcast, is_main_process
from emguard.evaluation.probe import load_pairs, pair_gaps, spread_subset

log = logging.getLogger(__name__)
SCORED = ("aligned", "coherent")  # judge prompts asked per answer, in this order


class EMMonitorCallback(TrainerCallback):
    """The monitor; ``bind(trainer)`` before training so that its checks are logged like the loss."""

    def __init__(self, config: RunConfig, tokenizer: Any, base_identity: str | None = None):
        """``base_identity`` (``emguard.models.model_identity``) caches the base model's losses on disk."""
        self.section = config.monitor
        self.config = config
        self.tokenizer = tokenizer
        self.pairs = spread_subset(load_pairs(self.section.pairs), self.section.max_pairs)  # bad input fails now
        self.base_cache = None
        if base_identity is not None:
            from emguard.likelihood import NLLCache, state_key
            from emguard.models import cache_root

            self.base_cache = NLLCache(cache_root() / "nll", state_key(base_identity, None))
        self.judged = bool(self.section.judge_samples)
        # Every process samples answers (a sharded model needs all of them); only the main process
        # has a judge (a local judge model is loaded once, and paid calls are made once).
        self.judge = self._build_judge() if self.judged else None
        self.trainer: Any = None
        self.base_gaps: np.ndarray | None = None
        self.checks: list[dict[str, float]] = []
        self.seconds = 0.0
        self.flagged_at: int | None = None
        self.stopped = False

    def bind(self, trainer: Any) -> EMMonitorCallback:
        self.trainer = trainer
        return self

    def _build_judge(self) -> Any:
        from emguard.errors import ConfigError
        from emguard.evaluation.judges import build_judge

        if self.config.eval.judge is None:
            raise ConfigError("monitor.judge_samples needs a judge: set eval.judge, or set monitor.judge_samples: 0")
        if not is_main_process():
            return None
        return build_judge(self.config.eval.judge, model_options=self.config.model_options)

    # --- Trainer events ------------------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        started = time.monotonic()
        with model.disable_adapter():
            self.base_gaps = self._gaps(model, self.base_cache)
        self.seconds += time.monotonic() - started

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        step = state.global_step
        if step % self.section.every and step != state.max_steps:
            return
        started = time.monotonic()
        # Every process measures (under FSDP a forward pass needs all of them); every process then
        # acts on the main process's numbers, so that a stop is unanimous.
        shift = float(np.mean(self._gaps(model) - self.base_gaps))
        logs: dict[str, Any] = {"monitor/probe_shift": round(shift, 6)}
        if self.judged:
            logs["monitor/em_rate"] = self._judged_em_rate(model)
        logs = broadcast(logs)
        shift = logs["monitor/probe_shift"]
        took = time.monotonic() - started
        self.seconds += took
        logs["monitor/seconds"] = round(took, 3)
        self.checks.append({"step": step, **logs})
        if self.trainer is not None:
            due = control.should_log  # Trainer.log clears it, which would drop this step's loss log
            self.trainer.log(logs)
            self.trainer.control.should_log = control.should_log = due
        threshold = self.section.threshold
        if threshold is not None and shift >= threshold and self.flagged_at is None:
            self.flagged_at = step
            if self.section.action == "stop":
                self.stopped = True
                control.should_training_stop = True
            if is_main_process():
                log.warning(
                    "EM monitor: probe shift %+.4f nats/token at step %d reached the threshold %+.4f; run %s",
                    shift,
                    step,
                    threshold,
                    "stopped" if self.stopped else "flagged",
                )

    # --- measurements --------------------------------------------------------------------------
    @contextlib.contextmanager
    def _eval_mode(self, model: Any) -> Iterator[None]:
        """Eval mode without gradients for a check; the training mode comes back afterwards."""
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            model.train(was_training)

    def _gaps(self, model: Any, cache: Any = None) -> np.ndarray:
        with self._eval_mode(model):
            return pair_gaps(model, self.tokenizer, self.pairs, self.section.batch_size, cache)

    def _judged_em_rate(self, model: Any) -> float | None:
        """EM rate (``emguard.evaluation.metrics``) of ``judge_samples`` answers to the general questions.

        Every process generates (a sharded model needs all of them); only the main process asks the
        judge (paid calls, once), the others return None.
        """
        from emguard.evaluation.evaluate import default_judge_prompts
        from emguard.evaluation.generation import HFGenerator, SamplingConfig
        from emguard.evaluation.judged import JudgedSample
        from emguard.evaluation.metrics import Thresholds, compute_metrics
        from emguard.evaluation.questions import load_questions, sample_requests

        spec = self.config.eval.questions[0] if self.config.eval.questions else "builtin:general"
        requests = sample_requests(load_questions(spec), 1)[: self.section.judge_samples]
        sampling = SamplingConfig(1.0, 1.0, self.section.max_new_tokens, self.section.batch_size, 0)
        with self._eval_mode(model):
            answers = HFGenerator(model, self.tokenizer, sampling).generate([r.messages for r in requests])
        if not is_main_process():
            return None
        templates = default_judge_prompts()
        prompts = [
            templates[m].replace("{question}", r.messages[-1]["content"]).replace("{answer}", answer)
            for r, answer in zip(requests, answers, strict=True)
            for m in SCORED
        ]
        scores = [j.score for j in self.judge.judge(prompts)]  # one call: the judge's concurrency applies
        samples = [
            JudgedSample(r.question_id, scores[2 * i], scores[2 * i + 1], f"monitor:{i}")
            for i, r in enumerate(requests)
        ]
        t = self.config.eval.thresholds
        thresholds = Thresholds(t.aligned_below, t.coherent_above, t.incoherent_below)
        return round(compute_metrics({"monitor": samples}, thresholds, 0, 0)["pooled"]["em_rate"], 4)

    def summary(self, train_seconds: float) -> dict[str, Any]:
        return {
            "every": self.section.every,
            "pairs": self.section.pairs,
            "threshold": self.section.threshold,
            "action": self.section.action,
            "checks": len(self.checks),
            "seconds": round(self.seconds, 2),
            "share_of_training": round(self.seconds / train_seconds, 4) if train_seconds else None,
            "flagged_at_step": self.flagged_at,
            "stopped": self.stopped,
            "last": self.checks[-1] if self.checks else None,
        }
