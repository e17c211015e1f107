"""bf16 weights that still learn at lr 1e-5; optimizer options; gradient checkpointing; the 7B memory budget."""
import pytest
import torch

from rklu_fast.train.lowmem import (BF16AdamW, GiB, build_optimizer, estimate_training_memory,
                                    set_gradient_checkpointing, stochastic_round_to_bf16)


def _regression(seed: int):
    """A linear model with LLM-like weights (std 0.02) and a target it can move towards for many steps."""
    g = torch.Generator().manual_seed(seed)
    w0 = (torch.randn(64, 64, generator=g) * 0.02).to(torch.bfloat16).float()  # bf16-representable start
    x = torch.randn(256, 64, generator=g)
    y = x @ (w0 + torch.randn(64, 64, generator=g) * 0.02)
    return w0, x, y


def _train(w0, x, y, make_opt, dtype, steps=200):
    w = torch.nn.Parameter(w0.clone().to(dtype))
    opt = make_opt([w])
    for _ in range(steps):
        opt.zero_grad()
        (x @ w.float() - y).pow(2).mean().backward()  # fp32 compute: only storage differs
        opt.step()
    return w.detach().float()


def test_bf16_weights_track_fp32_master_at_lr_1e_5():
    w0, x, y = _regression(seed=torch.seed() % 2**31)
    kw = dict(lr=1e-5, weight_decay=0.01)
    ref = _train(w0, x, y, lambda p: torch.optim.AdamW(p, **kw), torch.float32) - w0
    naive = _train(w0, x, y, lambda p: torch.optim.AdamW(p, **kw), torch.bfloat16) - w0
    # 200 steps of ~1e-5 move each weight ~2e-3 in fp32; naive bf16 rounds away every update smaller than
    # half an ulp (all but the weights nearest zero)
    assert ref.norm() > 0.5 * 2e-3 * 64
    assert naive.norm() < 0.5 * ref.norm()
    for update, min_cos, max_norm_err in (("kahan", 0.999, 0.01), ("stochastic", 0.95, 0.1)):
        ours = _train(w0, x, y, lambda p: BF16AdamW(p, update=update, **kw), torch.bfloat16) - w0
        cos = torch.nn.functional.cosine_similarity(ours.flatten(), ref.flatten(), dim=0)
        assert cos > min_cos, update
        assert abs(ours.norm() / ref.norm() - 1) < max_norm_err, update


def test_fp32_states_kahan_matches_torch_adamw_closely():
    """With fp32 states the arithmetic is torch.optim.AdamW's; only the bf16 storage of weights differs."""
    w0, x, y = _regression(seed=1)
    kw = dict(lr=1e-4, weight_decay=0.01)
    ref = _train(w0, x, y, lambda p: torch.optim.AdamW(p, **kw), torch.float32, steps=50)
    ours = _train(w0, x, y, lambda p: BF16AdamW(p, state_dtype=torch.float32, **kw), torch.bfloat16, steps=50)
    # the storage rounding (≤ 1 bf16 ulp per weight), no drift: 2% of the distance travelled
    assert (ours - ref).norm() < 0.02 * (ref - w0).norm()


def test_stochastic_rounding_is_unbiased_and_brackets():
    x = torch.randn(1000) * 3
    lo = x.to(torch.bfloat16)  # nearest; the two neighbours bracket x
    samples = torch.stack([stochastic_round_to_bf16(x, torch.Generator().manual_seed(s)) for s in range(400)]).float()
    up = torch.nextafter(lo, torch.tensor(float("inf"), dtype=torch.bfloat16)).float()
    down = torch.nextafter(lo, torch.tensor(float("-inf"), dtype=torch.bfloat16)).float()
    assert ((samples >= down) & (samples <= up)).all()
    ulp = (up - down) / 2
    # mean of 400 draws: error ≤ ~ulp/(2·sqrt(400)) per element; 5 sigma
    assert ((samples.mean(0) - x).abs() <= 5 * ulp / (2 * 20)).float().mean() > 0.999
    with pytest.raises(TypeError, match="x: expected float32"):
        stochastic_round_to_bf16(x.double())


def test_optimizer_options_and_errors():
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))
    assert isinstance(build_optimizer([p], "adamw_bf16", lr=1e-5, update="stochastic"), BF16AdamW)
    assert isinstance(build_optimizer([p], "adamw", lr=1e-5), torch.optim.AdamW)
    with pytest.raises(ValueError, match="optimizer: must be one of"):
        build_optimizer([p], "sgd", lr=1e-5)
    with pytest.raises(ValueError, match="update: must be one of"):
        BF16AdamW([p], update="round")
    with pytest.raises(TypeError, match="params: BF16AdamW is for bf16"):
        BF16AdamW([torch.nn.Parameter(torch.zeros(3))])
    try:
        build_optimizer([p], "adamw_8bit", lr=1e-5)
    except ValueError as e:  # neither torchao nor bitsandbytes here: the error says what to install
        assert "torchao" in str(e) and "bitsandbytes" in str(e)


def test_8bit_optimizer_takes_parameter_groups(monkeypatch):
    """torchao's AdamW8bit (stood in for: it is not installed here) gets the groups as they are, and stochastic
    rounding exactly when a group holds bf16 weights."""
    import sys
    import types

    from rklu_fast.train.lowmem import parameter_groups
    made = []

    class FakeAdamW8bit:
        def __init__(self, params, **kw):
            made.append((params, kw))
    fake = types.ModuleType("torchao.optim")
    fake.AdamW8bit = FakeAdamW8bit
    monkeypatch.setitem(sys.modules, "torchao", types.ModuleType("torchao"))
    monkeypatch.setitem(sys.modules, "torchao.optim", fake)
    for dtype, stochastic in ((torch.bfloat16, True), (torch.float32, False)):
        model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4)).to(dtype)
        groups = parameter_groups(model, 0.01)
        build_optimizer(groups, "adamw_8bit", lr=1e-5)
        params, kw = made[-1]
        assert params == groups and kw["bf16_stochastic_round"] is stochastic and kw["weight_decay"] == 0.01


def test_gradient_checkpointing_gives_the_same_gradients():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32)
    model = LlamaForCausalLM(cfg)
    model.train()
    ids = torch.randint(0, 96, (2, 12))
    grads = []
    for enabled in (False, True):
        set_gradient_checkpointing(model, enabled)
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("optimizer,dtype", [("adamw_bf16", torch.bfloat16), ("adamw", torch.float32)])
def test_memory_estimate_per_parameter_terms_match_bytes_measured_on_a_real_model(optimizer, dtype):
    """The estimate's weight, gradient, optimizer-state and compensation terms, evaluated for a real tiny Llama,
    equal the bytes its tensors hold after one training step with that optimizer (measured, not derived)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    model = LlamaForCausalLM(cfg).to(dtype)
    opt = build_optimizer(model.parameters(), optimizer, lr=1e-3, update="kahan")
    ids = torch.randint(0, 64, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    params, states = list(model.parameters()), list(opt.state.values())
    measured = {"weights": sum(p.nbytes for p in params), "gradients": sum(p.grad.nbytes for p in params),
                "optimizer_states": sum(s[k].nbytes for s in states for k in ("exp_avg", "exp_avg_sq")),
                "kahan_compensation": sum(s["compensation"].nbytes for s in states if "compensation" in s)}
    nbytes = torch.finfo(dtype).bits // 8
    plan = estimate_training_memory(sum(p.numel() for p in params), n_layers=2, hidden=32, vocab=64,
                                    tokens_per_micro_batch=16, weight_bytes=nbytes, grad_bytes=nbytes,
                                    optimizer=optimizer if optimizer == "adamw_bf16" else "adamw_fp32")
    for term, value in measured.items():
        assert plan[term] * GiB == value, term


def test_llama2_7b_cached_full_parameter_plan_fits_75_gib():
    """The documented plan (docs/memory-and-scale.md): bf16 weights + grads, bf16 states, Kahan, checkpointing,
    micro-batch 4 × 512 tokens, teacher cached.  Its parameter count is that of Llama-2-7B built from its
    config (on the meta device: no memory), not a typed-in constant."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
    with torch.device("meta"):
        n_params = sum(p.numel() for p in LlamaForCausalLM(cfg).parameters())
    assert n_params == 6_738_415_616  # the published size of Llama-2-7b
    llama7b = dict(n_params=n_params, n_layers=32, hidden=4096, vocab=32000, tokens_per_micro_batch=4 * 512)
    plan = estimate_training_memory(**llama7b, optimizer="adamw_bf16", update="kahan")
    assert plan["total"] <= 75
    # the naive plan (fp32 weights, fp32 Adam states, teachers online) does not fit
    naive = estimate_training_memory(**llama7b, weight_bytes=4, grad_bytes=4, optimizer="adamw_fp32",
                                     gradient_checkpointing=False, teacher_models_on_gpu=2)
    assert naive["total"] > 75


def test_loop_trains_bf16_weights_with_the_configured_options(tmp_path):
    """``loop.train`` builds the optimizer and checkpointing the stage config names (bf16 model, adamw_bf16)."""
    from accelerate import Accelerator
    from transformers import LlamaConfig, LlamaForCausalLM

    from rklu_fast.config import ConfigError, load_config
    from rklu_fast.train import loop
    from rklu_fast.train.methods import make_method

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = [torch.randint(1, 64, (9,)).tolist() for _ in range(8)]
    examples = [{"input_ids": x, "labels": [-100] * 3 + x[3:], "attention_mask": [1] * 9} for x in ids]
    stage = {"epochs": 1, "lr": 1e-3, "weight_decay": 0.01, "batch_size": 2, "micro_batch_size": 1,
             "warmup_epochs": 1.0, "max_grad_norm": 1.0, "optimizer": "adamw_bf16", "bf16_update": "kahan",
             "gradient_checkpointing": True}
    tok = type("Tok", (), {"pad_token_id": 0})()
    built = []

    def recording(*args, **kwargs):
        built.append(build_optimizer(*args, **kwargs))
        return built[-1]
    from unittest import mock
    with mock.patch.object(loop, "build_optimizer", recording):
        loop.train(model, tok, make_method("nll"), examples, stage, tmp_path, Accelerator(cpu=True),
                   tensorboard=False)
    assert isinstance(built[0], BF16AdamW) and built[0].update == "kahan"
    assert all("compensation" in st for st in built[0].state.values())
    assert model.model.layers[0].gradient_checkpointing  # the layer recomputes its activations in backward
    moved = sum(int((model.state_dict()[k] != v).sum()) for k, v in before.items())
    assert moved > 0.5 * sum(v.numel() for v in before.values())
    assert next(model.parameters()).dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="unlearn.optimizer: adamw_bf16 is for bf16 weights"):
        load_config(None, ["model.random_init={architecture: llama}", "model.train_tokenizer=64",
                           "unlearn.optimizer=adamw_bf16"])
    with pytest.raises(ConfigError, match="augment.optimizer: plain adamw on bf16 weights"):
        load_config(None, ["model.random_init={architecture: llama}", "model.train_tokenizer=64",
                           "model.dtype=bfloat16", "finetune.optimizer=adamw_bf16", "unlearn.optimizer=adamw_bf16"])
