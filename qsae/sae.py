"""TopK and BatchTopK sparse autoencoders over residual-stream rows, and their release formats.

Parameter names and shapes follow the original release (`W_enc [d_in, n]`, `b_enc [n]`,
`W_dec [n, d_in]`, `b_dec [d_in]`, fp32), so its `.pt` files load into this module unchanged.
The same weights are also written in the layouts SAELens and EleutherAI sparsify load from disk.
`TopKEncoder` is the training-speed path: the encoder's top-k with a backward pass that touches
only the selected latents; `BatchTopKEncoder` does the same for BatchTopK's top k x B over a batch.

`BatchTopKSAE` (Bussmann et al. 2024, "BatchTopK Sparse Autoencoders", arXiv:2412.06410) trains
with the top k x B pre-activations of a whole batch of B rows, so a row may use more or fewer than
k latents, and encodes at inference with a learned threshold instead: z = ReLU(pre) * (pre > threshold),
one scalar for all latents (the training rule is in qsae.train). Its files hold the threshold as
a fifth tensor; SAELens loads it as the JumpReLU SAE its own BatchTopK trainer saves for inference
(threshold repeated per latent); sparsify has no thresholded architecture, so it gets no sparsify
layout.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from qsae.files import atomic_write, atomic_write_json, first_line

PARAM_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec")
SAELENS_CFG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
SPARSIFY_WEIGHTS = "sae.safetensors"
THRESHOLD = "threshold"  # BatchTopK's inference threshold: a scalar tensor, [n] in the SAELens layout
# BatchTopK's fixed-width sparse view (encode_topk) keeps min(n, this x k) latents per row.
SPARSE_WIDTH_PER_K = 4
# SAELens treats a cfg without a version marker as pre-6.0 and drops the nested metadata;
# this marks the cfg as written in the 6.x layout.
SAELENS_FORMAT_VERSION = "6.0.0"


class TopKSAE(nn.Module):
    """`encode(x)`: pre = (x - b_dec) @ W_enc + b_enc, keep the top k of pre, ReLU, scatter into zeros.
    `decode(z)`: z @ W_dec + b_dec."""

    architecture = "topk"
    has_sparsify_layout = True

    def __init__(self, d_in: int, n_features: int, k: int):
        super().__init__()
        if min(d_in, n_features, k) < 1:
            raise ValueError(f"sizes must be >= 1, got d_in={d_in}, n_features={n_features}, k={k}")
        if k > n_features:
            raise ValueError(f"k={k} exceeds n_features={n_features}")
        self.d_in, self.n_features, self.k = d_in, n_features, k
        W_dec = torch.randn(n_features, d_in)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        self.W_enc = nn.Parameter(W_dec.T.clone())
        self.b_enc = nn.Parameter(torch.zeros(n_features))
        self.W_dec = nn.Parameter(W_dec)
        self.b_dec = nn.Parameter(torch.zeros(d_in))

    def encode_topk(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Top-k latents of x [..., d_in]: (values >= 0 [..., k], indices [..., k])."""
        pre = (x - self.b_dec) @ self.W_enc + self.b_enc
        values, indices = pre.topk(self.k, dim=-1)
        return F.relu(values), indices

    def encode(self, x: Tensor) -> Tensor:
        """Dense codes [..., n_features] with at most k nonzeros per row."""
        values, indices = self.encode_topk(x)
        return torch.zeros(*x.shape[:-1], self.n_features, dtype=values.dtype,
                           device=values.device).scatter_(-1, indices, values)

    def decode(self, z: Tensor) -> Tensor:
        return z @ self.W_dec + self.b_dec

    def decode_topk(self, values: Tensor, indices: Tensor) -> Tensor:
        """decode(encode(x)) from the top-k pairs, summing k decoder rows instead of a dense matmul."""
        return self.decoder_sum(values, indices) + self.b_dec

    def decoder_sum(self, values: Tensor, indices: Tensor) -> Tensor:
        """sum_j values[..., j] * W_dec[indices[..., j]]: [..., d_in], without b_dec."""
        k = indices.shape[-1]
        flat = F.embedding_bag(indices.reshape(-1, k), self.W_dec,
                               per_sample_weights=values.reshape(-1, k), mode="sum")
        return flat.reshape(*values.shape[:-1], self.d_in)

    def encode_for_training(self, x: Tensor, dead: Tensor | None = None,
                            k_aux: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """encode_topk for x [B, d_in] through `TopKEncoder` (sparse backward), plus the top k_aux
        latents among `dead` [n] (bool) for the AuxK loss: (values, indices, aux_values,
        aux_indices), values ReLU'd; the aux pair is [B, 0] when dead is None. Where fewer than
        k_aux latents are dead, the surplus aux picks have value 0."""
        values, indices, aux_values, aux_indices = TopKEncoder.apply(
            x, self.W_enc, self.b_enc, self.b_dec, self.k, dead, k_aux if dead is not None else 0)
        return F.relu(values), indices, F.relu(aux_values), aux_indices

    def decode_for_training(self, values: Tensor, indices: Tensor, batch_rows: int) -> Tensor:
        """x_hat [B, d_in] from encode_for_training's (values, indices) of a batch of batch_rows rows."""
        return self.decode_topk(values, indices)

    def fire_counts(self, values: Tensor, indices: Tensor) -> Tensor:
        """How many rows each latent fired on (a positive value) in encode_for_training's codes: [n]."""
        return torch.zeros(self.n_features, device=values.device).scatter_add_(
            0, indices.flatten(), (values > 0).flatten().float())

    def forward(self, x: Tensor) -> Tensor:
        return self.decode_topk(*self.encode_topk(x))

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Project decoder rows back to unit norm (the recipe's constraint, applied after each step)."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(torch.finfo(self.W_dec.dtype).eps))

    @classmethod
    def tensor_names(cls) -> tuple[str, ...]:
        """The tensors of its release files and state dict."""
        return PARAM_NAMES

    def release_tensors(self) -> dict[str, Tensor]:
        """The release tensors (tensor_names) as contiguous fp32 CPU tensors, detached from autograd."""
        return {name: getattr(self, name).detach().to("cpu", torch.float32).contiguous()
                for name in self.tensor_names()}

    def save_release(self, out_dir: str | Path, layer: int, hook_name: str) -> dict[str, Path]:
        """Write this SAE in its release formats under out_dir (.pt, .safetensors, SAELens, and
        sparsify where it has that layout); returns the path of each."""
        _check_hook_name(hook_name)
        out_dir = Path(out_dir)
        stem = f"sae_L{layer}_n{self.n_features}_k{self.k}"
        tensors = self.release_tensors()
        metadata = {"d_in": str(self.d_in), "n_features": str(self.n_features), "k": str(self.k),
                    "layer": str(layer), "hook_name": hook_name, "architecture": self.architecture}
        paths = {"pt": out_dir / f"{stem}.pt", "safetensors": out_dir / f"{stem}.safetensors",
                 "saelens": out_dir / "saelens" / hook_name}
        atomic_write(paths["pt"], lambda tmp: torch.save(tensors, tmp))
        atomic_write(paths["safetensors"], lambda tmp: save_file(tensors, tmp, metadata=metadata))
        atomic_write(paths["saelens"] / SAELENS_WEIGHTS, lambda tmp: save_file(self.saelens_tensors(tensors), tmp))
        atomic_write_json(paths["saelens"] / SAELENS_CFG, self.saelens_cfg(hook_name))
        if self.has_sparsify_layout:
            paths["sparsify"] = out_dir / "sparsify" / f"layers.{layer}"
            atomic_write(paths["sparsify"] / SPARSIFY_WEIGHTS,
                         lambda tmp: save_file(_sparsify_tensors(tensors), tmp))
            atomic_write_json(paths["sparsify"] / SAELENS_CFG, self.sparsify_cfg())
        return paths

    def saelens_tensors(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        """release_tensors as SAELens's sae_weights.safetensors holds them."""
        return tensors

    def saelens_cfg(self, hook_name: str) -> dict:
        """cfg.json for SAELens' `SAE.load_from_disk` (its TopKSAEConfig fields)."""
        return {"architecture": "topk", "d_in": self.d_in, "d_sae": self.n_features, "k": self.k,
                "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
                "normalize_activations": "none", "reshape_activations": "none",
                "rescale_acts_by_decoder_norm": False,
                "metadata": {"hook_name": hook_name, "sae_lens_version": SAELENS_FORMAT_VERSION}}

    def sparsify_cfg(self) -> dict:
        """cfg.json for sparsify's `Sae.load_from_disk`: SparseCoderConfig fields plus d_in.
        num_latents > 0 overrides expansion_factor, which keeps sparsify's default."""
        return {"activation": "topk", "expansion_factor": 32, "normalize_decoder": True,
                "num_latents": self.n_features, "k": self.k, "multi_topk": False,
                "skip_connection": False, "transcode": False, "d_in": self.d_in}

    @classmethod
    def load(cls, path: str | Path, k: int | None = None, device: str | torch.device = "cpu") -> TopKSAE:
        """Load from a release `.pt` or `.safetensors` file, a SAELens hook directory (or its
        cfg.json), or a sparsify layer directory. An explicit k overrides the stored one. The
        architecture is the stored one (from_tensors): TopKSAE.load of a BatchTopK release gives
        a BatchTopKSAE."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no SAE at {path}")
        if path.is_file() and path.name == SAELENS_CFG:
            path = path.parent
        architecture = None
        try:
            if path.is_dir():
                tensors, stored_k, architecture = _read_dir(path)
            elif path.suffix == ".pt":
                tensors = load_weights_only(path)
                match = re.search(r"_k(\d+)$", path.stem)
                stored_k = int(match.group(1)) if match else None
            elif path.suffix == ".safetensors":
                tensors, meta = _read_safetensors(path)
                stored_k = int(meta["k"]) if "k" in meta else None
                architecture = meta.get("architecture")  # absent from files written before BatchTopK
            else:
                raise ValueError(f"unrecognised SAE format: {path} (expected .pt, .safetensors, "
                                 "a SAELens hook directory or a sparsify layer directory)")
        except ValueError:
            raise
        except Exception as err:  # torch's unpickler and safetensors raise their own kinds
            reason = first_line(err)
            raise ValueError(f"{path} is not a readable SAE file ({reason})") from None
        if not isinstance(tensors, dict) or not all(isinstance(t, Tensor) for t in tensors.values()):
            raise ValueError(f"{path} holds a {type(tensors).__name__}, not an SAE's dict of tensors")
        k = k if k is not None else stored_k
        if k is None:
            raise ValueError(f"k is not stored with {path}; pass k explicitly")
        try:
            return cls.from_tensors(tensors, k, architecture).to(device)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], k: int, architecture: str | None = None) -> TopKSAE:
        """Build from a state dict with exactly the release tensors of one architecture: the four
        parameters (TopK), plus a scalar `threshold` (BatchTopK). The tensors decide the class, so
        TopKSAE.from_tensors of a BatchTopK state dict gives a BatchTopKSAE; `architecture`, where
        the file records one, must agree with them. Shapes are checked."""
        stored = BatchTopKSAE if THRESHOLD in tensors else TopKSAE
        if architecture is not None and sae_class(architecture) is not stored:
            raise ValueError(f"the SAE is recorded as {architecture!r} but its tensors are those of "
                             f"{stored.architecture!r} ({sorted(tensors)})")
        if not issubclass(stored, cls):
            raise ValueError(f"tensors {sorted(tensors)} are a {stored.architecture} SAE, not a {cls.architecture} one")
        if set(tensors) != set(stored.tensor_names()):
            raise ValueError(f"expected tensors {sorted(stored.tensor_names())}, got {sorted(tensors)}")
        if tensors["W_enc"].ndim != 2:
            raise ValueError(f"W_enc must be 2-D [d_in, n], got shape {tuple(tensors['W_enc'].shape)}")
        d_in, n_features = tensors["W_enc"].shape
        with torch.device("meta"):  # shapes only: no random init, no global RNG draw
            sae = stored(d_in, n_features, k)
        for name, tensor in sae.state_dict().items():
            if tensors[name].shape != tensor.shape:
                raise ValueError(f"{name} has shape {tuple(tensors[name].shape)}, "
                                 f"expected {tuple(tensor.shape)} for d_in={d_in}, n={n_features}")
        sae.load_state_dict({name: t.to(torch.float32).contiguous() for name, t in tensors.items()},
                            assign=True)
        return sae


class BatchTopKSAE(TopKSAE):
    """BatchTopK (module docstring). Training (encode_for_training) keeps the k x B largest ReLU'd
    pre-activations of a batch of B rows; inference keeps every latent above the learned
    `threshold` (a scalar buffer, 0 until trained: plain ReLU):
    `encode(x)`: pre = (x - b_dec) @ W_enc + b_enc, z = ReLU(pre) * (pre > threshold), never truncated.
    `encode_topk(x)`: the same codes in a fixed-width sparse view, the top `sparse_width` =
    min(n, 4k) of pre per row with those not above the threshold zeroed, so a row with more active
    latents than that is truncated there (and in what is built on it: decode_topk, the release's
    statistics), never in encode or forward."""

    architecture = "batchtopk"
    has_sparsify_layout = False  # sparsify 1.3 encodes with topk or groupmax only: no threshold
    threshold: Tensor

    def __init__(self, d_in: int, n_features: int, k: int):
        super().__init__(d_in, n_features, k)
        self.register_buffer(THRESHOLD, torch.zeros(()))
        self.sparse_width = min(n_features, SPARSE_WIDTH_PER_K * k)

    @classmethod
    def tensor_names(cls) -> tuple[str, ...]:
        return (*PARAM_NAMES, THRESHOLD)

    def encode(self, x: Tensor) -> Tensor:
        """Dense codes [..., n_features]: every latent whose pre-activation exceeds the threshold."""
        pre = (x - self.b_dec) @ self.W_enc + self.b_enc
        return F.relu(pre) * (pre > self.threshold)

    def encode_topk(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """encode(x) as (values >= 0 [..., sparse_width], indices [..., sparse_width]): the largest
        pre-activations of each row, zero where not above the threshold (see the class docstring)."""
        pre = (x - self.b_dec) @ self.W_enc + self.b_enc
        values, indices = pre.topk(self.sparse_width, dim=-1)
        return F.relu(values) * (values > self.threshold), indices

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))  # dense: exact whatever a row's number of active latents

    def encode_for_training(self, x: Tensor, dead: Tensor | None = None,
                            k_aux: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The batch's top k x B pre-activations, x [B, d_in], through `BatchTopKEncoder` (sparse
        backward): (values [k B] ReLU'd, positions [k B] = row * n + latent in ascending order, so
        grouped by row, aux_values, aux_indices), the aux pair as in TopKSAE.encode_for_training."""
        values, positions, aux_values, aux_indices = BatchTopKEncoder.apply(
            x, self.W_enc, self.b_enc, self.b_dec, self.k, self.sparse_width, dead,
            k_aux if dead is not None else 0)
        return F.relu(values), positions, F.relu(aux_values), aux_indices

    def decode_for_training(self, values: Tensor, indices: Tensor, batch_rows: int) -> Tensor:
        """x_hat [batch_rows, d_in] from encode_for_training's (values, positions): one bag of
        decoder rows per batch row (rows with no selected latent get b_dec)."""
        rows, latents = indices // self.n_features, indices % self.n_features
        starts = torch.searchsorted(rows, torch.arange(batch_rows, device=rows.device))
        return F.embedding_bag(latents, self.W_dec, starts, mode="sum", per_sample_weights=values) + self.b_dec

    def fire_counts(self, values: Tensor, indices: Tensor) -> Tensor:
        return super().fire_counts(values, indices % self.n_features)

    def saelens_tensors(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        """SAELens's JumpReLU layout: the threshold once per latent ([n], as SAELens's BatchTopK trainer saves it)."""
        return {**tensors, THRESHOLD: tensors[THRESHOLD].expand(self.n_features).contiguous()}

    def saelens_cfg(self, hook_name: str) -> dict:
        """cfg.json of the JumpReLU inference SAE that SAELens's own BatchTopK trainer saves
        (BatchTopKTrainingSAEConfig's inference config is JumpReLUSAEConfig): its fields, and the
        training architecture and k in the metadata, where SAELens records them."""
        return {"architecture": "jumprelu", "d_in": self.d_in, "d_sae": self.n_features,
                "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
                "normalize_activations": "none", "reshape_activations": "none",
                "metadata": {"hook_name": hook_name, "sae_lens_version": SAELENS_FORMAT_VERSION,
                             "training_architecture": "batchtopk",
                             "training_architecture_details": {"k": self.k}}}


ARCHITECTURES = {"topk": TopKSAE, "batchtopk": BatchTopKSAE}


def sae_class(architecture: str) -> type[TopKSAE]:
    """The SAE class of an architecture name ("topk" | "batchtopk")."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown SAE architecture {architecture!r}; expected one of {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[architecture]


class TopKEncoder(torch.autograd.Function):
    """pre = (x - b_dec) @ W_enc + b_enc, then its top k per row, and optionally its top k_aux per
    row among the latents marked dead. Only B * (k + k_aux) entries of pre carry a gradient, so the
    backward pass gathers and segment-sums those instead of forming a dense [B, n] gradient and
    multiplying it back through two [B, n] x [n, d] matmuls (what autograd does through topk).

    forward(x [B, d], W_enc [d, n], b_enc [n], b_dec [d], k, dead [n] bool | None, k_aux)
      -> values [B, k], indices [B, k], aux_values [B, k_aux], aux_indices [B, k_aux]
      (pre-activations before ReLU; aux values of latents that are not dead are -inf).
    backward, with g the gradient of the selected entries, flattened to pairs (row b, latent m):
      grad_W_enc[:, m] = sum_{pairs at m} g * (x[b] - b_dec)   one embedding_bag over latent-sorted pairs
      grad_b_enc[m]    = sum_{pairs at m} g                    index_add
      grad_b_dec       = -W_enc @ grad_b_enc                   [d, n] x [n]
      grad_x[b]        = sum_{pairs at b} g * W_enc[:, m]      embedding_bag, only if x needs a grad
    Under autocast the [B, d] x [d, n] matmul runs in the autocast dtype; values come back in x's
    dtype and the backward runs in fp32.
    """

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_dec, k, dead, k_aux):
        x_centered = x - b_dec
        pre = torch.addmm(b_enc, x_centered, W_enc)
        values, indices = row_topk(pre, k)
        if k_aux > 0:
            aux_values, aux_indices = pre.masked_fill_(~dead, float("-inf")).topk(k_aux, dim=-1, sorted=False)
        else:
            aux_values = pre.new_empty(x.shape[0], 0)
            aux_indices = indices.new_empty(x.shape[0], 0)
        ctx.save_for_backward(x_centered, W_enc, indices, aux_indices)
        ctx.mark_non_differentiable(indices, aux_indices)
        return values.to(x.dtype), indices, aux_values.to(x.dtype), aux_indices

    @staticmethod
    def backward(ctx, grad_values, _grad_indices, grad_aux_values, _grad_aux_indices):
        x_centered, W_enc, indices, aux_indices = ctx.saved_tensors
        if grad_values is None:  # only the aux outputs were used
            grad_values = torch.zeros(indices.shape, dtype=W_enc.dtype, device=W_enc.device)
        if grad_aux_values is not None and aux_indices.shape[1] > 0:
            indices = torch.cat([indices, aux_indices], dim=1)
            grad_values = torch.cat([grad_values, grad_aux_values], dim=1)
        grad_values = grad_values.to(W_enc.dtype)
        latents, weights = indices.reshape(-1), grad_values.reshape(-1)
        rows = torch.div(torch.arange(len(latents), device=latents.device), indices.shape[1], rounding_mode="floor")
        grad_W_enc, grad_b_enc, grad_b_dec = _encoder_grads(ctx.needs_input_grad, x_centered, W_enc, rows,
                                                            latents, weights)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(indices, W_enc.T.contiguous(), mode="sum", per_sample_weights=grad_values)
        return grad_x, grad_W_enc, grad_b_enc, grad_b_dec, None, None, None


class BatchTopKEncoder(torch.autograd.Function):
    """TopKEncoder for BatchTopK: the k x B largest entries of pre [B, n] over the whole batch
    instead of k per row, so a row holds any number of them; the AuxK part is TopKEncoder's (per row).

    forward(x [B, d], W_enc, b_enc, b_dec, k, width, dead [n] bool | None, k_aux)
      -> values [k B] (pre-activations before ReLU), positions [k B] (row * n + latent, ascending),
         aux_values [B, k_aux], aux_indices [B, k_aux]
    The selection looks first among each row's top `width` entries: the k B largest of those are
    the batch's unless some row had all `width` of its candidates chosen (then an entry beyond
    them may be larger than the smallest chosen one), in which case it selects over all B x n
    entries (slower, same result). backward: TopKEncoder's, over the (row, latent) pairs.
    """

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_dec, k, width, dead, k_aux):
        x_centered = x - b_dec
        pre = torch.addmm(b_enc, x_centered, W_enc)
        values, positions = batch_topk(pre, k * x.shape[0], width)
        if k_aux > 0:
            aux_values, aux_indices = pre.masked_fill_(~dead, float("-inf")).topk(k_aux, dim=-1, sorted=False)
        else:
            aux_values = pre.new_empty(x.shape[0], 0)
            aux_indices = positions.new_empty(x.shape[0], 0)
        ctx.save_for_backward(x_centered, W_enc, positions, aux_indices)
        ctx.mark_non_differentiable(positions, aux_indices)
        return values.to(x.dtype), positions, aux_values.to(x.dtype), aux_indices

    @staticmethod
    def backward(ctx, grad_values, _grad_positions, grad_aux_values, _grad_aux_indices):
        x_centered, W_enc, positions, aux_indices = ctx.saved_tensors
        n_features = W_enc.shape[1]
        if grad_values is None:  # only the aux outputs were used
            grad_values = torch.zeros(positions.shape, dtype=W_enc.dtype, device=W_enc.device)
        rows, latents = positions // n_features, positions % n_features
        weights = grad_values.to(W_enc.dtype)
        use_aux = grad_aux_values is not None and aux_indices.shape[1] > 0
        all_rows, all_latents, all_weights = rows, latents, weights
        if use_aux:
            aux_weights = grad_aux_values.to(W_enc.dtype)
            aux_rows = torch.arange(len(aux_indices), device=rows.device).repeat_interleave(aux_indices.shape[1])
            all_rows, all_latents = torch.cat([rows, aux_rows]), torch.cat([latents, aux_indices.reshape(-1)])
            all_weights = torch.cat([weights, aux_weights.reshape(-1)])
        grad_W_enc, grad_b_enc, grad_b_dec = _encoder_grads(ctx.needs_input_grad, x_centered, W_enc, all_rows,
                                                            all_latents, all_weights)
        grad_x = None
        if ctx.needs_input_grad[0]:
            # The pairs are grouped by row: bag b holds row b's latents.
            W_enc_t = W_enc.T.contiguous()
            starts = torch.searchsorted(rows, torch.arange(len(x_centered), device=rows.device))
            grad_x = F.embedding_bag(latents, W_enc_t, starts, mode="sum", per_sample_weights=weights)
            if use_aux:
                grad_x = grad_x + F.embedding_bag(aux_indices, W_enc_t, mode="sum", per_sample_weights=aux_weights)
        return grad_x, grad_W_enc, grad_b_enc, grad_b_dec, None, None, None, None


TOPK_GROUPS = 256  # row_topk: latents m, m + 256, m + 512, ... form one group


def row_topk(pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """pre.topk(k, dim=-1) of pre [B, n], unsorted, in two cheaper passes on CPU: the k largest
    entries of a row lie in the k groups of latents with the largest maxima (any other group's
    entries are at most the k-th largest group maximum, and k larger entries exist), so each row
    takes the top k among those groups' members only: 1/4 of the row at n 2048, k 32."""
    n_rows, n = pre.shape
    per_group = n // TOPK_GROUPS
    if pre.device.type != "cpu" or n % TOPK_GROUPS or k * per_group * 2 > n:
        return pre.topk(k, dim=-1, sorted=False)
    group_max = pre.view(n_rows, per_group, TOPK_GROUPS).amax(dim=1)
    groups = group_max.topk(k, dim=-1, sorted=False).indices
    members = (groups.unsqueeze(-1) + TOPK_GROUPS * torch.arange(per_group, device=pre.device)).view(n_rows, -1)
    values, picked = pre.gather(1, members).topk(k, dim=-1, sorted=False)
    return values, members.gather(1, picked)


def batch_topk(pre: Tensor, count: int, width: int) -> tuple[Tensor, Tensor]:
    """The `count` largest entries of pre [B, n] (values, positions row * n + latent ascending), found
    among each row's top `width` first (BatchTopKEncoder)."""
    n_rows, n_features = pre.shape
    if width < n_features:
        candidate_values, candidate_latents = pre.topk(width, dim=-1, sorted=False)
        values, chosen = candidate_values.flatten().topk(count, sorted=False)
        chosen_rows = torch.div(chosen, width, rounding_mode="floor")
        if not (torch.bincount(chosen_rows, minlength=n_rows) == width).any():
            positions = chosen_rows * n_features + candidate_latents.flatten()[chosen]
            order = positions.argsort()
            return values[order], positions[order]
    values, positions = pre.flatten().topk(count, sorted=False)
    order = positions.argsort()
    return values[order], positions[order]


def _encoder_grads(needs_input_grad, x_centered: Tensor, W_enc: Tensor, rows: Tensor, latents: Tensor,
                   weights: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """grad_W_enc, grad_b_enc, grad_b_dec of an encoder whose selected entries pre[rows, latents]
    have gradients `weights` (flat pairs), as TopKEncoder's docstring gives them; None where not needed."""
    n_features = W_enc.shape[1]
    grad_W_enc = grad_b_enc = grad_b_dec = None
    if needs_input_grad[1]:
        # Pairs grouped by latent: bag m of the embedding_bag holds the rows that selected m.
        order = latents.argsort(stable=True)
        counts = torch.bincount(latents, minlength=n_features)
        grad_W_enc = F.embedding_bag(rows[order], x_centered, counts.cumsum(0) - counts, mode="sum",
                                     per_sample_weights=weights[order]).T
    if needs_input_grad[2] or needs_input_grad[3]:
        grad_b_enc = torch.zeros(n_features, dtype=W_enc.dtype, device=W_enc.device)
        grad_b_enc.index_add_(0, latents, weights)
        grad_b_dec = -(W_enc @ grad_b_enc)
    return grad_W_enc, grad_b_enc, grad_b_dec


def _check_hook_name(hook_name: str) -> None:
    # The hook name becomes a directory name under saelens/.
    if not hook_name or hook_name in (".", "..") or "/" in hook_name or "\\" in hook_name:
        raise ValueError(f"hook_name must be a single path component, got {hook_name!r}")


def _sparsify_tensors(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    # sparsify keeps the encoder as nn.Linear: weight [n, d_in] = W_enc.T.
    return {"encoder.weight": tensors["W_enc"].T.contiguous(), "encoder.bias": tensors["b_enc"],
            "W_dec": tensors["W_dec"], "b_dec": tensors["b_dec"]}


def load_weights_only(path: str | Path, allowed: list = ()):
    """torch.load with torch's weights-only unpickler (tensors, plain containers and the `allowed`
    globals): a file holding anything else is refused with a ValueError naming it, never run."""
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(f"{path} holds Python objects besides tensors, which qsae never unpickles") from None
    except (RuntimeError, EOFError, OSError) as err:
        reason = first_line(err)
        raise ValueError(f"{path} is unreadable ({reason})") from None


def _read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt", device="cpu") as f:
        return {name: f.get_tensor(name) for name in f.keys()}, f.metadata() or {}


def _read_dir(path: Path) -> tuple[dict[str, Tensor], int | None, str]:
    """Tensors, k and architecture from a SAELens hook directory or a sparsify layer directory."""
    cfg_path = path / SAELENS_CFG
    if not cfg_path.is_file():
        raise ValueError(f"{path} has no {SAELENS_CFG}; not a SAELens or sparsify SAE directory")
    cfg = json.loads(cfg_path.read_text())
    if (path / SAELENS_WEIGHTS).is_file():
        tensors, _ = _read_safetensors(path / SAELENS_WEIGHTS)
        if cfg.get("architecture") == "topk":
            return tensors, cfg.get("k"), "topk"
        if cfg.get("architecture") == "jumprelu" and THRESHOLD in tensors:
            return _saelens_batchtopk(cfg_path, cfg, tensors)
        raise ValueError(f"{cfg_path}: architecture {cfg.get('architecture')!r} is neither 'topk' nor "
                         "'jumprelu' (the layout of a BatchTopK SAE)")
    if (path / SPARSIFY_WEIGHTS).is_file():
        if cfg.get("activation", "topk") != "topk" or cfg.get("transcode") or cfg.get("skip_connection"):
            raise ValueError(f"{cfg_path}: only plain TopK sparse autoencoders load as TopKSAE")
        raw, _ = _read_safetensors(path / SPARSIFY_WEIGHTS)
        missing = {"encoder.weight", "encoder.bias", "W_dec", "b_dec"} - set(raw)
        if missing:
            raise ValueError(f"{path / SPARSIFY_WEIGHTS} lacks tensors {sorted(missing)}")
        tensors = {"W_enc": raw["encoder.weight"].T, "b_enc": raw["encoder.bias"],
                   "W_dec": raw["W_dec"], "b_dec": raw["b_dec"]}
        return tensors, cfg.get("k"), "topk"
    raise ValueError(f"{path} has neither {SAELENS_WEIGHTS} (SAELens) nor {SPARSIFY_WEIGHTS} (sparsify)")


def _saelens_batchtopk(cfg_path: Path, cfg: dict, tensors: dict[str, Tensor]) -> tuple[dict[str, Tensor], int | None, str]:
    """A SAELens JumpReLU directory as a BatchTopK SAE: one threshold shared by every latent (as
    SAELens's BatchTopK trainer and qsae write it), k from the metadata's training details."""
    threshold = tensors[THRESHOLD].reshape(-1)
    if len(threshold) == 0 or not (threshold == threshold[0]).all():
        raise ValueError(f"{cfg_path}: the JumpReLU thresholds differ between latents; only a BatchTopK SAE, "
                         "with one threshold for all latents, loads as BatchTopKSAE")
    k = ((cfg.get("metadata") or {}).get("training_architecture_details") or {}).get("k")
    if k is not None and k != int(k):
        raise ValueError(f"{cfg_path}: k = {k} is not a whole number of latents")
    return {**tensors, THRESHOLD: threshold[0].clone()}, None if k is None else int(k), "batchtopk"
