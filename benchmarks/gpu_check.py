"""A GPU check anyone can run: qsae's own SAE trainer at the original release's shape and at 65,536
latents, and qsae's capture pass on CUDA against CPU, reported as one table.

    python benchmarks/gpu_check.py [--smoke] [--out FILE] [--wide-tokens N] [--wide-max-seconds S]

Run it from anywhere: qsae is imported from the checkout this script sits in (no install needed).
It needs torch, transformers, safetensors, numpy, pyarrow and tqdm; no Ray, no vLLM, no network,
and nothing is downloaded (the tiny model of part (c) is built locally into ~/.cache/qsae, or
$QSAE_CACHE, on first use: about a minute on CPU). Sized to finish within 8 minutes on one H100/H200
(estimated, not yet timed there: the n=4096 rows are likely bound by the host, which gathers the whole
4 GB sample in a new order every epoch; each 65,536-latent row is cut at --wide-max-seconds).
`--smoke` runs the same code at a tiny size (on CUDA when there is one, else CPU) in seconds;
without --smoke and without CUDA it exits with status 2 and writes nothing.

What it measures, one table row each. Training rows come from a planted dictionary (the recipe of
benchmarks/bench_train.py, drawn on the GPU): 4 x n atoms (n = 4096) of unit norm in d_in = 5120
dimensions, 32 per row with power-law frequencies, exponential coefficients, 5% Gaussian noise.
  (a) "train n=4096": qsae.training.loop.train_sae at the original release's shape (d_in 5120, n 4096, k 32,
      batch 4096, 200,000 rows, 20 epochs, the whole sample shuffled each epoch) with recipe
      "original", recipe "modern", and "modern" with bf16 autocast.
  (b) "train n=65536": the same trainer, modern and modern bf16, at 65,536 latents for a token budget
      (--wide-tokens, 2M by default; each run's steps are also cut at --wide-max-seconds). A latent counts as
      dead after 50 silent steps here (500 in the recipe), so the AuxK term, which is on for nearly
      all of a long run, is in the measurement; the rows stream through qsae's default 65,536-row
      shuffle buffer, as a 200M-token run read from the store would. The note extrapolates the rate to
      3 layers x 200M tokens, to set against a published third-party run that took about 35 h for
      that on one 96 GB GPU.
  (c) "capture tiny": qsae.capture.capture_residuals (the hooked forward pass that produces stored
      rows) on the tiny Qwen3.5 hybrid model (Gated DeltaNet + full attention, as Qwen3.6-27B), on
      the same sequences on CPU and on CUDA, both float32, every layer.

How to read the columns:
  seconds       wall time of the whole call (training: row scan, initialisation and all epochs;
                capture: the device pass only).
  tokens/s      n=4096: rows x epochs / train_sae's training seconds (history["seconds"]: the epochs,
                host-side shuffling and host-to-device copies included, set-up excluded).
                n=65536: tokens / seconds over the steps after the first 50 (steady state, AuxK in).
                capture: tokens in the sequences / seconds of the device pass.
  FVU           training fraction of variance unexplained: the last epoch's pooled FVU
                (history["fvu"][-1]); n=65536: the mean batch FVU of the last 20 steps.
  held-out FVU  sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 on 16,384 rows of the same distribution
                never trained on (fp32 forward). Lower is better; modern should beat original, bf16
                should be close to fp32.
  peak GPU GiB  torch.cuda.max_memory_allocated over the call, after reset_peak_memory_stats; "-"
                on CPU.
  note          capture: the largest absolute difference between CPU and CUDA rows, the largest
                relative one (per row, ||cuda - cpu|| / ||cpu||), and PASS when the relative one is
                at most 1e-3. TF32 is switched off for that pass (torch.backends.cuda.matmul and
                cudnn .allow_tf32 = False): both sides are then IEEE fp32 and differ only by
                summation order and kernel choice, ~1e-6 relative per op, so 1e-3 after 12 layers
                leaves wide margin, while a padding, layer or dtype bug shows up far above it. TF32
                rounds matmul inputs to 10 mantissa bits (~5e-4 relative), which would sit at the
                tolerance. The fp32 training rows run with torch's default, TF32 off. If the
                flash-linear-attention kernels (fla) are installed, transformers binds Qwen3.5's
                delta rule to them for every device (Triton, whose fp32 dots may use TF32; the CPU
                pass may then fail and the row read ERROR); the note names the kernels in use.
A measurement that raises is reported as an ERROR row and the next one runs. Exit status: 0 when
every row is fine, 1 when a row failed (error, non-finite FVU, capture FAIL), 2 without CUDA.

The table is printed and written to --out (default gpu_check.txt in the current directory), with
the raw numbers in a JSON file beside it (same stem, .json); both are rewritten after every row,
so a run cut short keeps what it measured.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import json
import math
import os
import sys
import time
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # qsae from this checkout, whether or not it is installed
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local files only: never wait on an unreachable hub

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor  # noqa: E402

from qsae.capture import capture_residuals  # noqa: E402
from qsae.config import TrainConfig  # noqa: E402
from qsae.files import atomic_write  # noqa: E402
from qsae.models import decoder_layers, load_model, resolve_model_path  # noqa: E402
from qsae.questions import BUNDLED_QUESTIONS, chat_prompt, format_prompt, load_questions  # noqa: E402
from qsae.sae import TopKSAE  # noqa: E402
from qsae.tiny import practice_response  # noqa: E402
from qsae.training.loop import train_sae  # noqa: E402
from qsae.training.state import Progress  # noqa: E402
from qsae.training.trained import recipe_settings  # noqa: E402

NO_CUDA = "no CUDA device: run with --smoke for the CPU check"
ZIPF_EXPONENT, ATOMS_PER_LATENT, NOISE_FRACTION = 1.1, 4, 0.05  # benchmarks/bench_train.py's recipe
CAPTURE_RTOL = 1e-3  # max ||cuda - cpu|| / ||cpu|| per row (module docstring)
EXTRAPOLATE_TOKENS = 3 * 200_000_000  # 3 layers x 200M tokens
PUBLISHED_HOURS = 35  # the third-party run of that size on one 96 GB GPU
TRAIN_FVU_STEPS = 20  # n=65536: train FVU = mean batch FVU of the last this many steps


@dataclass(frozen=True)
class Sizes:
    d_in: int
    n_features: int  # (a)
    k: int
    batch_size: int
    train_rows: int
    held_out_rows: int
    epochs: int
    active: int  # planted atoms per row
    wide_features: int  # (b)
    wide_tokens: int
    wide_dead_after_steps: int
    wide_max_seconds: float
    capture_sequences: int  # (c)


FULL = Sizes(d_in=5120, n_features=4096, k=32, batch_size=4096, train_rows=200_000, held_out_rows=16_384,
             epochs=20, active=32, wide_features=65_536, wide_tokens=2_000_000, wide_dead_after_steps=50,
             wide_max_seconds=45, capture_sequences=6)
SMOKE = Sizes(d_in=64, n_features=128, k=8, batch_size=256, train_rows=4096, held_out_rows=1024, epochs=2,
              active=8, wide_features=1024, wide_tokens=2048, wide_dead_after_steps=4, wide_max_seconds=60,
              capture_sequences=4)


@dataclass
class Row:
    """One measurement: the table's columns, whether it passed, and raw numbers for the JSON."""

    what: str
    setting: str
    seconds: float | None = None
    tokens_per_s: float | None = None
    fvu: float | None = None
    held_out_fvu: float | None = None
    peak_gpu_gib: float | None = None
    note: str = ""
    ok: bool = True
    raw: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------
# Device helpers: no-ops on CPU


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@contextmanager
def ieee_fp32():
    """fp32 matmuls and convolutions without TF32 on CUDA, for the capture comparison."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# ------------------------------------------------------------------------------------------------
# Data and evaluation


@torch.no_grad()
def planted_rows(n_rows: int, d_in: int, n_atoms: int, active: int, seed: int, device: torch.device,
                 chunk_rows: int = 16_384) -> np.ndarray:
    """Rows drawn on `device` a chunk at a time into one host array (train_sae takes a host array):
    each the sum of `active` unit atoms picked with replacement, atom i (from 1) with probability
    proportional to i ** -1.1, with exponential coefficients, plus Gaussian noise at 5% of the
    signal's per-dimension scale (measured on the first chunk)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    atoms = torch.randn(n_atoms, d_in, generator=gen, device=device)
    atoms /= atoms.norm(dim=1, keepdim=True)
    frequency = torch.arange(1, n_atoms + 1, device=device, dtype=torch.float32) ** -ZIPF_EXPONENT
    out = np.empty((n_rows, d_in), dtype=np.float32)
    noise = None
    for start in range(0, n_rows, chunk_rows):
        m = min(chunk_rows, n_rows - start)
        support = torch.multinomial(frequency, m * active, replacement=True, generator=gen).view(m, active)
        coefficients = torch.empty(m, active, device=device).exponential_(generator=gen)
        rows = F.embedding_bag(support, atoms, per_sample_weights=coefficients, mode="sum")
        noise = NOISE_FRACTION * rows.std().item() if noise is None else noise
        rows += noise * torch.randn(rows.shape, generator=gen, device=device)
        out[start:start + m] = rows.cpu().numpy()
    return out


@torch.no_grad()
def held_out_fvu(sae: TopKSAE, x: Tensor, batch_size: int) -> float:
    """Pooled FVU on rows the SAE never saw, fp32 forward, sums in float64."""
    sq_error = sum(float((xb - sae(xb)).double().pow(2).sum()) for xb in x.split(batch_size))
    centred = x.double() - x.double().mean(dim=0)
    return sq_error / float(centred.pow(2).sum())


def setting_name(recipe: str, bf16: bool) -> str:
    return f"{recipe} bf16" if bf16 else recipe


# ------------------------------------------------------------------------------------------------
# (a) the original release's shape


def train_release_shape(rows: np.ndarray, held_out: Tensor, sizes: Sizes, device: torch.device,
                        recipe: str, bf16: bool) -> Row:
    cfg = TrainConfig(recipe=recipe, autocast_bf16=bf16, n_features=sizes.n_features, k=sizes.k,
                      epochs=sizes.epochs, batch_size=sizes.batch_size,
                      shuffle_buffer_rows=len(rows),  # the whole sample shuffled every epoch
                      device=str(device))
    reset_peak(device)
    started = time.perf_counter()
    sae, history = train_sae(rows, cfg)
    sync(device)
    seconds = time.perf_counter() - started
    peak = peak_gib(device)
    tokens = len(rows) * cfg.epochs
    fvu, held_out = history["fvu"][-1], held_out_fvu(sae, held_out, cfg.batch_size)
    return Row(f"train n={cfg.n_features}", setting_name(recipe, bf16), seconds, tokens / history["seconds"],
               fvu, held_out, peak,
               note=f"{len(rows):,} rows x {cfg.epochs} epochs, lr {cfg.learning_rate():.1e}, "
                    f"{history['seconds']:.1f} s training",
               ok=math.isfinite(fvu) and math.isfinite(held_out),
               raw={"tokens": tokens, "train_seconds": history["seconds"], "steps": history["steps"],
                    "revived": history["revived"], "fvu_per_epoch": history["fvu"],
                    "config": recipe_settings(cfg)})


# ------------------------------------------------------------------------------------------------
# (b) 65,536 latents for a token budget


class Stop(Exception):
    """Raised from on_step to end a run: train_sae has no step limit of its own."""


class StepClock:
    """on_step callback for the wide runs: ends the run (raising Stop) after `max_steps` steps or
    once `max_seconds` have passed since step 1 (set-up is never cut short), and keeps synchronised
    times at step 1, at step `warm_steps` and at the last step, so that the rate can leave out
    set-up and the steps before any latent can count as dead. At the end it keeps the SAE and the
    step metrics."""

    def __init__(self, device: torch.device, warm_steps: int, max_steps: int, max_seconds: float):
        self.device, self.warm_steps, self.max_steps, self.max_seconds = device, warm_steps, max_steps, max_seconds
        self.marks: dict[str, tuple[int, float]] = {}  # "first", "warm", "end" -> (step, time)
        self.metrics: dict = {}
        self.sae: TopKSAE | None = None
        self.cut = False

    def mark(self, name: str, step: int) -> None:
        sync(self.device)
        self.marks[name] = (step, time.perf_counter())

    def __call__(self, progress: Progress) -> None:
        if progress.step == 1:
            self.mark("first", 1)
        if progress.step == self.warm_steps:
            self.mark("warm", progress.step)
        self.cut = progress.step > 1 and time.perf_counter() - self.marks["first"][1] > self.max_seconds
        if progress.step >= self.max_steps or self.cut or progress.done:
            self.mark("end", progress.step)
            self.metrics, self.sae = progress.metrics(), progress.sae
            raise Stop

    def timed_window(self) -> tuple[int, float, int, float]:
        """(first step, its time, last step, its time) of the steady-state window."""
        start = self.marks.get("warm", self.marks["first"])
        if start[0] >= self.marks["end"][0]:  # cut before the warm step: from step 1 then
            start = self.marks["first"]
        return (*start, *self.marks["end"])


def train_wide(rows: np.ndarray, held_out: Tensor, sizes: Sizes, device: torch.device, bf16: bool) -> Row:
    batch = sizes.batch_size
    max_steps = max(2, math.ceil(sizes.wide_tokens / batch))
    n_rows = min(len(rows), max_steps * batch) // batch * batch  # whole batches: every step is `batch` tokens
    cfg = TrainConfig(recipe="modern", autocast_bf16=bf16, n_features=sizes.wide_features, k=sizes.k,
                      epochs=math.ceil(max_steps * batch / n_rows), batch_size=batch,
                      dead_after_steps=sizes.wide_dead_after_steps, device=str(device))
    warm = min(sizes.wide_dead_after_steps, max_steps - 1)
    reset_peak(device)
    started = time.perf_counter()
    clock = StepClock(device, warm, max_steps, sizes.wide_max_seconds)
    try:
        train_sae(rows[:n_rows], cfg, on_step=clock)
    except Stop:
        pass
    seconds = time.perf_counter() - started
    peak = peak_gib(device)
    first, t0, last, t1 = clock.timed_window()
    rate = (last - first) * batch / (t1 - t0) if last > first else math.nan  # nan: cut at step 1
    hours = EXTRAPOLATE_TOKENS / rate / 3600
    step_fvu = clock.metrics["step_fvu"]
    fvu = float(np.mean(step_fvu[-TRAIN_FVU_STEPS:]))
    held_out = held_out_fvu(clock.sae, held_out, batch)
    dead = clock.metrics["dead_fraction"]
    cut = f", cut at {sizes.wide_max_seconds:g} s" if clock.cut and last < max_steps else ""
    note = (f"{last} of {max_steps} steps{cut}; rate over steps {first + 1}-{last}, dead {dead:.0%}; "
            f"3 layers x 200M tokens: {hours:.1f} h (published run: ~{PUBLISHED_HOURS} h)")
    return Row(f"train n={cfg.n_features}", setting_name("modern", bf16), seconds, rate, fvu, held_out, peak,
               note=note, ok=all(math.isfinite(v) for v in (rate, fvu, held_out)),
               raw={"steps": last, "max_steps": max_steps, "tokens": last * batch, "cut_by_time": bool(cut),
                    "rate_steps": [first + 1, last], "rate_seconds": t1 - t0, "dead_fraction": dead,
                    "extrapolated_hours": hours, "extrapolated_tokens": EXTRAPOLATE_TOKENS,
                    "published_hours": PUBLISHED_HOURS, "config": recipe_settings(cfg)})


# ------------------------------------------------------------------------------------------------
# (c) capture on CUDA against CPU


def practice_sequences(tokenizer, n: int) -> tuple[list[list[int]], list[int]]:
    """Chat prompt + a practice response for the first n bundled questions, as capture sees a
    rollout: (token ids, index of the first response token)."""
    sequences, starts = [], []
    for q in load_questions(BUNDLED_QUESTIONS)[:n]:
        prompt = tokenizer(chat_prompt(tokenizer, format_prompt(q), thinking=False), add_special_tokens=False).input_ids
        response = tokenizer(practice_response(q, q.answer_letter), add_special_tokens=False).input_ids
        sequences.append(prompt + response + [tokenizer.eos_token_id])
        starts.append(len(prompt))
    return sequences, starts


def capture_check(sizes: Sizes, device: torch.device) -> Row:
    path = resolve_model_path("tiny")
    reference_model, tokenizer = load_model(path, dtype="float32", device="cpu")
    sequences, starts = practice_sequences(tokenizer, sizes.capture_sequences)
    layers = list(range(len(decoder_layers(reference_model))))
    # batch_size 2 over sequences of different lengths: right padding is part of what is compared.
    reference = capture_residuals(reference_model, sequences, starts, layers, batch_size=2)
    del reference_model
    with ieee_fp32():
        model, _ = load_model(path, dtype="float32", device=str(device))  # as a capture replica loads it
        reset_peak(device)
        started = time.perf_counter()
        rows = capture_residuals(model, sequences, starts, layers, batch_size=2)
        sync(device)
        seconds = time.perf_counter() - started
    peak = peak_gib(device)
    max_abs = max_rel = 0.0
    for layer in layers:
        cpu, other = np.concatenate(reference[layer]), np.concatenate(rows[layer])
        difference = np.abs(other - cpu)
        max_abs = max(max_abs, float(difference.max()))
        row_norm = np.maximum(np.linalg.norm(cpu, axis=1), np.finfo(np.float32).tiny)
        max_rel = max(max_rel, float((np.linalg.norm(other - cpu, axis=1) / row_norm).max()))
    passed = max_rel <= CAPTURE_RTOL
    kernels = [name for name in ("fla", "causal_conv1d") if importlib.util.find_spec(name) is not None]
    tokens = sum(len(seq) for seq in sequences)
    note = (f"{'PASS' if passed else 'FAIL'}: max abs diff {max_abs:.3g}, max rel diff {max_rel:.3g} "
            f"(tol {CAPTURE_RTOL:g}, TF32 off); {len(sequences)} sequences, {len(layers)} layers, "
            f"linear attention: {'+'.join(kernels) + ' kernels' if kernels else 'torch reference'}")
    return Row("capture tiny", f"cpu vs {device.type} fp32", seconds, tokens / seconds, None, None, peak,
               note=note, ok=passed,
               raw={"device": device.type, "max_abs_diff": max_abs, "max_rel_diff": max_rel,
                    "rtol": CAPTURE_RTOL, "passed": passed, "tokens": tokens, "layers": layers,
                    "response_rows": sum(len(seq) - s for seq, s in zip(sequences, starts)),
                    "fast_kernels": kernels})


# ------------------------------------------------------------------------------------------------
# Report


COLUMNS = ("what", "setting", "seconds", "tokens/s", "FVU", "held-out FVU", "peak GPU GiB", "note")


def cell(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(header: str, rows: list[Row]) -> str:
    """The header line, then the columns: text left-aligned, numbers right-aligned, the note last."""
    cells = [list(COLUMNS)] + [
        [r.what, r.setting, cell(r.seconds, ".1f"), cell(r.tokens_per_s, ",.0f"), cell(r.fvu, ".4f"),
         cell(r.held_out_fvu, ".4f"), cell(r.peak_gpu_gib, ".2f"), r.note] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS) - 1)]
    lines = [header]
    for line in cells:
        padded = [text.ljust(w) if i < 2 else text.rjust(w) for i, (text, w) in enumerate(zip(line, widths))]
        lines.append("  ".join(padded + [line[-1]]).rstrip())
    return "\n".join(lines)


def describe_device(device: torch.device) -> dict:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda,
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32}


class Report:
    """Rows so far, printed at the end and rewritten to the table file and its JSON after each row."""

    def __init__(self, out: Path, info: dict, smoke: bool):
        self.out, self.info, self.smoke, self.rows = out, info, smoke, []
        self.started = time.perf_counter()

    def header(self) -> str:
        i, s = self.info, self.info["sizes"]
        return (f"qsae gpu_check{' --smoke' if self.smoke else ''} | device {i['device']} | torch {i['torch']} | "
                f"CUDA {i['cuda'] or 'none'} | TF32 matmul {'on' if i['tf32_matmul'] else 'off'} | "
                f"d_in {s['d_in']}, k {s['k']}, batch {s['batch_size']}")

    def text(self) -> str:
        return table(self.header(), self.rows)

    def add(self, row: Row) -> None:
        self.rows.append(row)
        text = self.text()
        atomic_write(self.out, lambda tmp: Path(tmp).write_text(text + "\n"))
        raw = {**self.info, "smoke": self.smoke, "header": self.header(),
               "elapsed_seconds": time.perf_counter() - self.started,
               "rows": [dataclasses.asdict(r) for r in self.rows]}
        atomic_write(self.out.with_suffix(".json"), lambda tmp: Path(tmp).write_text(json.dumps(raw, indent=1) + "\n"))


def measure(what: str, setting: str, run: Callable[[], Row], device: torch.device) -> Row:
    """run(), or an ERROR row when it raises (the traceback goes to stderr), so later rows still run."""
    started = time.perf_counter()
    try:
        row = run()
    except Exception as err:  # noqa: BLE001 - reported in the table, the exit status says it failed
        traceback.print_exc()
        row = Row(what, setting, note=f"ERROR {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}",
                  ok=False)
    free_memory(device)
    print(f"gpu_check: {what} {setting}: {'ok' if row.ok else 'FAILED'} in {time.perf_counter() - started:.0f} s",
          file=sys.stderr, flush=True)
    return row


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds, on CPU when there is no CUDA")
    parser.add_argument("--out", type=Path, default=Path("gpu_check.txt"),
                        help="table file (default gpu_check.txt); the JSON goes beside it as <stem>.json")
    parser.add_argument("--wide-tokens", type=int, default=None,
                        help=f"token budget of each 65,536-latent run (default {FULL.wide_tokens:,})")
    parser.add_argument("--wide-max-seconds", type=float, default=None,
                        help=f"cut each 65,536-latent run after this long (default {FULL.wide_max_seconds:g})")
    args = parser.parse_args(argv)
    if args.out.suffix == ".json":
        parser.error("--out names the table; the JSON is written beside it with the suffix .json")
    for name in ("wide_tokens", "wide_max_seconds"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        print(f"gpu_check: {NO_CUDA}", file=sys.stderr)
        return 2
    if device.type == "cpu":
        # The smoke check's matrices are tiny: more threads gain nothing, and on a shared CPU OpenMP's
        # spin-waiting slows them several-fold.
        torch.set_num_threads(1)
    sizes = SMOKE if args.smoke else FULL
    overrides = {"wide_tokens": args.wide_tokens, "wide_max_seconds": args.wide_max_seconds}
    sizes = dataclasses.replace(sizes, **{k: v for k, v in overrides.items() if v is not None})
    report = Report(args.out, {**describe_device(device), "sizes": dataclasses.asdict(sizes)}, args.smoke)

    started = time.perf_counter()
    rows = planted_rows(sizes.train_rows + sizes.held_out_rows, sizes.d_in, ATOMS_PER_LATENT * sizes.n_features,
                        sizes.active, seed=0, device=device)
    train, held_out = rows[:sizes.train_rows], torch.from_numpy(rows[sizes.train_rows:]).to(device)
    report.info["data_seconds"] = time.perf_counter() - started
    print(f"gpu_check: {len(rows):,} planted rows in {report.info['data_seconds']:.0f} s", file=sys.stderr)

    runs = [(f"train n={sizes.n_features}", setting_name(recipe, bf16),
             lambda recipe=recipe, bf16=bf16: train_release_shape(train, held_out, sizes, device, recipe, bf16))
            for recipe, bf16 in (("original", False), ("modern", False), ("modern", True))]
    runs += [(f"train n={sizes.wide_features}", setting_name("modern", bf16),
              lambda bf16=bf16: train_wide(train, held_out, sizes, device, bf16)) for bf16 in (False, True)]
    runs.append(("capture tiny", f"cpu vs {device.type} fp32", lambda: capture_check(sizes, device)))
    for what, setting, run in runs:
        report.add(measure(what, setting, run, device))
    print(report.text(), flush=True)
    return 0 if all(row.ok for row in report.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
