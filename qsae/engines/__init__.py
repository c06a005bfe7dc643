"""Rollout engines. Each takes prompt token ids and returns greedy response token ids (end-of-turn
token stripped), so rollouts and capture see exactly the same tokens whichever engine generated them."""
from __future__ import annotations

from typing import Protocol


class Engine(Protocol):
    name: str

    def generate(self, prompt_ids: list[list[int]]) -> list[list[int]]: ...
