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
    from qsae.models import load_tokenizer, resolve_model_path
    from qsae.release import build_release
    from qsae.train import load_trained

    cfg = load_pipeline_config(args)
    run_dir = Path(cfg.out).resolve()
    trained = {layer: load_trained(run_dir, layer) for layer in cfg.capture.layers}
    tokenizer = load_tokenizer(resolve_model_path(cfg.model.name), cfg.model.revision)
    print(f"[qsae] release written to {build_release(cfg, run_dir, trained, tokenizer, {})}")
    return 0


def cmd_train(args) -> int:
    from qsae.store import load_residuals
    from qsae.train import TrainConfig, train_sae

    cfg = TrainConfig(
        recipe=args.recipe, n_features=args.n_features, k=args.k, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        seed=args.seed, device=args.device,
    )
    residuals = load_residuals(args.activations, args.layer)
    cfg.validate(residuals.shape[1])
    sae, history = train_sae(residuals, cfg)
    out = Path(args.out)
    files = sae.save_release(out, args.layer, f"blocks.{args.layer}.hook_resid_post")
    metrics = {"config": asdict(cfg.resolved()), "rows": int(residuals.shape[0]), "d_in": int(residuals.shape[1]), **history}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    print(f"[qsae] trained SAE (final train FVU {history['fvu'][-1]:.4f}); wrote {len(files)} files to {out}")
    return 0


def cmd_export(args) -> int:
    from qsae.sae import TopKSAE

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

    t = sub.add_parser("train", help="train one TopK SAE on an activation store or a .npy file")
    t.add_argument("--activations", required=True, help="activation store directory (run or activations/) or 2-D .npy")
    t.add_argument("--layer", type=int, required=True, help="layer to read from a store; names the outputs")
    t.add_argument("--n-features", type=int, required=True)
    t.add_argument("--k", type=int, required=True)
    t.add_argument("--epochs", type=int, default=20)
    t.add_argument("--batch-size", type=int, default=4096)
    t.add_argument("--recipe", choices=["modern", "original"], default="modern", help="training recipe (README)")
    t.add_argument("--lr", type=float, help="Adam learning rate (default: the recipe's)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="cpu")
    t.add_argument("--out", required=True, help="output directory for the SAE files and metrics.json")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("export", help="write an SAE in every release format (.pt, safetensors, SAELens, sparsify)")
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(args.func, args)


def release_main(argv: list[str]) -> int:
    """Entry point of jobs/release.py: `qsae release` with the same arguments."""
    args = pipeline_parser("jobs/release.py", "qsae: the whole pipeline, questions to released SAEs").parse_args(argv)
    return run(cmd_release, args)


if __name__ == "__main__":
    sys.exit(main())
