"""The tiny models: a randomly initialised Qwen3.5 hybrid (Gated DeltaNet + gated attention, the
config classes of Qwen3.6-27B) with a byte-level BPE tokenizer, briefly fine-tuned on the bundled
questions so that it reasons for a while and ends with "Answer: <letter>" (without that, every
rollout would be wrong and the correctness statistics undefined). "tiny-dense" is the same recipe on a
dense Qwen3 (head_dim 64), which vLLM's CPU build can load. Built on first use and cached.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from qsae.questions import BUNDLED_QUESTIONS, LETTERS, Question, chat_prompt, format_prompt, load_questions

TINY_MODEL = "tiny"
TINY_DENSE_MODEL = "tiny-dense"
# Qwen-style chat template: with thinking off the assistant turn opens with an empty think block,
# which is how Qwen3/3.5/3.6 checkpoints switch reasoning off.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]


@dataclass(frozen=True)
class TinyRecipe:
    """Everything that determines the tiny model; its hash names the cache directory."""

    architecture: str = "qwen3_5"  # "qwen3_5" (hybrid VLM class, like Qwen3.6-27B) or "qwen3" (dense ForCausalLM)
    vocab_size: int = 1024
    hidden_size: int = 64
    intermediate_size: int = 256
    num_hidden_layers: int = 12
    full_attention_interval: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 16
    linear_heads: int = 4
    linear_head_dim: int = 16
    seed: int = 0
    finetune_steps: int = 150
    finetune_batch: int = 8
    finetune_lr: float = 3e-3
    correct_fraction: float = 0.65  # share of practice answers that are right: both classes must occur
    version: int = 2  # bump when the build changes in a way the fields above do not show

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


# Dense Qwen3 for the CPU build of vLLM, which rejects head_dim 16 and cannot load the Qwen3.5 classes.
# Linear-attention fields are unused by this architecture.
TINY_DENSE_RECIPE = TinyRecipe(
    architecture="qwen3",
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=6,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=64,
)


def default_cache_dir() -> Path:
    return Path(os.environ.get("QSAE_CACHE", Path.home() / ".cache" / "qsae"))


def tiny_model_path(cache_dir: str | Path | None = None, recipe: TinyRecipe = TinyRecipe()) -> Path:
    """Path of the cached tiny model, building it on first use (one builder at a time, atomic rename)."""
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    target = root / f"tiny-{recipe.architecture}-{recipe.digest()}"
    if (target / "config.json").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".tiny.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "config.json").exists():
            staging = Path(tempfile.mkdtemp(dir=root, prefix=".building-"))
            try:
                build_tiny_model(staging, recipe)
                os.replace(staging, target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    return target


def practice_response(question: Question, letter: str) -> str:
    """A response that weighs every option before committing to `letter`. It names the topic but does
    not copy the options' text, which a model this small would take far longer to learn."""
    verdicts = ("does not fit the question", "is possible but weaker", "seems unlikely here")
    lines = [f"This is a {question.field} question about {question.subfield}.", "Let me check each option in turn."]
    for i in range(len(question.options)):
        verdict = "matches the key idea" if LETTERS[i] == letter else verdicts[i % 3]
        lines.append(f"Option {LETTERS[i]} {verdict}.")
    lines.append(f"Weighing these, the best supported choice is option {letter}.")
    lines.append(f"Answer: {letter}")
    return "\n".join(lines)


def practice_answers(questions: list[Question], correct_fraction: float, seed: int) -> list[str]:
    """The letter each practice response ends with: right for `correct_fraction` of the questions."""
    rng = np.random.default_rng(seed)
    letters = []
    for q in questions:
        n = len(q.options)
        if rng.random() < correct_fraction:
            letters.append(q.answer_letter)
        else:
            wrong = [c for c in LETTERS[:n] if c != q.answer_letter]
            letters.append(wrong[int(rng.integers(len(wrong)))])
    return letters


def build_tiny_tokenizer(corpus: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    core.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
        padding_side="left",
    )


def tiny_config(recipe: TinyRecipe, tokenizer):
    from transformers import Qwen3_5Config, Qwen3Config

    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_hidden_layers,
        num_attention_heads=recipe.num_attention_heads,
        num_key_value_heads=recipe.num_key_value_heads,
        head_dim=recipe.head_dim,
        max_position_embeddings=4096,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    if recipe.architecture == "qwen3":
        return Qwen3Config(**common, tie_word_embeddings=False)
    if recipe.architecture != "qwen3_5":
        raise ValueError(f"unknown tiny architecture {recipe.architecture!r}; expected qwen3_5 or qwen3")
    text = dict(
        common,
        full_attention_interval=recipe.full_attention_interval,
        linear_key_head_dim=recipe.linear_head_dim,
        linear_value_head_dim=recipe.linear_head_dim,
        linear_num_key_heads=recipe.linear_heads // 2,
        linear_num_value_heads=recipe.linear_heads,
    )
    # A vision tower is part of the Qwen3.5 VLM class; keep it minimal, it is never run.
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=recipe.hidden_size)
    return Qwen3_5Config(text_config=text, vision_config=vision, tie_word_embeddings=False)


def build_tiny_model(out_dir: str | Path, recipe: TinyRecipe = TinyRecipe()) -> Path:
    """Build, fine-tune and save the tiny model and its tokenizer into `out_dir`."""
    from transformers import Qwen3_5ForConditionalGeneration, Qwen3ForCausalLM

    questions = load_questions(BUNDLED_QUESTIONS)
    letters = practice_answers(questions, recipe.correct_fraction, recipe.seed)
    responses = [practice_response(q, letter) for q, letter in zip(questions, letters)]
    prompts = [format_prompt(q) for q in questions]
    tokenizer = build_tiny_tokenizer(prompts + responses, recipe.vocab_size)

    torch.manual_seed(recipe.seed)
    model_class = Qwen3ForCausalLM if recipe.architecture == "qwen3" else Qwen3_5ForConditionalGeneration
    model = model_class(tiny_config(recipe, tokenizer))
    examples = [
        practice_example(tokenizer, prompt, response) for prompt, response in zip(prompts, responses)
    ]
    finetune(model, examples, recipe, pad_id=tokenizer.pad_token_id)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "qsae_tiny_recipe.json").write_text(json.dumps(asdict(recipe), indent=2))
    return out_dir


def practice_example(tokenizer, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """(input_ids, labels): the loss covers the response and its end-of-turn token, not the prompt."""
    prompt_ids = tokenizer(chat_prompt(tokenizer, prompt, thinking=False), add_special_tokens=False).input_ids
    response_ids = tokenizer(response, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    return prompt_ids + response_ids, [-100] * len(prompt_ids) + response_ids


def finetune(model: nn.Module, examples: list[tuple[list[int], list[int]]], recipe: TinyRecipe, pad_id: int) -> None:
    from tqdm.auto import tqdm

    rng = np.random.default_rng(recipe.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.finetune_lr, weight_decay=0.0)
    model.train()
    for _ in tqdm(range(recipe.finetune_steps), desc="fine-tuning tiny model", leave=False):
        batch = [examples[i] for i in rng.choice(len(examples), recipe.finetune_batch, replace=False)]
        width = max(len(ids) for ids, _ in batch)
        # Right padding: causal attention and the DeltaNet recurrence never look at later positions.
        input_ids = torch.tensor([ids + [pad_id] * (width - len(ids)) for ids, _ in batch])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch])
        lengths = torch.tensor([len(ids) for ids, _ in batch])
        attention_mask = (torch.arange(width) < lengths[:, None]).long()
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
