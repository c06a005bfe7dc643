"""Model loss: CE and KL of spliced forward passes equal the model's own forward with a hook written
here, for both tiny model classes; pooled statistics and intervals equal sums and a bootstrap written here."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from by_hand import bootstrap_t
from torch import nn

from qsae.analysis.model_loss import (
    LossTable,
    RolloutTokens,
    _splice,
    fidelity_of_layers,
    fidelity_variants,
    layer_fidelity,
    rollout_losses,
    sae_replacement,
    zero_replacement,
)
from qsae.models import decoder_layers, load_model, resolve_model_path
from qsae.questions import BUNDLED_QUESTIONS, chat_prompt, load_questions
from qsae.sae import TopKSAE
from qsae.tiny import practice_response

LAYER = 3  # exists in both tiny models (12 and 6 decoder layers)
RESPONSE_TOKENS = 24
FIDELITY_KEYS = {
    "ce_clean", "ce_spliced", "ce_zero", "ce_mean", "delta_ce", "delta_ce_ci", "ce_loss_recovered",
    "ce_loss_recovered_ci", "kl", "kl_ci", "kl_zero", "n_tokens", "n_rollouts", "n_questions",
}


@pytest.fixture(scope="module")
def dense():
    """(model, tokenizer) of the dense tiny Qwen3 in float32 on CPU."""
    return load_model(resolve_model_path("tiny-dense"), dtype="float32", device="cpu")


@pytest.fixture(params=["tiny", "dense"])
def lm(request):
    return request.getfixturevalue(request.param)


def make_rollouts(tokenizer, n: int = 2) -> list[RolloutTokens]:
    """Chat prompts of bundled questions (the question alone, without its options: short sequences keep
    the CPU forward passes cheap) with a practice response cut to RESPONSE_TOKENS tokens; every fourth
    response position is left out of the splice set, like a special token."""
    rollouts = []
    for i, question in enumerate(load_questions(BUNDLED_QUESTIONS)[:n]):
        prompt = tokenizer(chat_prompt(tokenizer, question.question, False), add_special_tokens=False).input_ids
        response = tokenizer(practice_response(question, question.answer_letter), add_special_tokens=False).input_ids
        ids = prompt + response[:RESPONSE_TOKENS]
        positions = np.array([p for p in range(len(prompt), len(ids)) if (p - len(prompt)) % 4 != 3])
        rollouts.append(RolloutTokens(10 + i, ids, len(prompt), positions))
    return rollouts


def d_model(model) -> int:
    return model.get_input_embeddings().weight.shape[1]


def reference_logits(model, rollout: RolloutTokens, replace=None) -> torch.Tensor:
    """Float32 logits [N, vocab] at the scored positions from the model's full forward, with the output
    of decoder layer LAYER replaced at the splice positions by replace(rows) when given."""
    def hook(module, inputs, output):
        hidden = (output[0] if isinstance(output, tuple) else output).clone()
        rows = torch.as_tensor(rollout.splice_positions, device=hidden.device)
        hidden[0, rows] = replace(hidden[0, rows]).to(hidden.dtype)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = decoder_layers(model)[LAYER].register_forward_hook(hook) if replace is not None else None
    try:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([rollout.token_ids], device=model.device)).logits[0]
    finally:
        if handle is not None:
            handle.remove()
    return logits[rollout.n_prompt : -1].float()


def targets(rollout: RolloutTokens, device="cpu") -> torch.Tensor:
    return torch.tensor(rollout.token_ids[rollout.n_prompt + 1 :], device=device)


def reference_kl(clean_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """sum over positions of KL(clean || variant)."""
    return F.kl_div(F.log_softmax(logits, -1), F.log_softmax(clean_logits, -1), log_target=True,
                    reduction="sum").item()


def test_clean_ce_equals_the_models_own_forward(lm):
    model, tokenizer = lm
    rollouts = make_rollouts(tokenizer)
    table = rollout_losses(model, rollouts, {}, progress=False)
    np.testing.assert_array_equal(table.rollout_ids, [10, 11])
    for i, rollout in enumerate(rollouts):
        logits = reference_logits(model, rollout)
        assert table.n_tokens[i] == len(rollout.token_ids) - 1 - rollout.n_prompt == RESPONSE_TOKENS - 1
        expected = F.cross_entropy(logits, targets(rollout), reduction="sum").item()
        assert table.ce_clean[i] == pytest.approx(expected, rel=1e-5)


def test_identity_replacement_costs_nothing(lm):
    model, tokenizer = lm
    table = rollout_losses(model, make_rollouts(tokenizer, n=1), {(LAYER, "identity"): lambda rows: rows},
                           progress=False)
    np.testing.assert_allclose(table.ce[(LAYER, "identity")], table.ce_clean, rtol=0, atol=1e-6)
    np.testing.assert_allclose(table.kl[(LAYER, "identity")], 0, atol=1e-6)


def test_replacements_equal_an_independent_hook(lm):
    """Zero, mean and SAE splices give the CE and KL of the model's forward with a hook written here."""
    model, tokenizer = lm
    torch.manual_seed(0)
    sae = TopKSAE(d_model(model), 4 * d_model(model), k=8)
    mean = torch.randn(d_model(model))
    rollouts = make_rollouts(tokenizer)
    table = rollout_losses(model, rollouts, fidelity_variants(LAYER, sae, mean.numpy()), progress=False)
    replacements = {"zero": lambda rows: rows * 0, "mean": lambda rows: mean.expand_as(rows), "spliced": sae}
    for i, rollout in enumerate(rollouts):
        clean = reference_logits(model, rollout)
        for name, replace in replacements.items():
            logits = reference_logits(model, rollout, replace)
            ce = F.cross_entropy(logits, targets(rollout), reduction="sum").item()
            assert table.ce[(LAYER, name)][i] == pytest.approx(ce, rel=1e-5), name
            assert table.kl[(LAYER, name)][i] == pytest.approx(reference_kl(clean, logits), rel=1e-4, abs=1e-6), name
    # A random SAE is a poor reconstruction: the model's loss rises and its predictions move.
    assert table.ce[(LAYER, "spliced")].sum() > table.ce_clean.sum()
    assert np.all(table.kl[(LAYER, "spliced")] > 0)
    entry = layer_fidelity(table, LAYER, n_boot=50, seed=0)
    assert set(entry) == FIDELITY_KEYS
    assert entry["delta_ce"] > 0 and entry["n_tokens"] == 2 * (RESPONSE_TOKENS - 1) and entry["n_rollouts"] == 2
    json.dumps(entry)


def test_a_sweeps_saes_are_scored_in_the_same_passes_against_the_layers_ablations(dense):
    """train.sweep: each other SAE of the layer is spliced in the same passes; its CE and KL per token
    pooled over the rollouts equal the model's forward with a hook written here, and the zero and mean
    ablations it is compared with are the layer's own."""
    model, tokenizer = dense
    torch.manual_seed(1)
    width = d_model(model)
    main, wide = TopKSAE(width, 2 * width, k=4), TopKSAE(width, 8 * width, k=16)
    mean = np.zeros(width)
    rollouts = make_rollouts(tokenizer)
    entries = fidelity_of_layers(model, {LAYER: main}, {LAYER: mean}, rollouts, n_boot=20, seed=0,
                                 sweep={LAYER: {"n=512-k=16": wide}})
    entry, member = entries[LAYER], entries[LAYER]["sweep"]["n=512-k=16"]
    assert set(member) == FIDELITY_KEYS and "sweep" not in member
    ce = kl = tokens = 0.0
    for rollout in rollouts:
        clean, logits = reference_logits(model, rollout), reference_logits(model, rollout, wide)
        ce += F.cross_entropy(logits, targets(rollout), reduction="sum").item()
        kl += reference_kl(clean, logits)
        tokens += len(targets(rollout))
    assert member["ce_spliced"] == pytest.approx(ce / tokens, rel=1e-5)
    assert member["kl"] == pytest.approx(kl / tokens, rel=1e-4)
    assert (member["ce_zero"], member["ce_mean"], member["ce_clean"]) == (entry["ce_zero"], entry["ce_mean"],
                                                                         entry["ce_clean"])
    assert member["ce_spliced"] != entry["ce_spliced"]
    assert member["delta_ce_ci"][0] <= member["delta_ce"] <= member["delta_ce_ci"][1]


def test_positions_outside_the_splice_set_keep_their_output(tiny):
    """Splicing the second half of the response leaves every earlier loss as it was, and a splice at
    the last token (which predicts nothing scored) changes nothing."""
    model, tokenizer = tiny
    rollout = make_rollouts(tokenizer, n=1)[0]
    half = rollout.n_prompt + RESPONSE_TOKENS // 2
    second_half = RolloutTokens(0, rollout.token_ids, rollout.n_prompt, np.arange(half, len(rollout.token_ids)))
    last = RolloutTokens(1, rollout.token_ids, rollout.n_prompt, np.array([len(rollout.token_ids) - 1]))
    table = rollout_losses(model, [second_half, last], {(LAYER, "zero"): zero_replacement}, progress=False)
    y = targets(rollout)
    clean = F.cross_entropy(reference_logits(model, rollout), y, reduction="none")
    spliced = F.cross_entropy(reference_logits(model, second_half, torch.zeros_like), y, reduction="none")
    before = half - rollout.n_prompt
    torch.testing.assert_close(spliced[:before], clean[:before], rtol=0, atol=0)
    assert not torch.allclose(spliced[before:], clean[before:])
    assert table.ce[(LAYER, "zero")][0] == pytest.approx(spliced.sum().item(), rel=1e-5)
    assert table.ce[(LAYER, "zero")][1] == table.ce_clean[1]
    assert table.kl[(LAYER, "zero")][1] == 0


def test_chunking_does_not_change_the_sums(tiny):
    model, tokenizer = tiny
    torch.manual_seed(1)
    sae = TopKSAE(d_model(model), 256, k=4)
    variants = {(LAYER, "zero"): zero_replacement, (7, "spliced"): sae_replacement(sae)}
    rollouts = make_rollouts(tokenizer, n=1)
    whole = rollout_losses(model, rollouts, variants, chunk_tokens=4096, progress=False)
    chunked = rollout_losses(model, rollouts, variants, chunk_tokens=5, progress=False)  # 23 positions: 5 chunks
    # Equal up to float32 rounding: the output embedding's matmul blocks differently for 5 rows than for 23.
    np.testing.assert_allclose(chunked.ce_clean, whole.ce_clean, rtol=1e-6)
    for key in variants:
        np.testing.assert_allclose(chunked.ce[key], whole.ce[key], rtol=1e-6)
        np.testing.assert_allclose(chunked.kl[key], whole.kl[key], rtol=1e-5, atol=1e-7)


def test_rollouts_without_a_scored_token_and_bad_inputs(tiny):
    model, tokenizer = tiny
    rollout = make_rollouts(tokenizer, n=1)[0]
    n_prompt = rollout.n_prompt
    one_token = RolloutTokens(3, rollout.token_ids[: n_prompt + 1], n_prompt, np.array([n_prompt]))
    table = rollout_losses(model, [one_token], {(LAYER, "zero"): zero_replacement}, progress=False)
    assert table.n_tokens[0] == 0 and table.ce_clean[0] == 0 and table.ce[(LAYER, "zero")][0] == 0
    in_prompt = RolloutTokens(4, rollout.token_ids, n_prompt, np.array([n_prompt - 1, n_prompt]))
    unsorted = RolloutTokens(5, rollout.token_ids, n_prompt, np.array([n_prompt + 2, n_prompt + 1]))
    for bad in (in_prompt, unsorted):
        with pytest.raises(ValueError, match="splice_positions"):
            rollout_losses(model, [bad], {(LAYER, "zero"): zero_replacement}, progress=False)
    with pytest.raises(ValueError, match="layer out of range"):
        rollout_losses(model, [rollout], {(12, "zero"): zero_replacement}, progress=False)
    with pytest.raises(ValueError, match="returned shape"):
        rollout_losses(model, [rollout], {(LAYER, "bad"): lambda rows: rows[:1]}, progress=False)


def test_splice_keeps_the_rest_of_a_tuple_output():
    """A decoder layer may return (residual, ...): only the residual's rows at the positions change."""
    class PairLayer(nn.Module):
        def forward(self, x):
            return x + 0, "cache"

    layer, x = PairLayer(), torch.randn(1, 5, 4)
    with _splice(layer, torch.tensor([1, 3]), zero_replacement):
        hidden, extra = layer(x)
    expected = x.clone()
    expected[0, [1, 3]] = 0
    assert extra == "cache" and torch.equal(hidden, expected)
    assert torch.equal(layer(x)[0], x)  # the hook is gone after the block


# ----------------------------------------------------------------------------------------------
# layer_fidelity on a table written here


def synthetic_table(n_rollouts: int, seed: int = 0) -> LossTable:
    """Per-rollout sums with clean < spliced < zero on average, plus a rollout with no scored token."""
    rng = np.random.default_rng(seed)
    n_tokens = np.append(rng.integers(5, 50, n_rollouts), 0)
    ce_clean = n_tokens * rng.uniform(1.0, 2.0, n_rollouts + 1)
    per_token = {"spliced": 0.3, "zero": 3.0, "mean": 2.0}
    ce = {(2, name): ce_clean + n_tokens * rng.uniform(0, 2 * shift, n_rollouts + 1)
          for name, shift in per_token.items()}
    kl = {(2, name): n_tokens * rng.uniform(0, shift, n_rollouts + 1) for name, shift in per_token.items()}
    return LossTable(np.arange(n_rollouts + 1), n_tokens, ce_clean, ce, kl)


def test_layer_fidelity_pools_over_tokens_and_bootstraps_over_questions():
    table = synthetic_table(7)
    questions = np.array(["a", "a", "b", "c", "c", "d", "e", "f"])  # f: the rollout with no scored token
    n_boot, seed, alpha = 60, 5, 0.1
    entry = layer_fidelity(table, 2, questions=questions, n_boot=n_boot, seed=seed, alpha=alpha)
    assert set(entry) == FIDELITY_KEYS
    assert json.loads(json.dumps(entry)) == entry
    scored = slice(0, 7)  # the last rollout has no scored token and is dropped
    n = table.n_tokens[scored]
    ce = {name: table.ce[(2, name)][scored] for name in ("spliced", "zero", "mean")}
    ce["clean"] = table.ce_clean[scored]
    kl = table.kl[(2, "spliced")][scored]
    rollouts_of = [np.flatnonzero(questions[scored] == q) for q in "abcde"]

    def stats(rows):
        tokens = n[rows].sum()
        clean, spliced, zero = (ce[name][rows].sum() / tokens for name in ("clean", "spliced", "zero"))
        return spliced - clean, (zero - spliced) / (zero - clean), kl[rows].sum() / tokens

    for name in ("clean", "spliced", "zero", "mean"):
        assert entry[f"ce_{name}"] == pytest.approx(ce[name].sum() / n.sum(), rel=1e-12)
    assert (entry["delta_ce"], entry["ce_loss_recovered"], entry["kl"]) == pytest.approx(stats(np.arange(7)), rel=1e-12)
    assert entry["kl_zero"] == pytest.approx(table.kl[(2, "zero")][scored].sum() / n.sum(), rel=1e-12)
    assert (entry["n_tokens"], entry["n_rollouts"], entry["n_questions"]) == (n.sum(), 7, 5)
    for column, key in enumerate(("delta_ce", "ce_loss_recovered", "kl")):
        def of_questions(drawn, column=column):
            return stats(np.concatenate([rollouts_of[q] for q in drawn]))[column]

        expected = bootstrap_t(5, of_questions, n_boot, seed, alpha)
        np.testing.assert_allclose(entry[f"{key}_ci"], expected, rtol=1e-9)
        low, high = entry[f"{key}_ci"]
        assert low < entry[key] < high
    # Without questions each rollout is its own.
    alone = layer_fidelity(table, 2, n_boot=n_boot, seed=seed, alpha=alpha)
    assert alone["n_questions"] == 7 and alone["delta_ce_ci"] != entry["delta_ce_ci"]


def test_layer_fidelity_edge_cases():
    single = layer_fidelity(synthetic_table(1), 2, n_boot=20)
    assert single["n_rollouts"] == single["n_questions"] == 1
    assert single["delta_ce_ci"] is None and single["ce_loss_recovered_ci"] is None and single["kl_ci"] is None
    assert np.isfinite([single["delta_ce"], single["ce_loss_recovered"], single["kl"]]).all()
    table = synthetic_table(4)
    table.ce[(2, "zero")] = table.ce_clean.copy()  # zero ablation costs nothing: recovery undefined
    flat = layer_fidelity(table, 2, n_boot=20)
    assert flat["ce_loss_recovered"] is None and flat["ce_loss_recovered_ci"] is None
    assert flat["delta_ce_ci"] is not None
    with pytest.raises(ValueError, match="layer 3 lacks"):
        layer_fidelity(table, 3)
    del table.ce[(2, "mean")]
    with pytest.raises(ValueError, match=r"\['mean'\]"):
        layer_fidelity(table, 2)
    with pytest.raises(ValueError, match="n_boot"):
        layer_fidelity(synthetic_table(3), 2, n_boot=0)
    table = synthetic_table(3)
    table.n_tokens[:] = 0
    with pytest.raises(ValueError, match="no scored tokens"):
        layer_fidelity(table, 2)


# ----------------------------------------------------------------------------------------------
# CUDA, bfloat16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bfloat16_on_cuda_matches_the_models_own_forward(tiny_path):
    model, tokenizer = load_model(tiny_path, dtype="bfloat16", device="cuda")
    torch.manual_seed(0)
    sae = TopKSAE(d_model(model), 4 * d_model(model), k=8)  # float32 on CPU: the replacement moves it
    rollouts = make_rollouts(tokenizer)
    table = rollout_losses(model, rollouts, {(LAYER, "spliced"): sae_replacement(sae)}, chunk_tokens=7, progress=False)
    assert sae.W_dec.device.type == "cuda" and sae.W_dec.dtype == torch.float32
    for i, rollout in enumerate(rollouts):
        y = targets(rollout, "cuda")
        clean = reference_logits(model, rollout)
        spliced = reference_logits(model, rollout, lambda rows: sae(rows.float()))
        assert table.ce_clean[i] == pytest.approx(F.cross_entropy(clean, y, reduction="sum").item(), rel=2e-2)
        assert table.ce[(LAYER, "spliced")][i] == pytest.approx(F.cross_entropy(spliced, y, reduction="sum").item(),
                                                                rel=2e-2)
        assert table.kl[(LAYER, "spliced")][i] == pytest.approx(reference_kl(clean, spliced), rel=5e-2, abs=1e-2)
