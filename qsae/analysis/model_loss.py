"""SAE fidelity in the model's own next-token loss: CE loss recovered and KL to the clean model.

Token set, per rollout of token ids x_0 .. x_{T-1} whose first n_prompt are the prompt:
- scored (loss) positions: n_prompt <= p <= T-2, the response positions that have a next token;
  loss_p = -log softmax(logits_p)[x_{p+1}], in nats.
- spliced positions S: the response positions the caller names (those the SAE was trained on;
  special and very-high-norm tokens keep their own output). In a variant for layer L the output of
  decoder layer L (the residual stream after block L) at the positions in S is
  replaced; every other position keeps its own output.

Variants of layer L: "spliced" (sae(x), the SAE's reconstruction), "zero" (0) and "mean" (the mean
training row); "clean" replaces nothing. Per rollout r and variant v:
    CE_r(v) = sum_p loss_p(v)
    KL_r(v) = sum_p sum_w p_clean(w | p) (log p_clean(w | p) - log p_v(w | p))     [KL(clean || v)]
    N_r     = number of scored positions
Pooled over rollouts: ce(v) = sum_r CE_r(v) / sum_r N_r, kl(v) = sum_r KL_r(v) / sum_r N_r, and
    delta_ce          = ce(spliced) - ce(clean)
    ce_loss_recovered = (ce(zero) - ce(spliced)) / (ce(zero) - ce(clean))
(1: the splice costs nothing; 0: as bad as zero ablation), the CE loss score of SAELens and SAEBench.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from qsae.analysis.fidelity import DEFAULT_ALPHA, ratio_bootstrap_t
from qsae.capture import text_model
from qsae.models import decoder_layers

# rows [S, d_model] of a layer's output (model dtype) -> replacement rows [S, d_model]
Replacement = Callable[[Tensor], Tensor]
VariantKey = tuple[int, str]  # (layer, variant name)


@dataclass
class RolloutTokens:
    """One rollout to score."""

    rollout_id: int
    token_ids: list[int]
    """Prompt then response."""
    n_prompt: int
    """Number of prompt tokens at the start of token_ids."""
    splice_positions: np.ndarray
    """Strictly increasing response positions (n_prompt <= p < len(token_ids)) whose layer output a
    variant replaces."""
    question: str | None = None
    """The rollout's question: the intervals resample questions (None: each rollout its own)."""


@dataclass
class LossTable:
    """Per-rollout sums over the scored positions, all arrays [R] in rollout order."""

    rollout_ids: np.ndarray  # int64
    n_tokens: np.ndarray  # int64: scored positions per rollout
    ce_clean: np.ndarray  # float64: sum of clean CE
    ce: dict[VariantKey, np.ndarray]  # float64: sum of the variant's CE
    kl: dict[VariantKey, np.ndarray]  # float64: sum of KL(clean || variant)


def sae_replacement(sae: nn.Module) -> Replacement:
    """sae(x) computed in float32 and cast back to the rows' dtype (bfloat16 rows would otherwise
    meet float32 weights). On first use the SAE moves, in place, to the rows' device in float32."""

    def replace(rows: Tensor) -> Tensor:
        sae.to(device=rows.device, dtype=torch.float32)  # a no-op once it is there
        return sae(rows.float()).to(rows.dtype)

    return replace


def constant_replacement(vector: np.ndarray | Tensor) -> Replacement:
    """Every row becomes `vector` [d_model] (e.g. the mean training row), in the rows' dtype and device."""
    vector = torch.as_tensor(np.asarray(vector, dtype=np.float32) if isinstance(vector, np.ndarray) else vector)
    if vector.ndim != 1:
        raise ValueError(f"the replacement vector must be 1-D [d_model], got shape {tuple(vector.shape)}")

    def replace(rows: Tensor) -> Tensor:
        return vector.to(device=rows.device, dtype=rows.dtype).expand_as(rows)

    return replace


def zero_replacement(rows: Tensor) -> Tensor:
    """Every row becomes zeros: zero ablation."""
    return torch.zeros_like(rows)


def fidelity_variants(layer: int, sae: nn.Module, mean: np.ndarray | Tensor) -> dict[VariantKey, Replacement]:
    """The three variants layer_fidelity reads for `layer`: the SAE's reconstruction, zeros, the mean row."""
    return {
        (layer, "spliced"): sae_replacement(sae),
        (layer, "zero"): zero_replacement,
        (layer, "mean"): constant_replacement(mean),
    }


@torch.no_grad()  # not inference_mode: sae_replacement moves the caller's SAE, which may train later
def rollout_losses(
    model: nn.Module,
    rollouts: list[RolloutTokens],
    variants: dict[VariantKey, Replacement],
    *,
    chunk_tokens: int = 512,
    progress: bool = True,
) -> LossTable:
    """Clean and per-variant CE sums, and KL(clean || variant) sums, of each rollout.

    One sequence per forward pass (exact, no padding). Per rollout the clean pass runs once, then one
    pass per variant; only the final hidden rows of the scored positions are kept (n_variants + 1
    tensors [N_r, d_model] in the model dtype), and the output embedding turns them into logits
    `chunk_tokens` positions at a time, so no [T, vocab] tensor exists and the clean log-probs of a
    chunk are computed once for all variants. Logits come out in the model dtype, as in the model's
    own forward; log_softmax, CE and KL run in float32 and the sums accumulate in float64.
    """
    if model.training:
        raise ValueError("the model must be in eval mode (model.eval())")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    layers = decoder_layers(model)
    _check_variants(variants, len(layers))
    for rollout in rollouts:  # all up front: a bad rollout fails before hours of forward passes
        _check_rollout(rollout)
    runner, head = text_model(model), model.get_output_embeddings()
    device = model.get_input_embeddings().weight.device
    n_rollouts = len(rollouts)
    table = LossTable(
        rollout_ids=np.array([r.rollout_id for r in rollouts], dtype=np.int64),
        n_tokens=np.zeros(n_rollouts, dtype=np.int64),
        ce_clean=np.zeros(n_rollouts),
        ce={key: np.zeros(n_rollouts) for key in variants},
        kl={key: np.zeros(n_rollouts) for key in variants},
    )
    bar = tqdm(rollouts, desc="model loss", unit="rollout", disable=None if progress else True)
    for i, rollout in enumerate(bar):
        table.n_tokens[i] = max(len(rollout.token_ids) - 1 - rollout.n_prompt, 0)
        if table.n_tokens[i] == 0:
            continue
        clean, spliced, targets = _scored_hidden(runner, layers, rollout, variants, device=device)
        for rows in _chunks(len(targets), chunk_tokens):
            clean_logp = _log_probs(head, clean[rows])
            table.ce_clean[i] += _ce_sum(clean_logp, targets[rows])
            for key, hidden in spliced.items():
                logp = _log_probs(head, hidden[rows])
                table.ce[key][i] += _ce_sum(logp, targets[rows])
                table.kl[key][i] += _kl_sum(clean_logp, logp)
    return table


def _scored_hidden(
    runner: nn.Module, layers: nn.ModuleList, rollout: RolloutTokens, variants: dict[VariantKey, Replacement], *,
    device: torch.device,
) -> tuple[Tensor, dict[VariantKey, Tensor], Tensor]:
    """Final hidden rows [N, d_model] at the scored positions of the clean pass and of each variant's
    pass, and the targets [N] (the next token of each scored position)."""
    input_ids = torch.tensor([rollout.token_ids], device=device)
    scored = slice(rollout.n_prompt, len(rollout.token_ids) - 1)
    positions = torch.tensor(rollout.splice_positions, dtype=torch.long, device=device)  # a copy: may be read-only
    clean = _final_hidden(runner, input_ids)[scored]
    spliced = {}
    for key, replace in variants.items():
        if len(positions) == 0:  # nothing to replace: the variant is the clean pass
            spliced[key] = clean
            continue
        with _splice(layers[key[0]], positions, replace):
            spliced[key] = _final_hidden(runner, input_ids)[scored]
    return clean, spliced, input_ids[0, scored.start + 1 :]


def _check_variants(variants: dict[VariantKey, Replacement], n_layers: int) -> None:
    for key in variants:
        if not (isinstance(key, tuple) and len(key) == 2 and isinstance(key[1], str)):
            raise ValueError(f"variant keys are (layer, name) pairs, got {key!r}")
        if not 0 <= key[0] < n_layers:
            raise ValueError(f"variant {key}: layer out of range, the model has {n_layers} decoder layers")


def _check_rollout(rollout: RolloutTokens) -> None:
    n = len(rollout.token_ids)
    where = f"rollout {rollout.rollout_id}"
    if not 0 <= rollout.n_prompt <= n:
        raise ValueError(f"{where}: n_prompt={rollout.n_prompt} outside 0..{n} (the number of tokens)")
    positions = np.asarray(rollout.splice_positions)
    if positions.ndim != 1 or (positions.size and not np.issubdtype(positions.dtype, np.integer)):
        raise ValueError(f"{where}: splice_positions must be a 1-D integer array, got {positions!r}")
    if positions.size and (positions[0] < rollout.n_prompt or positions[-1] >= n or np.any(np.diff(positions) <= 0)):
        raise ValueError(
            f"{where}: splice_positions must be strictly increasing response positions in "
            f"{rollout.n_prompt}..{n - 1}, got {positions.min()}..{positions.max()}"
        )


def _final_hidden(runner: nn.Module, input_ids: Tensor) -> Tensor:
    """Final-norm hidden states [T, d_model] of one sequence."""
    return runner(input_ids=input_ids, use_cache=False).last_hidden_state[0]


@contextmanager
def _splice(layer: nn.Module, positions: Tensor, replace: Replacement):
    """Within the block, `layer`'s output at `positions` of the (single) sequence is replace(rows)."""

    def hook(module, inputs, output):
        # A decoder layer returns the residual tensor, or a tuple whose first element is it.
        hidden = output[0] if isinstance(output, tuple) else output
        where = positions.to(hidden.device)
        rows = hidden[0, where]
        new_rows = replace(rows)
        if new_rows.shape != rows.shape:
            raise ValueError(f"a replacement returned shape {tuple(new_rows.shape)} for rows {tuple(rows.shape)}")
        hidden = hidden.clone()
        hidden[0, where] = new_rows.to(hidden.dtype)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = layer.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _chunks(n: int, size: int) -> Iterator[slice]:
    return (slice(start, min(start + size, n)) for start in range(0, n, size))


def _log_probs(head: nn.Module, hidden: Tensor) -> Tensor:
    """log softmax of the logits of `hidden` [c, d] in float32: [c, vocab]."""
    weight = next(head.parameters())
    return F.log_softmax(head(hidden.to(weight.device)).float(), dim=-1)


def _ce_sum(logp: Tensor, targets: Tensor) -> float:
    return -logp.gather(1, targets.to(logp.device)[:, None]).double().sum().item()


def _kl_sum(clean_logp: Tensor, logp: Tensor) -> float:
    """sum over rows of KL(clean || variant) = sum_w p_clean (log p_clean - log p_variant)."""
    return (clean_logp.exp() * (clean_logp - logp)).sum(dim=-1).double().sum().item()


# ----------------------------------------------------------------------------------------------
# Pooled statistics and bootstrap intervals


SUMS = ("n_tokens", "ce_clean", "ce_spliced", "ce_zero", "ce_mean", "kl", "kl_zero")  # per-question sums, in order
INTERVALS = ("delta_ce", "ce_loss_recovered", "kl")


def pooled(totals: np.ndarray) -> dict[str, np.ndarray]:
    """The pooled statistics of totals [..., len(SUMS)] (sums over questions, in SUMS order): each CE
    and KL per scored token, delta_ce, and ce_loss_recovered (NaN where ce_zero == ce_clean)."""
    tokens = totals[..., 0]
    with np.errstate(divide="ignore", invalid="ignore"):
        out = {name: totals[..., i] / tokens for i, name in enumerate(SUMS) if i}
        out["delta_ce"] = out["ce_spliced"] - out["ce_clean"]
        gap = out["ce_zero"] - out["ce_clean"]
        out["ce_loss_recovered"] = np.where(gap != 0, (out["ce_zero"] - out["ce_spliced"]) / gap, np.nan)
    return out


def layer_fidelity(
    table: LossTable, layer: int, *, questions: np.ndarray | None = None, n_boot: int = 1000, seed: int = 0,
    alpha: float = DEFAULT_ALPHA, spliced: str = "spliced",
) -> dict:
    """The JSON entry of one layer: pooled CE per scored token of each variant, delta_ce,
    ce_loss_recovered and KL(clean || spliced) per token, with intervals over questions.

    Rollouts without a scored token carry no information and are dropped first; n_rollouts counts
    the rest. `questions` [R] names each table row's question (None: each rollout its own): the
    rollouts of a question are summed together, and the intervals are fidelity.ratio_bootstrap_t's
    studentized bootstrap over those questions. Intervals are None with a single question, and
    ce_loss_recovered and its interval are None where it is undefined (ce_zero == ce_clean).
    `spliced` names the variant to score (another of the layer's SAEs: train.sweep), against the
    layer's one zero and mean ablation.
    """
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    missing = [name for name in (spliced, "zero", "mean") if (layer, name) not in table.ce]
    if missing:
        known = sorted({key[0] for key in table.ce})
        raise ValueError(f"layer {layer} lacks variant(s) {missing} in the loss table (layers with variants: {known})")
    scored = table.n_tokens > 0
    if not scored.any():
        raise ValueError("no scored tokens: every rollout has fewer than one response token after its first")
    per_rollout = np.stack([table.n_tokens.astype(np.float64), table.ce_clean, table.ce[(layer, spliced)],
                            table.ce[(layer, "zero")], table.ce[(layer, "mean")], table.kl[(layer, spliced)],
                            table.kl[(layer, "zero")]], axis=1)[scored]
    _, question = np.unique(table.rollout_ids if questions is None else np.asarray(questions), return_inverse=True)
    question = question.reshape(-1)[scored]
    _, question = np.unique(question, return_inverse=True)  # the questions left with a scored token
    sums = np.zeros((int(question.max()) + 1, len(SUMS)))
    np.add.at(sums, question, per_rollout)
    point = {name: float(value) for name, value in pooled(sums.sum(axis=0)).items()}
    entry = {name: point[name] for name in ("ce_clean", "ce_spliced", "ce_zero", "ce_mean", "delta_ce")}
    entry["ce_loss_recovered"] = point["ce_loss_recovered"] if np.isfinite(point["ce_loss_recovered"]) else None
    entry.update(kl=point["kl"], kl_zero=point["kl_zero"])
    intervals = dict.fromkeys(INTERVALS)
    if len(sums) > 1:
        intervals = ratio_bootstrap_t(sums, lambda totals: {name: pooled(totals)[name] for name in INTERVALS},
                                      n_boot=n_boot, seed=seed, alpha=alpha)
    entry.update({f"{name}_ci": None if intervals[name] is None else list(intervals[name]) for name in INTERVALS})
    entry["n_tokens"] = int(table.n_tokens[scored].sum())
    entry["n_rollouts"] = int(scored.sum())
    entry["n_questions"] = len(sums)
    return entry


FIDELITY_DEFINITION = {
    "scored": "next-token cross-entropy (nats) at every response position but the last, on held-out rollouts",
    "spliced": "the layer's output replaced at every response position whose token passes the row masks "
               "(special and very-high-norm tokens keep their own output)",
    "ce_*": "pooled over tokens: sum of CE over rollouts / number of scored tokens; clean, spliced (SAE "
            "reconstruction), zero (zeros), mean (the training rows' mean)",
    "delta_ce": "ce_spliced - ce_clean",
    "ce_loss_recovered": "(ce_zero - ce_spliced) / (ce_zero - ce_clean)",
    "kl": "mean over scored tokens of KL(p_clean || p_spliced), nats",
    "kl_zero": "the same for the zero ablation, KL(p_clean || p_zero)",
    "intervals": "95% studentized bootstrap (bootstrap-t) over the held-out questions, jackknife standard errors",
}


def fidelity_of_layers(model: nn.Module, saes: dict[int, nn.Module], means: dict[int, np.ndarray],
                       rollouts: list[RolloutTokens], *, n_boot: int, seed: int,
                       sweep: dict[int, dict[str, nn.Module]] | None = None) -> dict[int, dict]:
    """layer_fidelity of every layer's SAE, one clean pass per rollout shared by all layers' variants.
    A layer's `sweep` SAEs (shape name -> SAE) are spliced in turn in the same passes and scored against
    the same ablations; their entries go under the layer entry's "sweep"."""
    sweep = sweep or {}
    variants = {key: fn for layer, sae in saes.items() for key, fn in fidelity_variants(layer, sae, means[layer]).items()}
    variants.update({(layer, sweep_variant(shape)): sae_replacement(sae)
                     for layer, members in sweep.items() for shape, sae in members.items()})
    table = rollout_losses(model, rollouts, variants)
    questions = None if any(r.question is None for r in rollouts) else np.array([r.question for r in rollouts])
    entries = {layer: layer_fidelity(table, layer, questions=questions, n_boot=n_boot, seed=seed) for layer in saes}
    for layer, members in sweep.items():
        entries[layer]["sweep"] = {shape: layer_fidelity(table, layer, questions=questions, n_boot=n_boot, seed=seed,
                                                         spliced=sweep_variant(shape)) for shape in members}
    return entries


def sweep_variant(shape: str) -> str:
    """The variant name of a layer's sweep SAE of shape `shape` spliced in."""
    return f"spliced {shape}"
