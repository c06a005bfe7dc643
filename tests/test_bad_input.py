"""Bad input, as a user would give it: every case ends with exit status 2, one `qsae: error:` line
naming the problem (and the file), no traceback, and nothing written. The commands run in this
process (the same entry points as the scripts, minus interpreter start-up); two cases run as real
processes at the end. The bad-input table of docs/faults.md lists the same cases (checked below)."""
from __future__ import annotations

import dataclasses
import http.server
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from qsae.cli import main, release_main
from qsae.config import PipelineConfig
from qsae.questions import BUNDLED_QUESTIONS
from qsae.sae import TopKSAE
from qsae.sae_files import release_tensors, save_sae
from qsae.store import ShardRows, new_manifest, shard_checksums, write_manifest, write_shard

ROOT = Path(__file__).resolve().parent.parent
D = 8


def assert_fails_cleanly(capsys, rc: int, problem: str) -> str:
    """The one error line, checked; returns the run's stdout."""
    out, err = capsys.readouterr()
    assert rc == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("qsae: error: ") and problem in lines[0], lines[0]
    return out


@pytest.mark.parametrize("entry, argv, problem", [
    (release_main, ["--bogus"], "unrecognized arguments: --bogus (see jobs/release.py --help)"),
    (main, ["train", "--layer", "0"], "the following arguments are required: --activations, --out"),
    (main, ["export", "--sae", "x.pt", "--layer", "three", "--out", "y"], "argument --layer: invalid int value"),
    (main, ["train", "--matryoshka-prefixes", "4,x"],
     "argument --matryoshka-prefixes: expected comma-separated integers, got '4,x'"),
])
def test_a_command_line_argparse_refuses_says_so_in_qsaes_line(capsys, entry, argv, problem):
    with pytest.raises(SystemExit) as exit_:
        entry(argv)
    assert_fails_cleanly(capsys, exit_.value.code, problem)


def test_an_empty_out_flag_is_refused_not_ignored(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where the config's own out would be made
    assert_fails_cleanly(capsys, release_main(["--out", ""]), "out is empty")
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------
# Every config field: a value it cannot take, refused by the config check before anything runs.

CONFIG_CASES = [
    ("model.name=", "model.name is empty"),
    ("model.dtype=float64", "model.dtype must be one of"),
    ("model.device=gpu", "model.device must be auto, cpu, cuda or cuda:N"),
    ("rollout.engine=sglang", "unknown rollout.engine 'sglang'"),
    ('rollout.questions=" "', "rollout.questions is empty"),
    ("rollout.num_questions=1", "rollout.num_questions must be >= 2"),
    ("rollout.seed=-1", "rollout.seed must be >= 0"),
    ("rollout.max_new_tokens=0", "rollout.max_new_tokens must be >= 1"),
    ("rollout.batch_size=0", "rollout.batch_size must be >= 1"),
    ("rollout.tensor_parallel_size=0", "rollout.tensor_parallel_size must be >= 1"),
    ("rollout.gpu_memory_utilization=1.5", "rollout.gpu_memory_utilization must be in (0, 1]"),
    ("rollout.gpu_memory_utilization=nan", "rollout.gpu_memory_utilization must be in (0, 1]"),
    ("rollout.vllm.max_num_seqs=64", "rollout.vllm sets max_num_seqs but rollout.engine = transformers"),
    ("rollout.vllm=64", "rollout.vllm expects dict, got 64"),
    ("train.sweep=64", "train.sweep expects dict | None, got 64"),
    ("train.sweep.k=[]", "train.sweep is empty"),
    ("train.sweep.n_features=[128,8]", "train.sweep: the SAE of n_features = 8, k = 16: k=16 exceeds n_features=8"),
    ("train.sweep.pairs=[[256]]", "train.sweep.pairs must be a list of [n_features, k] pairs"),
    ("rollout.prompts_in_flight=0", "rollout.prompts_in_flight must be >= 1"),
    ("rollout.max_model_len=0", "rollout.max_model_len must be >= 1"),
    ("rollout.max_model_len=200 rollout.max_new_tokens=200", "leaves no room for a prompt"),
    ("train.n_features=0 train.k=0", "must be positive: n_features=0, k=0"),
    ("capture.layers=[]", "capture.layers is empty"),
    ("capture.layers=[-1]", "capture.layers must be layer indices >= 0"),
    ("capture.layers=[3,3]", "capture.layers repeats a layer"),
    ('capture.layers="some"', 'capture.layers must be a list of layer indices or "all"'),
    ("capture.dtype=bfloat16", "capture.dtype must be float16 or float32"),
    ("capture.num_actors=0", "capture.num_actors must be >= 1"),
    ("capture.cpus_per_actor=-1", "capture.cpus_per_actor must be >= 0"),
    ("capture.gpus_per_actor=-0.5", "capture.gpus_per_actor must be >= 0"),
    ("capture.questions_per_shard=0", "capture.questions_per_shard must be >= 1"),
    ("capture.batch_size=0", "capture.batch_size must be >= 1"),
    ("capture.max_tokens_per_layer=2", "capture.max_tokens_per_layer must be >= 3"),
    ("rollout.samples_per_question=0", "rollout.samples_per_question must be >= 1"),
    ("rollout.samples_per_question=4", "rollout.samples_per_question = 4 with rollout.temperature = 0 (greedy)"),
    ("rollout.top_p=0.9", "rollout.top_p / rollout.top_k shape sampling, but rollout.temperature = 0 is greedy"),
    ("rollout.temperature=-0.5", "rollout.temperature must be a finite number >= 0"),
    ("rollout.temperature=0.7 rollout.top_p=0", "rollout.top_p must be in (0, 1]"),
    ("rollout.top_k=-1", "rollout.top_k must be >= 0"),
    ("rollout.sampling_seed=-1", "rollout.sampling_seed must be >= 0"),
    ("capture.keep_per_rollout=0", "capture.keep_per_rollout = 0 keeps no position of any rollout"),
    ("capture.keep_fraction=0.0", "capture.keep_fraction = 0.0 must be in (0, 1] (0 keeps nothing)"),
    ("capture.keep_per_rollout=4 capture.keep_fraction=0.5", "capture.keep_per_rollout and capture.keep_fraction both set"),
    ("capture.keep_seed=-1", "capture.keep_seed must be >= 0"),
    ("capture.max_norm_multiple=0.5", "capture.max_norm_multiple must be 0 (off) or above 1"),
    ("train.recipe=fast", "unknown recipe 'fast'"),
    ("train.architecture=gated", "unknown architecture 'gated'; expected one of topk, batchtopk, matryoshka-batchtopk"),
    ("train.architecture=matryoshka-batchtopk train.recipe=original",
     "train: architecture 'matryoshka-batchtopk' needs the modern recipe"),
    ("train.matryoshka_prefixes=[16,64]",
     "train: matryoshka_prefixes belongs to architecture 'matryoshka-batchtopk', not 'topk'"),
    ("train.architecture=matryoshka-batchtopk train.matryoshka_prefixes=[64,16]",
     "train: matryoshka_prefixes must be strictly increasing, got [64, 16]"),
    ("train.architecture=matryoshka-batchtopk train.matryoshka_prefixes=[64,512]",
     "train: matryoshka_prefixes [64, 512] go beyond n_features=256"),
    ("train.architecture=matryoshka-batchtopk train.matryoshka_prefixes=[-8,64]",
     "train: matryoshka_prefixes must be positive integers, got [-8, 64]"),
    ("train.matryoshka_prefixes=[0.5]", "train.matryoshka_prefixes expects list[int], got [0.5]"),
    ("train.n_features=0", "must be positive: n_features=0"),
    ("train.k=0", "must be positive: k=0"),
    ("train.k=300", "train: k=300 exceeds n_features=256"),
    ("train.epochs=-1", "must be positive: epochs=-1"),
    ("train.batch_size=0", "must be positive: batch_size=0"),
    ("train.lr=-0.001", "must be positive: lr=-0.001"),
    ("train.lr=inf", "lr must be a finite number"),
    ("train.revive_every_epochs=-1", "revive_every_epochs must be >= 0"),
    ("train.lr_decay_fraction=1.5", "lr_decay_fraction must be in [0, 1], got 1.5"),
    ("train.dead_after_steps=0", "must be positive: dead_after_steps=0"),
    ("train.recipe=original train.autocast_bf16=true", "autocast_bf16 belongs to the modern recipe"),
    ("train.seed=-1", "seed must be >= 0"),
    ("train.shuffle_buffer_rows=0", "must be positive: shuffle_buffer_rows=0"),
    ("train.device=gpu", "train.device must be auto, cpu, cuda or cuda:N"),
    ("train.device=cuda", "train.device = cuda needs train.gpus_per_layer > 0"),
    ("model.device=cuda", "model.device = cuda needs capture.gpus_per_actor > 0"),
    ("train.holdout_fraction=1.0", "train.holdout_fraction must be in (0, 1)"),
    ("train.split_seed=-1", "train.split_seed must be >= 0"),
    ("train.cpus_per_layer=0", "train.cpus_per_layer must be > 0"),
    ("train.gpus_per_layer=-1", "train.gpus_per_layer must be >= 0"),
    ("train.workers_per_layer=0", "train.workers_per_layer must be >= 1"),
    ("train.report_every_steps=0", "train.report_every_steps must be >= 1"),
    ("train.checkpoint_every_steps=0", "train.checkpoint_every_steps must be >= 1"),
    ("train.max_failures=-1", "train.max_failures must be >= 0"),
    ("train.gpus_per_layer=2", "a worker drives one GPU at most"),
    ("train.workers_per_layer=2 train.gpus_per_layer=1", "NCCL needs one whole GPU per worker"),
    ("release.top_contexts=0", "release.top_contexts must be >= 1"),
    ("release.quantile_examples=0", "release.quantile_examples must be >= 1"),
    ("release.context_tokens=-1", "release.context_tokens must be >= 0"),
    ("release.bootstrap=0", "release.bootstrap must be >= 1"),
    ("release.permutations=0", "release.permutations must be >= 1"),
    ("release.probe_permutations=-1", "release.probe_permutations must be >= 0"),
    ("release.unscored_rollouts=maybe", "release.unscored_rollouts must be exclude or wrong"),
    ("release.fidelity_rollouts=0", "release.fidelity_rollouts must be >= 1"),
    ("causal.layers=[]", "causal.layers is empty"),
    ("causal.features=0", "causal.features must be >= 1"),
    ("causal.steer_multiples=[-4.0]", "causal.steer_multiples must be positive numbers"),
    ("causal.questions=0", "causal.questions must be >= 1"),
    ("autointerp.features=-1", "autointerp.features must be >= 0"),
    ("autointerp.random_features=-1", "autointerp.random_features must be >= 0"),
    ("autointerp.features=0 autointerp.random_features=0", "no feature to explain"),
    ('autointerp.explainer=" /a/model"', "autointerp.explainer has spaces around it"),
    ("autointerp.examples=0", "autointerp.examples must be >= 1"),
    ("autointerp.heldout_examples=0", "autointerp.heldout_examples must be >= 1"),
    ("autointerp.max_new_tokens=0", "autointerp.max_new_tokens must be >= 1"),
    ("autointerp.batch_size=0", "autointerp.batch_size must be >= 1"),
    ("autointerp.seed=-1", "autointerp.seed must be >= 0"),
    ('out=""', "out is empty"),
    ("ray_address=somewhere", "Ray address 'somewhere' is not of the form host:port"),
    ("train.epochs=many", "train.epochs expects int, got 'many'"),
    ("train.colour=red", "unknown config key 'train.colour'"),
]

# Fields where any value of the right type is valid (the type itself is checked for every field).
ANY_VALUE_OF_ITS_TYPE = {"model.revision", "rollout.thinking", "rollout.decode_cuda_graphs", "capture.exclude_special_tokens",
                         "release.export_activations", "release.every_token", "causal.enabled",
                         "autointerp.enabled"}


def test_every_config_field_has_a_bad_value_case():
    named = {part.split("=", 1)[0] for case, _ in CONFIG_CASES for part in shlex.split(case)}
    fields = set()
    for top in dataclasses.fields(PipelineConfig):
        section = getattr(PipelineConfig(), top.name)
        fields |= ({f"{top.name}.{f.name}" for f in dataclasses.fields(section)} if dataclasses.is_dataclass(section)
                   else {top.name})
    assert fields - ANY_VALUE_OF_ITS_TYPE <= named, sorted(fields - ANY_VALUE_OF_ITS_TYPE - named)


@pytest.mark.parametrize("case, problem", CONFIG_CASES, ids=[case for case, _ in CONFIG_CASES])
def test_a_config_value_that_cannot_work_is_refused_before_anything_runs(capsys, tmp_path, case, problem):
    out = tmp_path / "run"
    where = [] if case.startswith("out=") else ["--out", str(out)]  # --out would override the case's own out
    stdout = assert_fails_cleanly(capsys, release_main([*where, *shlex.split(case)]), problem)
    assert "[qsae]" not in stdout  # not even the first stage started
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# The driver's files: questions, config, model, run directory, store, Ray address. Each case is
# (the table's name for it, arguments, what the error line says); `root` holds the files it needs.

def bundled_rows() -> list[dict]:
    return [json.loads(line) for line in BUNDLED_QUESTIONS.read_text().splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def edited_questions(root: Path, edit) -> str:
    rows = bundled_rows()[:4]
    edit(rows[1])
    return f"rollout.questions={json.dumps(str(write_jsonl(root / 'edited.jsonl', rows)))}"


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def not_ray(root: Path) -> str:
    """A local HTTP server: a port that answers, but not as Ray does."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), QuietHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"ray_address=127.0.0.1:{server.server_address[1]}"


def closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"ray_address=127.0.0.1:{s.getsockname()[1]}"


def weightless_model(root: Path, tiny_path: str) -> str:
    model = root / "model"
    shutil.copytree(tiny_path, model, ignore=shutil.ignore_patterns("*.safetensors"))
    return f"model.name={json.dumps(str(model))}"


def model_with(root: Path, tiny_path: str, *, without: str = "", template: str | None = None) -> str:
    """The tiny model's directory without the file `without`, or with its chat template `template`."""
    model = root / "model"
    shutil.copytree(tiny_path, model, ignore=shutil.ignore_patterns(without) if without else None)
    if template is not None:
        (model / "chat_template.jinja").write_text(template)
    return f"model.name={json.dumps(str(model))}"


def damaged_model(root: Path, tiny_path: str) -> str:
    model = root / "model"
    shutil.copytree(tiny_path, model)
    weights = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    return f"model.name={json.dumps(str(model))}"


def store_of_another_run(run: Path, manifest) -> None:
    (run / "activations").mkdir(parents=True)
    (run / "activations" / "manifest.json").write_text(manifest if isinstance(manifest, str) else json.dumps(manifest))


def captured_store(run: Path, questions: str = "bundled", model: str = "tiny") -> None:
    """A store as capture leaves it after its first shard, made from the model and questions given."""
    from qsae.capture import plan_shards, store_manifest
    from qsae.config import load_config
    from qsae.pipeline import resolve
    from qsae.questions import question_digest

    plan = resolve(load_config(None, [f"rollout.questions={json.dumps(questions)}", f"model.name={json.dumps(model)}"]))
    manifest = store_manifest(plan.spec)
    first = plan_shards(plan.questions, 8)[0]
    manifest["shards"][first.name] = {"questions": [q.uuid for q in first.questions], "rollouts": 8,
                                      "question_digests": [question_digest(q) for q in first.questions],
                                      "rows": {"3": 1, "7": 1, "11": 1}}
    store_of_another_run(run, manifest)


def corrected_answer_key(root: Path, run: Path) -> list[str]:
    """The bundled questions captured, then the second question's answer key corrected in the file."""
    rows = bundled_rows()
    path = write_jsonl(root / "questions.jsonl", rows)
    captured_store(run, str(path))
    q = rows[1]
    other = next(letter for letter in "ABCD" if letter != q["answer_letter"])
    q.update(answer_letter=other, answer=q["options"]["ABCD".index(other)])
    write_jsonl(path, rows)
    return [f"rollout.questions={json.dumps(str(path))}"]


def weights_replaced_in_place(root: Path, run: Path) -> list[str]:
    """A store captured from a copy of the tiny model, whose weights file was then written again."""
    model = root / "model"
    shutil.copytree(resolve_tiny(), model)
    captured_store(run, model=str(model))
    weights = model / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    return [f"model.name={json.dumps(str(model))}"]


def set_questions(q: dict, **values) -> None:
    q.update(values)


DRIVER_CASES = {
    "question file missing": (lambda root, run: ["rollout.questions=/no/such/questions.jsonl"],
                              "question file not found: /no/such/questions.jsonl"),
    "question file of another type": (lambda root, run: [f"rollout.questions={json.dumps(str(root / 'q.csv'))}"],
                                      "expected .jsonl, .json or .parquet"),
    "question file not UTF-8": (
        lambda root, run: [f"rollout.questions={json.dumps(str(root / 'latin1.jsonl'))}"],
        "latin1.jsonl line 2: not UTF-8 text"),
    "question line not JSON": (
        lambda root, run: [f"rollout.questions={json.dumps(str(root / 'broken.jsonl'))}"],
        "broken.jsonl line 2: invalid JSON"),
    "question file empty": (lambda root, run: [f"rollout.questions={json.dumps(str(root / 'empty.jsonl'))}"],
                            "empty.jsonl: contains no questions"),
    "question Parquet unreadable": (
        lambda root, run: [f"rollout.questions={json.dumps(str(root / 'bad.parquet'))}"],
        "bad.parquet: not a readable Parquet file"),
    "question field missing": (lambda root, run: [edited_questions(root, lambda q: q.pop("difficulty"))],
                               "edited.jsonl line 2: field 'difficulty' is missing"),
    "question text empty": (lambda root, run: [edited_questions(root, lambda q: set_questions(q, question="  "))],
                            "edited.jsonl line 2: field 'question' is empty"),
    "options all the same": (
        lambda root, run: [edited_questions(root, lambda q: set_questions(
            q, options=["same"] * 4, answer="same", answer_letter="A"))],
        "edited.jsonl line 2: field 'options' repeat the answer's text at B, C, D"),
    "option empty": (
        lambda root, run: [edited_questions(root, lambda q: q["options"].__setitem__(
            0 if q["answer_letter"] != "A" else 1, ""))],
        "edited.jsonl line 2: field 'options' has empty option(s)"),
    "answer not among the options": (
        lambda root, run: [edited_questions(root, lambda q: set_questions(q, answer="nowhere"))],
        "edited.jsonl line 2: field 'answer' is 'nowhere'"),
    "more questions asked than exist": (lambda root, run: ["rollout.num_questions=1000"],
                                        "cannot sample 1000 questions: 48 exist"),
    "config file missing": (lambda root, run: ["--config", str(root / "nope.toml")], "config file not found"),
    "config file not UTF-8": (lambda root, run: ["--config", str(root / "latin1.toml")],
                              "latin1.toml is not UTF-8 text"),
    "config file not TOML": (lambda root, run: ["--config", str(root / "broken.toml")],
                             "broken.toml is not valid TOML"),
    "model path missing": (lambda root, run: ["model.name=/no/such/model"],
                           "model path does not exist or is not a directory: /no/such/model"),
    "hub id without network": (lambda root, run: ["model.name=nobody/no-such-model"],
                               "model 'nobody/no-such-model' is not in the local hub cache and the hub at"),
    "model directory without weights": (lambda root, run: [weightless_model(root, resolve_tiny())],
                                        "holds no weights (no *.safetensors or *.bin file)"),
    "model weights truncated": (lambda root, run: [damaged_model(root, resolve_tiny())],
                                "model weights {model}/model.safetensors are unreadable"),
    "model directory without its tokenizer": (
        lambda root, run: [model_with(root, resolve_tiny(), without="tokenizer.json")],
        "the tokenizer of model {model} does not give back a prompt's text"),
    "model directory without a chat template": (
        lambda root, run: [model_with(root, resolve_tiny(), without="chat_template.jinja")],
        "the tokenizer of model {model} has no chat template"),
    "chat template that does not render": (
        lambda root, run: [model_with(root, resolve_tiny(), template="{% for message in messages %}{{ oops(")],
        "the chat template of model {model} does not render"),
    "autointerp explainer missing": (lambda root, run: ["autointerp.explainer=/no/such/explainer"],
                                     "autointerp.explainer = '/no/such/explainer': model path does not exist"),
    "autointerp explainer without weights": (
        lambda root, run: ["autointerp.explainer=" + weightless_model(root, resolve_tiny()).split("=", 1)[1]],
        "holds no weights (no *.safetensors or *.bin file)"),
    "vLLM on CPU replicas for a hybrid model": (lambda root, run: ["rollout.engine=vllm"],
                                                "rollout.engine = vllm on replicas without a GPU"),
    "sampling with vLLM on CPU replicas": (
        lambda root, run: ["rollout.engine=vllm", "model.name=tiny-dense", "capture.layers=[1]", "rollout.temperature=0.7"],
        "rollout.temperature > 0 with rollout.engine = vllm on replicas without a GPU"),
    "vLLM engine argument capture depends on": (
        lambda root, run: ["rollout.engine=vllm", "model.name=tiny-dense", "capture.layers=[1]",
                           "rollout.vllm.enable_prefix_caching=true"],
        "rollout.vllm sets enable_prefix_caching, which qsae sets itself"),
    "layer beyond the model": (lambda root, run: ["capture.layers=[3, 12]"],
                               "layer(s) [12] out of range: the model has 12 decoder layers"),
    "prompt longer than the context": (
        lambda root, run: [edited_questions(root, lambda q: set_questions(q, question="why " * 6000))],
        "exceeds the model's context of 4096 tokens (1 question(s) do)"),
    "prompt longer than rollout.max_model_len": (lambda root, run: ["rollout.max_model_len=300"],
                                                 "exceeds the model's context of 300 tokens"),
    "run directory is a file": (lambda root, run: (run.write_text("x"), [])[1],
                                "exists and is not a directory"),
    "run directory under a file": (lambda root, run: ["--out", str(root / "afile" / "run")],
                                   "afile is a file, not a directory"),
    "store captured differently": (
        lambda root, run: store_of_another_run(run, new_manifest("tiny", "other", [3, 7, 11], 64, dtype="float32")),
        "the activation store was captured differently (model_revision: store has 'other'"),
    "question file corrected since the store was captured": (
        corrected_answer_key, "the question file gives question"),
    "model weights replaced since the store was captured": (
        weights_replaced_in_place, "weights: model.safetensors changed since the store was captured"),
    "store manifest truncated": (lambda root, run: store_of_another_run(run, '{"format": 3, "layers": [3'),
                                 "manifest.json is damaged"),
    "store manifest of the wrong shape": (lambda root, run: store_of_another_run(run, "[1, 2, 3]"),
                                          "manifest.json is not an activation store manifest"),
    "Ray address not listening": (lambda root, run: [closed_port()], "cannot reach the Ray cluster at 127.0.0.1:"),
    "Ray address not Ray": (lambda root, run: [not_ray(root)], "but it is not a Ray cluster"),
}


def resolve_tiny() -> str:
    from qsae.models import resolve_model_path

    return resolve_model_path("tiny")


@pytest.fixture
def bad_files(tmp_path) -> Path:
    root = tmp_path / "files"
    root.mkdir()
    rows = bundled_rows()[:3]
    (root / "q.csv").write_text("uuid,question\n")
    lines = [json.dumps(row) for row in rows]  # ASCII: the one byte outside UTF-8 is placed below
    (root / "latin1.jsonl").write_bytes((lines[0] + "\n" + lines[1][:-2] + ' é"}\n').encode("latin-1"))
    (root / "broken.jsonl").write_text(lines[0] + "\n" + lines[1][:40] + "\n")
    (root / "empty.jsonl").write_text("\n")
    (root / "bad.parquet").write_bytes(b"PAR1 this is not parquet")
    (root / "latin1.toml").write_bytes('out = "runs/café"\n'.encode("latin-1"))
    (root / "broken.toml").write_text("[train\nepochs = 3\n")
    (root / "afile").write_text("x")
    return root


@pytest.mark.parametrize("name", list(DRIVER_CASES))
def test_a_bad_driver_input_is_refused_before_ray_starts(capsys, tiny_path, tmp_path, bad_files, monkeypatch, name):
    monkeypatch.setenv("HF_ENDPOINT", f"http://{closed_port().split('=')[1]}")  # a hub that cannot be reached
    make, problem = DRIVER_CASES[name]
    run = tmp_path / "run"
    extra = make(bad_files, run) or []
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    stdout = assert_fails_cleanly(capsys, release_main(["--out", str(run), *extra]),
                                  problem.replace("{model}", str(bad_files / "model")))
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written
    if not name.startswith("Ray address"):
        assert "[qsae] start ray" not in stdout


# ---------------------------------------------------------------------------------------------
# `qsae train` and `qsae export` on files: activations, checkpoints, SAEs, output directories.

def planted(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, D)).astype(np.float32)


def write_store(store_dir: Path, rows: np.ndarray | None) -> None:
    manifest = new_manifest("test/model", None, [0], D, dtype="float32")
    if rows is not None:
        n = len(rows)
        written = write_shard(store_dir, 0, "shard-00000", ShardRows(np.zeros(n, np.int64), np.arange(n), np.zeros(n, np.int32), np.ones(n, bool), rows), dtype="float32")
        manifest["shards"]["shard-00000"] = {"rollouts": 1, "rows": {"0": written},
                                             "checksums": shard_checksums(store_dir, "shard-00000", [0])}
    write_manifest(store_dir, manifest)


def npy(root: Path, name: str, array: np.ndarray) -> Path:
    np.save(root / name, array, allow_pickle=True)
    return root / name


def raw(root: Path, name: str, data: bytes) -> Path:
    (root / name).write_bytes(data)
    return root / name


class Payload:
    """Unpickling this would create a file: what a planted file would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def truncated_npy(root: Path) -> Path:
    path = npy(root, "full.npy", planted(100, 0))
    return raw(root, "truncated.npy", path.read_bytes()[:300])


def nan_rows(root: Path) -> Path:
    rows = planted(64, 3)
    rows[17, 5] = np.nan
    return npy(root, "nan.npy", rows)


def store(root: Path, rows, manifest: bytes | None = None) -> Path:
    write_store(root / "store", rows)
    if manifest is not None:
        (root / "store" / "manifest.json").write_bytes(manifest)
    return root / "store"


def train_args(activations: Path, *extra) -> list[str]:
    return ["train", "--activations", str(activations), "--layer", "0", "--n-features", "8", "--k", "2",
            "--epochs", "1", "--batch-size", "32", *map(str, extra)]


TRAIN_CASES = {
    "activations missing": (lambda r: train_args(r / "absent.npy"), "activation file not found"),
    "activations .npy empty (0 bytes)": (lambda r: train_args(raw(r, "zero.npy", b"")),
                                         "zero.npy is not a readable .npy array"),
    "activations .npy truncated": (lambda r: train_args(truncated_npy(r)), "truncated.npy is not a readable .npy array"),
    "activations .npy of Python objects": (
        lambda r: train_args(npy(r, "objects.npy", np.array([{"a": 1}], dtype=object))),
        "objects.npy is not a readable .npy array"),
    "activations not 2-D": (lambda r: train_args(npy(r, "flat.npy", np.zeros(100, np.float32))),
                            "must hold a 2-D float array"),
    "activations with NaN": (lambda r: train_args(nan_rows(r)), "nan.npy contains NaN or inf"),
    "activations all equal": (lambda r: train_args(npy(r, "constant.npy", np.ones((100, D), np.float32))),
                              "the 100 training row(s) do not vary"),
    "activations of one row": (lambda r: train_args(npy(r, "one.npy", planted(1, 0))),
                               "the 1 training row(s) do not vary"),
    "store without shards": (lambda r: train_args(store(r, None)), "lists no shards"),
    "store layer without rows": (lambda r: train_args(store(r, np.zeros((0, D), np.float32))), "no rows for layer 0"),
    "store manifest empty": (lambda r: train_args(store(r, planted(64, 0), b"")), "manifest.json is damaged"),
    "store manifest not UTF-8": (lambda r: train_args(store(r, planted(64, 0), b'{"layers": [0]}\xff')),
                                 "manifest.json is damaged"),
    "store manifest of the wrong shape": (lambda r: train_args(store(r, planted(64, 0), b'{"layers": 0}')),
                                          "manifest.json is not an activation store manifest"),
    "store shard damaged (checksum fails)": (
        lambda r: train_args(zeroed_store(r)),
        "store/layer=0/shard-00000.arrow does not match the sha256 checksum the manifest records for it"),
    "train k above n": (lambda r: train_args(npy(r, "ok.npy", planted(64, 0)), "--k", 9), "k=9 exceeds n_features=8"),
    "train k = 0": (lambda r: train_args(npy(r, "ok.npy", planted(64, 0)), "--k", 0), "must be positive: k=0"),
    "train epochs negative": (lambda r: train_args(npy(r, "ok.npy", planted(64, 0)), "--epochs", -2),
                              "must be positive: epochs=-2"),
    "train batch size 0": (lambda r: train_args(npy(r, "ok.npy", planted(64, 0)), "--batch-size", 0),
                           "must be positive: batch_size=0"),
    "train lr negative": (lambda r: train_args(npy(r, "ok.npy", planted(64, 0)), "--lr", -0.1),
                          "must be positive: lr=-0.1"),
    "train BatchTopK with the original recipe": (
        lambda r: train_args(npy(r, "ok.npy", planted(64, 0)), "--recipe", "original", "--architecture", "batchtopk"),
        "needs the modern recipe"),
    "train on CUDA without a GPU": (lambda r: train_args(npy(r, "ok.npy", planted(64, 0)), "--device", "cuda:999"),
                                    "--device cuda:999: this machine has"),
    "train an SAE larger than memory": (lambda r: train_args(npy(r, "ok.npy", planted(64, 0)), "--n-features",
                                                             10_000_000_000),
                                        "needs about"),
    "train Matryoshka prefixes not increasing": (
        lambda r: train_args(npy(r, "ok.npy", planted(64, 0)), "--architecture", "matryoshka-batchtopk",
                             "--matryoshka-prefixes", "4,2"),
        "matryoshka_prefixes must be strictly increasing, got [4, 2]"),
    "train Matryoshka prefixes beyond n": (
        lambda r: train_args(npy(r, "ok.npy", planted(64, 0)), "--architecture", "matryoshka-batchtopk",
                             "--matryoshka-prefixes", "4,16"),
        "matryoshka_prefixes [4, 16] go beyond n_features=8"),
    "train Matryoshka prefixes under another architecture": (
        lambda r: train_args(npy(r, "ok.npy", planted(64, 0)), "--architecture", "batchtopk",
                             "--matryoshka-prefixes", "2,4"),
        "matryoshka_prefixes belongs to architecture 'matryoshka-batchtopk', not 'batchtopk'"),
    "train --checkpoint-every negative": (lambda r: train_args(npy(r, "ok.npy", planted(64, 0)),
                                                               "--checkpoint-every", -1),
                                          "--checkpoint-every must be >= 0"),
    "export SAE missing": (lambda r: ["export", "--sae", str(r / "absent.pt"), "--layer", "0"], "no SAE at"),
    "export .pt of Python objects": (
        lambda r: (torch.save({"W_enc": Payload(r / "ran")}, r / "planted_k2.pt"),
                   ["export", "--sae", str(r / "planted_k2.pt"), "--layer", "0"])[1],
        "planted_k2.pt holds Python objects besides tensors, which qsae never unpickles"),
    "export .pt of other tensors": (
        lambda r: (torch.save({"weight": torch.zeros(3)}, r / "model_k2.pt"),
                   ["export", "--sae", str(r / "model_k2.pt"), "--layer", "0"])[1],
        "model_k2.pt: expected tensors ['W_dec', 'W_enc', 'b_dec', 'b_enc'], got ['weight']"),
    "export .pt of one tensor": (
        lambda r: (torch.save(torch.zeros(3), r / "tensor.pt"),
                   ["export", "--sae", str(r / "tensor.pt"), "--layer", "0", "--k", "2"])[1],
        "tensor.pt holds a Tensor, not an SAE's dict of tensors"),
    "export .safetensors truncated": (
        lambda r: ["export", "--sae", str(raw(r, "cut.safetensors", b"\x10\0\0\0\0\0\0\0{\"W_")), "--layer", "0"],
        "cut.safetensors is not a readable SAE file"),
    "export of another format": (lambda r: ["export", "--sae", str(raw(r, "sae.bin", b"x")), "--layer", "0"],
                                 "unrecognised SAE format"),
    "export SAELens k not a whole number": (lambda r: ["export", "--sae", saelens_with(r, k=2.5), "--layer", "0"],
                                            "cfg.json: k = 2.5 is not a whole positive number"),
    "export SAELens k as text": (lambda r: ["export", "--sae", saelens_with(r, k="4"), "--layer", "0"],
                                 "cfg.json: k = '4' is not a whole positive number"),
    "export SAELens cfg.json not JSON": (lambda r: ["export", "--sae", saelens_with(r, text="{\"k\": 2,"), "--layer", "0"],
                                         "cfg.json is not a readable cfg.json"),
    "export safetensors k not a number": (lambda r: ["export", "--sae", safetensors_with(r, k="four"), "--layer", "0"],
                                          "k = 'four' is not a whole positive number"),
    "export SAE with NaN weights": (lambda r: ["export", "--sae", safetensors_with(r, nan=True), "--layer", "0"],
                                    "W_dec hold NaN or inf"),
}


def saelens_with(root: Path, *, k=None, text: str | None = None) -> str:
    """A SAELens folder of a small TopK SAE whose cfg.json says k = `k`, or is `text`."""
    folder = save_sae(TopKSAE(D, 8, 2), root / "sae", 0, "h")["saelens"]
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(text if text is not None else json.dumps({**cfg, "k": k}))
    return str(folder)


def safetensors_with(root: Path, *, k: str = "2", nan: bool = False) -> str:
    """A small TopK SAE's .safetensors file with metadata k = `k`, its decoder NaN where `nan`."""
    tensors = release_tensors(TopKSAE(D, 8, 2))
    if nan:
        tensors["W_dec"][3, 1] = float("nan")
    save_file(tensors, str(root / "odd.safetensors"), metadata={"k": k})
    return str(root / "odd.safetensors")


@pytest.mark.parametrize("name", list(TRAIN_CASES))
def test_a_bad_file_for_train_or_export_is_refused(capsys, tmp_path, name):
    make, problem = TRAIN_CASES[name]
    root = tmp_path / "files"
    root.mkdir()
    argv = make(root)
    out = tmp_path / "out"
    assert_fails_cleanly(capsys, main([*argv, "--out", str(out)]), problem)
    assert not out.exists()
    assert not (root / "ran").exists()  # a planted payload never runs


@pytest.mark.parametrize("command", ["train", "export"])
@pytest.mark.parametrize("where, problem", [("afile", "exists and is not a directory"),
                                            ("afile/sub", "afile is a file, not a directory")])
def test_an_output_directory_that_cannot_be_made_is_refused_before_work(capsys, tmp_path, command, where, problem):
    (tmp_path / "afile").write_text("x")
    if command == "train":
        argv = train_args(npy(tmp_path, "ok.npy", planted(64, 0)))
    else:
        argv = ["export", "--sae", str(tmp_path / "absent.pt"), "--layer", "0"]  # the SAE is not even read
    assert_fails_cleanly(capsys, main([*argv, "--out", str(tmp_path / where)]), problem)
    assert (tmp_path / "afile").read_text() == "x"


# ---------------------------------------------------------------------------------------------
# `qsae evaluate`: an SAE that does not fit the run, or files qsae cannot read as one, refused before
# a row is read or the model loaded. The run: a store's manifest of layers 3, 7, 11 at d_model 64.

RUN_LAYERS, RUN_D_MODEL = [3, 7, 11], 64


def evaluate_args(root: Path, sae, *extra, layer: int = 7) -> list[str]:
    return ["evaluate", "--sae", str(sae), "--layer", str(layer), "--run", str(root / "run"), *map(str, extra)]


def saelens_sae(root: Path, *, d_in: int = RUN_D_MODEL, hook: str = "blocks.7.hook_resid_post", sae=None,
                **cfg) -> Path:
    """A SAELens folder of a small SAE (TopK unless `sae`), its cfg.json's keys replaced by `cfg`."""
    folder = save_sae(sae or TopKSAE(d_in, 32, 4), root / "sae", 7, hook)["saelens"]
    saved = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**saved, **cfg}))
    return folder


def thresholds_per_latent(root: Path) -> Path:
    """A SAELens JumpReLU folder whose latents have thresholds of their own (not a BatchTopK SAE)."""
    from safetensors.torch import load_file

    from qsae.sae import BatchTopKSAE

    folder = saelens_sae(root, sae=BatchTopKSAE(RUN_D_MODEL, 32, 4))
    tensors = load_file(str(folder / "sae_weights.safetensors"))
    save_file({**tensors, "threshold": torch.linspace(0.1, 1.0, 32)}, str(folder / "sae_weights.safetensors"))
    return folder


def without_weights(root: Path) -> Path:
    folder = saelens_sae(root)
    (folder / "sae_weights.safetensors").unlink()
    return folder


EVALUATE_CASES = {
    "evaluate SAE missing": (lambda r: evaluate_args(r, r / "absent"), "no SAE at"),
    "evaluate SAELens weights missing": (
        lambda r: evaluate_args(r, without_weights(r)),
        "has neither sae_weights.safetensors (SAELens) nor sae.safetensors (sparsify)"),
    "evaluate SAE of another width than the run": (
        lambda r: evaluate_args(r, saelens_sae(r, d_in=D)), "the SAE's d_in is 8, but the run's residuals have d_model 64"),
    "evaluate SAE hook of a layer not captured": (
        lambda r: evaluate_args(r, saelens_sae(r, hook="blocks.5.hook_resid_post"), layer=5),
        "layer 5 is not a captured layer of the run (it captured 3, 7, 11)"),
    "evaluate SAE hook of another layer": (
        lambda r: evaluate_args(r, saelens_sae(r, hook="blocks.3.hook_resid_post")),
        "hook 'blocks.3.hook_resid_post' is layer 3's residual stream, not --layer 7's"),
    "evaluate SAE hook off the residual stream": (
        lambda r: evaluate_args(r, saelens_sae(r, hook="blocks.7.hook_mlp_out")),
        "hook 'blocks.7.hook_mlp_out' is not the residual stream after a block"),
    "evaluate SAE of an unsupported architecture": (
        lambda r: evaluate_args(r, saelens_sae(r, architecture="standard")),
        "architecture 'standard' is neither 'topk' nor 'jumprelu'"),
    "evaluate JumpReLU SAE with a threshold per latent": (
        lambda r: evaluate_args(r, thresholds_per_latent(r)), "the JumpReLU thresholds differ between latents"),
    "evaluate SAELens SAE that normalizes its input": (
        lambda r: evaluate_args(r, saelens_sae(r, normalize_activations="expected_average_only_in")),
        "normalize_activations = 'expected_average_only_in': qsae encodes raw residuals"),
    "evaluate SAELens cfg width not its weights'": (
        lambda r: evaluate_args(r, saelens_sae(r, d_sae=99)), "gives the latents as 99, but the encoder's weights have 32"),
    "evaluate k above the SAE's width": (lambda r: evaluate_args(r, saelens_sae(r), "--k", 40), "k=40 exceeds n_features=32"),
    "evaluate run directory without a store": (
        lambda r: evaluate_args(r, saelens_sae(r), "--run", r / "sae"), "no activation store at"),
}


@pytest.mark.parametrize("name", list(EVALUATE_CASES))
def test_a_bad_sae_or_run_for_evaluate_is_refused_before_a_row_is_read(capsys, tmp_path, name):
    make, problem = EVALUATE_CASES[name]
    write_manifest(tmp_path / "run" / "activations", new_manifest("tiny", None, RUN_LAYERS, RUN_D_MODEL, dtype="float32"))
    argv = make(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    assert_fails_cleanly(capsys, main(argv), problem)
    assert sorted(tmp_path.rglob("*")) == before


# ---------------------------------------------------------------------------------------------
# A store whose bytes changed since capture: 8 KB of a shard zeroed, its length unchanged, so the Arrow
# reader and the row count pass; only the checksum the manifest records tells (qsae.store.verify_store).

def zero_fill(path: Path, size: int = 8192) -> None:
    data = bytearray(path.read_bytes())
    start = len(data) // 2 - size // 2
    data[start:start + size] = bytes(size)
    path.write_bytes(bytes(data))


def zeroed_store(root: Path) -> Path:
    """`qsae train`'s case: one layer's store, its shard's checksum recorded as capture records it."""
    from qsae.store import read_manifest, shard_checksums, shard_path

    store_dir = root / "store"
    write_store(store_dir, planted(1000, 0))
    manifest = read_manifest(store_dir)
    manifest["shards"]["shard-00000"]["checksums"] = shard_checksums(store_dir, "shard-00000", [0])
    write_manifest(store_dir, manifest)
    zero_fill(shard_path(store_dir, 0, "shard-00000"))
    return store_dir


def test_analyze_refuses_a_store_whose_checksum_fails(capsys, tiny_path, tmp_path):
    """`qsae analyze`'s side of "store shard damaged (checksum fails)": a trained run (the embedded
    default's layers, SAEs of the config's shape) whose store has a shard zeroed; refused before the
    analysis reads a row or removes anything."""
    from qsae.rundir import RunDir
    from qsae.store import shard_checksums, shard_path
    from qsae.training.trained import TrainedSAE, save_trained

    layers, d_model = [3, 7, 11], 64
    for layer in layers:
        save_trained(RunDir(tmp_path), layer, TrainedSAE(TopKSAE(d_model, 32, 4), {"revived": 0}, {}))
    store_dir = tmp_path / "activations"
    manifest = new_manifest("tiny", None, layers, d_model, dtype="float32")
    for i in range(2):
        shard, n = f"shard-{i:05d}", 300
        rows = {str(layer): write_shard(store_dir, layer, shard, ShardRows(
            np.full(n, i), np.arange(n), np.zeros(n, np.int32), np.ones(n, bool),
            np.random.default_rng([i, layer]).normal(size=(n, d_model)).astype(np.float32)), dtype="float32")
            for layer in layers}
        manifest["shards"][shard] = {"questions": [], "rollouts": 1, "rows": rows,
                                     "checksums": shard_checksums(store_dir, shard, layers)}
    write_manifest(store_dir, manifest)
    damaged = shard_path(store_dir, 7, "shard-00001")
    zero_fill(damaged)
    (tmp_path / "analysis").mkdir()
    (tmp_path / "analysis" / "kept.json").write_text("{}")
    # A store written here, not captured from the model: no encode pass (it would replay the model).
    rc = main(["analyze", "--out", str(tmp_path), "train.n_features=32", "train.k=4", "release.every_token=false"])
    assert_fails_cleanly(capsys, rc, f"shard {damaged} does not match the sha256 checksum the manifest records")
    assert (tmp_path / "analysis" / "kept.json").exists()  # refused before the analysis removed anything


def test_analyze_refuses_to_encode_a_store_of_another_model(capsys, tiny_path, tmp_path):
    """"encode pass against a store of another model": `qsae analyze` would replay the store's rollouts
    through the config's model; refused before Ray starts or anything is written."""
    from qsae.rundir import RunDir
    from qsae.training.trained import TrainedSAE, save_trained

    for layer in (3, 7, 11):
        save_trained(RunDir(tmp_path), layer, TrainedSAE(TopKSAE(64, 32, 4), {"revived": 0}, {}))
    write_manifest(tmp_path / "activations", new_manifest("tiny-dense", None, [3, 7, 11], 64, dtype="float32"))
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    stdout = assert_fails_cleanly(capsys, main(["analyze", "--out", str(tmp_path), "train.n_features=32", "train.k=4"]),
                                  "model_id: store has 'tiny-dense', run wants 'tiny'")
    assert "[qsae] start ray" not in stdout
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


# ---------------------------------------------------------------------------------------------
# docs/faults.md's table lists these cases, and only these.

def readme_cases() -> set[str]:
    text = (ROOT / "docs" / "faults.md").read_text()
    table = text.split("<!-- bad-input table -->", 2)[1]
    return {line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ") and "---" not in line
            and not line.startswith("| Input ")}


def test_readme_lists_every_bad_input_case():
    # The last ones are tested where they happen: argparse above, Ray's resources in test_pipeline.py.
    cases = set(DRIVER_CASES) | set(TRAIN_CASES) | set(EVALUATE_CASES) | {"any config value it cannot take", "output directory unusable",
                                                    "command-line arguments wrong", "a Ray request no node can hold",
                                                    "run directory in use by another driver",
                                                    "encode pass against a store of another model",
                                                    "model weights of another model than its config"}  # test_models.py
    assert readme_cases() == cases


# ---------------------------------------------------------------------------------------------
# As real processes: the exit status and the one line reach the shell.

@pytest.mark.parametrize("argv, problem", [
    ([sys.executable, "jobs/release.py", "train.k=0"], "must be positive: k=0"),
    ([sys.executable, "-m", "qsae", "train", "--activations", "absent.npy", "--layer", "0", "--n-features", "8",
      "--k", "2", "--out", "never"], "activation file not found"),
])
def test_a_process_exits_2_with_one_line(tmp_path, argv, problem):
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [done.stderr.strip()] and problem in done.stderr
    assert done.stderr.startswith("qsae: error: ") and not (ROOT / "never").exists()


# ---------------------------------------------------------------------------------------------
# One driver per run directory.

def test_a_second_driver_on_a_run_directory_is_refused_naming_the_first(capsys, tmp_path):
    """A live driver's lock (a real process of this host) refuses the next driver before Ray starts,
    naming the holder; the lock and the run directory are left as they were."""
    from qsae.rundir import RunDir, driver_identity

    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        run = RunDir(tmp_path / "run")
        run.root.mkdir()
        run.lock.write_text(json.dumps(driver_identity(holder.pid)))
        before = run.lock.read_text()
        assert_fails_cleanly(capsys, release_main(["--out", str(run.root)]),
                             f"is in use by another qsae driver (pid {holder.pid} on this host)")
        assert run.lock.read_text() == before and sorted(p.name for p in run.root.iterdir()) == [".qsae.lock"]
    finally:
        holder.kill()
        holder.wait()


def test_a_killed_drivers_lock_is_taken_over_and_every_exit_releases_it(tmp_path):
    from qsae.rundir import RunDir, read_lock

    run = RunDir(tmp_path)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    run.lock.write_text(json.dumps({"pid": gone.pid, "host": socket.gethostname(), "started": "1"}))
    with run.driver_lock():  # the dead process's lock is taken over
        assert read_lock(run.lock)["pid"] == os.getpid()
        with pytest.raises(ValueError, match="in use by another qsae driver"):
            with run.driver_lock():  # this very process, as a second driver, is refused
                pass
    assert not run.lock.exists()
    with pytest.raises(RuntimeError), run.driver_lock():
        raise RuntimeError("a stage failed")
    assert not run.lock.exists()  # released on an error too
    run.lock.write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "1"}))
    with pytest.raises(ValueError, match="in use by a qsae driver on host elsewhere"), run.driver_lock():
        pass
