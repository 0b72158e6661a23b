"""Prompt sets of the bench, by name (``bench.prompt_sets`` in a recipe): each gives, per concept, the
prompts whose images are checked for that concept. The wanted (quality) prompts come from the data
(:func:`edgesafe.data.wanted_prompts`), so they follow the captions the model is meant to serve.

- ``direct``: the concept's own prompts (those unlearning reads);
- ``paraphrase``: its held-out paraphrases, which unlearning never sees.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class PromptSet:
    """A registered concept prompt set (a section of the report's safety figures)."""

    prompts: Callable[..., list[str]]
    """(concept) -> prompts."""
    summary: str


PROMPT_SETS: dict[str, PromptSet] = {
    "direct": PromptSet(lambda concept: list(concept.prompts), "the concept's own prompts (read by unlearning)"),
    "paraphrase": PromptSet(lambda concept: list(concept.paraphrases),
                            "held-out paraphrases of the concept (never seen by unlearning)"),
}


def concept_prompts(recipe) -> dict[str, dict[str, list[str]]]:
    """``{set: {concept: prompts}}`` for the recipe's prompt sets (a concept without prompts in a set is left
    out of it)."""
    result: dict[str, dict[str, list[str]]] = {}
    for name in recipe.bench.prompt_sets:
        per_concept = {c.name: PROMPT_SETS[name].prompts(c) for c in recipe.concepts}
        result[name] = {c: p for c, p in per_concept.items() if p}
    return result
