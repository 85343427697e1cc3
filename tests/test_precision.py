"""Precision as a build option: bf16 storage on the CPU target (llm.c's mixed-precision scheme).

In bf16, parameters, activations and their gradients are stored in bf16; the master weights, AdamW's
moments, what ops keep for their backward, the losses and all arithmetic are fp32. The references:

- a PyTorch GPT-2 that rounds to bf16 at the same points as the generated C (every stored activation,
  the parameters from their fp32 master). It computes each op in fp32 from the same bf16 inputs, so the
  two differ only by fp32 summation order before a rounding. Such a difference (about 2^-24 relative per
  term) flips a bf16 rounding rarely, and a flip moves that element by one bf16 ulp (2^-8 relative); so
  the logits agree to a few bf16 ulps of the logits' scale, and most elements exactly;
- the fp32 model, which bf16 follows to bf16's precision: the loss to about 2^-8 relative per rounding
  on its path, and a training run's loss curve closely.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import gpt2gen
from gpt2gen import precision as PR
from gpt2gen.builder import BuildError, generate
from gpt2gen.cli import main
from gpt2gen.program import ROLES

CFG = dict(L=2, C=64, NH=4, B=2, T=16, V=96, Vp=128, maxT=32)
ULP = 2.0 ** -8          # bf16 keeps 8 significant bits: a rounding moves a value by at most 2^-9 relative


def bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).to(torch.float32)


def rounded_gpt2(p: dict[str, torch.Tensor], idx, targets, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """GPT-2 rounding to bf16 where the generated C stores bf16: each op's output (not statistics or losses)."""
    B, T = idx.shape
    C, NH, L, V = cfg["C"], cfg["NH"], cfg["L"], cfg["V"]
    idx_t = torch.from_numpy(idx).long()
    x = bf16(p["wte"][idx_t] + p["wpe"][:T])
    mask = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)
    for l in range(L):
        h = bf16(F.layer_norm(x, (C,), p["ln1w"][l], p["ln1b"][l], 1e-5))
        qkv = bf16(h @ p["qkvw"][l].T + p["qkvb"][l])
        q, k, v = (t.reshape(B, T, NH, C // NH).transpose(1, 2) for t in qkv.split(C, dim=2))
        att = ((q @ k.transpose(-2, -1)) / np.sqrt(C // NH)).masked_fill(mask, float("-inf")).softmax(-1)
        y = bf16((att @ v).transpose(1, 2).reshape(B, T, C))
        x = bf16(x + bf16(y @ p["attprojw"][l].T + p["attprojb"][l]))
        h = bf16(F.layer_norm(x, (C,), p["ln2w"][l], p["ln2b"][l], 1e-5))
        h = bf16(F.gelu(bf16(h @ p["fcw"][l].T + p["fcb"][l]), approximate="tanh"))
        x = bf16(x + bf16(h @ p["fcprojw"][l].T + p["fcprojb"][l]))
    x = bf16(F.layer_norm(x, (C,), p["lnfw"], p["lnfb"], 1e-5))
    logits = bf16(x @ p["wte"].T)
    loss = F.cross_entropy(logits[..., :V].reshape(-1, V), torch.from_numpy(targets).long().reshape(-1))
    return logits, loss


def batch(rng, cfg=CFG):
    x = rng.integers(0, cfg["V"], size=(cfg["B"], cfg["T"] + 1))
    return x[:, :-1].astype(np.int32), x[:, 1:].astype(np.int32)


@pytest.fixture(scope="module")
def models():
    return {p: gpt2gen.build("model.yaml", precision=p, seed=3, **CFG) for p in ("fp32", "bf16")}


def test_the_bf16_build_stores_what_the_policy_says(models):
    m = models["bf16"]
    assert m.precision == "bf16"
    assert m.params["wte"].dtype == PR.DTYPES["bf16"].numpy and m.grads["qkvw"].dtype == m.params["wte"].dtype
    assert m.master["wte"].dtype == np.float32 and m.arenas["m"].dtype == np.float32
    assert m.acts["ln1"].dtype == m.params["wte"].dtype
    for name in ("ln_1_mean", "ln_1_rstd", "attn_lse", "loss_lse", "losses"):
        assert m.acts[name].dtype == np.float32, name
    # the same fp32 initial weights in both precisions; bf16's parameters are their rounding
    for name, w in models["fp32"].params.items():
        assert np.array_equal(m.master[name], w), name
        assert np.array_equal(m.params[name].astype(np.float32), bf16(torch.from_numpy(w)).numpy()), name
    # half the bytes for parameters, gradients and activations; fp32 master weights on top
    b16, f32 = m.layout.arena_bytes(), models["fp32"].layout.arena_bytes()
    assert b16["params"] * 2 <= f32["params"] + 64 * 16 and b16["master"] == 4 * m.layout.params.size
    assert "master" not in f32 and b16["acts"] < 0.6 * f32["acts"]


def test_bf16_forward_matches_a_reference_that_rounds_at_the_same_points(models):
    m = models["bf16"]
    idx, targets = batch(np.random.default_rng(0))
    loss = m.forward(idx, targets)
    got = m.logits.astype(np.float32)
    p = {k: torch.from_numpy(v.astype(np.float32)) for k, v in m.params.items()}
    want, want_loss = rounded_gpt2(p, idx, targets, m.config)
    want = want[..., :m.config["V"]].numpy()
    scale = float(np.abs(want).max())
    err = np.abs(got - want)
    worst = np.unravel_index(int(err.argmax()), err.shape)
    # flips of a bf16 rounding (rare) move an element by one ulp, and propagate through the layers
    assert err.max() <= 8 * ULP * scale, f"worst logits{list(worst)}: {got[worst]} vs {want[worst]}"
    assert np.mean(err <= ULP * np.abs(want)) > 0.9, "most logits should agree to one bf16 rounding"
    assert abs(loss - float(want_loss)) <= 4 * ULP * abs(float(want_loss)), (loss, float(want_loss))


def test_bf16_follows_fp32_to_bf16_precision(models):
    """Against fp32 (no rounding): the loss within a few bf16 roundings on its path, gradients in direction."""
    idx, targets = batch(np.random.default_rng(1))
    out = {}
    for prec, m in models.items():
        loss = m.forward(idx, targets)
        m.zero_grad()
        m.backward()
        out[prec] = (loss, {k: v.astype(np.float32) for k, v in m.grads.items()})
    (l32, g32), (l16, g16) = out["fp32"], out["bf16"]
    # 2L + 4 roundings of activations on the way to the loss, each at most 2^-9 relative
    assert abs(l16 - l32) <= (2 * CFG["L"] + 4) * ULP / 2 * abs(l32), (l16, l32)
    for name in g32:
        a, b = g16[name].ravel(), g32[name].ravel()
        cos = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))
        rel = float(np.linalg.norm(a - b) / (np.linalg.norm(b) + 1e-30))
        # bf16 gradients carry about 2^-8 relative error per rounding on a path of ~3L+4 stored values
        assert cos > 0.99 and rel < 0.1, f"grad {name}: cosine {cos:.4f}, relative error {rel:.4f}"


def test_a_bf16_training_run_tracks_fp32():
    """30 AdamW steps on a learnable sequence: the bf16 loss curve stays within bf16's precision of fp32's."""
    cfg = dict(CFG, B=4, T=32, V=256, Vp=256, maxT=64)
    rng = np.random.default_rng(0)
    x = rng.integers(0, cfg["V"], size=(cfg["B"], cfg["T"] + 1))
    for t in range(1, x.shape[1]):
        x[:, t] = (x[:, t - 1] * 7 + 3) % cfg["V"]
    curves = {}
    for prec in ("fp32", "bf16"):
        m = gpt2gen.build("model.yaml", precision=prec, seed=1, **cfg)
        curve = []
        for _ in range(30):
            curve.append(m.forward(x[:, :-1], x[:, 1:]))
            m.zero_grad()
            m.backward()
            m.update(lr=3e-3)
        curves[prec] = np.array(curve)
    f32, b16 = curves["fp32"], curves["bf16"]
    assert f32[-1] < 0.5 * f32[0], "the task is learnable"
    worst = int(np.argmax(np.abs(b16 - f32)))
    assert np.all(np.abs(b16 - f32) <= 0.02 * f32 + 0.01), f"step {worst}: bf16 {b16[worst]} vs fp32 {f32[worst]}"


def test_a_bf16_training_state_resumes_exactly(tmp_path):
    """The state holds the fp32 master weights and moments: resuming reproduces the bf16 run bit for bit."""
    from gpt2gen import checkpoint as ck
    idx, targets = batch(np.random.default_rng(2))

    def steps(m, n):
        out = []
        for _ in range(n):
            out.append(m.forward(idx, targets))
            m.zero_grad()
            m.backward()
            m.update(lr=1e-3)
        return out
    a = gpt2gen.build("model.yaml", precision="bf16", seed=5, **CFG)
    steps(a, 2)
    ck.save_state(tmp_path / "s.safetensors", a, step=2)
    rest = steps(a, 2)
    b = gpt2gen.build("model.yaml", precision="bf16", seed=9, **CFG)
    ck.load_state(tmp_path / "s.safetensors", b)
    b.step = 2
    assert steps(b, 2) == rest
    f = gpt2gen.build("model.yaml", precision="fp32", seed=9, **CFG)
    with pytest.raises(ck.CheckpointError, match=r"trained in bf16, the model is built in fp32[\s\S]*--precision bf16"):
        ck.load_state(tmp_path / "s.safetensors", f)


def test_a_precision_the_target_lacks_names_the_ones_it_has(capsys):
    with pytest.raises(BuildError, match=r"target `cpu` has no precision `fp16`; it has fp32, bf16"):
        generate("model.yaml", precision="fp16", **CFG)
    assert main(["build", "--precision", "fp16", "--set", "L=1"]) == 2
    assert "has no precision `fp16`; it has fp32, bf16" in capsys.readouterr().err


def test_layout_prints_each_tensors_dtype_and_the_totals_by_arena(capsys):
    assert main(["layout", "--precision", "bf16", "--set", "L=2"]) == 0
    out = capsys.readouterr().out
    assert "params arena, bf16" in out and "  ln_1_mean    f32 " in out and "  ln1          bf16 " in out
    assert "precision bf16; by arena: params bf16" in out and "master f32" in out and "acts by role:" in out


def test_the_fused_classifier_says_when_the_logits_are_gone():
    """Backward writes d_logits over the logits: reading them afterwards, or a second backward of the same
    forward, is refused with what to do; a new forward makes both right again."""
    m = gpt2gen.build("model.yaml", seed=0, **CFG)
    idx, targets = batch(np.random.default_rng(4))
    m.forward(idx, targets)
    before = m.logits.copy()
    m.zero_grad()
    m.backward()
    with pytest.raises(RuntimeError, match="read model.logits before backward, or build with fuse='none'"):
        m.logits
    with pytest.raises(RuntimeError, match="backward already ran for this forward"):
        m.backward()
    m.forward(idx, targets)
    assert np.array_equal(m.logits, before)
    plain = gpt2gen.build("model.yaml", seed=0, fuse="none", **CFG)
    plain.forward(idx, targets)
    plain.backward()
    assert np.array_equal(plain.logits, before)


# ---- dynamic loss scaling ----------------------------------------------------------------------------------

def test_dynamic_loss_scaling_skips_overflowed_steps_and_changes_nothing_else(tmp_path):
    """The derived step with loss scaling (fp16's; proved here on fp32 and bf16 builds, which the CPU has): the
    backward seeds loss_scale / (B*T), the update unscales, so a run with a power-of-two scale equals one
    without, bit for bit (scaling by 2^k is exact away from overflow and subnormals). A scale that makes a
    gradient overflow skips the step -- weights, moments and the step count untouched -- and halves the
    scale; after `loss_scale_growth` good steps it doubles again. A state stores the scaler."""
    from gpt2gen import checkpoint as ck
    idx, targets = batch(np.random.default_rng(6))

    def run(m, n):
        out = []
        for _ in range(n):
            out.append(m.forward(idx, targets))
            m.zero_grad()
            m.backward()
            out.append(m.update(lr=1e-3, weight_decay=0.1))
        return out
    for prec in ("fp32", "bf16"):
        plain = gpt2gen.build("model.yaml", precision=prec, seed=2, **CFG)
        scaled = gpt2gen.build("model.yaml", precision=prec, seed=2, loss_scaling=True, **CFG)
        assert scaled.loss_scaling and scaled.loss_scale == 2.0 ** 16 and not plain.loss_scaling
        assert run(plain, 3) == run(scaled, 3)
        for name in plain.params:
            assert np.array_equal(plain.weights[name], scaled.weights[name]), (prec, name)
        before = {k: v.copy() for k, v in scaled.arenas.items() if k in ("params", "m", "v", "master")}
        scaled.forward(idx, targets)
        scaled.zero_grad()
        scaled.backward()
        scaled.grads["lnfw"][5] = np.inf                   # as an overflow in fp16 would leave it
        assert scaled.update(lr=1e-3, weight_decay=0.1) is False
        assert scaled.step == 3 and scaled.loss_scale == 2.0 ** 15
        for k, v in before.items():
            assert np.array_equal(scaled.arenas[k], v), (prec, k)
    scaled.loss_scale_growth = 2
    run(scaled, 2)
    assert scaled.loss_scale == 2.0 ** 16 and scaled.step == 5
    ck.save_state(tmp_path / "s.safetensors", scaled, step=scaled.step)
    again = gpt2gen.build("model.yaml", precision="bf16", seed=0, loss_scaling=True, **CFG)
    ck.load_state(tmp_path / "s.safetensors", again)
    assert again.loss_scale_state == scaled.loss_scale_state


def test_the_program_lists_every_buffer_with_its_role_and_dtype():
    program, _ = generate("model.yaml", precision="bf16", **CFG)
    b = program.buffers
    assert (b["wte"].role, b["wte"].dtype) == ("param", "bf16")
    assert (b["grad:wte"].role, b["grad:wte"].dtype) == ("grad", "bf16")
    assert (b["master:wte"].role, b["master:wte"].dtype) == ("master", "f32")
    assert (b["m:qkvw"].role, b["v:qkvw"].dtype, b["v:qkvw"].per_layer) == ("moment", "f32", True)
    assert (b["ln1"].role, b["ln_1_mean"].role, b["attproj"].role, b["idx"].role) == ("act", "saved", "scratch", "input")
    assert b["dacts:dslot0"].role == "act_grad" and {x.role for x in b.values()} == set(ROLES)


@pytest.mark.parametrize("prec", ["fp32", "bf16"])
def test_fused_and_unfused_builds_agree_bit_for_bit(prec):
    """Each fused kernel computes what its two ops compute, rounding (in bf16) at the same points: the loss,
    the logits (V < Vp: the padding columns too) and every gradient are the same bytes."""
    idx, targets = batch(np.random.default_rng(7))
    out = {}
    for fuse in ("all", "none"):
        m = gpt2gen.build("model.yaml", precision=prec, fuse=fuse, seed=4, **CFG)
        loss = m.forward(idx, targets)
        logits = m.logits.copy()
        m.zero_grad()
        m.backward()
        out[fuse] = (loss, logits.tobytes(), {k: v.tobytes() for k, v in m.grads.items()})
    assert out["all"][:2] == out["none"][:2]
    for name, g in out["none"][2].items():
        assert out["all"][2][name] == g, name
