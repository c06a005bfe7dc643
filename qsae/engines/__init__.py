"""Rollout engines. Each takes prompt token ids and returns greedy generations: the response token
ids (end-of-turn token stripped) and why generation ended, so rollouts and capture see exactly the
same tokens whichever engine generated them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Generation:
    token_ids: list[int]
    finish_reason: str  # "stop" (an end-of-turn token ended it) or "length" (the max_new_tokens budget did)


class Engine(Protocol):
    name: str

    def generate(self, prompt_ids: list[list[int]]) -> list[Generation]: ...


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
