"""Rollout engines. Each takes prompt token ids and returns generations, greedy or sampled with a seed
per prompt: the response token ids (end-of-turn token stripped) and why generation ended, so rollouts
and capture see exactly the same tokens whichever engine generated them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class Generation:
    token_ids: list[int]
    finish_reason: str  # "stop" (an end-of-turn token ended it) or "length" (the max_new_tokens budget did)


@dataclass(frozen=True)
class Sampling:
    """How the next token is picked: greedily (temperature 0), else from the temperature-scaled
    distribution cut to top_p (nucleus) and top_k (0: no cut), with a seed per prompt."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


GREEDY = Sampling()


def generation_seed(sampling_seed: int, rollout_id: int) -> int:
    """The seed a rollout's tokens are sampled with: the same for the same rollout on every rerun."""
    return int(np.random.SeedSequence([sampling_seed, rollout_id]).generate_state(1)[0])


class Engine(Protocol):
    name: str
    sampling: Sampling

    def generate(self, prompt_ids: list[list[int]], seeds: list[int] | None = None) -> list[Generation]:
        """One generation per prompt; `seeds` (one per prompt) seed sampling and are ignored when greedy."""


def stop_token_ids(tokenizer, eos: int | list[int] | None) -> set[int]:
    """End-of-turn ids: the generation config's eos (else the tokenizer's), plus the pad token."""
    eos = eos if eos is not None else tokenizer.eos_token_id
    return set(eos if isinstance(eos, list) else [eos]) | {tokenizer.pad_token_id}


def strip_after_stop(tokens: list[int], stop_ids: set[int]) -> Generation:
    """Cut a generated sequence at its first stop token (which is not kept) or at padding; a sequence
    with neither ran out of budget."""
    for i, token in enumerate(tokens):
        if token in stop_ids:
            return Generation(tokens[:i], "stop")
    return Generation(tokens, "length")
