"""The fused linear KL losses against a float64 composition of plain torch ops, their autograd and compile
integration, their argument errors, and the model helpers that hand the pipeline a body and a head."""
import pytest
import torch

import rklu_fast
import rklu_fast.fused_linear as FL
from loss_support import CPU_BACKENDS

ALPHA = 8.0


def losses(reverse):
    return rklu_fast.fused_linear_reverse_kl_loss if reverse else rklu_fast.fused_linear_forward_kl_loss


def make(b=3, t=11, d=13, v=101, bias=True, dtype=torch.float32):
    """Fresh random inputs: odd d and V, logits of a few units like a trained head's, ignored and masked rows."""
    hidden = torch.randn(b, t, d).to(dtype).requires_grad_()
    weight = (torch.randn(v, d) / d ** 0.5).to(dtype).requires_grad_()
    bias_t = (0.5 * torch.randn(v)).to(dtype).requires_grad_() if bias else None
    original = 2.0 * torch.randn(b, t, v)
    augmented = original + 0.5 * torch.randn(b, t, v)
    labels = torch.randint(0, v, (b, t))
    labels[:, :3] = -100  # prompt tokens
    mask = torch.ones(b * t, dtype=torch.bool)
    mask[3 + torch.randperm(t - 3)[:2]] = False  # two answer rows masked: 22 valid rows at b, t = 3, 11
    return hidden, weight, bias_t, original, augmented, labels, mask.reshape(b, t)


def float64_reference(hidden, weight, bias, original, augmented, alpha, valid, *, reverse=True, temperature=1.0,
                      reduction="mean", divisor=None, row_weights=None, teacher_rows="all"):
    """Loss and (d hidden, d weight, d bias) in float64 with plain torch ops: `hidden @ W.T + b`, the teacher
    `l_o − α·relu(l_aug − l_o)`, two log-softmaxes and the KL of each valid row."""
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    b = None if bias is None else bias.detach().double().requires_grad_()
    v = w.shape[0]
    z = (h @ w.T + (0 if b is None else b)).reshape(-1, v)
    lo = original.double().reshape(-1, v)
    t = lo if augmented is None else lo - alpha * torch.relu(augmented.double().reshape(-1, v) - lo)
    valid = valid.reshape(-1)
    if teacher_rows == "valid":  # one teacher row per valid row: spread them back onto the rows
        full = torch.zeros(z.shape, dtype=torch.float64)
        full[valid] = t
        t = full
    logp = torch.log_softmax(z / temperature, -1)
    logq = torch.log_softmax(t / temperature, -1)
    kl = (logp.exp() * (logp - logq)).sum(-1) if reverse else (logq.exp() * (logq - logp)).sum(-1)
    rows = torch.where(valid, kl, torch.zeros_like(kl))
    if reduction == "none":
        loss = rows.reshape(hidden.shape[:-1])
        target = (rows * row_weights.double().reshape(-1)).sum()
    else:
        loss = rows.sum()
        if reduction == "mean":
            loss = loss / (max(int(valid.sum()), 1) if divisor is None else divisor)
        target = loss
    wrt = [x for x in (h, w, b) if x is not None]
    grads = torch.autograd.grad(target, wrt)
    return loss.detach(), grads


def rel(x, ref):
    return float((x.detach().double() - ref).norm() / ref.norm().clamp_min(1e-300))


def run(fn, hidden, weight, bias, *args, **kw):
    loss = fn(hidden, weight, *args, bias=bias, **kw)
    wrt = [x for x in (hidden, weight, bias) if x is not None]
    return loss.detach(), torch.autograd.grad(loss, wrt)


@pytest.mark.parametrize("backend", CPU_BACKENDS[:1] + CPU_BACKENDS[2:])  # Triton: test_triton_interpreter
@pytest.mark.parametrize("reverse", [True, False], ids=["reverse", "forward"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("chunk_size", [None, 7])
def test_matches_float64_composition(backend, reverse, bias, chunk_size):
    """[B, T, d] hidden, labels with ignore_index and a mask; chunk 7 does not divide the valid rows."""
    hidden, weight, b, original, augmented, labels, mask = make(bias=bias)
    valid = (labels != -100) & mask
    assert int(valid.sum()) == 22
    loss, grads = run(losses(reverse), hidden, weight, b, original, augmented, ALPHA, labels=labels, mask=mask,
                      chunk_size=chunk_size, backend=backend)
    ref_loss, ref_grads = float64_reference(hidden, weight, b, original, augmented, ALPHA, valid, reverse=reverse)
    assert abs(float(loss) - float(ref_loss)) <= 1e-5 * abs(float(ref_loss))
    for name, g, r in zip(("hidden", "weight", "bias"), grads, ref_grads):
        assert g.dtype == torch.float32
        assert rel(g, r) <= 1e-5, f"d{name}: relative error {rel(g, r):.2e}"
    assert torch.equal(grads[0][~valid], torch.zeros(int((~valid).sum()), 13))


@pytest.mark.parametrize("backend", CPU_BACKENDS[1:2])
def test_triton_interpreter(backend):
    """The Triton kernel (interpreted) inside the chunk loop: N = 40 rows of d = 24, V = 999, 3 chunks."""
    hidden, weight, b, original, augmented, labels, mask = make(b=2, t=20, d=24, v=999)
    valid = (labels != -100) & mask
    for reverse in (True, False):
        loss, grads = run(losses(reverse), hidden, weight, b, original, augmented, ALPHA, labels=labels,
                          mask=mask, chunk_size=11, backend=backend)
        ref_loss, ref_grads = float64_reference(hidden, weight, b, original, augmented, ALPHA, valid,
                                                reverse=reverse)
        assert abs(float(loss) - float(ref_loss)) <= 1e-5 * abs(float(ref_loss))
        for g, r in zip(grads, ref_grads):
            assert rel(g, r) <= 1e-5


@pytest.mark.parametrize("backend", CPU_BACKENDS[:1] + CPU_BACKENDS[2:])
def test_compact_teacher_rows_temperature_and_no_augmented(backend):
    hidden, weight, b, original, augmented, labels, mask = make()
    valid = (labels != -100) & mask
    for aug in (augmented, None):
        kw = dict(labels=labels, mask=mask, temperature=2.0, chunk_size=5, backend=backend)
        full, full_grads = run(rklu_fast.fused_linear_reverse_kl_loss, hidden, weight, b, original, aug, 3.0, **kw)
        compact, compact_grads = run(rklu_fast.fused_linear_reverse_kl_loss, hidden, weight, b, original[valid],
                                     None if aug is None else aug[valid], 3.0, teacher_rows="valid", **kw)
        assert torch.equal(full, compact) and all(torch.equal(x, y) for x, y in zip(full_grads, compact_grads))
        ref_loss, ref_grads = float64_reference(hidden, weight, b, original[valid],
                                                None if aug is None else aug[valid], 3.0, valid, temperature=2.0,
                                                teacher_rows="valid")
        assert abs(float(compact) - float(ref_loss)) <= 1e-5 * abs(float(ref_loss))
        assert all(rel(g, r) <= 1e-5 for g, r in zip(compact_grads, ref_grads))


@pytest.mark.parametrize("backend", CPU_BACKENDS[:1] + CPU_BACKENDS[2:])
def test_reductions_num_items_and_row_weights(backend):
    hidden, weight, b, original, augmented, labels, mask = make()
    valid = (labels != -100) & mask
    kw = dict(labels=labels, mask=mask, chunk_size=6, backend=backend)
    fn = rklu_fast.fused_linear_reverse_kl_loss
    loss, grads = run(fn, hidden, weight, b, original, augmented, ALPHA, reduction="sum", **kw)
    ref_loss, ref_grads = float64_reference(hidden, weight, b, original, augmented, ALPHA, valid, reduction="sum")
    assert abs(float(loss) - float(ref_loss)) <= 1e-5 * abs(float(ref_loss))
    assert all(rel(g, r) <= 1e-5 for g, r in zip(grads, ref_grads))
    for num in (50, torch.tensor(50)):  # gradient accumulation: the divisor of the whole step
        loss, grads = run(fn, hidden, weight, b, original, augmented, ALPHA, num_items_in_batch=num, **kw)
        ref_loss, ref_grads = float64_reference(hidden, weight, b, original, augmented, ALPHA, valid, divisor=50)
        assert abs(float(loss) - float(ref_loss)) <= 1e-5 * abs(float(ref_loss))
        assert all(rel(g, r) <= 1e-5 for g, r in zip(grads, ref_grads))
    # "none": per-row losses; a backward with per-row weights recomputes the gradients with those weights
    rows = fn(hidden, weight, original, augmented, ALPHA, bias=b, reduction="none", **kw)
    weights = torch.rand(rows.shape)
    grads = torch.autograd.grad((rows * weights).sum(), (hidden, weight, b))
    ref_rows, ref_grads = float64_reference(hidden, weight, b, original, augmented, ALPHA, valid,
                                            reduction="none", row_weights=weights)
    assert rows.shape == (3, 11) and torch.equal(rows[~valid], torch.zeros(int((~valid).sum())))
    torch.testing.assert_close(rows.double(), ref_rows, rtol=1e-5, atol=1e-6)
    assert all(rel(g, r) <= 1e-5 for g, r in zip(grads, ref_grads))


@pytest.mark.parametrize("backend", CPU_BACKENDS[:1] + CPU_BACKENDS[2:])
def test_frozen_head_computes_no_weight_gradient(backend, monkeypatch):
    """LoRA's case: the head does not require grad, so no dW GEMM runs; hidden still gets its gradient."""
    calls = []
    real = FL._accumulate_weight_grad
    monkeypatch.setattr(FL, "_accumulate_weight_grad", lambda *a, **k: calls.append(1) or real(*a, **k))
    hidden, weight, b, original, augmented, labels, mask = make()
    weight.requires_grad_(False)
    b.requires_grad_(False)
    loss = rklu_fast.fused_linear_reverse_kl_loss(hidden, weight, original, augmented, bias=b, labels=labels,
                                                  mask=mask, chunk_size=4, backend=backend)
    loss.backward()
    assert calls == [] and weight.grad is None and b.grad is None
    _, ref_grads = float64_reference(hidden, weight, b, original, augmented, ALPHA, (labels != -100) & mask)
    assert rel(hidden.grad, ref_grads[0]) <= 1e-5
    calls.clear()
    weight.requires_grad_(True)
    rklu_fast.fused_linear_reverse_kl_loss(hidden, weight, original, augmented, bias=b, labels=labels, mask=mask,
                                           chunk_size=4, backend=backend).backward()
    assert len(calls) == -(-int(((labels != -100) & mask).sum()) // 4)  # one accumulating GEMM per chunk


def test_no_grad_runs_no_gradient_gemm(monkeypatch):
    calls = []
    real = FL._accumulate_weight_grad
    monkeypatch.setattr(FL, "_accumulate_weight_grad", lambda *a, **k: calls.append(1) or real(*a, **k))
    hidden, weight, b, original, augmented, labels, mask = make()
    with torch.no_grad():
        loss = rklu_fast.fused_linear_reverse_kl_loss(hidden, weight, original, augmented, bias=b, labels=labels)
    assert calls == [] and not loss.requires_grad
    ref_loss, _ = float64_reference(hidden, weight, b, original, augmented, ALPHA, labels != -100)
    assert abs(float(loss) - float(ref_loss)) <= 1e-5 * abs(float(ref_loss))
    with_grad = rklu_fast.fused_linear_reverse_kl_loss(hidden, weight, original, augmented, bias=b, labels=labels)
    assert calls == [1] and torch.equal(with_grad.detach(), loss)  # one chunk: one dW GEMM


@pytest.mark.parametrize("backend", CPU_BACKENDS[:1] + CPU_BACKENDS[2:])
def test_all_rows_ignored(backend):
    hidden, weight, b, original, augmented, labels, _ = make()
    labels[:] = -100
    loss, grads = run(rklu_fast.fused_linear_reverse_kl_loss, hidden, weight, b, original, augmented, ALPHA,
                      labels=labels, backend=backend)
    assert float(loss) == 0.0 and all(torch.equal(g, torch.zeros_like(g)) for g in grads)
    compact, _ = run(rklu_fast.fused_linear_reverse_kl_loss, hidden, weight, b, original[:0], augmented[:0],
                     ALPHA, labels=labels, teacher_rows="valid", backend=backend)
    assert float(compact) == 0.0


def test_ignored_rows_may_hold_nan():
    """Ignored rows are dropped before any matmul: NaN hidden states there reach neither loss nor gradients."""
    hidden, weight, b, original, augmented, labels, mask = make()
    valid = (labels != -100) & mask
    with torch.no_grad():
        hidden[~valid] = float("nan")
        original[~valid] = float("nan")
    loss, grads = run(rklu_fast.fused_linear_reverse_kl_loss, hidden, weight, b, original, augmented, ALPHA,
                      labels=labels, mask=mask, chunk_size=5)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)


def test_deterministic_and_retained_graph():
    hidden, weight, b, original, augmented, labels, mask = make()
    kw = dict(labels=labels, mask=mask, chunk_size=6)
    first = run(rklu_fast.fused_linear_reverse_kl_loss, hidden, weight, b, original, augmented, ALPHA, **kw)
    again = run(rklu_fast.fused_linear_reverse_kl_loss, hidden, weight, b, original, augmented, ALPHA, **kw)
    assert torch.equal(first[0], again[0]) and all(torch.equal(x, y) for x, y in zip(first[1], again[1]))
    # the incoming gradient scales every gradient; a retained graph's second backward hands out fresh tensors
    loss = rklu_fast.fused_linear_reverse_kl_loss(hidden, weight, original, augmented, bias=b, **kw)
    g3 = torch.autograd.grad(3 * loss, (hidden, weight, b), retain_graph=True)
    kept = [g.clone() for g in g3]
    g1 = torch.autograd.grad(loss, (hidden, weight, b))
    assert all(torch.equal(x, y) for x, y in zip(g3, kept))
    for x, y, base in zip(g1, g3, first[1]):
        torch.testing.assert_close(x, base, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(y, 3 * base, rtol=1e-6, atol=1e-9)


def test_bf16_and_autocast():
    """bf16 weights: logits and their gradient in bf16 (as `lm_head(h)` makes them), dW accumulated in fp32 over
    many chunks and rounded once; autocast: fp32 parameters, bf16 GEMMs, fp32 gradients."""
    hidden, weight, b, original, augmented, labels, mask = make(b=4, t=16, d=32, v=301, dtype=torch.bfloat16)
    valid = (labels != -100) & mask
    loss, grads = run(rklu_fast.fused_linear_reverse_kl_loss, hidden, weight, b, original, augmented, ALPHA,
                      labels=labels, mask=mask, chunk_size=3)
    ref_loss, ref_grads = float64_reference(hidden, weight, b, original, augmented, ALPHA, valid)
    assert grads[1].dtype == torch.bfloat16
    assert abs(float(loss) - float(ref_loss)) <= 2e-2 * abs(float(ref_loss))  # bf16 logits
    assert all(rel(g, r) <= 2e-2 for g, r in zip(grads, ref_grads))
    h32, w32, b32 = (x.detach().float().requires_grad_() for x in (hidden, weight, b))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_ac, grads_ac = run(rklu_fast.fused_linear_reverse_kl_loss, h32, w32, b32, original, augmented, ALPHA,
                                labels=labels, mask=mask, chunk_size=3)
        unfused = rklu_fast.reverse_kl_loss(torch.nn.functional.linear(h32, w32, b32), original, augmented,
                                            ALPHA, labels=labels, mask=mask)
    assert all(g.dtype == torch.float32 for g in grads_ac)
    torch.testing.assert_close(loss_ac, unfused, rtol=1e-6, atol=1e-7)  # the same bf16 logits, the same kernel
    for g, r in zip(grads_ac, torch.autograd.grad(unfused, (h32, w32, b32))):
        assert rel(g, r.double()) <= 1e-2


def test_float64_is_computed_in_float64():
    """float64 hidden and weight take the `torch` backend under "auto" and give a float64 loss and gradients."""
    hidden, weight, b, original, augmented, labels, mask = make(dtype=torch.float64)
    original, augmented = original.double(), augmented.double()  # (the teacher is formed in its inputs' dtype)
    loss, grads = run(rklu_fast.fused_linear_reverse_kl_loss, hidden, weight, b, original, augmented, ALPHA,
                      labels=labels, mask=mask, chunk_size=5)
    ref_loss, ref_grads = float64_reference(hidden, weight, b, original, augmented, ALPHA, (labels != -100) & mask)
    assert loss.dtype == torch.float64 and abs(float(loss) - float(ref_loss)) <= 1e-12 * abs(float(ref_loss))
    assert all(g.dtype == torch.float64 and rel(g, r) <= 1e-12 for g, r in zip(grads, ref_grads))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast leaves float64 alone, so does the op
        loss_ac, grads_ac = run(rklu_fast.fused_linear_reverse_kl_loss, hidden, weight, b, original, augmented,
                                ALPHA, labels=labels, mask=mask, chunk_size=5)
    assert loss_ac.dtype == torch.float64 and abs(float(loss_ac) - float(ref_loss)) <= 1e-12 * abs(float(ref_loss))
    assert all(g.dtype == torch.float64 and rel(g, r) <= 1e-12 for g, r in zip(grads_ac, ref_grads))


def test_torch_compile_matches_eager():
    def step(h, w, b, o, a, labels):  # the causal-LM shift: hidden[:, :-1] with labels[:, 1:]
        return rklu_fast.fused_linear_reverse_kl_loss(h[:, :-1], w, o[:, :-1], a[:, :-1], 4.0, bias=b,
                                                      labels=labels[:, 1:], temperature=2.0, chunk_size=5,
                                                      backend="torch")

    hidden, weight, b, original, augmented, labels, _ = make()
    eager = step(hidden, weight, b, original, augmented, labels)
    g_eager = torch.autograd.grad(eager, (hidden, weight, b))
    # aot_eager traces what matters here (the wrapper, the op's fake kernel and autograd) without Inductor's
    # C++ code generation, which would add ~10 s and only compiles the few elementwise ops around the op
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(hidden, weight, b, original, augmented,
                                                                         labels)
    g_compiled = torch.autograd.grad(compiled, (hidden, weight, b))
    torch.testing.assert_close(compiled, eager)
    for x, y in zip(g_compiled, g_eager):
        torch.testing.assert_close(x, y)


def test_opcheck():
    hidden, weight, b, original, augmented, labels, mask = make(b=2, t=5)
    h2 = hidden.detach().reshape(10, 13).requires_grad_()
    valid = ((labels != -100) & mask).reshape(-1)
    scale = torch.tensor(0.25)
    common = (8.0, 1.0, True)
    cases = [(h2, weight, b, original, augmented, valid, scale, *common, False, True, True, True, True, 3,
              torch.float32, "torch"),
             (h2, weight.detach(), None, original[valid.reshape(2, 5)], None, valid, scale, *common, True,
              True, False, False, True, 0, torch.float32, "torch"),
             (h2, weight, b, original, augmented, valid, torch.ones(()), *common, False, True, True, True, False, 4,
              torch.float32, "torch")]
    for args in cases:
        torch.library.opcheck(FL.fused_linear_kl, args)


def test_chunk_rows():
    assert FL.chunk_rows(10_000, 32000) == (256 << 20) // (3 * 32000 * 4) == 699
    assert FL.chunk_rows(10_000, 128256) == 256  # the floor of 256 rows
    assert FL.chunk_rows(100, 32000) == 100 and FL.chunk_rows(0, 32000) == 1
    assert FL.chunk_rows(10_000, 32000, chunk_size=64) == 64


H = torch.randn(2, 3, 5)
W = torch.randn(7, 5)
O = torch.randn(2, 3, 7)


def call(**changes):
    kw = dict(hidden=H, weight=W, original_logits=O)
    kw.update(changes)
    return rklu_fast.fused_linear_reverse_kl_loss(**kw)


@pytest.mark.parametrize("changes,error,pattern", [
    (dict(weight=torch.randn(5, 7)), ValueError, r"weight must be \[V, d\] with d = 5"),
    (dict(weight=torch.randn(7, 5, 1)), ValueError, r"weight must be \[V, d\]"),
    (dict(bias=torch.randn(6)), ValueError, r"bias must be \[V\] = \[7\]"),
    (dict(bias=torch.randn(7, dtype=torch.float64)), TypeError, "bias is float64 but weight is float32"),
    (dict(weight=W.bfloat16()), TypeError, "hidden is float32 but weight is bfloat16"),
    (dict(hidden=torch.randn(5)), ValueError, "hidden must be"),
    (dict(hidden=H.long()), TypeError, "hidden must be bfloat16"),
    (dict(weight=W.numpy()), TypeError, "weight must be a torch.Tensor"),
    (dict(weight=W.to("meta")), ValueError, "weight is on meta, but hidden is on cpu"),
    (dict(original_logits=torch.randn(2, 3, 8)), ValueError, "original_logits has vocab size 8, but weight has 7"),
    (dict(original_logits=torch.randn(4, 7)), ValueError, "original_logits has 4 rows"),
    (dict(augmented_logits=torch.randn(6, 7)), ValueError, "augmented_logits has shape"),
    (dict(original_logits=O.clone().requires_grad_()), ValueError, "original_logits requires grad"),
    (dict(labels=torch.zeros(2, 4, dtype=torch.long)), ValueError, "labels must have the row shape"),
    (dict(mask=torch.ones(2, 3)), TypeError, "mask must be a bool tensor"),
    (dict(reduction="batchmean"), ValueError, "reduction must be one of"),
    (dict(chunk_size=0), ValueError, "chunk_size must be"),
    (dict(temperature=-1.0), ValueError, "temperature must be"),
    (dict(num_items_in_batch=3, reduction="sum"), ValueError, "num_items_in_batch replaces"),
    (dict(backend="jax"), ValueError, "backend must be"),
    (dict(num_items_in_batch=0), ValueError, "num_items_in_batch must be > 0"),
    (dict(weight=torch.randn(0, 5), original_logits=torch.randn(2, 3, 0)), ValueError, "weight has 0 rows"),
    (dict(hidden=H.double(), weight=W.double(), backend="cpu"), ValueError, "hidden is float64; backend 'cpu'"),
    (dict(original_logits=O[:1], labels=torch.zeros(2, 3, dtype=torch.long), teacher_rows="valid"), ValueError,
     "6 valid rows, 3 teacher rows"),
])
def test_bad_input_names_the_argument(changes, error, pattern):
    with pytest.raises(error, match=pattern):
        call(**changes)


# ------------------------------------------------------------------------------------------- models
def tiny(arch):
    from transformers import LlamaConfig, LlamaForCausalLM, PhiConfig, PhiForCausalLM
    common = dict(vocab_size=61, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  max_position_embeddings=64)
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(num_key_value_heads=2, **common))
    return PhiForCausalLM(PhiConfig(**common))


@pytest.mark.parametrize("arch", ["llama", "phi"])
def test_model_parts_give_the_models_logits_and_gradients(arch):
    """The fused loss from `body(...)` hidden states and the head equals the loss from `model(...).logits`, in the
    value and in every parameter's gradient."""
    torch.manual_seed(0)
    model = tiny(arch)
    assert FL.supports_fused_linear(model) == (True, "")
    body, head = FL.fused_linear_parts(model)
    assert (head.bias is not None) == (arch == "phi")
    ids = torch.randint(0, 61, (2, 9))
    labels = ids.clone()
    labels[:, :3] = -100
    teacher = 3 * torch.randn(2, 8, 61)
    hidden = body(input_ids=ids).last_hidden_state
    fused = rklu_fast.fused_linear_reverse_kl_loss(hidden[:, :-1], head.weight, teacher, bias=head.bias,
                                                   labels=labels[:, 1:], chunk_size=4)
    fused_grads = torch.autograd.grad(fused, list(model.parameters()))
    logits = model(input_ids=ids).logits
    plain = rklu_fast.reverse_kl_loss(logits[:, :-1], teacher, labels=labels[:, 1:])
    plain_grads = torch.autograd.grad(plain, list(model.parameters()))
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-7)
    for (name, _), x, y in zip(model.named_parameters(), fused_grads, plain_grads):
        assert rel(x, y.double()) <= 1e-5, name


def test_unsupported_models_say_why():
    model = tiny("llama")
    model.config.logit_scale = 0.5
    ok, why = FL.supports_fused_linear(model)
    assert not ok and "logit_scale" in why
    with pytest.raises(ValueError, match="model: fused linear loss not supported: config.logit_scale"):
        FL.fused_linear_parts(model)
    model = tiny("llama")
    model.config.final_logit_softcapping = 1.0  # a cap of 1 still changes the logits
    assert FL.supports_fused_linear(model) == (False, "config.final_logit_softcapping = 1.0 changes the logits "
                                                      "after the head")
    model.config.final_logit_softcapping = None
    model.config.logits_scaling = 1.0  # a scale of 1 does not
    assert FL.supports_fused_linear(model) == (True, "")
    model.lm_head.register_forward_hook(lambda mod, inp, out: out * 2)
    assert not FL.supports_fused_linear(model)[0]

    class Other(torch.nn.Module):
        pass

    assert FL.supports_fused_linear(Other()) == (False, "Other is not one of the supported causal LMs "
                                                        f"{FL._PLAIN_HEAD_MODELS}")


def test_peft_wrapped_models():
    peft = pytest.importorskip("peft", reason="peft is not installed")
    model = peft.get_peft_model(tiny("llama"), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    ok, _ = FL.supports_fused_linear(model)
    body, head = FL.fused_linear_parts(model)
    assert ok and head is model.get_base_model().lm_head and not head.weight.requires_grad
    wrapped_head = peft.get_peft_model(tiny("llama"), peft.LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    ok, why = FL.supports_fused_linear(wrapped_head)
    assert not ok and "not a plain torch.nn.Linear" in why
