"""``emguard demo``: the main job end to end on the built-in model, CPU only, no network.

1. Extract an "evil" persona vector on the spot (for preventive steering).
2. A sweep on ``builtin:risky-finance`` (EM-inducing) with its matched control
   ``builtin:safe-finance`` and the benign task ``builtin:opswap``: no defense, kl, steering,
   interleave with Interleaving++ selection (the no-defense run is its misaligned model) and
   inoculation; each trained run is evaluated (probe always; judged answers when a judge is set).
   With ``--rl``, GRPO cells too (``rl_datasets``).
3. The report (``report.html``, ``report.md``, PNGs) from every cell.

A judge is used when ``OPENAI_API_KEY`` or ``OPENAI_BASE_URL`` is set (model
``$EMGUARD_JUDGE_MODEL``, default gpt-4o-mini-2024-07-18); otherwise the report says that no judge
was configured and shows the judge-free probe. Sizes were set by measurement on 2 CPU cores
(see the README): ``--quick`` under 5 minutes, the default under 30.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from emguard.config import DEFAULT_MODEL, build_config
from emguard.fsio import atomic_write_text

DEFAULT_JUDGE_MODEL = "gpt-4o-mini-2024-07-18"
STEER = {"alpha": 2.0}  # preventive steering: +2·v at the recommended layer during training


@dataclass(frozen=True)
class DemoSize:
    """Everything the two demo sizes differ in."""

    steps: int
    batch_size: int
    max_length: int
    questions: int  # general questions answered per run (example answers; judged when a judge is set)
    samples: int  # answers per question
    answer_tokens: int
    opswap_per_tier: int
    benign_tokens: int  # the benign task's answer budget (a worked answer is ~25 tokens)
    pool_size: int  # Interleaving++ candidates scored
    persona_questions: int
    persona_pairs: int
    persona_tokens: int
    monitor_every: int
    monitor_pairs: int | None  # None: all 24 general pairs
    probe_pairs: int | None  # per pair set, evenly spaced; None: all (24 general, 354 judged, 16 finance)
    benign_steps: int  # the benign task's own recipe: short examples, a higher learning rate
    rl_steps: int = 2  # --rl: GRPO optimizer steps per cell
    rl_prompts: int = 2  # --rl: prompts per step (x 4 generations)
    rl_tokens: int = 16  # --rl: completion length


# Sized by measurement on 2 CPU cores (README, "The demo"): --quick is a smoke run of every piece.
QUICK = DemoSize(
    steps=2,
    batch_size=4,
    max_length=256,
    questions=2,
    samples=1,
    answer_tokens=24,
    opswap_per_tier=2,  # 6 items: one generation batch
    benign_tokens=24,  # 2 steps teach nothing: the answers are cut either way (and counted)
    pool_size=16,
    persona_questions=3,
    persona_pairs=2,
    persona_tokens=32,
    monitor_every=2,
    monitor_pairs=4,
    probe_pairs=8,
    benign_steps=2,
)
DEFAULT = DemoSize(
    steps=12,
    batch_size=8,
    max_length=384,
    questions=8,
    samples=1,
    answer_tokens=64,
    opswap_per_tier=16,
    benign_tokens=48,
    pool_size=160,
    persona_questions=6,
    persona_pairs=5,
    persona_tokens=64,
    monitor_every=6,
    monitor_pairs=12,
    probe_pairs=48,  # of builtin:judged's 354 (general has 24, finance 16: all of those)
    benign_steps=40,
    rl_steps=8,
    rl_prompts=4,
    rl_tokens=48,
)
BENIGN_LEARNING_RATE = 5.0e-4


def judge_section() -> dict[str, Any] | None:
    """The judge the environment configures, or None."""
    if not (os.environ.get("OPENAI_API_KEY") or os.environ.get("OPENAI_BASE_URL")):
        return None
    return {"kind": "openai", "model": os.environ.get("EMGUARD_JUDGE_MODEL", DEFAULT_JUDGE_MODEL)}


def question_subset(path: Path, n: int) -> Path:
    """The first ``n`` questions of ``builtin:general`` as a YAML file (the demo answers only these)."""
    text = (resources.files("emguard.evaluation") / "question_sets" / "general.yaml").read_text(encoding="utf-8")
    atomic_write_text(path, yaml.safe_dump(yaml.safe_load(text)[:n], sort_keys=False, allow_unicode=True))
    return path


def base_config(size: DemoSize, questions: Path, judge: dict[str, Any] | None, model: str) -> dict[str, Any]:
    return {
        "model": model,
        "data": {"max_length": size.max_length, "max_examples": size.steps * size.batch_size, "overlong": "drop"},
        "lora": {"r": 32, "alpha": 64, "rslora": True},
        "training": {
            "max_steps": size.steps,
            "batch_size": size.batch_size,
            "micro_batch_size": 4,
            "learning_rate": 2.0e-4,
            "warmup_steps": 1,
            "save_steps": 10,
        },
        "monitor": {"every": size.monitor_every, "max_pairs": size.monitor_pairs},
        "eval": {
            "questions": [str(questions)],
            "samples_per_paraphrase": size.samples,
            "sampling": {"max_new_tokens": size.answer_tokens, "batch_size": 8},
            "judge": judge,
            # Broad EM on the built-in pairs and on third-party pairs (answers of real EM models).
            "probe": {
                "pairs": ["builtin:general", "builtin:judged", "builtin:finance"],
                "max_pairs": size.probe_pairs,
            },
            "bootstrap": 1000,
        },
    }


RL_DEFENSES = ["none", "kl", "steering", "inoculation"]


def rl_datasets(size: DemoSize) -> list[dict[str, Any]]:
    """``--rl``: GRPO on the finance prompts, reckless reward against its matched prudent control, and on
    the benign opswap task (criterion c under RL)."""
    grpo = {
        "training.method": "grpo",
        "training.max_steps": size.rl_steps,
        "training.batch_size": 4 * size.rl_prompts,
        "training.micro_batch_size": 4 * size.rl_prompts,
        "rl.num_generations": 4,
        "rl.max_completion_length": size.rl_tokens,
        "rl.max_prompts": 4 * size.rl_prompts * size.rl_steps,
    }

    def finance(target: str) -> dict[str, Any]:
        return {**grpo, "rl.rewards": [{"name": "finance", "target": target}]}

    return [
        {
            "name": "prudent-finance-rl",
            "train": "builtin:finance-prompts",
            "role": "control",
            "defenses": ["none"],
            "set": finance("prudent"),
        },
        {
            "name": "reckless-finance-rl",
            "train": "builtin:finance-prompts",
            "role": "narrow",
            "in_domain": "builtin:finance",
            "defenses": RL_DEFENSES,
            "set": {**finance("reckless"), "eval.probe.control": "{cell:prudent-finance-rl/none}"},
        },
        {
            "name": "opswap-rl",
            "train": "builtin:opswap-prompts",
            "role": "benign",
            "defenses": RL_DEFENSES,
            "set": {
                **grpo,
                "rl.rewards": [{"name": "opswap"}],
                "eval.benign.opswap_per_tier": size.opswap_per_tier,
                "eval.benign.max_new_tokens": size.benign_tokens,
                "eval.questions": [],
                "eval.probe.pairs": [],
                "monitor.every": 0,
            },
        },
    ]


def sweep_spec(
    output_dir: Path,
    size: DemoSize,
    vector: Path,
    layer: int,
    judge: dict[str, Any] | None,
    model: str = DEFAULT_MODEL,
    rl: bool = False,
) -> dict:
    questions = question_subset(output_dir / "questions.yaml", size.questions)
    spec = {
        "output_dir": str(output_dir / "sweep"),
        "base": base_config(size, questions, judge, model),
        "datasets": [
            {"name": "safe-finance", "train": "builtin:safe-finance", "role": "control", "defenses": ["none"]},
            {
                "name": "risky-finance",
                "train": "builtin:risky-finance",
                "role": "narrow",
                "in_domain": "builtin:finance",
                "set": {"eval.probe.control": "{cell:safe-finance/none}"},
            },
            {
                "name": "opswap",
                "train": "builtin:opswap",
                "role": "benign",
                "set": {
                    "eval.benign.opswap_per_tier": size.opswap_per_tier,
                    "eval.benign.max_new_tokens": size.benign_tokens,
                    "eval.questions": [],
                    "eval.probe.pairs": [],
                    "monitor.every": 0,  # criterion (c) needs the task's accuracy, not the EM monitor
                    "training.max_steps": size.benign_steps,
                    # short examples: one pass per step is ~17% faster than two (measured, 2 CPU cores)
                    "training.micro_batch_size": size.batch_size,
                    "training.learning_rate": BENIGN_LEARNING_RATE,
                    "data.max_examples": size.benign_steps * size.batch_size,
                },
            },
        ],
        "defenses": [
            {"label": "none", "defenses": [{"name": "none"}]},
            {"label": "kl", "defenses": [{"name": "kl", "lambda": 1.0}]},
            {
                "label": "steering",
                "defenses": [{"name": "steering", "vector": str(vector), "layer": layer, "alpha": 2.0}],
            },
            {
                "label": "interleave-pp",
                "defenses": [
                    {
                        "name": "interleave",
                        "fraction": 0.1,
                        "selection": "perplexity_gap",
                        "misaligned": ["{cell:risky-finance/none}"],
                        "pool_size": size.pool_size,
                    }
                ],
            },
            {"label": "inoculation", "defenses": [{"name": "inoculation"}]},
        ],
        "seeds": [0],
    }
    if rl:
        spec["datasets"] += rl_datasets(size)
    return spec


def persona_config(output_dir: Path, size: DemoSize, model: str = DEFAULT_MODEL):
    return build_config(
        {
            "model": model,
            "output_dir": str(output_dir / "persona"),
            "persona": {
                "trait": "builtin:evil",
                "max_questions": size.persona_questions,
                "max_prompt_pairs": size.persona_pairs,
                "sampling": {"max_new_tokens": size.persona_tokens, "batch_size": 8},
            },
        },
        source="demo",
    )


def _persona_vector(output_dir: Path, size: DemoSize, model: str, progress: bool) -> tuple[Path, int]:
    """The demo's persona vector and its recommended layer; a finished extraction is reused."""
    from emguard.persona.extract import extract_persona

    folder = output_dir / "persona"
    if (folder / "persona.json").is_file() and (folder / "persona_vector.safetensors").is_file():
        report = json.loads((folder / "persona.json").read_text())
        return folder / "persona_vector.safetensors", int(report["recommended_layer"])
    result = extract_persona(persona_config(output_dir, size, model), progress=progress)
    return Path(result.vector_file), int(result.report["recommended_layer"])


@dataclass
class DemoResult:
    output_dir: Path
    report_html: Path
    report_md: Path
    judge: str
    wall_time_s: float
    failed: list[str]

    def summary(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}


def run_demo(
    output_dir: str | Path = "runs/demo",
    quick: bool = False,
    progress: bool = True,
    *,
    model: str = DEFAULT_MODEL,
    size: DemoSize | None = None,
    rl: bool = False,
) -> DemoResult:
    """Persona vector, the defense sweep, and the report; returns where the report is.

    ``rl`` adds GRPO cells (the paper's RL scenario): the finance prompts under a reckless reward
    against the prudent one, and the opswap task, with none, kl, steering and inoculation.

    ``model`` and ``size`` exist for tests (a tiny model, a few steps); the demo is the built-in model.
    """
    from emguard.report import write_report
    from emguard.report.collect import expand_run_dirs
    from emguard.sweep import SweepSpec, run_sweep

    started = time.monotonic()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    size = size or (QUICK if quick else DEFAULT)
    judge = judge_section()
    vector, layer = _persona_vector(output_dir, size, model, progress)
    spec = SweepSpec.model_validate(sweep_spec(output_dir, size, vector, layer, judge, model, rl=rl))
    sweep = run_sweep(spec, progress=progress)
    title = f"emguard demo{' (--quick)' if quick else ''}: defenses against EM on builtin:risky-finance"
    report = write_report(expand_run_dirs([sweep.output_dir]), output_dir / "report", title=title)
    return DemoResult(
        output_dir=output_dir,
        report_html=report.html,
        report_md=report.markdown,
        judge=f"openai {judge['model']}" if judge else "none",
        wall_time_s=round(time.monotonic() - started, 1),
        failed=sweep.failed,
    )
