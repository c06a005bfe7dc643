"""TopK and BatchTopK sparse autoencoders over residual-stream rows (their files: qsae.sae_files).

Parameter names and shapes follow the original release (`W_enc [d_in, n]`, `b_enc [n]`,
`W_dec [n, d_in]`, `b_dec [d_in]`, fp32). `TopKEncoder` is the training-speed path: the encoder's
top-k with a backward pass that touches only the selected latents; `BatchTopKEncoder` does the same
for BatchTopK's top k x B over a batch.

`BatchTopKSAE` (Bussmann et al. 2024, "BatchTopK Sparse Autoencoders", arXiv:2412.06410) trains
with the top k x B pre-activations of a whole batch of B rows, so a row may use more or fewer than
k latents, and encodes at inference with a learned threshold instead: z = ReLU(pre) * (pre > threshold),
one scalar for all latents (the training rule is in qsae.training.recipes).

`MatryoshkaBatchTopKSAE` (Bussmann et al. 2025, "Learning Multi-Level Features with Matryoshka
Sparse Autoencoders", arXiv:2503.17547) selects latents as BatchTopK does, and trains every nested
prefix of the dictionary (latents 0..p-1 for each width p in `prefixes`) to reconstruct on its own,
so that the first latents carry the most general features; it encodes exactly as BatchTopK.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qsae.config import matryoshka_prefixes

PARAM_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec")
THRESHOLD = "threshold"  # BatchTopK's inference threshold: a scalar tensor
PREFIXES = "prefixes"  # Matryoshka's nested prefix widths: an int64 tensor [m], the last n_features
# BatchTopK's fixed-width sparse view (encode_topk) keeps min(n, this x k) latents per row.
SPARSE_WIDTH_PER_K = 4
# decoder_sum multiplies densely once k is at least 1 / 32 of the latents: a float32 matmul at ~67
# TFLOP/s against a gather at ~4.8 TB/s breaks even near n / k = 28 on an H100/H200 (estimates).
DENSE_DECODE_SHARE = 32


class TopKSAE(nn.Module):
    """`encode(x)`: pre = (x - b_dec) @ W_enc + b_enc, keep the top k of pre, ReLU, scatter into zeros.
    `decode(z)`: z @ W_dec + b_dec."""

    architecture = "topk"

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
        return self.decoder_sum(values, indices, dense=False) + self.b_dec

    def decoder_sum(self, values: Tensor, indices: Tensor, *, dense: bool | None = None) -> Tensor:
        """sum_j values[..., j] * W_dec[indices[..., j]]: [..., d_in], without b_dec.

        A gather of k decoder rows per row reads B k d_in numbers; where k is a large share of the
        latents (AuxK's d_in / 2 picks) one dense [B, n] @ W_dec reads W_dec once and runs as a
        matmul instead (at k 2,560, d_in 5,120, B 4,096 the gather reads ~0.2 TB a step). `dense`
        None chooses by DENSE_DECODE_SHARE; the two sum in different orders (equal to rounding)."""
        k = indices.shape[-1]
        if k * DENSE_DECODE_SHARE >= self.n_features if dense is None else dense:
            codes = values.new_zeros(*values.shape[:-1], self.n_features).scatter_add(-1, indices, values)
            return codes @ self.W_dec
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

    def reconstruction_term(self, x: Tensor, values: Tensor, indices: Tensor, sq_error: Tensor) -> Tensor:
        """The reconstruction term of the training loss on a batch x from encode_for_training's
        (values, indices), given sq_error = sum ||x - x_hat||^2 of the whole dictionary: that sum."""
        return sq_error

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Project decoder rows back to unit norm (the recipe's constraint, applied after each step)."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(torch.finfo(self.W_dec.dtype).eps))

    @classmethod
    def tensor_names(cls) -> tuple[str, ...]:
        """The tensors of its release files and state dict."""
        return PARAM_NAMES

    def release_tensors(self) -> dict[str, Tensor]:
        """The release tensors (tensor_names) as contiguous CPU tensors, detached from autograd: fp32,
        integers (Matryoshka's prefixes) as they are."""
        return {name: release_tensor(getattr(self, name)) for name in self.tensor_names()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], k: int, architecture: str | None = None) -> TopKSAE:
        """Build from a state dict with exactly the release tensors of one architecture: the four
        parameters (TopK), plus a scalar `threshold` (BatchTopK), plus the integer `prefixes`
        (Matryoshka BatchTopK). The tensors decide the class, so
        TopKSAE.from_tensors of a BatchTopK state dict gives a BatchTopKSAE; `architecture`, where
        the file records one, must agree with them. Shapes are checked."""
        stored = (MatryoshkaBatchTopKSAE if PREFIXES in tensors else BatchTopKSAE if THRESHOLD in tensors
                  else TopKSAE)
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
        options = stored.stored_options(tensors, n_features)
        with torch.device("meta"):  # shapes only: no random init, no global RNG draw
            sae = stored(d_in, n_features, k, **options)
        expected = sae.state_dict()
        for name, tensor in expected.items():
            if tensors[name].shape != tensor.shape:
                raise ValueError(f"{name} has shape {tuple(tensors[name].shape)}, "
                                 f"expected {tuple(tensor.shape)} for d_in={d_in}, n={n_features}")
        sae.load_state_dict({name: t.to(expected[name].dtype).contiguous() for name, t in tensors.items()},
                            assign=True)
        return sae

    @classmethod
    def stored_options(cls, tensors: dict[str, Tensor], n_features: int) -> dict:
        """The constructor's arguments besides the sizes, as a state dict records them."""
        return {}


def release_tensor(tensor: Tensor) -> Tensor:
    """A tensor as the files hold it: on the CPU, contiguous, floating point as fp32."""
    return tensor.detach().to("cpu", torch.float32 if tensor.is_floating_point() else tensor.dtype).contiguous()


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


class MatryoshkaBatchTopKSAE(BatchTopKSAE):
    """Matryoshka BatchTopK (module docstring): BatchTopK's selection and inference, and a training
    loss that is the mean over the nested prefixes of each one's reconstruction error
    (reconstruction_term). `prefixes` (a buffer, so checkpoints and files keep it) holds the widths,
    strictly increasing, the last n_features; empty asks for qsae.config.matryoshka_prefixes'
    default doubling."""

    architecture = "matryoshka-batchtopk"
    prefixes: Tensor

    def __init__(self, d_in: int, n_features: int, k: int, prefixes: Sequence[int] = ()):
        super().__init__(d_in, n_features, k)
        self.register_buffer(PREFIXES, torch.tensor(matryoshka_prefixes(list(prefixes), n_features), dtype=torch.long))

    @classmethod
    def tensor_names(cls) -> tuple[str, ...]:
        return (*PARAM_NAMES, THRESHOLD, PREFIXES)

    @classmethod
    def stored_options(cls, tensors: dict[str, Tensor], n_features: int) -> dict:
        prefixes = tensors[PREFIXES]
        if prefixes.ndim != 1 or prefixes.is_floating_point():
            raise ValueError(f"{PREFIXES} must be a 1-D integer tensor, got {prefixes.dtype} of shape {tuple(prefixes.shape)}")
        asked = prefixes.tolist()
        if not asked or asked[-1] != n_features:
            raise ValueError(f"{PREFIXES} {asked} must end at n_features={n_features}")
        return {"prefixes": asked}

    def reconstruction_term(self, x: Tensor, values: Tensor, indices: Tensor, sq_error: Tensor) -> Tensor:
        """The mean over the prefixes of sum ||x - x_hat_p||^2, x_hat_p decoded from the selected
        latents below p; the last prefix is the whole dictionary, whose error sq_error already is."""
        rows, latents = indices // self.n_features, indices % self.n_features
        inner = prefix_sq_errors(x, values, rows, latents, self.prefixes[:-1], self.W_dec, self.b_dec)
        return (inner.sum() + sq_error) / len(self.prefixes)


def prefix_sq_errors(x: Tensor, values: Tensor, rows: Tensor, latents: Tensor, prefixes: Tensor,
                     W_dec: Tensor, b_dec: Tensor) -> Tensor:
    """sum over the batch x [B, d] of ||x - x_hat_p||^2 for each width p of `prefixes` [m] (int64,
    increasing): x_hat_p = b_dec + sum of values[j] W_dec[latents[j]] over the selected pairs j of
    the row with latents[j] < p. The pairs are grouped by row, latents ascending within a row (as
    BatchTopKEncoder returns them). Each pair falls in the group of the first prefix that holds it
    (group m: none), so one bag per (row, group) sums them and a cumulative sum over the groups
    gives every prefix's reconstruction: [m] sums."""
    batch_rows, groups = len(x), len(prefixes) + 1
    bags = rows * groups + torch.searchsorted(prefixes, latents, right=True)  # ascending: sorted by row, then latent
    starts = torch.searchsorted(bags, torch.arange(batch_rows * groups, device=bags.device))
    sums = F.embedding_bag(latents, W_dec, starts, mode="sum", per_sample_weights=values)
    x_hats = sums.view(batch_rows, groups, -1)[:, :-1].cumsum(dim=1) + b_dec
    return (x_hats - x.unsqueeze(1)).pow(2).sum(dim=(0, 2))


ARCHITECTURES = {"topk": TopKSAE, "batchtopk": BatchTopKSAE, "matryoshka-batchtopk": MatryoshkaBatchTopKSAE}


def sae_class(architecture: str) -> type[TopKSAE]:
    """The SAE class of an architecture name ("topk" | "batchtopk" | "matryoshka-batchtopk")."""
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
        grad_W_enc, grad_b_enc, grad_b_dec = _encoder_grads(ctx.needs_input_grad, x_centered, W_enc, rows=rows,
                                                            latents=latents, weights=weights)
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
        grad_W_enc, grad_b_enc, grad_b_dec = _encoder_grads(ctx.needs_input_grad, x_centered, W_enc, rows=all_rows,
                                                            latents=all_latents, weights=all_weights)
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


def _encoder_grads(needs_input_grad, x_centered: Tensor, W_enc: Tensor, *, rows: Tensor, latents: Tensor,
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
