"""compare_methods runs the PEFT parity III methods by name (a file of its own,
so that pytest-xdist runs it beside the other smoke runs)."""


from tests.experiments.conftest import compare_smoke


def test_compare_methods_smoke_parity_iii(tmp_path):
    # PEFT parity III by name: held-out perplexity falls and nothing is materialised;
    # LoRA-FA and Riemannian LoRA are LoRA with their optimizers; orthogonal
    # and MiCA are LoRA inits (MiCA's b frozen); QA-LoRA pools x first,
    # BD-LoRA multiplies blocks (both factored forms)
    methods = ["lorafa", "riemannian", "orthogonal", "mica", "qalora", "bdlora"]
    rows, res = compare_smoke(tmp_path, methods, fall=0.99, timeout=480)
    assert "materializ" not in res.stderr.lower(), res.stderr[-2000:]
