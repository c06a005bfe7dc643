"""Batched generation with transformers, greedy or sampled: the engine that runs everywhere (CPU, CUDA).

transformers samples a whole batch from the process's one torch generator, so a prompt's tokens would
depend on what shares its batch. Sampling is done here instead, per prompt from a generator seeded
with that prompt's seed (PromptSeededSampler), and generation itself stays greedy over the one token
it leaves: a rollout samples the same tokens in any batch, shard or rerun (same device and versions).
"""
from __future__ import annotations

import torch
from transformers import (LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper,
                          TopPLogitsWarper)

from qsae.engines import GREEDY, Generation, Sampling, stop_token_ids, strip_after_stop


class HFEngine:
    name = "transformers"

    def __init__(self, model, tokenizer, max_new_tokens: int, batch_size: int, sampling: Sampling = GREEDY):
        self.model = model
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.sampling = sampling
        eos = model.generation_config.eos_token_id if model.generation_config else None
        self.stop_ids = stop_token_ids(tokenizer, eos)

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], seeds: list[int] | None = None) -> list[Generation]:
        if not self.sampling.greedy and (seeds is None or len(seeds) != len(prompt_ids)):
            raise ValueError("sampled generation needs one seed per prompt")
        responses = []
        for start in range(0, len(prompt_ids), self.batch_size):
            batch = slice(start, start + self.batch_size)
            responses += self._generate_batch(prompt_ids[batch], None if self.sampling.greedy else seeds[batch])
        return responses

    def _generate_batch(self, batch: list[list[int]], seeds: list[int] | None) -> list[Generation]:
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
            do_sample=False,  # greedy over the scores PromptSeededSampler leaves: its pick
            logits_processor=None if seeds is None else LogitsProcessorList(
                [PromptSeededSampler(self.sampling, seeds, device)]),
            pad_token_id=pad,
            eos_token_id=sorted(self.stop_ids - {pad}),
        )
        return [strip_after_stop(row.tolist(), self.stop_ids) for row in output[:, width:].cpu()]


class PromptSeededSampler(LogitsProcessor):
    """Samples each row's next token from the temperature / top-k / top-p distribution with that row's
    own generator (Gumbel-max: argmax of log-probabilities plus Gumbel noise draws from that
    distribution) and returns scores that leave only that token, for greedy decoding to take."""

    def __init__(self, sampling: Sampling, seeds: list[int], device: torch.device):
        self.warpers = LogitsProcessorList(
            [TemperatureLogitsWarper(sampling.temperature)]
            + ([TopKLogitsWarper(sampling.top_k)] if sampling.top_k else [])
            + ([TopPLogitsWarper(sampling.top_p)] if sampling.top_p < 1 else []))
        self.generators = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        log_probs = torch.log_softmax(self.warpers(input_ids, scores.float()), dim=-1)
        tiny = torch.finfo(torch.float32).tiny
        uniform = torch.stack([torch.rand(scores.shape[-1], generator=g, device=scores.device) for g in self.generators])
        picked = (log_probs - torch.log(-torch.log(uniform.clamp_min(tiny)))).argmax(dim=-1, keepdim=True)
        return torch.full_like(scores, float("-inf")).scatter_(-1, picked, 0.0)
