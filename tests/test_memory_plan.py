"""The memory plan (kpo_lightning/algorithms/memory_plan.py), `rollout.generation_batch_size=auto` and `run.py --plan`.

The exact terms are compared with the bytes of real tensors: the KV cache after a forward and after `generate` on a
tiny Qwen3 with the real 151,936-token vocabulary, and the logits the log-prob path asks the LM head for.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from kpo_lightning.algorithms import memory_plan as mp
from kpo_lightning.algorithms.sequence_logprobs import sequence_logprobs
from kpo_lightning.cli.config_loading import load_config
from kpo_lightning.cli.main import main
from kpo_lightning.config import ModelConfig
from kpo_lightning.models.memory import parameter_counts
from kpo_lightning.rollout import engine as engine_module
from kpo_lightning.rollout.engine import HFGenerateEngine, SamplingParams, resolve_batch_size

QWEN3_VOCAB = 151_936
# Qwen3-4B's config.json shapes (the numbers).
QWEN3_4B = dict(
    hidden_size=2560,
    num_hidden_layers=36,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    vocab_size=QWEN3_VOCAB,
    intermediate_size=9728,
    tie_word_embeddings=True,
    max_position_embeddings=40960,
)


@pytest.fixture(scope="module")
def tiny_qwen3():
    """2 layers, hidden 32, 4 heads of head_dim 16 (not hidden / heads = 8), 2 KV heads, the real vocabulary."""
    config = Qwen3Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=64,
        vocab_size=QWEN3_VOCAB,
        tie_word_embeddings=True,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    return Qwen3ForCausalLM(config).eval()


def cache_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def test_shapes_respect_head_dim_and_kv_heads():
    shapes = mp.Shapes.from_config(Qwen3Config(**QWEN3_4B))
    assert (shapes.head_dim, shapes.kv_heads, shapes.layers, shapes.vocab) == (128, 8, 36, QWEN3_VOCAB)
    # The figure: 2 x 36 layers x 8 KV heads x 128 x 2 B = 144 KiB per token in bfloat16.
    assert mp.kv_cache_bytes_per_token(shapes, 2) == 144 * 1024
    # A config without head_dim / num_key_value_heads: hidden / heads, and every head has its own K and V.
    plain = SimpleNamespace(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, vocab_size=10)
    shapes = mp.Shapes.from_config(plain)
    assert (shapes.head_dim, shapes.kv_heads, shapes.intermediate) == (16, 4, 256)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_cache_bytes_equal_a_real_cache_after_forward_and_generate(tiny_qwen3, dtype):
    model = tiny_qwen3.to(dtype)
    shapes = mp.Shapes.from_config(model.config)
    per_token = mp.kv_cache_bytes_per_token(shapes, dtype.itemsize)
    ids = torch.randint(3, 1000, (3, 7))
    with torch.no_grad():
        cache = model(input_ids=ids, use_cache=True).past_key_values
    assert cache_bytes(cache) == per_token * 3 * 7
    prompt, new = 5, 6
    with torch.no_grad():
        out = model.generate(
            input_ids=ids[:, :prompt],
            attention_mask=torch.ones(3, prompt, dtype=torch.long),
            do_sample=False,
            max_new_tokens=new,
            min_new_tokens=new,
            eos_token_id=None,
            pad_token_id=0,
            return_dict_in_generate=True,
        )
    # The last sampled token is never fed back: the cache holds prompt + new - 1 positions; the plan counts + new.
    assert out.sequences.shape[1] == prompt + new
    assert cache_bytes(out.past_key_values) == per_token * 3 * (prompt + new - 1)
    tiny_qwen3.to(torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_bytes_equal_what_the_log_prob_path_makes(tiny_qwen3, dtype):
    model = tiny_qwen3.to(dtype)
    seen = []
    hook = model.lm_head.register_forward_hook(lambda m, i, out: seen.append(out.numel() * out.element_size()))
    batch, prompt, response = 3, 4, 6
    ids = torch.randint(3, 1000, (batch, prompt + response))
    try:
        logp, _ = sequence_logprobs(model, ids, torch.ones_like(ids), prompt_length=prompt)
    finally:
        hook.remove()
        tiny_qwen3.to(torch.float32)
    assert logp.shape == (batch, response)
    assert seen == [mp.logits_bytes(batch, response, QWEN3_VOCAB, dtype.itemsize)]


def saved_for_backward_bytes(model, ids, autocast: bool) -> int:
    """Bytes of the distinct storages a forward saves for backward, weights excluded (autocast's cast copies of the
    weights are counted: they are saved too)."""
    storages: dict[int, int] = {}
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", enabled=autocast):
        model.model(input_ids=ids, attention_mask=torch.ones_like(ids))
    return sum(n for ptr, n in storages.items() if ptr not in weights)


@pytest.mark.parametrize("autocast", [False, True])
def test_activation_estimate_is_near_what_a_forward_saves(autocast):
    """The activation formula against the bytes a real forward saves (a 4-layer Qwen3, 4 x 64 tokens). Measured
    estimate / saved: 1.12 float32, 0.87 bf16 autocast; with checkpointing against the forward's saved layer
    inputs plus one layer's share of the uncheckpointed bytes (what backward recomputes): 1.03 and 0.82. Bounds
    [0.75, 1.33]: an estimate, not an exact term."""
    config = Qwen3Config(
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        intermediate_size=384,
        vocab_size=1000,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    ids = torch.randint(0, 1000, (4, 64))
    shapes, compute_bytes = mp.Shapes.from_config(config), 2 if autocast else 4
    full = saved_for_backward_bytes(Qwen3ForCausalLM(config).train(), ids, autocast)
    estimate = mp.activation_bytes(shapes, ids.numel(), compute_bytes, 4, checkpointing=False)
    assert 0.75 <= estimate / full <= 1.33, estimate / full
    model = Qwen3ForCausalLM(config).train()
    model.gradient_checkpointing_enable()
    layer_inputs = saved_for_backward_bytes(model, ids, autocast)
    assert layer_inputs < full / 5  # checkpointing keeps little
    estimate = mp.activation_bytes(shapes, ids.numel(), compute_bytes, 4, checkpointing=True)
    assert 0.75 <= estimate / (layer_inputs + full / config.num_hidden_layers) <= 1.33


def test_parameter_counts_on_meta_equal_the_real_model(tiny_qwen3):
    counts = parameter_counts(tiny_qwen3.config, ModelConfig())
    real = sum(p.numel() for p in tiny_qwen3.parameters())
    assert counts["total"] == counts["trainable"] == real  # tied embedding counted once
    layer = sum(p.numel() for p in tiny_qwen3.model.layers[0].parameters())
    assert counts["largest_layer"] == layer
    assert counts["root"] == real - 2 * layer
    lora = ModelConfig(lora=ModelConfig().lora.__class__(r=4))
    from kpo_lightning.models.loading import apply_lora

    wrapped = apply_lora(Qwen3ForCausalLM(tiny_qwen3.config), lora)
    with_lora = parameter_counts(tiny_qwen3.config, lora)
    assert with_lora["trainable"] == sum(p.numel() for p in wrapped.parameters() if p.requires_grad) > 0
    assert with_lora["total"] == sum(p.numel() for p in wrapped.parameters())


def plan(overrides, processes, gib=80.0, lora_trainable=None):
    cfg = load_config(["preset=paper", *overrides])
    shapes = mp.Shapes.from_config(Qwen3Config(**QWEN3_4B))
    counts = mp.ParameterCounts(
        total=4_000_000_000, trainable=lora_trainable or 4_000_000_000, root=400_000_000, largest_layer=100_000_000
    )
    return mp.plan_memory(cfg, shapes, counts, gib * mp.GIB, processes)


def test_fsdp_divides_weights_gradients_and_optimizer_state_by_the_process_count():
    one = plan(["trainer.strategy=auto"], 1)
    eight = plan(["trainer.strategy=fsdp"], 8)
    for line in ("weights", "gradients", "optimizer (AdamW, 2 moments)"):
        assert eight.lines[line] * 8 == one.lines[line]
    assert one.lines["weights"] == 4e9 * 4  # float32 master weights under bf16-mixed
    assert one.lines["optimizer (AdamW, 2 moments)"] == 2 * 4e9 * 4
    bf16_true = plan(["trainer.strategy=auto", "trainer.precision=bf16-true"], 1)
    assert bf16_true.lines["weights"] == 4e9 * 2


def test_lora_counts_only_adapter_gradients_and_state():
    lora = plan(["trainer.strategy=auto", "model.lora.r=16"], 1, lora_trainable=30_000_000)
    assert lora.lines["weights"] == 4e9 * 4
    assert lora.lines["gradients"] == 30e6 * 4
    assert lora.lines["optimizer (AdamW, 2 moments)"] == 2 * 30e6 * 4


def test_checkpointing_shrinks_activations_and_the_micro_batch_scales_logits():
    with_ckpt = plan(["trainer.strategy=fsdp"], 8)
    without = plan(["trainer.strategy=fsdp", "model.gradient_checkpointing=false"], 8)
    key_with = "training: activations (with checkpointing, estimate)"
    key_without = "training: activations (without checkpointing, estimate)"
    assert with_ckpt.lines[key_with] < without.lines[key_without] / 5
    assert with_ckpt.activations_other == without.lines[key_without]
    half = plan(["trainer.strategy=fsdp", "optim.micro_batch_size=4"], 8)
    assert half.lines["training: logits at micro-batch 4"] * 2 == with_ckpt.lines["training: logits at micro-batch 8"]
    assert with_ckpt.lines["training: logits at micro-batch 8"] == 8 * 4096 * QWEN3_VOCAB * 2


def test_auto_generation_batch_fits_beside_the_rest_and_an_int_is_kept():
    auto = plan(["trainer.strategy=fsdp"], 8)
    assert auto.fits and auto.generation_batch >= 1
    assert auto.generation_peak <= auto.usable
    bigger = plan(["trainer.strategy=fsdp"], 8, gib=141)
    assert bigger.generation_batch >= 2 * auto.generation_batch  # twice the free memory: at least twice the batch
    too_many = plan(["trainer.strategy=fsdp", "rollout.generation_batch_size=512"], 8)
    assert too_many.generation_batch == 0 and not too_many.fits  # an int that does not fit is reported, not changed
    assert plan(["trainer.strategy=fsdp", "rollout.generation_batch_size=8"], 8).generation_batch == 8


def test_generation_batch_size_is_a_bounded_power_of_two():
    assert mp.generation_batch_size(99.0, 10) == 8
    assert mp.generation_batch_size(9.0, 10) == 0
    assert mp.generation_batch_size(1e18, 10) == mp.AUTO_MAX_SEQUENCES
    assert mp.generation_batch_size(160.0, 10) == 16


def test_auto_batch_on_cpu_is_bounded_and_follows_free_memory(tiny_model, monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_batch_size(0, tiny_model, cpu, 10, 10) == 0
    assert resolve_batch_size(5, tiny_model, cpu, 10, 10) == 5
    auto = resolve_batch_size("auto", tiny_model, cpu, 10, 10)
    assert 1 <= auto <= mp.AUTO_MAX_SEQUENCES  # from /proc/meminfo: a tiny model gets the cap
    per_sequence = mp.generation_bytes_per_sequence(mp.Shapes.from_config(tiny_model.config), 10, 10, 4)
    monkeypatch.setattr(engine_module, "free_device_bytes", lambda device: 5.5 * per_sequence / (1 - mp.HEADROOM))
    assert resolve_batch_size("auto", tiny_model, cpu, 10, 10) == 4
    monkeypatch.setattr(engine_module, "free_device_bytes", lambda device: 0)
    assert resolve_batch_size("auto", tiny_model, cpu, 10, 10) == 1  # never 0: try one sequence at a time
    shapeless = torch.nn.Linear(2, 2)
    shapeless.config = SimpleNamespace(vocab_size=10)
    assert resolve_batch_size("auto", shapeless, cpu, 10, 10) == 0  # no shapes in its config: all at once


def test_auto_batch_sizes_the_kv_cache_in_the_dtype_generate_will_use(tiny_model, monkeypatch):
    """Weights' dtype without autocast; autocast's (bfloat16: half the KV cache) under it."""
    cpu, shapes = torch.device("cpu"), mp.Shapes.from_config(tiny_model.config)
    free = 40 * mp.generation_bytes_per_sequence(shapes, 10, 10, 4)
    monkeypatch.setattr(engine_module, "free_device_bytes", lambda device: free)
    for dtype, autocast in [(4, False), (2, True)]:
        expected = mp.generation_batch_size(
            free * (1 - mp.HEADROOM), mp.generation_bytes_per_sequence(shapes, 10, 10, dtype)
        )
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            assert resolve_batch_size("auto", tiny_model, cpu, 10, 10) == expected
    assert expected == 64  # bfloat16: 40 x (1 - headroom) x ~2 sequences fit -> 64; float32 gave 32


def test_generate_with_auto_calls_generate_in_batches_of_the_chosen_size(tiny_model, char_tokenizer, monkeypatch):
    calls = []
    original = tiny_model.generate
    monkeypatch.setattr(tiny_model, "generate", lambda **kw: calls.append(kw["input_ids"].shape[0]) or original(**kw))
    monkeypatch.setattr(engine_module, "resolve_batch_size", lambda *args: 4)
    params = SamplingParams(num_samples=3, max_new_tokens=4, batch_size="auto", seed=0)
    gen = HFGenerateEngine().generate(tiny_model, char_tokenizer, ["1+1=", "2+2=", "3+3="], params)
    assert calls == [4, 4, 1] and gen.input_ids.shape[0] == 9


def test_generation_batch_size_config_values(capsys):
    cfg = load_config([])
    assert cfg.rollout.generation_batch_size == "auto"
    # training rollouts, validation and mode=eval all sample with it
    assert SamplingParams.for_training(cfg.rollout).batch_size == "auto"
    assert SamplingParams.for_eval(cfg.rollout, cfg.eval).batch_size == "auto"
    assert load_config(["rollout.generation_batch_size=16"]).rollout.generation_batch_size == 16
    for bad, needle in [("abc", "auto"), ("-1", "auto"), ("1.5", "integer or auto")]:
        code = main([f"rollout.generation_batch_size={bad}", "--print-config"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and "rollout.generation_batch_size" in err and needle in err


@pytest.fixture(scope="module")
def qwen3_4b_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen3-4b")
    Qwen3Config(**QWEN3_4B).save_pretrained(folder)  # config.json only: no weights
    return folder


def test_plan_qwen3_4b_paper_preset_fits_8_gpus_of_80_gib(qwen3_4b_folder, capsys):
    code = main(
        ["--plan", "preset=paper", f"model.name_or_path={qwen3_4b_folder}", "--device-memory-gib", "80"]
        + ["trainer.devices=8", "trainer.strategy=fsdp"]  # options between overrides work
    )
    out = capsys.readouterr().out
    assert code == 0, out
    for line in ("weights", "gradients", "optimizer", "KV cache at batch", "logits at micro-batch 8", "activations"):
        assert line in out
    assert "with checkpointing" in out and "without checkpointing" in out and ": fits" in out
    batch = int(out.split("generation batch: ")[1].split()[0])
    assert batch >= 1
    assert "4.022B parameters" in out  # exact count of Qwen3-4B (tied embedding once)


def test_plan_qwen3_4b_on_one_24_gib_gpu_names_what_to_change(qwen3_4b_folder, capsys):
    code = main(
        ["--plan", "preset=paper", f"model.name_or_path={qwen3_4b_folder}", "trainer.devices=1"]
        + ["trainer.strategy=auto", "--device-memory-gib", "24"]
    )
    captured = capsys.readouterr()
    err = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1, captured.err
    assert err[0].startswith("error: --plan: does not fit") and "trainer.strategy=fsdp" in err[0]
    assert "does NOT fit" in captured.out


def test_plan_input_errors_are_one_line(tmp_path, capsys):
    cases = [
        (["--plan", f"model.name_or_path={tmp_path}", "--device-memory-gib", "8"], str(tmp_path)),
        (["--plan", "--device-memory-gib", "-1"], "--device-memory-gib"),
        (["--device-memory-gib", "8"], "--plan"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--plan", "trainer.accelerator=gpu"], "--device-memory-gib"))
    for args, needle in cases:
        code = main(args)
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert code == 2 and len(err) == 1 and needle in err[0], (args, err)


def test_plan_of_the_default_job_on_this_cpu_fits(capsys):
    assert main(["--plan"]) == 0
    assert "available RAM" in capsys.readouterr().out
