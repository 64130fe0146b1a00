"""peftjax.train.fit: signals, checkpoints, resume, skipped steps, logs, plots.

The step is a tiny hand-written jitted update over a ``TrainState`` (Adam on a
4-row embedding and a projection, with key-driven noise so the PRNG key takes
part in the result), compiled once and shared by all tests.
"""

import functools
import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from peftjax import adapters, data, train, tree
from peftjax.io import checkpoint

V = 8  # vocabulary
TX = optax.adam(0.05)


def _loss(w, key, batch):
    emb = w["emb"] * (1 + 0.1 * jax.random.normal(key, w["emb"].shape))  # "dropout" noise
    x = emb[batch["tokens"]] @ w["out"]
    loss = jnp.mean((x - (batch["tokens"] % 3).astype(x.dtype)) ** 2)
    # A batch with negative positions stands for a corrupt one: its loss is NaN.
    return loss * jnp.where(jnp.any(batch["positions"] < 0), jnp.nan, 1.0)


@jax.jit
def STEP(state, batch):
    key, sub = jax.random.split(state.key)
    loss, g = jax.value_and_grad(_loss)(state.trainable, sub, batch)
    finite = jnp.isfinite(loss) & jnp.all(jnp.array(
        [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(g)]))
    with jax.numpy_dtype_promotion("standard"):  # optax's Adam mixes int and float
        updates, opt_state = TX.update(g, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(g),
               "skipped": (~finite).astype(jnp.int32),
               "tokens": jnp.sum(batch["segment_ids"] != 0)}
    return train.TrainState(keep(trainable, state.trainable), state.frozen,
                            keep(opt_state, state.opt_state), state.step + 1, key), metrics


def init_state():
    w = {"emb": jax.random.normal(jax.random.key(1), (V, 4)), "out": jnp.full((4,), 0.1)}
    return train.TrainState(w, {}, TX.init(w), jnp.int32(0), jax.random.key(0))


def batches():
    rng = np.random.default_rng(0)
    docs = [rng.integers(2, V, size=n) for n in (7, 5, 9, 6, 3, 8, 4)]
    return data.Batches(data.pack(docs, 4, eos_id=1), batch_size=2, seed=0)


def batch_list(n, nan_at=()):
    b = batches()
    out = [b[p] for p in range(n)]
    for p in nan_at:
        out[p]["positions"] = np.full_like(out[p]["positions"], -1)
    return out


def leaves(state):
    return [np.asarray(jax.random.key_data(x)) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
            else np.asarray(x) for x in jax.tree.leaves(state)]


def assert_same_state(a, b):
    # Bit-exact on purpose: both runs are the same jitted computation on the same
    # machine in the same process, so an exact resume reproduces every bit.
    la, lb = leaves(a), leaves(b)
    assert len(la) == len(lb) and la
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_array_equal(x, y)


def rows(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(x) for x in f.read().splitlines()]


def test_sigterm_then_resume_is_bit_exact(tmp_path):
    full = train.fit(STEP, init_state(), batches(), steps=12, progress=False,
                     log_path=tmp_path / "a.jsonl")

    def killed_at_5(state, batch):
        state, metrics = STEP(state, batch)
        if int(state.step) == 5:
            os.kill(os.getpid(), signal.SIGTERM)  # the handler only sets a flag
        return state, metrics

    ckpt, log = tmp_path / "ckpt", tmp_path / "b.jsonl"
    cut = train.fit(killed_at_5, init_state(), batches(), steps=12, progress=False,
                    checkpoint_dir=ckpt, checkpoint_every=4, log_path=log)
    assert cut.interrupted_by == signal.SIGTERM and cut.step == 5
    assert checkpoint.all_steps(ckpt) == [4, 5]
    assert train.resume_step(ckpt) == 5

    res = train.fit(STEP, init_state(), batches(), steps=12, progress=False,
                    checkpoint_dir=ckpt, checkpoint_every=4, log_path=log, resume=True)
    assert res.interrupted_by is None and res.step == 12
    assert [h["step"] for h in res.history] == list(range(6, 13))
    assert checkpoint.all_steps(ckpt) == [4, 5, 8, 12]
    assert_same_state(res.state, full.state)
    assert int(res.state.step) == 12
    # Every logged loss, before and after the interruption, is the uninterrupted run's.
    np.testing.assert_allclose([r["loss"] for r in rows(log)],
                               [r["loss"] for r in rows(tmp_path / "a.jsonl")], rtol=0, atol=0)
    assert [r["step"] for r in rows(log)] == list(range(1, 13))


def test_checkpoint_every_writes_those_steps_and_the_end(tmp_path):
    r = train.fit(STEP, init_state(), batches(), steps=10, progress=False,
                  checkpoint_dir=tmp_path / "c", checkpoint_every=4)
    assert checkpoint.all_steps(tmp_path / "c") == [4, 8, 10]
    back = checkpoint.restore(tmp_path / "c", init_state(), step=10)
    assert isinstance(back, train.TrainState) and int(back.step) == 10
    assert_same_state(back, r.state)
    with pytest.raises(ValueError, match=r"already holds checkpoints \(steps \[4, 8, 10\]\)"):
        train.fit(STEP, init_state(), batches(), steps=10, progress=False,
                  checkpoint_dir=tmp_path / "c")


def test_nan_batch_is_skipped_and_counted():
    before = train.fit(STEP, init_state(), batch_list(2), steps=2, progress=False)
    r = train.fit(STEP, init_state(), batch_list(4, nan_at=(2,)), steps=3, progress=False)
    assert r.skipped == 1 and [h["skipped"] for h in r.history] == [0, 0, 1]
    assert np.isnan(r.history[2]["loss"])
    assert int(r.state.step) == 3 and r.step == 3
    # The skipped step left the trained values and the optimizer state as they were.
    for x, y in zip(jax.tree.leaves((r.state.trainable, r.state.opt_state)),
                    jax.tree.leaves((before.state.trainable, before.state.opt_state)),
                    strict=True):
        np.testing.assert_array_equal(x, y)


def test_too_many_skipped_steps_names_them(tmp_path):
    log = tmp_path / "m.jsonl"
    with pytest.raises(train.TooManySkippedSteps,
                       match=r"3 steps in a row \(steps 3 to 5\).*after step 2") as e:
        train.fit(STEP, init_state(), batch_list(8, nan_at=(2, 3, 4)), steps=8,
                  progress=False, max_skipped_in_a_row=3, log_path=log)
    assert (e.value.first, e.value.last, int(e.value.state.step)) == (3, 5, 5)
    assert [r["skipped"] for r in rows(log)] == [0, 0, 1, 1, 1]
    # Two in a row is below the limit: the run goes on.
    r = train.fit(STEP, init_state(), batch_list(6, nan_at=(2, 3)), steps=6,
                  progress=False, max_skipped_in_a_row=3)
    assert r.skipped == 2 and r.step == 6


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no checkpoint under"):
        train.fit(STEP, init_state(), batches(), steps=4, progress=False,
                  checkpoint_dir=tmp_path / "none", resume=True)
    with pytest.raises(ValueError, match="need a checkpoint_dir"):
        train.fit(STEP, init_state(), batches(), steps=4, progress=False, resume=True)


def test_resume_sets_a_damaged_newest_step_aside(tmp_path):
    ckpt, log = tmp_path / "c", tmp_path / "m.jsonl"
    first = train.fit(STEP, init_state(), batch_list(8), steps=8, progress=False,
                      checkpoint_dir=ckpt, checkpoint_every=4, log_path=log)
    record = ckpt / "8" / "meta" / "metadata"
    record.write_bytes(record.read_bytes()[:40])
    assert checkpoint.latest_intact_step(ckpt) == 4

    kept = tmp_path / "c.damaged" / "8"
    with pytest.warns(checkpoint.CheckpointWarning,
                      match=f"resumed from step 4 .*damaged step 8 moved to {kept}"):
        again = train.fit(STEP, init_state(), batch_list(8), steps=8, progress=False,
                          checkpoint_dir=ckpt, checkpoint_every=4, log_path=log, resume=True)
    assert (kept / "meta" / "metadata").stat().st_size == 40  # kept as it was
    assert checkpoint.all_steps(ckpt) == [4, 8] and checkpoint.latest_intact_step(ckpt) == 8
    assert [r["step"] for r in rows(log)] == list(range(1, 9))  # 5..8 replaced, once
    assert [h["step"] for h in again.history] == [5, 6, 7, 8]
    assert_same_state(again.state, first.state)  # the list was skipped to position 4

    for s in (4, 8):  # every step damaged: resume_step names the newest's damage
        rec = ckpt / str(s) / "meta" / "metadata"
        rec.write_bytes(rec.read_bytes()[:40])
    with pytest.raises(ValueError, match=r"every checkpoint under .* is damaged \(steps "
                                         r"\[4, 8\]\); the newest: .*step 8"):
        train.resume_step(ckpt)


def test_log_rows_and_eval_rows(tmp_path):
    sched = optax.linear_schedule(1.0, 0.0, 5)
    held_out = batches()[0]
    seen = []

    def eval_fn(state):
        seen.append(int(state.step))
        return {"loss": _loss(state.trainable, jax.random.key(7), held_out)}

    log = tmp_path / "m.jsonl"
    r = train.fit(STEP, init_state(), batches(), steps=5, progress=False, eval_fn=eval_fn,
                  eval_every=2, schedule=sched, log_path=log)
    assert seen == [2, 4, 5]  # every 2 steps and at the end
    got = rows(log)
    train_rows = [x for x in got if "loss" in x]
    eval_rows = [x for x in got if "eval_loss" in x]
    assert [x["step"] for x in got] == [1, 2, 2, 3, 4, 4, 5, 5]
    assert train_rows == r.history and [x["step"] for x in eval_rows] == [2, 4, 5]
    b = batches()
    for p, row in enumerate(train_rows):
        assert set(row) == {"step", "loss", "lr", "grad_norm", "skipped", "tokens",
                            "tokens_per_s", "seconds"}
        np.testing.assert_allclose(row["lr"], 1.0 - p / 5, rtol=1e-6)  # the update's rate
        assert row["tokens"] == int((b[p]["segment_ids"] != 0).sum())
        np.testing.assert_allclose(row["tokens_per_s"], row["tokens"] / row["seconds"])
    # The eval value is the held-out loss of the final state, computed apart.
    want = float(_loss(r.state.trainable, jax.random.key(7), held_out))
    np.testing.assert_allclose(r.evals[-1]["loss"], want, rtol=1e-6)
    assert [e["step"] for e in r.evals] == [2, 4, 5]
    np.testing.assert_allclose([e["eval_loss"] for e in eval_rows],
                               [e["loss"] for e in r.evals], rtol=0)


def test_plot_and_progress_bar(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    pytest.importorskip("tqdm")
    png = tmp_path / "loss.png"
    train.fit(STEP, init_state(), batches(), steps=3, desc="tinyfit", plot_path=png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "tinyfit" in capsys.readouterr().err


def test_plot_without_matplotlib_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"plot_path needs matplotlib.*peftjax\[train\]"):
        train.fit(STEP, init_state(), batches(), steps=1, progress=False,
                  plot_path=tmp_path / "x.png")


def test_a_step_that_does_not_count_is_refused():
    with pytest.raises(ValueError, match=r"step advanced by one \(expected 1, got 0\)"):
        train.fit(lambda s, b: (s, {"loss": 0.0}), init_state(), [0], steps=1,
                  progress=False)


def test_trainer_step_with_donation_resumes_bit_exact(tmp_path):
    # The same check through train.trainer's step (factored LoRA, donated state).
    rng = np.random.default_rng(3)
    params = {"w1": jnp.asarray(rng.standard_normal((4, 8)), jnp.float32),
              "w2": jnp.asarray(rng.standard_normal((8, 3)), jnp.float32)}

    def loss_fn(p, batch):
        return jnp.mean((jnp.tanh(batch["x"] @ p["w1"]) @ p["w2"] - batch["y"]) ** 2)

    t = train.trainer(loss_fn, optax.adam(3e-2), adapters=tree.assign(
        params, [tree.Rule(where="w1|w2", then=adapters.lora(2))]))
    step = functools.partial(t.step, params=params)
    feed = [{"x": rng.standard_normal((4, 4)).astype(np.float32),
             "y": rng.standard_normal((4, 3)).astype(np.float32)} for _ in range(6)]

    full = train.fit(step, t.init(jax.random.key(0), params), feed, steps=6, progress=False)

    def killed_at_3(state, batch):
        state, metrics = step(state, batch)
        if int(state.step) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return state, metrics

    cut = train.fit(killed_at_3, t.init(jax.random.key(0), params), feed, steps=6,
                    progress=False, checkpoint_dir=tmp_path / "c")
    assert (cut.interrupted_by, cut.step) == (signal.SIGINT, 3)
    res = train.fit(step, t.init(jax.random.key(0), params), feed, steps=6, progress=False,
                    checkpoint_dir=tmp_path / "c", resume=True)
    assert checkpoint.all_steps(tmp_path / "c") == [3, 6]
    assert float(full.history[-1]["loss"]) < float(full.history[0]["loss"])
    assert_same_state(res.state, full.state)
