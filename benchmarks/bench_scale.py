"""How a run scales: store bytes per layer, driver memory and stage wall times per 1,000 rollouts.

    python benchmarks/bench_scale.py [--questions 1000] [--samples 2] [--max-new-tokens 64]
                                     [--keep-per-rollout 40] [--response-tokens 2000] [--work DIR] [--keep]

Generates --questions multiple-choice questions (seeded, varied text, answers spread over the letters)
as a JSONL file in the work directory, then runs, one after the other, as a user would:
- "full": `python jobs/release.py --out WORK/full` on those questions with --samples sampled rollouts
  each (temperature 0.8), --max-new-tokens, and small train/release settings (tests/multinode_run.py's);
  the store keeps every response position;
- "bounded": `python -m qsae capture --out WORK/bounded`, the same questions and rollouts (same
  seeds, so the same tokens) with capture.keep_per_rollout = --keep-per-rollout; capture only.
The baseline is the full run: the bounded store is reported against it (full / bounded).

Reported, measured and per 1,000 rollouts (every number scaled linearly by 1,000 / rollouts; fixed
costs such as Ray's start-up and the driver's baseline memory do not really scale, so small runs
overstate them): store bytes per layer (the sum of the layer's .arrow files), each stage's wall seconds
(the full run's timings.json), the driver's peak RSS (VmHWM of the driver process alone, polled from
/proc while it runs: Ray's workers, raylet and GCS are separate processes and are not counted), and
and the encode pass's wall time against capture's (both stages of the full run, which encodes every
response token: release.every_token is on by default). Then the store the same rules imply for all 26,529 SuperGPQA questions
on Qwen3.6-27B (d_model 5120, 3 layers, float16), with and without the bounded store, and the hours
each stage of that run would take on --gpus GPUs at stated per-GPU rates (estimates, not measured here).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from qsae.questions import LETTERS
from qsae.store import KeptPositions, read_manifest, row_bytes

ROOT = Path(__file__).resolve().parent.parent
PER = 1000  # the unit: per 1,000 rollouts
SUPERGPQA_QUESTIONS = 26_529
REAL_D_MODEL, REAL_LAYERS, REAL_DTYPE = 5120, 3, "float16"  # Qwen3.6-27B at layers 11/31/55, float16 store
REAL_FEATURES = 4096
# configs/supergpqa_full.toml's training: rows per layer, epochs, data-parallel GPUs per layer.
TRAIN_ROWS, TRAIN_EPOCHS, TRAIN_GPUS_PER_LAYER = 1_000_000, 20, 2
# Its fidelity: release.fidelity_rollouts held-out rollouts, about ten forward passes each, a task per layer.
FIDELITY_ROLLOUTS, FIDELITY_PASSES = 256, 10
# Small training and analysis settings that finish in minutes on a laptop CPU (tests/multinode_run.py's RUN).
SMALL = ["train.n_features=32", "train.k=4", "train.epochs=3", "train.batch_size=64", "release.bootstrap=20",
         "release.permutations=50", "causal.features=1", "causal.questions=2"]
ENCODE, CAPTURE = "encode", "capture"  # stage names as timings.json starts them


# ------------------------------------------------------------------------------------------------
# Questions


WORDS = ("amber", "basalt", "cobalt", "delta", "ember", "fjord", "granite", "harbor", "indigo", "juniper", "kelp",
         "lantern", "meadow", "nickel", "orchid", "pebble", "quartz", "ridge", "saffron", "tundra", "umber",
         "velvet", "willow", "xenon", "yarrow", "zephyr")
UNITS = (("metres", "kilometre", 1000), ("grams", "kilogram", 1000), ("seconds", "hour", 3600),
         ("minutes", "day", 1440), ("millilitres", "litre", 1000), ("centimetres", "metre", 100))


def draw_question(rng: np.random.Generator) -> tuple[str, object, list, tuple[str, str, str]]:
    """(question text, answer, a pool of distractors, (discipline, field, subfield)); numbers vary per draw."""
    kind = rng.integers(5)
    if kind == 0:
        a, b = (int(x) for x in rng.integers(10, 1000, 2))
        op = str(rng.choice(["+", "-", "x"]))
        answer = {"+": a + b, "-": a - b, "x": a * b}[op]
        return f"What is {a} {op} {b}?", answer, [answer + d for d in range(-30, 31) if d], \
            ("Science", "Mathematics", "Arithmetic")
    if kind == 1:
        a, b = int(rng.integers(100, 10_000)), int(rng.integers(3, 40))
        return f"What is the remainder when {a} is divided by {b}?", a % b, list(range(b + 10)), \
            ("Science", "Mathematics", "Number Theory")
    if kind == 2:
        small, big, factor = UNITS[rng.integers(len(UNITS))]
        n = int(rng.integers(2, 60))
        answer = n * factor
        return f"How many {small} are there in {n} {big}s?", answer, \
            [answer + factor * d for d in range(-20, 21) if d] + [n * factor // 10, n * factor * 10], \
            ("Engineering", "Metrology", "Unit Conversion")
    if kind == 3:
        numbers = [int(x) for x in rng.choice(100_000, 12, replace=False)]
        largest = bool(rng.integers(2))
        answer = max(numbers) if largest else min(numbers)
        return f"Which of the following numbers is the {'largest' if largest else 'smallest'}?", answer, \
            [x for x in numbers if x != answer], ("Science", "Mathematics", "Order")
    words = [str(w) for w in rng.choice(WORDS, 12, replace=False)]
    return "Which of these words comes first in alphabetical order?", min(words), \
        [w for w in words if w != min(words)], ("Humanities", "Linguistics", "Lexicography")


def write_questions(path: Path, n: int, seed: int = 0) -> None:
    """n questions in the bundled file's shape (qsae/data/questions.jsonl): 4 to 10 distinct options,
    the answer at a uniformly drawn letter, so prompts differ and answers spread over the letters."""
    rng = np.random.default_rng(seed)
    with open(path, "w", encoding="utf-8") as out:
        for i in range(n):
            text, answer, pool, (discipline, field, subfield) = draw_question(rng)
            n_options = int(rng.integers(4, len(LETTERS) + 1))
            pool = sorted({str(x) for x in pool} - {str(answer)})  # distinct and never the answer's text
            options = [str(x) for x in rng.choice(pool, min(n_options - 1, len(pool)), replace=False)]
            at = int(rng.integers(len(options) + 1))
            options.insert(at, str(answer))
            out.write(json.dumps({
                "uuid": f"bench-{i:06d}", "question": text, "options": options, "answer": str(answer),
                "answer_letter": LETTERS[at], "discipline": discipline, "field": field, "subfield": subfield,
                "difficulty": str(rng.choice(["easy", "middle", "hard"])),
            }) + "\n")


# ------------------------------------------------------------------------------------------------
# Runs


def peak_rss_bytes(pid: int) -> int | None:
    """VmHWM (the kernel's high-water mark of the process's resident set) from /proc; None once gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def run_measured(cmd: list[str], label: str) -> tuple[float, int]:
    """Run cmd with its console on ours (qsae's progress lines show as it goes); (wall s, driver peak RSS).
    VmHWM only grows, so the last reading before exit misses at most the last 0.2 s of growth."""
    print(f"[bench] {label}: {' '.join(cmd)}", flush=True)
    started, peak = time.perf_counter(), 0
    process = subprocess.Popen(cmd, cwd=ROOT)
    while process.poll() is None:
        peak = max(peak, peak_rss_bytes(process.pid) or 0)
        time.sleep(0.2)
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        sys.exit(f"[bench] {label} failed (exit {process.returncode}); see its run.log")
    return seconds, peak


def store_sizes(run: Path) -> dict:
    """Per layer: bytes of its .arrow files and rows; and the rollouts, from the manifest."""
    store = run / "activations"
    manifest = read_manifest(store)
    shards = manifest["shards"].values()
    return {
        "rollouts": sum(s["rollouts"] for s in shards),
        "d_model": manifest["d_model"], "dtype": manifest["dtype"],
        "bytes": {int(layer): sum(f.stat().st_size for f in (store / f"layer={layer}").glob("*.arrow"))
                  for layer in manifest["layers"]},
        "rows": {int(layer): sum(s["rows"][str(layer)] for s in shards) for layer in manifest["layers"]},
    }


def stage_seconds(run: Path) -> dict[str, float]:
    """timings.json by stage name ("capture (80 questions, layers [3, 7, 11])" -> "capture"), in run order."""
    timings = json.loads((run / "timings.json").read_text())
    return {name.split(" (")[0]: seconds for name, seconds in timings.items()}


# ------------------------------------------------------------------------------------------------
# Report


def fmt_bytes(n: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def report(args, full: dict, bounded: dict, stages: dict[str, float], rss: int, bounded_s: float) -> None:
    rollouts = full["rollouts"]
    scale = PER / rollouts  # linear in rollouts, for every row
    rows = []  # (what, measured, per 1,000 rollouts)
    for layer in full["bytes"]:
        f, b = full["bytes"][layer], bounded["bytes"][layer]
        rows += [(f"store bytes, layer {layer}, every position", fmt_bytes(f), fmt_bytes(f * scale)),
                 (f"store bytes, layer {layer}, bounded (keep {args.keep_per_rollout})", fmt_bytes(b),
                  fmt_bytes(b * scale)),
                 (f"  full / bounded, layer {layer}", f"{f / b:.2f}x", f"{f / b:.2f}x")]
    rows.append(("driver peak RSS (driver only; scaling overstates)", fmt_bytes(rss), fmt_bytes(rss * scale)))
    for name, seconds in stages.items():
        rows.append((f"wall s: {name}", f"{seconds:.1f}", f"{seconds * scale:.1f}"))
    rows.append(("wall s: bounded run (qsae capture, whole process)", f"{bounded_s:.1f}", f"{bounded_s * scale:.1f}"))
    if ENCODE in stages and stages.get(CAPTURE):
        ratio = f"{stages[ENCODE] / stages[CAPTURE]:.2f}x"
        rows.append(("encode pass / capture (wall s)", ratio, ratio))
    else:
        rows.append(("encode pass: not run (release.every_token off)", "-", "-"))

    layer = next(iter(full["rows"]))
    mean_tokens = full["rows"][layer] / rollouts  # every response position is a row
    print(f"\ntiny model, {args.questions} generated questions x {args.samples} samples = {rollouts} rollouts, "
          f"max_new_tokens {args.max_new_tokens}, mean response {mean_tokens:.1f} tokens; store d_model "
          f"{full['d_model']} {full['dtype']}: {full['bytes'][layer] / full['rows'][layer]:.0f} B a row on disk, "
          f"{row_bytes(full['d_model'], full['dtype'])} B by row_bytes; per 1,000 rollouts = measured x {scale:.3g} "
          f"(linear)")
    if args.max_new_tokens <= args.keep_per_rollout:  # KeptPositions keeps all of a shorter response
        print(f"note: responses of at most {args.max_new_tokens} tokens keep every position under keep "
              f"{args.keep_per_rollout}: the bounded store cannot be smaller here")
    print(f"{'quantity':<52} {'measured':>12} {'per 1,000 rollouts':>19}")
    for what, measured, per in rows:
        print(f"{what:<52} {measured:>12} {per:>19}")
    project(args, full, bounded)


def project(args, full: dict, bounded: dict) -> None:
    """The store for every SuperGPQA question on Qwen3.6-27B under the same rules, from qsae's own row size."""
    rollouts = SUPERGPQA_QUESTIONS * args.samples
    size = row_bytes(REAL_D_MODEL, REAL_DTYPE)
    layer = next(iter(full["rows"]))
    lengths = [  # (response length, rows per rollout with every position, rows per rollout bounded)
        (f"{args.response_tokens} tokens (stated)", args.response_tokens,
         KeptPositions(per_rollout=args.keep_per_rollout).count(args.response_tokens)),
        (f"{full['rows'][layer] / full['rollouts']:.1f} tokens (tiny run's mean)",
         full["rows"][layer] / full["rollouts"], bounded["rows"][layer] / bounded["rollouts"]),
    ]
    print(f"\nimplied for all {SUPERGPQA_QUESTIONS:,} SuperGPQA questions x {args.samples} samples = {rollouts:,} "
          f"rollouts on Qwen3.6-27B (d_model {REAL_D_MODEL}, {REAL_DTYPE}: {size:,} B a row, {REAL_LAYERS} layers; "
          f"Arrow overhead not included)")
    print(f"{'response length':<34} {'every position / layer':>23} {'bounded / layer':>16} {'every, 3 layers':>16} "
          f"{'bounded, 3 layers':>18}")
    for label, full_rows, kept_rows in lengths:
        f, b = rollouts * full_rows * size, rollouts * kept_rows * size
        print(f"{label:<34} {fmt_bytes(f):>23} {fmt_bytes(b):>16} {fmt_bytes(f * REAL_LAYERS):>16} "
              f"{fmt_bytes(b * REAL_LAYERS):>18}")
    plan_hours(args, rollouts)


def plan_hours(args, rollouts: int) -> None:
    """Hours per stage of the same run on --gpus GPUs, from the stated per-GPU rates (estimates: none
    of these rates was measured here). Generation and the hooked forward passes scale with replicas;
    the three layers train at once, each on TRAIN_GPUS_PER_LAYER data-parallel workers."""
    generated = rollouts * args.response_tokens
    forward = rollouts * (args.prompt_tokens + args.response_tokens)  # prompt + response, once per rollout
    seconds = {
        "capture: generation": generated / (args.gpus * args.generate_tokens_per_s),
        "capture: hooked forward pass": forward / (args.gpus * args.forward_tokens_per_s),
        "train: 3 layers at once": TRAIN_ROWS * TRAIN_EPOCHS / (TRAIN_GPUS_PER_LAYER * args.train_rows_per_s),
        "encode pass (forward pass again)": forward / (args.gpus * args.forward_tokens_per_s),
        "evaluate: fidelity, 3 layers at once": FIDELITY_ROLLOUTS * FIDELITY_PASSES
        * (args.prompt_tokens + args.response_tokens) / args.forward_tokens_per_s,
    }
    pools = 3 * rollouts * REAL_FEATURES * 4  # one layer's max, mean and fire fraction: float32, R x n each
    print(f"\nestimated hours on {args.gpus} GPUs (stated rates per GPU: generation {args.generate_tokens_per_s:,} "
          f"tokens/s over a replica's batch, hooked forward {args.forward_tokens_per_s:,} tokens/s, training "
          f"{args.train_rows_per_s:,} rows/s a worker; prompts of {args.prompt_tokens} tokens)")
    for stage, s in seconds.items():
        print(f"{stage:<40} {s / 3600:>8.2f} h")
    print(f"{'total':<40} {sum(seconds.values()) / 3600:>8.2f} h")
    print(f"driver memory of the merged rollout pools, one layer at a time: {fmt_bytes(pools)} "
          f"({rollouts:,} rollouts x {REAL_FEATURES} features x 3 float32)")


# ------------------------------------------------------------------------------------------------
# Driver


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", type=int, default=1000, help="generated questions")
    parser.add_argument("--samples", type=int, default=2, help="rollout.samples_per_question")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="rollout.max_new_tokens")
    parser.add_argument("--keep-per-rollout", type=int, default=40, help="capture.keep_per_rollout of the bounded run")
    parser.add_argument("--response-tokens", type=int, default=2000, help="response length of the SuperGPQA projection")
    parser.add_argument("--prompt-tokens", type=int, default=400, help="prompt length of the SuperGPQA projection")
    parser.add_argument("--gpus", type=int, default=16, help="GPUs of the projection (one capture replica each)")
    parser.add_argument("--generate-tokens-per-s", type=int, default=600,
                        help="stated: a replica's vLLM generation rate over its batch (one shard of 32 prompts "
                             "at a time, eager decoding, waiting for the longest response)")
    parser.add_argument("--forward-tokens-per-s", type=int, default=5000,
                        help="stated: a replica's hooked forward pass (eager prefill, ~30%% of an H200's bf16 peak)")
    parser.add_argument("--train-rows-per-s", type=int, default=100_000, help="stated: one trainer worker's rate")
    parser.add_argument("--work", help="work directory (default: a temporary one, removed at the end unless --keep)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary work directory")
    args = parser.parse_args()

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-scale-"))
    full_dir, bounded_dir = work / "full", work / "bounded"
    for run in (full_dir, bounded_dir):
        if run.exists():  # a rerun into it would resume (skip captured shards) and measure nothing
            sys.exit(f"[bench] {run} exists: remove it or choose another --work")
    work.mkdir(parents=True, exist_ok=True)
    try:
        questions = work / "questions.jsonl"
        write_questions(questions, args.questions)
        common = [f"rollout.questions={json.dumps(str(questions))}", f"rollout.samples_per_question={args.samples}",
                  "rollout.temperature=0.8", f"rollout.max_new_tokens={args.max_new_tokens}", *SMALL]
        _, rss = run_measured([sys.executable, "jobs/release.py", "--out", str(full_dir), *common], "full run")
        # Capture only (rollouts + store, no training): the same seeds sample the same rollouts.
        bounded_s, _ = run_measured([sys.executable, "-m", "qsae", "capture", "--out", str(bounded_dir), *common,
                                     f"capture.keep_per_rollout={args.keep_per_rollout}"], "bounded capture")
        report(args, store_sizes(full_dir), store_sizes(bounded_dir), stage_seconds(full_dir), rss, bounded_s)
    finally:
        if args.work is None and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"[bench] work directory kept: {work}")


if __name__ == "__main__":
    main()
