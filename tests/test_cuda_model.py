"""Whole models built for the CUDA target and run under the emulator, against PyTorch and transformers.

``gpt2gen.build(..., target="cuda", emulate=True)`` compiles the very ``model.cu`` a GPU build compiles
(templates/cuda/, cuBLASLt calls included) against gpt2gen.cuda_emu and runs it on the CPU with GPU semantics,
behind the same Python API. Checked in every precision: logits, loss, every parameter gradient and the losses
of 10 AdamW steps against PyTorch (GPT-2) and transformers (Llama 2, Mistral, Gemma); an fp16 run whose
gradients overflow skips the step, lowers the scale and recovers; two runs give the same bits.

Tolerances (TOLERANCES below, one row per precision; also in docs/cuda.md):
  * fp32: as the CPU target (tests/test_model.py): logits and loss rtol 1e-4 / 1e-5, gradients atol 1e-4 x the
    tensor's largest |gradient| (sums over B*T positions in another order), the 10-step loss curve rtol 1e-4
    against a float64 run.
  * bf16 / fp16 against fp32 PyTorch on the same fp32 weights: every parameter and activation is rounded to
    16 bits where it is stored (relative 2^-9 for bf16, 2^-12 for fp16 per rounding), and a layer chains a
    handful of such roundings, each amplified by at most the op's condition number (~1 for norms and
    residuals). Logits: atol 2^-5 (bf16) / 2^-8 (fp16) of the largest |logit| plus rtol of the same size; the
    loss: rtol 2^-6 / 2^-9; gradients: within 2^-3 / 2^-6 of the tensor's largest |gradient| (cancellation in
    a sum of rounded terms can cost its relative accuracy, so the bound is on the scale of the tensor, not of
    the element); the 10-step loss curve within 2^-5 / 2^-8 of the loss, since the 16-bit parameters are the
    stochastic rounding of fp32 master weights that follow fp32's trajectory.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import gpt2gen
from helpers import assert_close, scaled_atol
from reference import adamw, gpt2_forward, params_to_torch

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

# precision: (logits rel, loss rtol, gradient rel, 10-step loss-curve rtol)
TOLERANCES = {
    "fp32": (1e-5, 1e-5, 1e-4, 1e-4),
    "bf16": (2.0 ** -5, 2.0 ** -6, 2.0 ** -3, 2.0 ** -5),
    "fp16": (2.0 ** -8, 2.0 ** -9, 2.0 ** -6, 2.0 ** -8),
}
PRECISIONS = list(TOLERANCES)
GPT2 = dict(V=97, L=2, C=32, NH=2, maxT=16, B=2, T=16)   # the trainer's test builds this too


def emulated(precision="fp32", **kw):
    return gpt2gen.build("model.yaml", target="cuda", emulate=True, precision=precision, **(GPT2 | kw))


def batch(model, seed=0):
    rng = np.random.default_rng(seed)
    B, T = model.max_batch
    V = model.config["V"]
    return rng.integers(0, V, (B, T)).astype(np.int32), rng.integers(0, V, (B, T)).astype(np.int32)


def f32(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float32)


def check_decode(model, row: np.ndarray, want: np.ndarray, precision: str, what: str) -> None:
    """The decode program over the KV cache (tests/test_decode.py's schedule: a prompt chunk, single tokens, a
    chunk, single tokens) against the forward's logits ``want`` for the same sequence ``row``. Tolerance as
    tests/test_decode.py derives it: S * gamma_K * max|logit| in fp32; in 16 bits, a rounding that a different
    fp32 summation order flips costs one ulp of the storage type (2^-8 bf16, 2^-11 fp16, relative), carried
    through S chained reductions."""
    from test_decode import _schedule
    cfg = model.config
    K = max(int(cfg["C"]), int(cfg.get("FF", 4 * cfg["C"])), int(cfg["maxT"]))
    chain = 2 + 4 * int(cfg["L"])
    rel = {"fp32": K * 2.0 ** -24 / (1 - K * 2.0 ** -24), "bf16": 2.0 ** -8, "fp16": 2.0 ** -11}[precision] * chain
    got = np.zeros_like(want)
    for start, n in _schedule(len(row), model.max_batch[1]):
        got[start:start + n] = model.decode(row[start:start + n], start)[:, :want.shape[1]]
    assert_close(f"{what} decode logits ({precision})", got, want, rtol=0, atol=rel * float(np.abs(want).max()))


@pytest.mark.parametrize("precision,fuse", [(p, "all") for p in PRECISIONS] + [("fp32", "none")])
def test_gpt2_step_matches_pytorch(precision, fuse):
    """Fused builds in every precision (the builds the 10-step test trains), and the unfused one in fp32."""
    logits_rel, loss_rtol, grad_rel, _ = TOLERANCES[precision]
    model = emulated(precision, fuse=fuse)
    idx, targets = batch(model)
    p = params_to_torch({k: f32(v) for k, v in model.params.items()})   # the (16-bit) weights it computes with
    want_logits, want_loss = gpt2_forward(p, idx, model.config, targets)
    want_loss.backward()
    loss = model.forward(idx, targets)
    V = model.config["V"]
    want = want_logits[..., :V].detach().numpy()
    assert_close(f"logits ({precision})", f32(model.logits), want, rtol=logits_rel * 10,
                 atol=scaled_atol(want, logits_rel))
    assert_close(f"loss ({precision})", loss, want_loss.item(), rtol=loss_rtol)
    model.zero_grad()
    model.backward()
    for name, t in p.items():   # fp16 is loss-scaled: its gradients are loss_scale times the loss's
        g = t.grad.numpy()
        assert_close(f"grad {name} ({precision})", f32(model.grads[name]) / model.loss_scale, g, rtol=1e-3 if precision == "fp32" else 0,
                     atol=scaled_atol(g, grad_rel))
    assert not [n for n, a in model.acts.items() if a.ndim >= 2 and a.shape[-2:] == (GPT2["T"], GPT2["T"])], \
        "flash-style attention keeps no T x T buffer"
    model.forward(idx)      # again (the fused classifier's backward wrote over the logits)
    check_decode(model, idx[0], np.array(model.logits[0], dtype=np.float32), precision, "gpt2")


@pytest.mark.parametrize("precision", PRECISIONS)
def test_gpt2_fused_build_matches_pytorch_over_10_adamw_steps(precision):
    """The fused build (classifier, matmul + gelu, residual + layernorm): 10 AdamW steps against PyTorch's AdamW
    in float64 from the same fp32 weights."""
    curve_rtol = TOLERANCES[precision][3]
    model = emulated(precision)
    assert model.program.fused
    idx, targets = batch(model, seed=3)
    p = {k: t.detach().double().requires_grad_() for k, t in params_to_torch({k: f32(v) for k, v in
                                                                               model.weights.items()}).items()}
    decay = {t.name: t.decay for t in model.spec.of_kind("param")}
    lr, betas, eps, wd = 3e-3, (0.9, 0.95), 1e-8, 0.1
    opt = adamw(p, decay, lr, betas, eps, wd)
    ours, theirs = [], []
    for step in range(1, 11):
        ours.append(model.forward(idx, targets))
        model.zero_grad()
        model.backward()
        assert model.update(lr, betas[0], betas[1], eps, wd, step)
        opt.zero_grad()
        _, loss = gpt2_forward(p, idx, model.config, targets)
        loss.backward()
        theirs.append(loss.item())
        opt.step()
    print(f"losses (cuda emulated, {precision}):", np.round(ours, 5))
    print("losses (pytorch float64):        ", np.round(theirs, 5))
    assert ours[-1] < ours[0] - 0.5, "training on one batch should drive the loss down"
    assert_close(f"loss curve ({precision})", ours, theirs, rtol=curve_rtol)


def test_two_runs_give_the_same_bits():
    """No float atomics anywhere: the same seed and batch give bitwise-equal losses and weights (bf16: the
    stochastic rounding of the update is a hash of the step and the element, so it repeats too)."""
    runs = []
    for _ in range(2):
        model = emulated("bf16")
        idx, targets = batch(model, seed=5)
        losses = []
        for step in range(1, 4):
            losses.append(model.forward(idx, targets))
            model.zero_grad()
            model.backward()
            model.update(1e-3, step=step)
        runs.append((losses, {k: v.copy() for k, v in model.params.items()}))
    assert runs[0][0] == runs[1][0]
    for name in runs[0][1]:
        assert runs[0][1][name].tobytes() == runs[1][1][name].tobytes(), name


def test_fp16_overflow_skips_the_step_and_recovers():
    """A loss scale so large that the fp16 gradients overflow: the update finds inf/nan on the device, changes
    nothing and halves the scale; a sane scale then trains."""
    model = emulated("fp16")
    assert model.loss_scaling
    idx, targets = batch(model, seed=1)
    before = {k: v.copy() for k, v in model.params.items()}
    model.loss_scale = 2.0 ** 60
    model.forward(idx, targets)
    model.zero_grad()
    model.backward()
    assert not np.isfinite(f32(model.grads["wte"])).all(), "the forced overflow should show in the gradients"
    assert model.update(1e-3) is False and model.step == 0 and model.loss_scale == 2.0 ** 59
    for k, v in model.params.items():
        assert v.tobytes() == before[k].tobytes(), f"{k} changed in a skipped step"
    model.loss_scale = 2.0 ** 10
    losses = []
    for _ in range(5):
        losses.append(model.forward(idx, targets))
        model.zero_grad()
        model.backward()
        assert model.update(3e-3)
    assert model.step == 5 and losses[-1] < losses[0]


# ---- Llama 2, Mistral, Gemma against transformers ------------------------------------------------------------

ARCH_CASES = {
    "llama2": ("LlamaConfig", "LlamaForCausalLM",
               dict(vocab_size=61, hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2), 2, 7),
    "mistral": ("MistralConfig", "MistralForCausalLM",
                dict(vocab_size=61, hidden_size=24, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4,
                     num_key_value_heads=1, sliding_window=4), 2, 9),
    "gemma": ("GemmaConfig", "GemmaForCausalLM",
              dict(vocab_size=61, hidden_size=32, intermediate_size=40, num_hidden_layers=1, num_attention_heads=2,
                   num_key_value_heads=1, head_dim=16), 2, 7),
}


def hf_pair(arch, directory, precision):
    import transformers
    cfg_name, model_name, fields, B, T = ARCH_CASES[arch]
    torch.manual_seed(7)
    hf = getattr(transformers, model_name)(getattr(transformers, cfg_name)(
        **fields, max_position_embeddings=32, initializer_range=0.1, attn_implementation="eager")).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.2 + (0.0 if arch == "gemma" else 1.0))
    hf.save_pretrained(directory)
    ours = gpt2gen.from_hf(directory, model=f"models/{arch}.yaml", target="cuda", precision=precision,
                           target_options={"emulate": True}, B=B, T=T)
    return hf, ours


@pytest.mark.parametrize("arch,precision", [(a, "fp32") for a in ARCH_CASES]
                         + [("llama2", "bf16"), ("mistral", "fp16"), ("gemma", "bf16")])
def test_architectures_match_transformers(arch, precision, tmp_path):
    """Every architecture in fp32 and one 16-bit precision each (the op tests cover every op in all three)."""
    from test_arch_parity import hf_view, unpadded
    logits_rel, loss_rtol, grad_rel, _ = TOLERANCES[precision]
    hf, ours = hf_pair(arch, tmp_path, precision)
    B, T = ours.max_batch
    rng = np.random.default_rng(2)
    idx = rng.integers(0, hf.config.vocab_size, (B, T)).astype(np.int32)
    targets = rng.integers(0, hf.config.vocab_size, (B, T)).astype(np.int32)
    if precision != "fp32":    # the reference runs on the weights the 16-bit model computes with
        with torch.no_grad():
            for n, p in hf.named_parameters():
                p.copy_(p.to(torch.bfloat16 if precision == "bf16" else torch.float16).float())
    logits = hf(torch.from_numpy(idx).long()).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             torch.from_numpy(targets).long().reshape(-1))
    loss.backward()
    got = ours.forward(idx, targets)
    want = logits.detach().numpy()
    assert_close(f"{arch} logits ({precision})", f32(ours.logits), want, rtol=logits_rel * 10,
                 atol=scaled_atol(want, logits_rel))
    assert_close(f"{arch} loss ({precision})", got, loss.item(), rtol=loss_rtol)
    ours.zero_grad()
    ours.backward()
    grads = {k: v.grad.numpy() for k, v in hf.named_parameters()}
    for name in ours.params:
        want_g = hf_view(ours, grads, name)
        got_g = unpadded(f32(ours.grads[name]) / ours.loss_scale, want_g, f"grad {name}")
        assert_close(f"{arch} grad {name} ({precision})", got_g, want_g, rtol=1e-3 if precision == "fp32" else 0,
                     atol=scaled_atol(want_g, grad_rel))
    ours.forward(idx)
    check_decode(ours, idx[0], np.array(ours.logits[0], dtype=np.float32), precision, arch)
