"""`qsae train` against sparsify on a planted dictionary: whole-process wall time and held-out FVU.

    python benchmarks/bench_train.py [--train-rows 500000] [--epochs 2] [--repeats 3] [--quick]
                                     [--methods modern,original,sparsify] [--sparsify-python PATH]

Data (seeded, written once to --data-dir as train.npy and held_out.npy, reused while the settings
match): a planted dictionary of --atoms random unit atoms in --d-in dimensions. Each row draws
--active distinct atoms, atom i (from 0) with probability proportional to 1 / (i + 10) (Zipf-like;
drawn in sequence without replacement), with log-normal coefficients exp(N(--coef-mu,
--coef-sigma^2)), plus isotropic Gaussian noise whose variance is --noise (2%) of the rows' total
variance. The held-out rows are drawn from the same dictionary after the training rows.

Methods, each one whole process (start-up, imports, data scan, initialisation, checkpoints and
output files included), timed from spawn to exit, one after another (a round), --repeats rounds:
- "qsae modern": `python -m qsae.cli train --activations train.npy --layer 0 --n-features N --k K
  --epochs E --batch-size B --out DIR`, qsae's defaults (the modern recipe);
- "qsae original": the same with `--recipe original`;
- "qsae modern fp32" and "qsae modern bf16" (only when asked for in --methods): the same as modern
  with `--no-autocast-bf16` or `--autocast-bf16` (the modern default is bf16 where the device
  multiplies bf16 natively; elsewhere bf16 matmuls are far slower than fp32);
- "sparsify": EleutherAI sparsify's own `Trainer` at its defaults (SparseCoderConfig(num_latents=N,
  k=K); TrainConfig defaults: the "signum" optimizer, sign descent under a schedule-free wrapper at
  lr 5e-3 / sqrt(N / 2**14), b_dec at the first batch's mean, no AuxK), run by --sparsify-python
  (default: this interpreter) when it can import sparsify. Its trainer reads activations through a
  model's forward hooks, so the rows are served by a stand-in model whose one layer returns the
  rows its input ids index, one "sequence" of --batch-size shuffled rows per step (each epoch its
  own seeded permutation, the last batch of an epoch short), batch size 1 sequence.

Reported per method (median over the rounds for seconds; the quality of the first round's run,
which is deterministic for a given seed): whole-process wall seconds; tokens/s = train rows x
epochs / those seconds; held-out FVU, pooled: sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over the
held-out rows, from the SAE file the process wrote (qsae: load_sae of the .safetensors;
sparsify: its SparseCoder.load_from_disk, evaluated by --sparsify-python); L0 = mean number of
positive latents per held-out row; dead % = latents that fire on no held-out row; and wall time
over the original recipe's; then the CPU seconds the process used (user + system, children
included) and their ratio to the original's: on a machine shared with other load, a steadier
measure of the work than wall time. `--json PATH` also writes every run's numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ZIPF_OFFSET = 10  # atom i is drawn with probability proportional to 1 / (i + ZIPF_OFFSET)
METHODS = ("modern", "original", "modern-fp32", "modern-bf16", "sparsify")
LABELS = {"modern": "qsae modern", "original": "qsae original", "modern-fp32": "qsae modern fp32",
          "modern-bf16": "qsae modern bf16"}
HERE = Path(__file__).resolve()


# ------------------------------------------------------------------------------------------------
# Data


def draw_supports(rng: np.random.Generator, n_rows: int, n_atoms: int, active: int) -> np.ndarray:
    """[n_rows, active] distinct atom indices per row, drawn one after another with probability
    proportional to 1 / (i + ZIPF_OFFSET) among the atoms not drawn yet (weighted sampling without
    replacement): draws with replacement, keeping each row's first `active` distinct ones."""
    weights = 1.0 / (np.arange(n_atoms) + ZIPF_OFFSET)
    cdf = np.cumsum(weights / weights.sum())
    out = np.empty((n_rows, active), dtype=np.int64)
    todo = np.arange(n_rows)
    draws = 2 * active
    while len(todo):
        d = np.minimum(np.searchsorted(cdf, rng.random((len(todo), draws))), n_atoms - 1)
        order = np.argsort(d, axis=1, kind="stable")  # equal atoms keep their draw order
        repeat_sorted = np.take_along_axis(d, order, axis=1)
        repeat = np.zeros(d.shape, dtype=bool)
        np.put_along_axis(repeat, order[:, 1:], repeat_sorted[:, 1:] == repeat_sorted[:, :-1], axis=1)
        keep = ~repeat & (np.cumsum(~repeat, axis=1) <= active)
        full = keep.sum(axis=1) == active
        out[todo[full]] = d[full][keep[full]].reshape(-1, active)
        todo = todo[~full]  # rows with too many repeats draw again
    return out


def planted_rows(args: argparse.Namespace, n_rows: int, atoms: np.ndarray, rng: np.random.Generator,
                 noise_std: float | None, chunk: int = 8192) -> tuple[np.ndarray, float]:
    """Signal rows [n_rows, d_in] (float32) plus noise of per-dimension std noise_std (when given)."""
    out = np.empty((n_rows, atoms.shape[1]), dtype=np.float32)
    for start in range(0, n_rows, chunk):
        size = min(chunk, n_rows - start)
        support = draw_supports(rng, size, len(atoms), args.active)
        coef = rng.lognormal(args.coef_mu, args.coef_sigma, (size, args.active)).astype(np.float32)
        out[start:start + size] = np.einsum("ra,rad->rd", coef, atoms[support], optimize=True)
    signal_var = float(((out - out.mean(0, dtype=np.float64)) ** 2).sum(dtype=np.float64)) / n_rows
    if noise_std is None:
        # noise variance = noise of the total: noise_var = f / (1 - f) x signal variance
        noise_std = float(np.sqrt(args.noise / (1 - args.noise) * signal_var / atoms.shape[1]))
    for start in range(0, n_rows, chunk):
        rows = out[start:start + chunk]
        rows += noise_std * rng.standard_normal(rows.shape, dtype=np.float32)
    return out, noise_std


def data_files(args: argparse.Namespace) -> tuple[Path, Path]:
    """(train.npy, held_out.npy) for these settings, generated once."""
    key = (f"d{args.d_in}_a{args.atoms}_s{args.active}_mu{args.coef_mu}_sd{args.coef_sigma}_"
           f"noise{args.noise}_r{args.train_rows}_h{args.held_out_rows}_seed{args.seed}")
    folder = Path(args.data_dir) / key
    train, held_out = folder / "train.npy", folder / "held_out.npy"
    if train.exists() and held_out.exists():
        return train, held_out
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    atoms = rng.standard_normal((args.atoms, args.d_in)).astype(np.float32)
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    rows, noise_std = planted_rows(args, args.train_rows, atoms, rng, None)
    np.save(folder / "train.tmp.npy", rows)
    rows, _ = planted_rows(args, args.held_out_rows, atoms, rng, noise_std)
    np.save(folder / "held_out.tmp.npy", rows)
    os.replace(folder / "train.tmp.npy", train)
    os.replace(folder / "held_out.tmp.npy", held_out)
    print(f"[bench] planted data written to {folder} in {time.perf_counter() - started:.0f} s", flush=True)
    return train, held_out


# ------------------------------------------------------------------------------------------------
# Held-out quality (runs under either interpreter: numpy and torch only, the SAE's own package lazily)


def held_out_metrics(reconstruct, held_out: np.ndarray, n_features: int, chunk: int = 8192) -> dict:
    """reconstruct(x) -> (x_hat, latent indices [B, k], latent values [B, k]); pooled FVU, L0, dead."""
    import torch

    sq_error, active = 0.0, 0
    fired = torch.zeros(n_features, dtype=torch.bool)
    x_all = torch.from_numpy(np.ascontiguousarray(held_out, dtype=np.float32))
    with torch.no_grad():
        for start in range(0, len(x_all), chunk):
            x = x_all[start:start + chunk]
            x_hat, indices, values = reconstruct(x)
            sq_error += (x - x_hat.float()).double().pow(2).sum().item()
            positive = values > 0
            active += int(positive.sum())
            fired[indices[positive]] = True
    x64 = x_all.double()
    total = (x64 - x64.mean(0)).pow(2).sum().item()
    return {"fvu": sq_error / total, "l0": active / len(x_all), "dead": 1.0 - fired.float().mean().item()}


def evaluate(kind: str, sae_path: str, held_out_path: str) -> dict:
    held_out = np.load(held_out_path)
    if kind == "qsae":
        from qsae.sae_files import load_sae

        sae = load_sae(sae_path)

        def reconstruct(x):
            values, indices = sae.encode_topk(x)
            return sae.decode_topk(values, indices), indices, values

        return held_out_metrics(reconstruct, held_out, sae.n_features)
    from sparsify import SparseCoder

    sae = SparseCoder.load_from_disk(sae_path)

    def reconstruct(x):
        out = sae(x)
        return out.sae_out, out.latent_indices, out.latent_acts

    return held_out_metrics(reconstruct, held_out, sae.num_latents)


# ------------------------------------------------------------------------------------------------
# sparsify's own trainer, fed by a stand-in model (runs in the --sparsify-python process)


def sparsify_train(train_path: str, out: str, n_features: int, k: int, epochs: int, batch_size: int,
                   seed: int) -> None:
    import torch
    from sparsify import SaeConfig, TrainConfig, Trainer
    from torch import nn
    from transformers import PretrainedConfig, PreTrainedModel

    rows = torch.from_numpy(np.load(train_path))  # the trainer reads them through the model: in memory

    class RowsConfig(PretrainedConfig):
        model_type = "bench_rows"

    class RowsModel(PreTrainedModel):
        """One identity layer over the rows its input ids index: sparsify hooks that layer's output."""
        config_class = RowsConfig

        def __init__(self, config):
            super().__init__(config)
            self.register_buffer("rows", rows, persistent=False)
            self.anchor = nn.Parameter(torch.zeros(1), requires_grad=False)  # model.device reads a parameter
            self.layers = nn.ModuleList([nn.Identity()])

        def forward(self, input_ids, **_):
            hidden = nn.functional.embedding(input_ids, self.rows)
            for layer in self.layers:
                hidden = layer(hidden)
            return hidden

    class Sequences(torch.utils.data.Dataset):
        """Each epoch: a seeded permutation of the rows cut into 'sequences' of batch_size rows."""

        def __init__(self):
            n = len(rows)
            self.per_epoch = -(-n // batch_size)
            self.orders = [torch.from_numpy(np.random.default_rng([seed, epoch]).permutation(n))
                           for epoch in range(1, epochs + 1)]

        def __len__(self):
            return epochs * self.per_epoch

        def __getitem__(self, i):
            epoch, j = divmod(i, self.per_epoch)
            return {"input_ids": self.orders[epoch][j * batch_size:(j + 1) * batch_size]}

    model = RowsModel(RowsConfig(num_hidden_layers=1))
    cfg = TrainConfig(SaeConfig(num_latents=n_features, k=k), batch_size=1, layers=[0], init_seeds=[seed],
                      log_to_wandb=False, save_dir=out, run_name="run")
    Trainer(cfg, Sequences(), model).fit()


# ------------------------------------------------------------------------------------------------
# Driver


def can_import_sparsify(python: str) -> str | None:
    """sparsify's version under that interpreter, or None."""
    probe = "import importlib.metadata, sparsify; print(importlib.metadata.version('eai-sparsify'))"
    try:
        done = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip().splitlines()[-1] if done.returncode == 0 and done.stdout.strip() else None


def command(method: str, args: argparse.Namespace, train: Path, out: Path) -> list[str]:
    if method == "sparsify":
        return [args.sparsify_python, str(HERE), "_sparsify-train", str(train), str(out), str(args.n_features),
                str(args.k), str(args.epochs), str(args.batch_size), str(args.seed)]
    cmd = [sys.executable, "-m", "qsae.cli", "train", "--activations", str(train), "--layer", "0",
           "--n-features", str(args.n_features), "--k", str(args.k), "--epochs", str(args.epochs),
           "--batch-size", str(args.batch_size), "--out", str(out)]
    if method == "original":
        cmd += ["--recipe", "original"]
    if method in ("modern-fp32", "modern-bf16"):
        cmd += ["--no-autocast-bf16" if method == "modern-fp32" else "--autocast-bf16"]
    return cmd + list(args.qsae_arg)


def run_once(method: str, args: argparse.Namespace, train: Path, held_out: Path, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    log = out / "log.txt"
    with open(log, "w") as sink:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        done = subprocess.run(command(method, args, train, out), stdout=sink, stderr=subprocess.STDOUT)
        seconds = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    if done.returncode != 0:
        raise RuntimeError(f"{method} failed (exit {done.returncode}); see {log}:\n{log.read_text()[-2000:]}")
    if method == "sparsify":
        probe = [args.sparsify_python, str(HERE), "_evaluate", "sparsify", str(out / "run" / "layers.0"), str(held_out)]
    else:
        probe = [sys.executable, str(HERE), "_evaluate", "qsae",
                 str(out / f"sae_L0_n{args.n_features}_k{args.k}.safetensors"), str(held_out)]
    quality = subprocess.run(probe, capture_output=True, text=True, check=True)
    return {"method": method, "seconds": seconds, "cpu_seconds": cpu, **json.loads(quality.stdout.strip().splitlines()[-1])}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d-in", type=int, default=512)
    parser.add_argument("--atoms", type=int, default=2048, help="planted dictionary size")
    parser.add_argument("--active", type=int, default=16, help="distinct atoms per row")
    parser.add_argument("--coef-mu", type=float, default=0.0, help="log-normal coefficients: mean of the log")
    parser.add_argument("--coef-sigma", type=float, default=0.5, help="log-normal coefficients: std of the log")
    parser.add_argument("--noise", type=float, default=0.02, help="noise variance as a fraction of the rows' total")
    parser.add_argument("--train-rows", type=int, default=500_000)
    parser.add_argument("--held-out-rows", type=int, default=50_000)
    parser.add_argument("--n-features", type=int, default=2048)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="seeds the data and every trainer")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of all methods; seconds are medians")
    parser.add_argument("--methods", default="modern,original,sparsify",
                        help=f"comma-separated, run in this order each round, from {', '.join(METHODS)}")
    parser.add_argument("--quick", action="store_true",
                        help="a small size for trying things: 65,536 train rows, 16,384 held out")
    parser.add_argument("--sparsify-python", default=sys.executable,
                        help="interpreter that can import sparsify (e.g. a separate venv's python)")
    parser.add_argument("--qsae-arg", action="append", default=[], metavar="ARG",
                        help="extra argument for every `qsae train` (repeatable, e.g. --qsae-arg=--lr=1e-3)")
    parser.add_argument("--data-dir", default=str(Path(tempfile.gettempdir()) / "qsae-bench-train"))
    parser.add_argument("--json", help="also write every run's numbers here")
    args = parser.parse_args(argv)
    if args.quick:
        args.train_rows, args.held_out_rows = 65_536, 16_384
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; choose from {', '.join(METHODS)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    train, held_out = data_files(args)
    labels = dict(LABELS)
    if "sparsify" in args.methods:
        version = can_import_sparsify(args.sparsify_python)
        if version is None:
            print(f"sparsify is not importable by {args.sparsify_python}: its row is skipped", flush=True)
            args.methods.remove("sparsify")
        labels["sparsify"] = f"sparsify {version}"
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-train-") as scratch:
        for round_ in range(args.repeats):
            for method in args.methods:
                result = run_once(method, args, train, held_out, Path(scratch) / f"{method}-{round_}")
                runs.append({"round": round_, **result})
                print(f"[bench] round {round_ + 1}/{args.repeats} {labels[method]}: {result['seconds']:.1f} s, "
                      f"held-out FVU {result['fvu']:.4f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": runs}, indent=1))

    tokens = args.train_rows * args.epochs
    seconds = {m: statistics.median(r["seconds"] for r in runs if r["method"] == m) for m in args.methods}
    cpu = {m: statistics.median(r["cpu_seconds"] for r in runs if r["method"] == m) for m in args.methods}
    first = {m: next(r for r in runs if r["method"] == m) for m in args.methods}
    print(f"\nplanted dictionary: d_in {args.d_in}, {args.atoms} atoms (p_i ~ 1/(i+{ZIPF_OFFSET})), {args.active} "
          f"per row, log-normal coefficients (mu {args.coef_mu}, sigma {args.coef_sigma}), noise "
          f"{100 * args.noise:g}% of the variance; {args.train_rows} train rows x {args.epochs} epochs = {tokens} "
          f"tokens, {args.held_out_rows} held-out rows; SAE n {args.n_features}, k {args.k}, batch "
          f"{args.batch_size}; {os.cpu_count()} CPUs; seconds = whole process, median of {args.repeats}")
    print(f"{'method':<20} {'seconds':>8} {'tokens/s':>9} {'FVU':>7} {'L0':>6} {'dead %':>7} {'/ original':>10} "
          f"{'CPU s':>8} {'CPU / orig':>10}")
    for method in args.methods:
        m = first[method]
        ratio, cpu_ratio = (f"{seconds[method] / seconds['original']:>10.3f}", f"{cpu[method] / cpu['original']:>10.3f}") \
            if "original" in seconds else (f"{'-':>10}", f"{'-':>10}")
        print(f"{labels[method]:<20} {seconds[method]:>8.1f} {tokens / seconds[method]:>9.0f} {m['fvu']:>7.4f} "
              f"{m['l0']:>6.1f} {100 * m['dead']:>7.1f} {ratio} {cpu[method]:>8.1f} {cpu_ratio}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_evaluate":
        print(json.dumps(evaluate(*sys.argv[2:5])))
    elif len(sys.argv) > 1 and sys.argv[1] == "_sparsify-train":
        a = sys.argv[2:]
        sparsify_train(a[0], a[1], *map(int, a[2:7]))
    else:
        main()
