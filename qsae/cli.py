"""Command line: `qsae release|capture|train|analyze|doctor|export|evaluate` (also `python -m qsae`).

`qsae train`'s SAE flags are made from TrainConfig's fields and their one-line docs, so a flag and
the setting it sets cannot drift apart.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from qsae import console
from qsae.config import TrainConfig

# Errors that mean "the input is wrong": reported in one line, exit status 2, no traceback.
USER_ERRORS = (ValueError, OSError, OverflowError)
CHECKPOINT = "checkpoint.pt"
REQUIRED_TRAIN_FLAGS = ("n_features", "k")  # no default fits every activation width


class Parser(argparse.ArgumentParser):
    """argparse, with its errors in qsae's one line: `qsae: error: ...`, exit status 2."""

    def error(self, message: str):
        self.exit(2, f"qsae: error: {message} (see {self.prog} --help)\n")


def pipeline_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = Parser(prog=prog, description=description)
    parser.add_argument("--config", help="TOML config (default: the embedded tiny.toml)")
    parser.add_argument("--out", help="run directory (overrides the config's `out`)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. train.epochs=5")
    return parser


def add_config_flags(parser: argparse.ArgumentParser, cls, required: tuple[str, ...] = ()) -> None:
    """One --flag per field of a config dataclass, typed by the field and helped by its doc; a flag
    left out keeps the field's default."""
    for f in dataclasses.fields(cls):
        base = str(f.type).replace(" | None", "")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = "" if default is None or f.name in required else f" (default: {default})"  # None: the doc says
        options = {"dest": f.name, "help": f.metadata.get("doc", "") + shown, "default": None}
        if base == "bool":
            options["action"] = argparse.BooleanOptionalAction
        else:
            options["type"] = {"int": int, "float": float, "str": str}[base]
        parser.add_argument("--" + f.name.replace("_", "-"), required=f.name in required, **options)


def config_from_flags(cls, args: argparse.Namespace):
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name) is not None})


def load_pipeline_config(args):
    from qsae.config import load_config

    overrides = list(args.overrides) + ([f"out={json.dumps(args.out)}"] if args.out is not None else [])
    return load_config(args.config, overrides)


def cmd_release(args) -> int:
    from qsae.pipeline import run_pipeline

    release_dir = run_pipeline(load_pipeline_config(args))
    console.say(f"[qsae] release written to {release_dir}")
    return 0


def cmd_capture(args) -> int:
    from qsae.distributed.connect import ray_session
    from qsae.distributed.resources import check_schedulable, replica_request
    from qsae.pipeline import Stages, capture, joins_cluster, prepare
    from qsae.rundir import RunDir

    cfg = load_pipeline_config(args)
    stages, run = Stages(), RunDir(cfg.out)
    with stages.stage("prepare (questions, model, layers)"):
        plan = prepare(cfg)
    run.root.mkdir(parents=True, exist_ok=True)
    stages.run = run
    with run.driver_lock(), console.lines_to_log(run.log), ray_session(cfg.ray_address):
        check_schedulable([replica_request(cfg.capture)], joined=joins_cluster(cfg))
        manifest = capture(plan, run, stages)
    console.say(f"[qsae] {len(manifest['shards'])} shards captured in {run.store}")
    return 0


def cmd_doctor(args) -> int:
    from qsae.doctor import FAIL, examine, report

    findings = examine(load_pipeline_config(args))
    print(report(findings))
    failed = [f.what for f in findings if f.level == FAIL]
    if failed:
        print(f"qsae: doctor: this config would fail here ({', '.join(failed)})", file=sys.stderr)
    return 1 if failed else 0


def cmd_analyze(args) -> int:
    from qsae.pipeline import analyze_from_disk

    release_dir = analyze_from_disk(load_pipeline_config(args))
    console.say(f"[qsae] release written to {release_dir}")
    return 0


def resume_state(checkpoint: Path, restart: bool, cfg: TrainConfig, source) -> dict | None:
    """The checkpoint a killed run with this --out left, checked against this run; None to start
    fresh (none there, or --restart, which deletes it)."""
    from qsae.training.state import check_resumable, load_training_state

    if restart or not checkpoint.exists():
        checkpoint.unlink(missing_ok=True)
        return None
    try:
        state = load_training_state(checkpoint)
    except ValueError as err:
        raise ValueError(f"{err}; rerun with --restart to discard it") from err
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
    from qsae.sae_files import hook_name, save_sae
    from qsae.store import verify_store
    from qsae.streaming import StoreSource, open_rows
    from qsae.models import memory_budget
    from qsae.training.loop import train_sae
    from qsae.training.state import check_training_memory

    if args.checkpoint_every < 0:
        raise ValueError(f"--checkpoint-every must be >= 0 (0 = never), got {args.checkpoint_every}")
    check_can_create_dir(args.out, "--out")  # before training, not after it
    cfg = config_from_flags(TrainConfig, args)
    cfg.check()
    cfg = dataclasses.replace(cfg, device=usable_device(cfg.device))
    source = open_rows(args.activations, args.layer)
    check_training_memory([cfg], source.d_in, memory_budget(cfg.device))
    if isinstance(source, StoreSource):  # once, before training: every byte of the layer's shards checked
        verify_store(source.store_dir, [args.layer])
    out = Path(args.out)
    checkpoint = out / CHECKPOINT
    for unfinished in out.glob(f".{CHECKPOINT}.*.tmp"):  # a killed run's half-written checkpoint
        unfinished.unlink()
    resume = resume_state(checkpoint, args.restart, cfg, source)
    if resume is not None:
        print(f"[qsae] resuming from step {resume['history']['steps']} ({checkpoint})", flush=True)
    sae, history = train_sae(source, cfg, on_step=checkpoint_writer(checkpoint, args.checkpoint_every), resume=resume)
    files = save_sae(sae, out, args.layer, hook_name(args.layer))
    metrics = {"config": resolved_config(cfg), "rows": source.n_rows, "d_in": source.d_in, **history}
    atomic_write_json(out / "metrics.json", metrics)
    # Outputs complete: drop the checkpoint, so a rerun into this --out trains afresh instead of
    # repeating the tail of this run.
    checkpoint.unlink(missing_ok=True)
    print(f"[qsae] trained SAE (final train FVU {history['fvu'][-1]:.4f}); wrote {len(files)} files to {out}")
    return 0


def usable_device(device: str) -> str:
    """--device as a torch device of this machine: auto resolved, CUDA refused where there is none."""
    import torch

    from qsae.models import resolve_device

    device = resolve_device(device)
    if device.startswith("cuda"):
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def resolved_config(cfg: TrainConfig) -> dict:
    """The settings metrics.json records: the recipe's defaults filled in, and autocast as it ran."""
    from qsae.training.recipes import RECIPES
    from qsae.training.trained import recipe_settings

    settings = recipe_settings(cfg)
    del settings["encoder_matmul"]
    return {**settings, "autocast_bf16": RECIPES[cfg.recipe].uses_autocast(cfg, cfg.device)}


def cmd_export(args) -> int:
    from qsae.files import check_can_create_dir
    from qsae.sae_files import hook_name, load_sae, save_sae

    check_can_create_dir(args.out, "--out")
    sae = load_sae(args.sae, k=args.k)
    files = save_sae(sae, Path(args.out), args.layer, hook_name(args.layer))
    print(f"[qsae] exported layer {args.layer} SAE to {args.out}: {', '.join(sorted(p.name for p in files.values()))}")
    return 0


def cmd_evaluate(args) -> int:
    from qsae.config import load_config
    from qsae.sae_evaluation import plan_evaluation, run_evaluation

    cfg = load_config(args.config, [*args.overrides, f"out={json.dumps(args.run)}"])  # the run's own config
    plan = plan_evaluation(cfg, args.sae, args.layer, k=args.k, fidelity=args.fidelity, out=args.out)
    with plan.run.driver_lock():  # the run's analysis and store stay as they are while read
        files = run_evaluation(plan)
    console.say(f"[qsae] evaluated {plan.other.path} at layer {args.layer}: {', '.join(str(p) for p in files)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="qsae", description="Sparse autoencoders for a model's residual stream")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func, help_text in (
        ("release", cmd_release, "whole pipeline: capture, train, analyze, evaluate, causal check, release"),
        ("capture", cmd_capture, "rollouts and residual capture into the activation store"),
        ("analyze", cmd_analyze, "analysis, evaluation, causal check and release from a trained run"),
        ("doctor", cmd_doctor, "what this machine would use for the config, and what would fail (nothing runs)"),
    ):
        p = sub.add_parser(name, help=help_text, parents=[pipeline_parser(name, help_text)], add_help=False)
        p.set_defaults(func=func)

    t = sub.add_parser("train", help="train one SAE on an activation store or a .npy file")
    t.add_argument("--activations", required=True, help="activation store directory (run or activations/) or 2-D .npy")
    t.add_argument("--layer", type=int, required=True, help="layer to read from a store; names the outputs")
    t.add_argument("--out", required=True, help="output directory for the SAE files and metrics.json")
    t.add_argument("--checkpoint-every", type=int, default=500, metavar="STEPS",
                   help=f"save <out>/{CHECKPOINT} every STEPS steps (0 = never); a rerun resumes from it")
    t.add_argument("--restart", action="store_true", help=f"delete <out>/{CHECKPOINT} and train from scratch")
    add_config_flags(t.add_argument_group("SAE and training settings"), TrainConfig, REQUIRED_TRAIN_FLAGS)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("export", help="write an SAE in every release format (.pt, safetensors, SAELens, sparsify for TopK)")
    e.add_argument("--sae", required=True, help="an SAE in any format qsae writes")
    e.add_argument("--layer", type=int, required=True)
    e.add_argument("--k", type=int, help="needed only when the file does not record k")
    e.add_argument("--out", required=True)
    e.set_defaults(func=cmd_export)

    v = sub.add_parser("evaluate", help="another SAE's release statistics on a finished run's rows, beside its own")
    v.add_argument("--sae", required=True, help="a SAELens or sparsify SAE directory, or an SAE file qsae writes")
    v.add_argument("--layer", type=int, required=True, help="the run's layer the SAE reads")
    v.add_argument("--run", required=True, help="a finished run directory (analyzed and evaluated)")
    v.add_argument("--out", help="output directory (default: <run>/evaluations/layer=L/<name of the SAE>)")
    v.add_argument("--k", type=int, help="needed only when the files do not record k")
    v.add_argument("--no-fidelity", dest="fidelity", action="store_false",
                   help="skip the fidelity in the model's loss (no model is loaded)")
    v.add_argument("--config", help="the run's TOML config (default: the embedded tiny.toml)")
    v.add_argument("overrides", nargs="*", metavar="section.key=value", help="the run's config overrides")
    v.set_defaults(func=cmd_evaluate)
    return parser


def run(func, args) -> int:
    console.handle_sigterm()
    try:
        return func(args)
    except USER_ERRORS as err:
        print(f"qsae: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: one line, and the shell's status for the signal
        what, status = ("terminated", 143) if console.terminated() else ("interrupted", 130)
        print(f"qsae: {what}; what is finished is kept, and the same command resumes", file=sys.stderr)
        return status


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(args.func, args)


def release_main(argv: list[str]) -> int:
    """Entry point of jobs/release.py: `qsae release` with the same arguments."""
    args = pipeline_parser("jobs/release.py", "qsae: the whole pipeline, questions to released SAEs").parse_args(argv)
    return run(cmd_release, args)


if __name__ == "__main__":
    sys.exit(main())
