"""Greedy batched generation with transformers: the engine that runs everywhere (CPU, CUDA)."""
from __future__ import annotations

import torch

from qsae.engines import Generation, stop_token_ids, strip_after_stop


class HFEngine:
    name = "transformers"

    def __init__(self, model, tokenizer, max_new_tokens: int, batch_size: int):
        self.model = model
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        eos = model.generation_config.eos_token_id if model.generation_config else None
        self.stop_ids = stop_token_ids(tokenizer, eos)

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]]) -> list[Generation]:
        responses = []
        for start in range(0, len(prompt_ids), self.batch_size):
            responses += self._generate_batch(prompt_ids[start : start + self.batch_size])
        return responses

    def _generate_batch(self, batch: list[list[int]]) -> list[Generation]:
        # Left padding keeps every prompt's last token at the same column, where generation continues.
        width = max(len(ids) for ids in batch)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in batch])
        attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch])
        device = self.model.device
        output = self.model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=sorted(self.stop_ids - {pad}),
        )
        return [strip_after_stop(row.tolist(), self.stop_ids) for row in output[:, width:].cpu()]
