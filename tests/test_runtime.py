"""The runtime API: zero-copy views, clear errors for bad inputs, and run-time B and T."""
from __future__ import annotations

import numpy as np
import pytest

import gpt2gen

CFG = dict(V=89, L=2, C=24, NH=2, maxT=16, B=2, T=8)


@pytest.fixture(scope="module")
def model():
    return gpt2gen.build("model.yaml", **CFG)


def test_views_are_zero_copy_and_stacked_per_layer(model):
    assert model.params["qkvw"].shape == (2, 72, 24)
    assert model.params["wte"].shape == (128, 24)           # padded vocabulary
    assert np.shares_memory(model.params["qkvw"], model.arenas["params"])
    assert np.shares_memory(model.grads["qkvw"], model.arenas["grads"])
    for arena in model.arenas.values():
        assert arena.ctypes.data % 64 == 0
    assert model.config["Vp"] == 128 and model.config["HS"] == 12


def test_writing_a_view_changes_the_model(model):
    idx = np.zeros((1, 4), np.int32)
    model.forward(idx)
    before = model.logits.copy()
    saved = model.params["lnfb"].copy()
    model.params["lnfb"][...] += 1.0
    model.forward(idx)
    assert not np.allclose(before, model.logits)
    model.params["lnfb"][...] = saved


def test_init_is_deterministic_and_follows_the_model_file():
    a = gpt2gen.build("model.yaml", **CFG, seed=3)
    b = gpt2gen.build("model.yaml", **CFG, seed=3)
    c = gpt2gen.build("model.yaml", **CFG, seed=4)
    assert np.array_equal(a.arenas["params"], b.arenas["params"])
    assert not np.array_equal(a.arenas["params"], c.arenas["params"])
    assert np.all(a.params["ln1w"] == 1) and np.all(a.params["qkvb"] == 0)
    assert abs(a.params["qkvw"].std() - 0.02) < 0.002
    assert abs(a.params["attprojw"].std() - 0.02 / np.sqrt(2 * CFG["L"])) < 0.002


@pytest.mark.parametrize("idx,error,match", [
    (np.zeros((2, 4), np.float32), TypeError, "integer token ids"),
    (np.zeros(4, np.int32), ValueError, "must be 2-D"),
    (np.zeros((3, 4), np.int32), ValueError, r"outside the build-time maxima B <= 2.*build with larger maxima"),
    (np.zeros((1, 9), np.int32), ValueError, "T <= 8"),
    (np.full((1, 4), 89, np.int32), ValueError, r"out of range \[0, 89\)"),
    (np.full((1, 4), -1, np.int64), ValueError, "out of range"),
    (np.zeros((0, 4), np.int32), ValueError, "outside the build-time maxima"),
])
def test_bad_inputs_give_clear_errors(model, idx, error, match):
    with pytest.raises(error, match=match):
        model.forward(idx)


def test_targets_must_match_idx(model):
    with pytest.raises(ValueError, match="has shape"):
        model.forward(np.zeros((2, 4), np.int32), np.zeros((2, 5), np.int32))
    with pytest.raises(ValueError, match=r"`targets`\[1, 2\] = 1000"):
        t = np.zeros((2, 4), np.int32)
        t[1, 2] = 1000
        model.forward(np.zeros((2, 4), np.int32), t)


def test_backward_needs_forward_with_targets():
    m = gpt2gen.build("model.yaml", **CFG)
    with pytest.raises(RuntimeError, match="forward pass first"):
        m.backward()
    with pytest.raises(RuntimeError, match="no forward pass"):
        _ = m.logits
    m.forward(np.zeros((1, 3), np.int32))
    with pytest.raises(RuntimeError, match="targets"):
        m.backward()


def test_smaller_batch_gives_the_same_numbers(model):
    """A row of a batch, or a prefix of a sequence, computes exactly what the full batch computed for it."""
    rng = np.random.default_rng(0)
    idx = rng.integers(0, 89, (2, 8)).astype(np.int32)
    model.forward(idx)
    full = model.logits.copy()
    model.forward(idx[1:, :5])
    np.testing.assert_allclose(model.logits, full[1:, :5], rtol=1e-6, atol=1e-6)


def test_gradients_accumulate_until_zero_grad(model):
    rng = np.random.default_rng(1)
    idx, tg = rng.integers(0, 89, (2, 8)).astype(np.int32), rng.integers(0, 89, (2, 8)).astype(np.int32)
    model.forward(idx, tg)
    model.zero_grad()
    model.backward()
    once = model.arenas["grads"].copy()
    model.forward(idx, tg)
    model.backward()
    # the kernels add their partial sums into what the buffer holds, so the rounding differs slightly
    np.testing.assert_allclose(model.arenas["grads"], 2 * once, rtol=1e-5, atol=1e-6 * np.abs(once).max())
    model.zero_grad()
    assert not model.arenas["grads"].any()


def test_update_counts_steps(model):
    model.update(1e-3)
    model.update(1e-3)
    assert model.step == 2
    with pytest.raises(ValueError, match="step must be >= 1"):
        model.update(1e-3, step=0)


def test_state_dict_round_trip(model):
    saved = model.state_dict()
    assert set(saved) == set(model.params) and not np.shares_memory(saved["wte"], model.arenas["params"])
    model.params["wte"][...] += 1.0
    model.load_state_dict(saved)
    np.testing.assert_array_equal(model.params["wte"], saved["wte"])
    with pytest.raises(KeyError, match="unknown parameter `nope`"):
        model.load_state_dict({"nope": saved["wte"]})
    with pytest.raises(ValueError, match="has shape"):
        model.load_state_dict({"wte": saved["wte"][:3]})


def _machine(monkeypatch, available: int):
    """Pretend ``available`` bytes are free now (and plenty exist): no override, no cgroup."""
    from gpt2gen import builder
    monkeypatch.delenv("GPT2GEN_MAX_MEMORY", raising=False)
    monkeypatch.setattr(builder, "_meminfo", {"MemTotal": 2 ** 40, "MemAvailable": available}.get)
    monkeypatch.setattr(builder, "_cgroup_limits", list)


def test_a_model_that_runs_but_cannot_train_here_is_refused_where_training_starts(monkeypatch):
    """Building and running write params and acts only, so a limit between that and the training footprint
    builds and runs the model; check_training_memory, called where training starts, refuses it with every
    arena's size."""
    from gpt2gen import builder, runtime
    program, _ = builder.generate("model.yaml", **CFG)
    sizes = builder.arena_bytes(program)
    monkeypatch.setenv("GPT2GEN_MAX_MEMORY", str(sizes["params"] + sizes["acts"] + 1024))
    m = gpt2gen.build("model.yaml", **CFG)
    assert np.isfinite(m.forward(np.zeros((2, 8), np.int32), np.ones((2, 8), np.int32)))
    with pytest.raises(builder.MemoryLimitError) as e:
        runtime.check_training_memory(m)
    msg = str(e.value)
    assert msg.startswith("model.yaml: the model needs") and "for its arenas, more than the " in msg, msg
    assert "available now (GPT2GEN_MAX_MEMORY=" in msg and "hint: make the model smaller" in msg, msg
    for name in ("params", "grads", "m", "v", "acts", "dacts", "total"):
        assert f"\n  {name} " in msg, (name, msg)
    _machine(monkeypatch, available=0)            # nothing free, but the arenas hold all they need already
    monkeypatch.setattr(runtime, "_resident_bytes", lambda a: a.nbytes)
    runtime.check_training_memory(m)
    monkeypatch.setattr(runtime, "_resident_bytes", lambda a: 0)
    with pytest.raises(builder.MemoryLimitError, match=r"more than the 0 bytes available now \(MemAvailable"):
        runtime.check_training_memory(m)


def test_fresh_arenas_take_memory_only_where_written():
    """What the memory policy rests on: a fresh arena is not in memory until written (mincore says so)."""
    from gpt2gen import runtime
    from gpt2gen.targets import host_arena
    a = host_arena(2 ** 28, "f32")                     # 256 MiB
    assert runtime._resident_bytes(a) <= 4 * 2 ** 20
    a[:2 ** 20] = 1.0                                       # 4 MiB written
    assert 4 * 2 ** 20 <= runtime._resident_bytes(a) <= 12 * 2 ** 20


def test_initialising_a_new_model_leaves_grads_m_and_v_untouched():
    """init_weights zeroes grads, m and v only when something may have written them: writing zeros over
    fresh ones would take 3x the parameters' memory for a model that is only run."""
    m = gpt2gen.build("model.yaml", **CFG, seed=None)
    for name in ("grads", "m", "v"):
        m._arenas[name].flags.writeable = False             # a write would raise
    m.init_weights(5)
    assert m.params["ln1w"].all() and not m._arenas["m"].any()
    for name in ("grads", "m", "v"):
        m._arenas[name].flags.writeable = True
    rng = np.random.default_rng(2)
    m.forward(rng.integers(0, 89, (2, 8)).astype(np.int32), rng.integers(0, 89, (2, 8)).astype(np.int32))
    m.zero_grad()
    m.backward()
    m.update(1e-3)
    assert m.arenas["m"].any() and m.grads["qkvw"].any()
    m.init_weights(5)                                       # after training: zeroed again
    assert not m.arenas["m"].any() and not m.arenas["v"].any() and not m.arenas["grads"].any() and m.step == 0


def test_an_allocation_that_fails_anyway_gets_the_same_clear_error(monkeypatch):
    from gpt2gen import runtime, targets
    from gpt2gen.builder import MemoryLimitError, compile_model
    built = compile_model("model.yaml", **CFG)

    def no_memory(nbytes, dtype):
        raise MemoryError(f"Unable to allocate {nbytes} bytes")
    monkeypatch.setattr(targets.Target, "allocator", lambda self, extension: no_memory)
    with pytest.raises(MemoryLimitError, match=r"(?s)for its arenas, and allocating them failed with .* available"):
        runtime.Model(built)
