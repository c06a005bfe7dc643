"""Pipeline configs: TOML files, `section.key=value` overrides, type checks and validation."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from qsae.config import (
    CONFIG_DIR,
    DEFAULT_CONFIG,
    ConfigError,
    SECTIONS,
    PipelineConfig,
    load_config,
    parse_override,
)


def test_default_is_the_tiny_config():
    assert DEFAULT_CONFIG == CONFIG_DIR / "tiny.toml"
    assert load_config() == load_config(CONFIG_DIR / "tiny.toml")


def test_tiny_config_loads_and_validates():
    cfg = load_config(CONFIG_DIR / "tiny.toml")
    assert isinstance(cfg, PipelineConfig)
    assert cfg.model.name == "tiny"
    assert cfg.capture.layers == [3, 7, 11]
    assert cfg.train.k <= cfg.train.n_features
    cfg.validate()


def test_qwen_config_is_the_original_release():
    cfg = load_config(CONFIG_DIR / "qwen36_27b.toml")
    assert cfg.capture.layers == [11, 31, 55]
    assert cfg.train.n_features == 4096
    assert cfg.train.k == 32
    assert cfg.rollout.num_questions == 150
    assert cfg.rollout.seed == 100
    assert cfg.capture.max_tokens_per_layer == 200_000
    assert cfg.train.epochs == 20
    assert cfg.train.batch_size == 4096
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.rollout.engine == "vllm" and cfg.rollout.decode_cuda_graphs
    # Every epoch one shuffle of the whole sample, as the original shuffled it in memory.
    assert cfg.train.shuffle_buffer_rows >= cfg.capture.max_tokens_per_layer
    cfg.validate()


def test_the_transformers_variant_of_the_reproduction_differs_only_in_its_engine():
    vllm = dataclasses.asdict(load_config(CONFIG_DIR / "qwen36_27b.toml"))
    hf = dataclasses.asdict(load_config(CONFIG_DIR / "qwen36_27b_transformers.toml"))
    assert hf["rollout"]["engine"] == "transformers"
    engine_keys = {"engine", "batch_size", "tensor_parallel_size", "gpu_memory_utilization", "decode_cuda_graphs",
                   "max_model_len"}
    for cfg in (vllm, hf):
        cfg["rollout"] = {key: value for key, value in cfg["rollout"].items() if key not in engine_keys}
        del cfg["out"]  # a store of its own: rows of the two engines are not mixed
    assert vllm == hf


def test_overrides_apply_with_the_right_types():
    cfg = load_config(None, ["train.epochs=3", "capture.layers=[1,2]", "model.name=foo", "out=x"])
    assert cfg.train.epochs == 3 and type(cfg.train.epochs) is int
    assert cfg.capture.layers == [1, 2] and all(type(v) is int for v in cfg.capture.layers)
    assert cfg.model.name == "foo"
    assert cfg.out == "x"


def test_the_vllm_table_takes_overrides_key_by_key(tmp_path):
    """[rollout.vllm] is a table of engine arguments: an override of one key keeps the file's others."""
    path = tmp_path / "run.toml"
    path.write_text('[rollout]\nengine = "vllm"\n[rollout.vllm]\nmax_num_seqs = 128\nblock_size = 32\n')
    cfg = load_config(path, ["rollout.vllm.max_num_seqs=256", "rollout.vllm.swap_space=2"])
    assert cfg.rollout.vllm == {"max_num_seqs": 256, "block_size": 32, "swap_space": 2}
    assert load_config(None).rollout.vllm == {} and load_config(None).rollout.vllm is not load_config(None).rollout.vllm


def test_overrides_win_over_the_file():
    cfg = load_config(CONFIG_DIR / "qwen36_27b.toml", ["train.k=8", "rollout.num_questions=5"])
    assert cfg.train.k == 8
    assert cfg.rollout.num_questions == 5
    assert cfg.train.n_features == 4096  # untouched keys keep the file's value


def test_override_int_for_float_becomes_float():
    cfg = load_config(None, ["train.lr=1", "capture.cpus_per_actor=2"])
    assert cfg.train.lr == 1.0 and type(cfg.train.lr) is float
    assert type(cfg.capture.cpus_per_actor) is float


def test_override_values_are_toml_literals_or_bare_strings():
    assert parse_override("train.epochs=7") == {"train": {"epochs": 7}}
    assert parse_override('model.name="a=b"') == {"model": {"name": "a=b"}}
    assert parse_override("model.name=Qwen/Qwen3.6-27B") == {"model": {"name": "Qwen/Qwen3.6-27B"}}
    assert parse_override("release.export_activations=false") == {"release": {"export_activations": False}}


def test_override_without_equals_sign_raises():
    with pytest.raises(ConfigError, match="train.epochs"):
        load_config(None, ["train.epochs"])


def test_unknown_section_key_is_named():
    with pytest.raises(ConfigError, match="train.epoch'"):
        load_config(None, ["train.epoch=3"])


def test_unknown_top_level_key_is_named():
    with pytest.raises(ConfigError, match="'bogus'"):
        load_config(None, ["bogus=1"])


def test_unknown_key_in_a_file_is_named(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[capture]\nlayer = [1]\n")
    with pytest.raises(ConfigError, match="capture.layer'"):
        load_config(path)


def test_section_given_as_a_value_raises():
    with pytest.raises(ConfigError, match="train"):
        load_config(None, ["train=3"])


@pytest.mark.parametrize(
    "override, key",
    [
        ('train.epochs="many"', "train.epochs"),
        ("train.epochs=many", "train.epochs"),
        ("capture.layers=[1.5]", "capture.layers"),
        ("capture.layers=3", "capture.layers"),
        ("train.epochs=true", "train.epochs"),
        ("capture.layers=[true]", "capture.layers"),
        ("train.lr=false", "train.lr"),
        ("model.name=3", "model.name"),
        ("release.export_activations=1", "release.export_activations"),
    ],
)
def test_wrong_type_raises_and_names_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_k_above_n_features_raises():
    with pytest.raises(ConfigError, match="train: k=17 exceeds n_features=16"):
        load_config(None, ["train.n_features=16", "train.k=17"])
    assert load_config(None, ["train.n_features=16", "train.k=16"]).train.k == 16


@pytest.mark.parametrize(
    "override, key",
    [("capture.layers=[]", "capture.layers"), ("capture.dtype=bfloat16", "capture.dtype"),
     ("train.holdout_fraction=1.0", "holdout_fraction"), ("capture.num_actors=0", "num_actors"),
     ("release.unscored_rollouts=maybe", "release.unscored_rollouts"), ("capture.max_norm_multiple=0.5", "max_norm_multiple"),
     ("capture.max_norm_multiple=-1", "max_norm_multiple"), ("release.permutations=0", "release.permutations"),
     ("release.bootstrap=0", "release.bootstrap"), ("release.fidelity_rollouts=0", "release.fidelity_rollouts")],
)
def test_invalid_values_raise(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, [override])


def test_missing_config_file_is_named(tmp_path):
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="nope.toml"):
        load_config(path)


def test_invalid_toml_is_named(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("[train\nepochs = 3\n")
    with pytest.raises(ConfigError, match="broken.toml"):
        load_config(path)



def test_data_parallel_gpu_workers_need_a_whole_gpu_each():
    # NCCL refuses two ranks on one GPU, and Ray may place fractional workers together.
    with pytest.raises(ConfigError, match="one whole GPU per worker"):
        load_config(None, ["train.workers_per_layer=2", "train.gpus_per_layer=1"])
    assert load_config(None, ["train.workers_per_layer=2", "train.gpus_per_layer=2"]).train.gpus_per_layer == 2


def test_readme_config_table_names_every_field():
    """README's configuration table has a row naming each config field as `section.field` (top-level
    ones as `field`), so no setting goes undocumented there."""
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    table = text[text.index("## Configuration"):text.index("\n## ", text.index("## Configuration") + 1)]
    named = set(re.findall(r"`([a-z_]+(?:\.[a-z_0-9]+)?)`", table))
    fields = {f"{section}.{f.name}" for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
    fields |= {"out", "ray_address"}
    assert fields - named == set()
