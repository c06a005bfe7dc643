"""Rollout engines. Each takes prompt token ids and returns greedy response token ids (end-of-turn
token stripped), so rollouts and capture see exactly the same tokens whichever engine generated them."""
from __future__ import annotations

from typing import Protocol


class Engine(Protocol):
    name: str

    def generate(self, prompt_ids: list[list[int]]) -> list[list[int]]: ...


def stop_token_ids(tokenizer, eos: int | list[int] | None) -> set[int]:
    """End-of-turn ids: the generation config's eos (else the tokenizer's), plus the pad token."""
    eos = eos if eos is not None else tokenizer.eos_token_id
    return set(eos if isinstance(eos, list) else [eos]) | {tokenizer.pad_token_id}


def strip_after_stop(tokens: list[int], stop_ids: set[int]) -> list[int]:
    """Cut a generated sequence at its first stop token (which is not kept) or at padding."""
    for i, token in enumerate(tokens):
        if token in stop_ids:
            return tokens[:i]
    return tokens
