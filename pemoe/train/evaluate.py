"""Evaluation as in the paper: rank classification over answer choices, median over prompt templates.

Each example's choices are scored by the model's log-likelihood of the choice given the input
(sum of the target tokens' log-probabilities, end-of-sequence token included; ``length_normalize=True``
divides by the token count): for T5 the decoder's, for a causal LM the log-probabilities of the choice's
tokens following ``[start] + input`` in one sequence (:mod:`pemoe.train.models`: the model family encodes
the pairs and returns logits aligned with their labels, so the score is the same sum for both); the
prediction is the best-scoring choice (ties: the first). Accuracy is computed per (task, template); a
task's score is the median over its templates, and the summary is the mean of the task scores (the paper's
held-out average).

:func:`routing_statistics` gives the data for the paper's Figure 5: the mean routing probability of each
expert, per task, at one adapter site (averaged over the non-padding tokens the site sees);
:func:`routing_statistics_all` at every routed site (both through :mod:`pemoe.router_health`).
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from pemoe.train.data import Batch, Example
from pemoe.train.tokenizer import Tokenizer

if TYPE_CHECKING:
    from pemoe.train.models import ModelFamily

__all__ = [
    "EvalResult",
    "model_logits",
    "score_choices",
    "rank_classification",
    "format_table",
    "routing_statistics",
    "routing_statistics_all",
    "default_routing_site",
]


def model_logits(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Logits [B, T, V] aligned with ``batch.labels`` (teacher forcing): the decoder's for pemoe's or
    transformers' T5 (a batch with decoder inputs), a causal LM's for a causal batch
    (:func:`pemoe.train.models.encode_causal_batch`)."""
    from pemoe.train.models import CausalLMFamily, T5Family

    family = CausalLMFamily() if batch.decoder_input_ids is None else T5Family()
    return family.logits(model, batch)


def _family(family: ModelFamily | None, decoder_start_id: int) -> ModelFamily:
    from pemoe.train.models import T5Family

    return T5Family(decoder_start_id) if family is None else family


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def score_choices(
    model: nn.Module,
    tokenizer: Tokenizer,
    examples: Sequence[Example],
    *,
    batch_size: int = 32,
    max_input_len: int = 128,
    max_target_len: int = 32,
    length_normalize: bool = False,
    decoder_start_id: int = 0,
    family: ModelFamily | None = None,
) -> list[list[float]]:
    """Log-likelihood of every choice of every example (one list per example, in choice order).

    ``family`` (:mod:`pemoe.train.models`) encodes and runs the model; None: T5 with ``decoder_start_id``."""
    family = _family(family, decoder_start_id)
    pairs = []
    for i, ex in enumerate(examples):
        if not ex.choices:
            raise ValueError(f"{ex.where}: rank classification needs 'choices' (task {ex.task!r})")
        pairs += [(i, c) for c in ex.choices]
    scores: list[list[float]] = [[] for _ in examples]
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            batch = family.encode(
                tokenizer,
                [examples[i].input for i, _ in chunk],
                [c for _, c in chunk],
                max_input_len=max_input_len,
                max_target_len=max_target_len,
            )
            batch = batch.to(_device(model))
            logp = torch.log_softmax(family.logits(model, batch).float(), dim=-1)
            valid = batch.labels != -100
            tok = logp.gather(-1, batch.labels.clamp(min=0)[..., None])[..., 0] * valid
            total = tok.sum(-1)
            if length_normalize:
                total = total / valid.sum(-1)
            for (i, _), s in zip(chunk, total.tolist(), strict=True):
                scores[i].append(s)
    finally:
        model.train(was_training)
    return scores


@dataclass
class EvalResult:
    """Accuracy per (task, template), per task (median over templates) and the mean over tasks."""

    per_template: dict[str, dict[str, float]]  # task -> template -> accuracy
    counts: dict[str, int]  # task -> number of examples
    per_task: dict[str, float] = field(init=False)
    average: float = field(init=False)

    def __post_init__(self) -> None:
        self.per_task = {t: statistics.median(v.values()) for t, v in sorted(self.per_template.items())}
        self.average = sum(self.per_task.values()) / len(self.per_task) if self.per_task else float("nan")

    def to_dict(self) -> dict:
        return {
            "average": self.average,
            "per_task": self.per_task,
            "per_template": self.per_template,
            "counts": self.counts,
        }


def rank_classification(
    model: nn.Module,
    tokenizer: Tokenizer,
    examples: Sequence[Example],
    **kwargs,
) -> EvalResult:
    """Rank-classification accuracy (see the module docstring); kwargs go to :func:`score_choices`."""
    scores = score_choices(model, tokenizer, examples, **kwargs)
    hits: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for ex, s in zip(examples, scores, strict=True):
        best = max(range(len(s)), key=lambda j: (s[j], -j))
        hits[ex.task][ex.template or "default"].append(int(ex.choices[best] == ex.target))
    per_template = {t: {k: sum(v) / len(v) for k, v in sorted(tm.items())} for t, tm in hits.items()}
    counts = {t: sum(len(v) for v in tm.values()) for t, tm in hits.items()}
    return EvalResult(per_template, counts)


def _chance(examples: Sequence[Example]) -> dict[str, float]:
    acc: dict[str, list[float]] = defaultdict(list)
    for ex in examples:
        acc[ex.task].append(1.0 / len(ex.choices))
    return {t: sum(v) / len(v) for t, v in acc.items()}


def format_table(results: dict[str, EvalResult], examples: Sequence[Example] | None = None) -> str:
    """Markdown table: one row per task, one column per result (median accuracy over templates, %),
    the chance level when ``examples`` are given, and the average row."""
    names = list(results)
    tasks = sorted({t for r in results.values() for t in r.per_task})
    chance = _chance(examples) if examples is not None else None
    head = ["task", "templates", "n"] + (["chance"] if chance else []) + names
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    first = results[names[0]]
    for t in tasks:
        row = [t, str(len(first.per_template.get(t, {}))), str(first.counts.get(t, 0))]
        if chance:
            row.append(f"{100 * chance[t]:.1f}")
        row += [f"{100 * r.per_task[t]:.1f}" if t in r.per_task else "-" for r in results.values()]
        lines.append("| " + " | ".join(row) + " |")
    avg = ["**average**", "", ""]
    if chance:
        avg.append(f"{100 * sum(chance.values()) / len(chance):.1f}")
    avg += [f"**{100 * r.average:.1f}**" for r in results.values()]
    lines.append("| " + " | ".join(avg) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# routing statistics (Figure 5)


def default_routing_site(model: nn.Module) -> str:
    """The paper's Figure-5 site: the FFN of the last encoder block (MoV: its ``mov`` site; MoLoRA:
    ``wi_0`` / ``wi``); for an adapter config without FFN sites, the last encoder block's first site."""
    from pemoe.injection import _require_injected

    sites = list(_require_injected(model)["sites"])
    last = len(model.encoder.block) - 1
    prefix = f"encoder.block.{last}."
    enc = [s for s in sites if s.startswith(prefix)]
    for suffix in (".mov", ".wi_0", ".wi"):
        hit = [s for s in enc if s.endswith("DenseReluDense" + suffix)]
        if hit:
            return hit[0]
    if not enc:
        raise ValueError("the model has no adapter site in its last encoder block")
    return enc[0]


def _routing_batches(
    tokenizer: Tokenizer, examples: Sequence[Example], device, model: nn.Module, family: ModelFamily, **encode
) -> dict[str, list[dict]]:
    """{task: [model keyword arguments]}: each task's examples encoded in batches (teacher forcing)."""
    by_task: dict[str, list[Example]] = defaultdict(list)
    for e in examples:
        by_task[e.task].append(e)
    batch_size = encode.pop("batch_size")
    out: dict[str, list[dict]] = {}
    for task in sorted(by_task):
        exs = by_task[task]
        out[task] = []
        for start in range(0, len(exs), batch_size):
            chunk = exs[start : start + batch_size]
            b = family.encode(tokenizer, [e.input for e in chunk], [e.target for e in chunk], **encode).to(device)
            out[task].append(family.model_inputs(model, b))
    return out


def routing_statistics_all(
    model: nn.Module,
    tokenizer: Tokenizer,
    examples: Sequence[Example],
    sites: Sequence[str] | None = None,
    *,
    batch_size: int = 32,
    max_input_len: int = 128,
    max_target_len: int = 32,
    family: ModelFamily | None = None,
) -> dict[str, dict[str, list[float]]]:
    """{site: {task: mean routing probability per expert}} for every routed site (or ``sites``) of a T5 or (with
    ``family`` a :class:`pemoe.train.models.CausalLMFamily`) a causal LM, over the examples' inputs and targets
    (:func:`pemoe.router_health.routing_by_task`: tokens weighted equally, padding excluded, MoV heads
    averaged)."""
    from pemoe.router_health import routing_by_task

    batches = _routing_batches(
        tokenizer,
        examples,
        _device(model),
        model,
        _family(family, 0),
        batch_size=batch_size,
        max_input_len=max_input_len,
        max_target_len=max_target_len,
    )
    return routing_by_task(model, batches, sites=sites)


def routing_statistics(
    model: nn.Module,
    tokenizer: Tokenizer,
    examples: Sequence[Example],
    site_key: str | None = None,
    *,
    batch_size: int = 32,
    max_input_len: int = 128,
    max_target_len: int = 32,
) -> tuple[str, dict[str, list[float]]]:
    """(site, {task: mean routing probability per expert}) at one site (default: :func:`default_routing_site`)
    over the examples' inputs and targets; :func:`routing_statistics_all` for every site.

    Tokens are weighted equally; padding tokens (encoder or decoder, by the site's stack) are excluded.
    """
    from pemoe.injection import _require_injected

    site_key = site_key or default_routing_site(model)
    sites = _require_injected(model)["sites"]
    if site_key not in sites:
        raise ValueError(f"no adapter site {site_key!r}; sites are e.g. {list(sites)[:3]}")
    config = _require_injected(model)["config"]
    if config.router_input != "token":
        raise ValueError("routing_statistics supports token routing only (this model routes by sentence)")
    if config.num_experts == 1:
        raise ValueError(f"site {site_key!r} has one expert and no router: nothing to plot")
    stats = routing_statistics_all(
        model,
        tokenizer,
        examples,
        [site_key],
        batch_size=batch_size,
        max_input_len=max_input_len,
        max_target_len=max_target_len,
    )
    return site_key, stats[site_key]
