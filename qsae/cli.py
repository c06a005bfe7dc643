"""Command line: `qsae release|capture|train|analyze|export` (also `python -m qsae`)."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

# Errors that mean "the input is wrong": reported in one line, exit status 2, no traceback.
USER_ERRORS = (ValueError, OSError, OverflowError)


def pipeline_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", help="TOML config (default: configs/tiny.toml, the embedded default)")
    parser.add_argument("--out", help="run directory (overrides the config's `out`)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. train.epochs=5")
    return parser


def load_pipeline_config(args):
    from qsae.config import load_config

    overrides = list(args.overrides) + ([f"out={json.dumps(args.out)}"] if args.out else [])
    return load_config(args.config, overrides)


def cmd_release(args) -> int:
    from qsae.pipeline import run_pipeline

    release_dir = run_pipeline(load_pipeline_config(args))
    print(f"[qsae] release written to {release_dir}")
    return 0


def cmd_capture(args) -> int:
    from qsae.distributed import run_capture
    from qsae.pipeline import connect_ray, prepare

    cfg = load_pipeline_config(args)
    questions, model_path, d_model = prepare(cfg)
    connect_ray(cfg.ray_address)
    run_dir = Path(cfg.out).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    manifest = run_capture(cfg, model_path, d_model, questions, run_dir)
    print(f"[qsae] {len(manifest['shards'])} shards captured in {run_dir / 'activations'}")
    return 0


def cmd_analyze(args) -> int:
    from qsae.distributed import causal_in_ray, model_side_in_ray
    from qsae.models import expand_layers, load_tokenizer, model_dims, resolve_model_path
    from qsae.pipeline import connect_ray, questions_path
    from qsae.questions import load_questions, sample_questions
    from qsae.release import build_release, check_trained_matches
    from qsae.rollout import read_rollouts
    from qsae.sample import RowRules, check_same_split, load_split
    from qsae.store import read_manifest
    from qsae.train import load_trained

    cfg = load_pipeline_config(args)
    run_dir = Path(cfg.out).resolve()
    model_path = resolve_model_path(cfg.model.name)
    cfg.capture.layers = expand_layers(cfg.capture.layers, model_dims(model_path, cfg.model.revision)[0])
    trained = {layer: load_trained(run_dir, layer) for layer in cfg.capture.layers}
    check_trained_matches(cfg, trained, read_manifest(run_dir / "activations"))  # all before Ray starts
    question_of = {r.rollout_id: r.question_id for r in read_rollouts(run_dir / "rollouts.parquet")}
    check_same_split(load_split(run_dir), RowRules.from_config(cfg), question_of)  # before Ray starts
    tokenizer = load_tokenizer(model_path, cfg.model.revision)
    questions = sample_questions(load_questions(questions_path(cfg)), cfg.rollout.num_questions, cfg.rollout.seed)
    connect_ray(cfg.ray_address)
    release_dir = build_release(cfg, run_dir, trained, tokenizer, {},
                                model_side_of=model_side_in_ray(cfg, model_path, trained),
                                causal_of=causal_in_ray(cfg, model_path, trained, questions))
    print(f"[qsae] release written to {release_dir}")
    return 0


CHECKPOINT = "checkpoint.pt"


def load_checkpoint(path: Path) -> dict:
    """A checkpoint `qsae train` wrote (train.load_training_state: no pickle is run)."""
    from qsae.train import load_training_state

    try:
        return load_training_state(path)
    except ValueError as err:
        raise ValueError(f"{err}; rerun with --restart to discard it") from err


def resume_state(checkpoint: Path, restart: bool, cfg, source) -> dict | None:
    """The checkpoint a killed run with this --out left, checked against this run; None to start
    fresh (none there, or --restart, which deletes it)."""
    from qsae.train import check_resumable

    if restart or not checkpoint.exists():
        checkpoint.unlink(missing_ok=True)
        return None
    state = load_checkpoint(checkpoint)
    try:
        check_resumable(state, cfg, source)
    except ValueError as err:
        raise ValueError(f"{checkpoint}: {err} (--restart discards it)") from err
    return state


def checkpoint_writer(checkpoint: Path, every: int):
    """on_step for train_sae: save the run every `every` steps (0 = never), by atomic rename, so a
    kill leaves the previous checkpoint or the new one, never half of one."""
    import torch

    from qsae.files import atomic_write

    def on_step(progress) -> None:
        if every and progress.step % every == 0 and not progress.done:
            atomic_write(checkpoint, lambda tmp: torch.save(progress.checkpoint(), tmp))

    return on_step


def cmd_train(args) -> int:
    from qsae.files import atomic_write_json, check_can_create_dir
    from qsae.store import open_rows
    from qsae.train import TrainConfig, train_sae

    if args.checkpoint_every < 0:
        raise ValueError(f"--checkpoint-every must be >= 0 (0 = never), got {args.checkpoint_every}")
    check_can_create_dir(args.out, "--out")  # before training, not after it
    cfg = TrainConfig(
        recipe=args.recipe, architecture=args.architecture, n_features=args.n_features, k=args.k, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, lr_decay_fraction=args.lr_decay_fraction,
        dead_after_steps=args.dead_after_steps, autocast_bf16=args.autocast_bf16, seed=args.seed,
        shuffle_buffer_rows=args.shuffle_buffer_rows, device=args.device,
    )
    source = open_rows(args.activations, args.layer)
    cfg.validate(source.d_in)
    out = Path(args.out)
    checkpoint = out / CHECKPOINT
    for unfinished in out.glob(f".{CHECKPOINT}.*.tmp"):  # a killed run's half-written checkpoint
        unfinished.unlink()
    resume = resume_state(checkpoint, args.restart, cfg, source)
    if resume is not None:
        print(f"[qsae] resuming from step {resume['history']['steps']} ({checkpoint})", flush=True)
    sae, history = train_sae(source, cfg, on_step=checkpoint_writer(checkpoint, args.checkpoint_every), resume=resume)
    files = sae.save_release(out, args.layer, f"blocks.{args.layer}.hook_resid_post")
    metrics = {"config": asdict(cfg.resolved()), "rows": source.n_rows, "d_in": source.d_in, **history}
    atomic_write_json(out / "metrics.json", metrics)
    # Outputs complete: drop the checkpoint, so a rerun into this --out trains afresh instead of
    # repeating the tail of this run.
    checkpoint.unlink(missing_ok=True)
    print(f"[qsae] trained SAE (final train FVU {history['fvu'][-1]:.4f}); wrote {len(files)} files to {out}")
    return 0


def cmd_export(args) -> int:
    from qsae.files import check_can_create_dir
    from qsae.sae import TopKSAE

    check_can_create_dir(args.out, "--out")
    sae = TopKSAE.load(args.sae, k=args.k)
    files = sae.save_release(Path(args.out), args.layer, f"blocks.{args.layer}.hook_resid_post")
    print(f"[qsae] exported layer {args.layer} SAE to {args.out}: {', '.join(sorted(p.name for p in files.values()))}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qsae", description="Sparse autoencoders for a model's residual stream")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func, help_text in (
        ("release", cmd_release, "whole pipeline: capture, train, analyze, release"),
        ("capture", cmd_capture, "rollouts and residual capture into the activation store"),
        ("analyze", cmd_analyze, "statistics, charts, exports and model card from a trained run"),
    ):
        p = sub.add_parser(name, help=help_text, parents=[pipeline_parser(name, help_text)], add_help=False)
        p.set_defaults(func=func)

    t = sub.add_parser("train", help="train one TopK (or BatchTopK) SAE on an activation store or a .npy file")
    t.add_argument("--activations", required=True, help="activation store directory (run or activations/) or 2-D .npy")
    t.add_argument("--layer", type=int, required=True, help="layer to read from a store; names the outputs")
    t.add_argument("--n-features", type=int, required=True)
    t.add_argument("--k", type=int, required=True)
    t.add_argument("--epochs", type=int, default=20)
    t.add_argument("--batch-size", type=int, default=4096)
    t.add_argument("--recipe", choices=["modern", "original"], default="modern", help="training recipe (README)")
    t.add_argument("--architecture", choices=["topk", "batchtopk"], default="topk",
                   help="topk, or batchtopk: top k x batch in training, a learned threshold after (modern recipe)")
    t.add_argument("--lr", type=float, help="Adam learning rate (default: the recipe's)")
    t.add_argument("--dead-after-steps", type=int, default=500,
                   help="a latent silent this many steps is dead (AuxK, revival)")
    t.add_argument("--shuffle-buffer-rows", type=int, default=65536,
                   help="rows shuffled together; memory holds about three such buffers")
    t.add_argument("--autocast-bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="modern recipe: encoder matmul under bf16 autocast (default: where the device has native bf16)")
    t.add_argument("--lr-decay-fraction", type=float,
                   help="last fraction of the steps over which lr falls linearly to 0 (default: the recipe's, 0 or 0.2)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="cpu")
    t.add_argument("--out", required=True, help="output directory for the SAE files and metrics.json")
    t.add_argument("--checkpoint-every", type=int, default=500, metavar="STEPS",
                   help=f"save <out>/{CHECKPOINT} every STEPS steps (0 = never); a rerun resumes from it")
    t.add_argument("--restart", action="store_true", help=f"delete <out>/{CHECKPOINT} and train from scratch")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("export", help="write an SAE in every release format (.pt, safetensors, SAELens, sparsify for TopK)")
    e.add_argument("--sae", required=True, help="an SAE in any format qsae writes")
    e.add_argument("--layer", type=int, required=True)
    e.add_argument("--k", type=int, help="needed only when the file does not record k")
    e.add_argument("--out", required=True)
    e.set_defaults(func=cmd_export)
    return parser


def run(func, args) -> int:
    try:
        return func(args)
    except USER_ERRORS as err:
        print(f"qsae: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: one line, and the shell's status for SIGINT
        print("qsae: interrupted; what is finished is kept, and the same command resumes", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(args.func, args)


def release_main(argv: list[str]) -> int:
    """Entry point of jobs/release.py: `qsae release` with the same arguments."""
    args = pipeline_parser("jobs/release.py", "qsae: the whole pipeline, questions to released SAEs").parse_args(argv)
    return run(cmd_release, args)


if __name__ == "__main__":
    sys.exit(main())
