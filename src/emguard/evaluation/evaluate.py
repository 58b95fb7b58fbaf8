"""``emguard eval``: generate answers, judge them, probe likelihoods, score the benign task.

The steps, in order (an interrupted eval resumes: answers and judgements are kept as they come):

1. Read everything that can be wrong (question and pair sets, adapters, judge settings) before
   writing anything.
2. ``conversations.jsonl``: the rendered conversations, one line per answer to generate, system
   prompts included. ``--dry-run`` stops here.
3. Generate the answers (appended to ``generations.jsonl`` batch by batch).
4. Judge every answer with every judge prompt of its question (on-disk cache; a failed call is
   recorded with its reason and retried by the next run).
5. Benign task: operator-swap accuracy, greedy (criterion c).
6. Probe: likelihood gaps of matched answer pairs under the evaluated model, the base model
   (adapter off) and a control fine-tune — a proxy, reported apart from the EM rate.
7. ``samples.jsonl`` and ``metrics.json``, written atomically; the manifest gets an ``eval`` record.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from emguard.config import RunConfig
from emguard.errors import ConfigError
from emguard.evaluation.answer_store import AnswerStore, file_sha256, generation_fingerprint, sample_key
from emguard.evaluation.generation import GenerationStats, HFGenerator, SamplingConfig, attach_adapter, find_adapter
from emguard.evaluation.judged import JudgedSample
from emguard.evaluation.judges import build_judge
from emguard.evaluation.metrics import Thresholds, compute_metrics
from emguard.evaluation.opswap_eval import OpswapItem, opswap_accuracy, opswap_eval_items
from emguard.evaluation.probe import AnswerPair, load_pairs, pair_logprobs, probe_report, spread_subset
from emguard.evaluation.questions import Question, SampleRequest, load_questions, sample_requests
from emguard.fsio import atomic_write_json, atomic_write_jsonl, atomic_write_yaml
from emguard.rundir import EVAL_CONFIG, MANIFEST, RunDir, git_commit, now, package_versions

log = logging.getLogger(__name__)

CONVERSATIONS = "conversations.jsonl"
GENERATIONS = "generations.jsonl"
SAMPLES = "samples.jsonl"
METRICS = "metrics.json"
SCORED_METRICS = ("aligned", "coherent")  # what the EM metrics read; other judge prompts are recorded only


@dataclass
class EvalResult:
    """Where an eval wrote what, and its metrics (None for a dry run)."""

    run_dir: Path
    conversations: Path
    n_conversations: int
    metrics: dict[str, Any] | None = None
    files: dict[str, str] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {
            "run_dir": str(self.run_dir),
            "conversations": str(self.conversations),
            "n_conversations": self.n_conversations,
            "files": self.files,
            "metrics": self.metrics,
        }


@dataclass(frozen=True)
class _Inputs:
    questions: dict[str, list[Question]]  # question-set spec -> its questions
    requests: list[tuple[str, SampleRequest]]  # (set spec, request)
    pairs: dict[str, list[AnswerPair]]
    adapter: Path | None
    control: Path | None
    benign: list[OpswapItem]  # empty: no benign task
    training_seed: int  # the evaluated adapter's (its benign items are held out from that training set)


def default_judge_prompts() -> dict[str, str]:
    """emguard's own aligned/coherent judge prompts (those of ``builtin:general``)."""
    return dict(load_questions("builtin:general")[0].judge_prompts)


def _read_inputs(config: RunConfig) -> _Inputs:
    e = config.eval
    questions = {spec: load_questions(spec) for spec in dict.fromkeys(e.questions)}
    requests = [(spec, r) for spec, qs in questions.items() for r in sample_requests(qs, e.samples_per_paraphrase)]
    pairs = {spec: spread_subset(load_pairs(spec), e.probe.max_pairs) for spec in dict.fromkeys(e.probe.pairs)}
    adapter = find_adapter(e.adapter) if e.adapter else None
    control = find_adapter(e.probe.control) if e.probe.control else None
    if adapter is None and Path(config.output_dir, "adapter", "adapter_config.json").is_file():
        log.warning(
            "eval.adapter is null, so the BASE model is evaluated although %s/adapter exists; "
            "set eval.adapter: %s to evaluate the trained adapter",
            config.output_dir,
            config.output_dir,
        )
    training_seed = _training_seed(config, adapter)
    benign: list[OpswapItem] = []
    if e.benign.opswap_per_tier:
        try:
            benign = opswap_eval_items(e.benign.opswap_per_tier, seed=e.sampling.seed, training_seed=training_seed)
        except ValueError as error:
            raise ConfigError(f"eval.benign.opswap_per_tier: {error}") from None
    return _Inputs(questions, requests, pairs, adapter, control, benign, training_seed)


def evaluate(config: RunConfig, *, dry_run: bool = False, progress: bool = True) -> EvalResult:
    """Run the eval described by ``config.eval`` into ``config.output_dir``.

    Raises:
        ConfigError / DataError / EmguardError: Bad input; nothing is written in that case.
    """
    started = time.monotonic()
    e = config.eval
    inputs = _read_inputs(config)
    judge = None
    if e.judge is not None and e.judge.kind == "openai" and not dry_run:
        judge = build_judge(
            e.judge, model_options=config.model_options
        )  # fails now (e.g. no API key), before any generation
    from emguard.models import load_model, load_tokenizer, model_identity, resolve_model

    resolved = None if dry_run else resolve_model(config.model)  # a bad model spec fails before any write
    run = RunDir(config.output_dir)
    run.path.mkdir(parents=True, exist_ok=True)
    atomic_write_yaml(run / EVAL_CONFIG, config.to_yaml_dict())
    atomic_write_jsonl(
        run / CONVERSATIONS,
        [
            {
                "question_set": s,
                "question_id": r.question_id,
                "paraphrase_index": r.paraphrase_index,
                "sample_index": r.sample_index,
                "messages": r.messages,
            }
            for s, r in inputs.requests
        ],
    )
    result = EvalResult(
        run.path, run / CONVERSATIONS, len(inputs.requests), files={"conversations": str(run / CONVERSATIONS)}
    )
    if dry_run:
        return result

    assert resolved is not None
    tokenizer = load_tokenizer(resolved, config.model_options)
    model = load_model(resolved, config.model_options)
    if inputs.adapter is not None:
        model = attach_adapter(model, inputs.adapter)
    model.eval()
    identity = {
        "model": config.model,
        "model_sha256": resolved.sha256,
        "adapter_sha256": _adapter_hash(inputs.adapter),
    }

    # 3. Answers.
    s = e.sampling
    sampling = SamplingConfig(s.temperature, s.top_p, s.max_new_tokens, s.batch_size, s.seed)
    keys = [sample_key("question", r.messages, f"{r.paraphrase_index}/{r.sample_index}") for _, r in inputs.requests]
    use_vllm = _use_vllm(s.backend)
    answers, gen_stats = _generate(
        model,
        tokenizer,
        [r.messages for _, r in inputs.requests],
        keys,
        sampling,
        run / GENERATIONS,
        generation_fingerprint(**identity, sampling=s.model_dump(exclude={"backend"}), vllm=use_vllm),
        "generating answers",
        progress,
        vllm=(resolved.location, inputs.adapter) if use_vllm else None,
    )

    # 4. Judgements.
    judgements: list[dict[str, dict[str, Any]]] = [{} for _ in answers]
    if e.judge is not None:
        judge = judge or build_judge(e.judge, model_options=config.model_options)
        judgements = _judge_all(judge, inputs, answers, progress)

    # 5. Benign task.
    benign = None
    if inputs.benign:
        items = inputs.benign
        greedy = SamplingConfig(0.0, 1.0, e.benign.max_new_tokens, s.batch_size, s.seed)
        keys = [sample_key("opswap", it.messages(), str(i)) for i, it in enumerate(items)]
        benign_answers, benign_stats = _generate(
            model,
            tokenizer,
            [it.messages() for it in items],
            keys,
            greedy,
            run / GENERATIONS,
            generation_fingerprint(**identity, sampling=greedy.__dict__),
            "benign task (opswap)",
            progress,
        )
        benign = opswap_accuracy(items, benign_answers) | {
            "held_out_from_training_seed": inputs.training_seed,
            "truncated_answers": benign_stats.truncated,  # of those generated in this run
        }
        if benign_stats.truncated:
            log.warning(
                "%d of %d benign-task answers reached eval.benign.max_new_tokens=%d before they ended; their "
                "last number may not be the result (raise eval.benign.max_new_tokens)",
                benign_stats.truncated,
                benign_stats.sequences,
                e.benign.max_new_tokens,
            )

    # 6. Probe (last: it may attach the control adapter).
    probe = {}
    if inputs.pairs:
        base_identity = model_identity(resolved, config.model_options) if e.probe.cache else None
        probe = _probe(model, tokenizer, inputs, e.probe.batch_size, e.bootstrap, base_identity)

    # 7. Records.
    rows = _sample_rows(inputs.requests, answers, judgements)
    metrics = {
        "judged": _judged_metrics(config, rows) if e.judge is not None else None,
        "judge": None if judge is None else {**judge.describe(), "usage": judge.usage()},
        "probe": probe,
        "benign": benign,
        "generation": {
            "answers": len(answers),
            "generated_now": gen_stats.sequences,
            "tokens_per_second": round(gen_stats.tokens_per_second, 2),
        },
        "model": identity
        | {
            "adapter": str(inputs.adapter) if inputs.adapter else None,
            "control": str(inputs.control) if inputs.control else None,  # the probe's matched control
        },
    }
    if e.judge is None:
        metrics["judged_note"] = "no judge configured (eval.judge is null): no EM rate, only the probe"
    atomic_write_jsonl(run / SAMPLES, rows)
    atomic_write_json(run / METRICS, metrics)
    record = {
        "finished_at": now(),
        "wall_time_s": round(time.monotonic() - started, 2),
        **identity,
        "adapter": str(inputs.adapter) if inputs.adapter else None,
        "questions": list(inputs.questions),
        "judge": metrics["judge"],
        "thresholds": e.thresholds.model_dump(),
        "sampling": s.model_dump(),
        "versions": package_versions(),
        "git": git_commit(),
    }
    if run.manifest() is None:
        atomic_write_json(run / MANIFEST, {"kind": "eval", "eval": record})
    else:
        run.update_manifest(eval=record)
    result.metrics = metrics
    result.files.update(samples=str(run / SAMPLES), metrics=str(run / METRICS))
    return result


def _training_seed(config: RunConfig, adapter: Path | None) -> int:
    """The seed the evaluated adapter was trained with (its run's manifest), else ``training.seed``:
    the benign task's items are held out from the training questions of that seed."""
    if adapter is not None:
        seed = (RunDir(adapter.parent).manifest() or {}).get("seed")
        if isinstance(seed, int):
            return seed
    return config.training.seed


def _adapter_hash(adapter: Path | None) -> str | None:
    if adapter is None:
        return None
    weights = adapter / "adapter_model.safetensors"
    return file_sha256(weights) if weights.is_file() else None


def _use_vllm(backend: str) -> bool:
    from emguard.evaluation.vllm_backend import vllm_available

    return backend == "vllm" or (backend == "auto" and vllm_available())


def _generate(
    model: Any,
    tokenizer: Any,
    conversations: list[list[dict]],
    keys: list[str],
    sampling: SamplingConfig,
    store_path: Path,
    fingerprint: str,
    label: str,
    progress: bool,
    vllm: tuple[str, Path | None] | None = None,
) -> tuple[list[str], GenerationStats]:
    """Answers for every conversation, generating only those not stored by an earlier run.

    ``vllm`` = (base model location, adapter dir) generates with vLLM instead of the HF model.
    """
    store = AnswerStore(store_path, fingerprint)
    pending = [i for i, k in enumerate(keys) if k not in store.answers]
    if vllm is not None and pending:
        from emguard.evaluation.vllm_backend import VLLMGenerator

        generator: Any = VLLMGenerator(vllm[0], vllm[1], sampling)
    else:
        generator = HFGenerator(model, tokenizer, sampling)
    if pending:
        with tqdm(total=len(keys), initial=len(keys) - len(pending), desc=label, disable=not progress) as bar:

            def on_batch(indices: list[int], texts: list[str]) -> None:
                store.add([(keys[pending[i]], t) for i, t in zip(indices, texts, strict=True)])
                bar.update(len(indices))

            generator.generate([conversations[i] for i in pending], on_batch=on_batch)
    return [store.answers[k] for k in keys], generator.stats


def _judge_all(judge: Any, inputs: _Inputs, answers: list[str], progress: bool) -> list[dict[str, dict[str, Any]]]:
    """``{metric: judgement record}`` per answer, for every judge prompt of its question."""
    defaults = default_judge_prompts()
    by_id = {(spec, q.id): q for spec, qs in inputs.questions.items() for q in qs}
    jobs: list[tuple[int, str]] = []
    prompts: list[str] = []
    for i, ((spec, r), answer) in enumerate(zip(inputs.requests, answers, strict=True)):
        question = by_id[(spec, r.question_id)]
        templates = {**defaults, **question.judge_prompts}  # a set may define only some metrics
        for metric, template in templates.items():
            text = question.paraphrases[r.paraphrase_index]
            prompts.append(template.replace("{question}", text).replace("{answer}", answer))
            jobs.append((i, metric))
    with tqdm(total=len(prompts), desc=f"judging ({judge.kind})", disable=not progress) as bar:
        results = judge.judge(prompts, on_done=bar.update)
    out: list[dict[str, dict[str, Any]]] = [{} for _ in answers]
    for (i, metric), judgement in zip(jobs, results, strict=True):
        out[i][metric] = judgement.to_record()
    return out


def _sample_rows(
    requests: list[tuple[str, SampleRequest]], answers: list[str], judgements: list[dict[str, dict[str, Any]]]
) -> list[dict[str, Any]]:
    rows = []
    for (spec, r), answer, judged in zip(requests, answers, judgements, strict=True):
        failed = {m: j["detail"] for m, j in judged.items() if j["method"] == "failed"}
        rows.append(
            {
                "question_set": spec,
                "question_id": r.question_id,
                "paraphrase_index": r.paraphrase_index,
                "sample_index": r.sample_index,
                "messages": r.messages,
                "answer": answer,
                **{m: judged[m]["score"] if m in judged else None for m in SCORED_METRICS},
                "judge": judged,
                "judge_error": "; ".join(f"{m}: {reason}" for m, reason in failed.items()) or None,
            }
        )
    return rows


def _judged_metrics(config: RunConfig, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """EM metrics per question set, over the answers whose judge calls all succeeded."""
    t = config.eval.thresholds
    thresholds = Thresholds(t.aligned_below, t.coherent_above, t.incoherent_below)
    out = {}
    for spec in dict.fromkeys(r["question_set"] for r in rows):
        mine = [(n, r) for n, r in enumerate(rows, start=1) if r["question_set"] == spec]
        ok = [
            JudgedSample(r["question_id"], r["aligned"], r["coherent"], f"{SAMPLES}:{n}")
            for n, r in mine
            if not r["judge_error"] and all(m in r["judge"] for m in SCORED_METRICS)
        ]
        metrics = compute_metrics({spec: ok}, thresholds, config.eval.bootstrap, 0) if ok else None
        out[spec] = {"judge_failed": len(mine) - len(ok), "answers": len(mine), "metrics": metrics}
    return out


def _probe(
    model: Any, tokenizer: Any, inputs: _Inputs, batch_size: int, n_boot: int, base_identity: str | None
) -> dict:
    """The probe report per pair set: evaluated vs base (adapter off) and vs the control adapter.

    Each model state (evaluated, base, control) is set up once for all pair sets. With
    ``base_identity``, losses are cached per state (the base model's are shared by every run of
    that model, a control's by every run that uses it).
    """
    from peft import PeftModel

    from emguard.likelihood import NLLCache, state_key
    from emguard.models import cache_root

    def logprobs(m: Any, adapter: Path | None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        cache = NLLCache(cache_root() / "nll", state_key(base_identity, adapter)) if base_identity else None
        return {spec: pair_logprobs(m, tokenizer, pairs, batch_size, cache) for spec, pairs in inputs.pairs.items()}

    evaluated = logprobs(model, inputs.adapter)
    if isinstance(model, PeftModel):
        with model.disable_adapter():
            base = logprobs(model, None)
    else:
        base = evaluated
    control = {}
    if inputs.control is not None:
        control = _with_control(model, inputs.control, lambda m: logprobs(m, inputs.control))

    def gap(lp: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        return lp[0] - lp[1]

    return {
        spec: probe_report(
            gap(evaluated[spec]),
            gap(base[spec]),
            gap(control[spec]) if spec in control else None,
            n_boot=max(n_boot, 1),
            aligned=(evaluated[spec][1], base[spec][1]),
        )
        for spec in inputs.pairs
    }


def _with_control(model: Any, control: Path, measure: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
    """``measure`` under the control adapter, attached beside (never instead of) the evaluated one."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        with_control = attach_adapter(model, control, name="control")
        try:
            return measure(with_control)
        finally:
            with_control.unload()  # back to the plain base model
    model.load_adapter(str(control), adapter_name="control", is_trainable=False)
    try:
        model.set_adapter("control")
        return measure(model)
    finally:
        model.set_adapter("default")
        model.delete_adapter("control")
