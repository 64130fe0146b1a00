"""peftjax.report: one definition of "trainable %" shared with tree.describe."""

import re

import jax
import jax.numpy as jnp
import optax

import peftjax
from peftjax import adapters, tree
from peftjax.report import ParamCount

_PCT = re.compile(r"trainable%: (\d+\.\d{4})$", re.M)


def _model():
    return {"attn": {"q": {"kernel": jnp.ones((16, 12)), "bias": jnp.zeros(12)},
                     "v": {"kernel": jnp.ones((16, 12))}},
            "embed": {"embedding": jnp.ones((40, 16))},
            "norm": {"scale": jnp.ones(16)}}


def test_describe_and_report_print_the_same_trainable_percent():
    params = _model()
    plan = tree.assign(params, [tree.Rule(where=r"attn/(q|v)/kernel", then=adapters.lora(2))])
    state = adapters.init(plan, jax.random.key(0), params)
    opt = optax.sgd(0.1, momentum=0.9)

    def step(t, s, p, f, batch):
        def loss(t):
            return jnp.sum(adapters.materialize(plan, p, t, f)["attn"]["q"]["kernel"])

        u, s = opt.update(jax.grad(loss)(t), s, t)
        return optax.apply_updates(t, u), s

    opt_state = opt.init(state.trainable)
    rep = peftjax.report(step, state.trainable, opt_state, params, state.frozen, None,
                         params=params, trainable=state.trainable, opt_state=opt_state)
    texts = {"describe": tree.describe(plan, params), "report": str(rep),
             "count_params": str(peftjax.count_params(params, state.trainable))}
    # independent count: 2 LoRA pairs of (16, 2) and (2, 12); base 16*12*2 + 12 + 640 + 16
    trainable, base = 2 * (16 * 2 + 2 * 12), 2 * 16 * 12 + 12 + 40 * 16 + 16
    want = f"{100.0 * trainable / (base + trainable):.4f}"
    assert want == "9.6220"
    for name, text in texts.items():
        assert _PCT.findall(text) == [want], (name, text)
        assert f"trainable params: {trainable:,} || all params: {base + trainable:,}" in text
    assert texts["describe"].splitlines()[-1].startswith(f"5 leaves, {base:,} parameters; ")


def test_trainable_percent_of_labels_counts_no_added_parameters():
    params = _model()
    labels = {"attn/q/kernel": "adam", "norm/scale": "frozen"}
    line = tree.describe(labels, params).splitlines()[-1]
    base = 2 * 16 * 12 + 12 + 40 * 16 + 16
    # the labelled kernel is part of the base: the total does not grow
    assert line == (f"5 leaves, {base:,} parameters; trainable params: 192 || all params: "
                    f"{base:,} || trainable%: {100.0 * 192 / base:.4f}")
    count = ParamCount(trainable=192, total=base)
    assert line.endswith(str(count)) and abs(count.percent - 100.0 * 192 / base) < 1e-12
    assert ParamCount(trainable=0, total=0).percent == 0.0
