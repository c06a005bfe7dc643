"""Model loading, layer lookup, chat prompts and the tiny-model factory."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from qsae.models import (
    ModelLoadError,
    attention_layer_indices,
    check_fits,
    check_layers,
    decoder_layers,
    load_model,
    memory_budget,
    missing_fast_kernels,
    model_dims,
    parameter_count,
    resolve_model_path,
)
from qsae.questions import chat_prompt
from qsae.tiny import TinyRecipe, build_tiny_model


def test_tiny_model_is_a_qwen3_5_hybrid(tiny):
    model, _ = tiny
    config = model.config
    assert config.model_type == "qwen3_5" and type(model).__name__ == "Qwen3_5ForConditionalGeneration"
    text = config.get_text_config()
    assert text.num_hidden_layers >= 8 and text.hidden_size >= 64
    assert attention_layer_indices(config) == [i for i in range(text.num_hidden_layers) if (i + 1) % 4 == 0]
    assert {"linear_attention", "full_attention"} == set(text.layer_types)
    layers = decoder_layers(model)
    assert layers is model.model.language_model.layers and len(layers) == text.num_hidden_layers


def test_decoder_layers_of_a_causal_lm(tiny):
    from transformers import Qwen3_5ForCausalLM

    causal = Qwen3_5ForCausalLM(tiny[0].config.get_text_config())
    assert decoder_layers(causal) is causal.model.layers


def test_chat_prompt_switches_thinking(tiny):
    _, tokenizer = tiny
    off, on = chat_prompt(tokenizer, "2+2?", thinking=False), chat_prompt(tokenizer, "2+2?", thinking=True)
    assert off.startswith("<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n")
    assert off.endswith("<think>\n\n</think>\n\n") and on.endswith("<|im_start|>assistant\n")


def test_tiny_model_writes_answers_of_both_classes(tiny):
    """Without both correct and wrong rollouts the correctness statistics would be undefined."""
    from qsae.engines.hf_engine import HFEngine
    from qsae.questions import BUNDLED_QUESTIONS, load_questions
    from qsae.rollout import run_rollouts

    model, tokenizer = tiny
    rollouts = run_rollouts(HFEngine(model, tokenizer, 256, 16), tokenizer, load_questions(BUNDLED_QUESTIONS), 0, thinking=False, seed=0)
    parsed = [r for r in rollouts if r.predicted_letter is not None]
    assert len(parsed) >= len(rollouts) // 2
    assert 0 < sum(r.correct for r in rollouts) < len(rollouts)
    assert sum(r.n_response_tokens for r in rollouts) > 3000


def test_tiny_build_is_deterministic(tmp_path):
    recipe = TinyRecipe(num_hidden_layers=4, finetune_steps=3)
    a, b = build_tiny_model(tmp_path / "a", recipe), build_tiny_model(tmp_path / "b", recipe)
    model_a, tok_a = load_model(str(a))
    model_b, tok_b = load_model(str(b))
    assert tok_a.get_vocab() == tok_b.get_vocab()
    state_b = model_b.state_dict()
    for name, tensor in model_a.state_dict().items():
        assert torch.equal(tensor, state_b[name]), name


def test_model_path_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model_path(str(tmp_path / "no-such-model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="could not load"):
        model_dims(str(tmp_path / "empty"))


def test_layer_range_is_checked(tiny_path):
    n_layers, d_model = model_dims(tiny_path)
    check_layers([0, n_layers - 1], n_layers)
    with pytest.raises(ValueError, match=f"out of range.*{n_layers} decoder layers"):
        check_layers([3, n_layers], n_layers)


def test_a_model_larger_than_its_replica_is_refused(tiny_path):
    n_parameters = parameter_count(tiny_path)
    model = load_model(tiny_path)[0]
    assert n_parameters == sum(p.numel() for p in model.state_dict().values())
    check_fits("tiny", n_parameters, "float32", memory_budget("cpu"))
    one_gpu = (n_parameters * 2 - 1, "1 GPU(s) with 0.0 GiB in all")  # one byte short of the bf16 weights
    check_fits("tiny", n_parameters, "float16", (n_parameters * 2, "exactly enough"))
    with pytest.raises(ModelLoadError, match="needs about .* GiB for its weights in bfloat16.*capture.gpus_per_actor"):
        check_fits("tiny", n_parameters, "bfloat16", one_gpu)
    assert parameter_count("Qwen/Qwen3.6-27B") is None  # a hub id: unknown before download, not refused


def test_the_missing_fast_linear_attention_kernels_are_named_for_a_hybrid_model_on_cuda(tiny, tiny_path):
    model, _ = tiny
    absent = [name for module, name in (("fla", "flash-linear-attention"), ("causal_conv1d", "causal-conv1d"))
              if importlib.util.find_spec(module) is None]
    assert missing_fast_kernels(model.config, "cuda") == absent
    assert missing_fast_kernels(model.config, "cpu") == []  # CUDA/Triton kernels: nothing to miss on CPU
    dense, _ = load_model("tiny-dense")
    assert missing_fast_kernels(dense.config, "cuda") == []  # no linear-attention layers
    loaded, _ = load_model(tiny_path, device="cpu")
    assert {p.device.type for p in loaded.parameters()} == {"cpu"} and not loaded.training


def test_weights_of_another_model_than_the_config_describes_are_refused(tmp_path):
    """transformers would leave unmatched parameters at random init (or skip unused weights) with only a
    report: the tiny dense model's weights under a Llama config (no q/k norms), and with one of its
    weights gone, are refused, naming what does not fit."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from qsae.tiny import TINY_DENSE_MODEL

    source = resolve_model_path(TINY_DENSE_MODEL)
    llama = tmp_path / "llama"
    shutil.copytree(source, llama)
    config = json.loads((llama / "config.json").read_text())
    (llama / "config.json").write_text(json.dumps({**config, "model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ModelLoadError, match=r"12 in the weights but not the model \(e.g. model.layers.0.self_attn.k_norm"):
        load_model(str(llama))
    short = tmp_path / "short"
    shutil.copytree(source, short)
    tensors = load_file(short / "model.safetensors")
    del tensors["model.norm.weight"]
    save_file(tensors, short / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"1 missing from the weights \(e.g. model.norm.weight\)"):
        load_model(str(short))
    assert load_model(source)[0] is not None  # the real one loads
