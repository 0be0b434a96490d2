"""Neural-incompatibility analysis: linear CKA, the mean-cosine metric, parametric and representation
similarity, plots and the ``analyze`` command."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from pktjax import analysis, plots
from pktjax.checkpoint import Model, layer_shapes, save_model, top_shapes
from pktjax.tiny import build_tokenizer, tiny_config

RNG = np.random.default_rng(0)


def random_model(cfg, seed: int) -> Model:
    """Random weights drawn with NumPy (quicker than compiling a sampler per shape): norms near 1, matrices
    N(0, 0.2²)."""
    rng = np.random.default_rng(seed)

    def draw(shape, vector):
        return jnp.asarray(1.0 + 0.1 * rng.normal(size=shape) if vector else 0.2 * rng.normal(size=shape), jnp.float32)

    params = {k: draw(s, len(s) == 1) for k, s in top_shapes(cfg).items()}
    params["layers"] = {k: draw((cfg.num_layers, *s), len(s) == 1) for k, s in layer_shapes(cfg).items()}
    return Model(params=params, config=cfg)


# ------------------------------------------------------------------------------------------------ references

def numpy_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA straight from the definition: HSIC with Gram matrices and the centring matrix H."""
    n = len(x)
    h = np.eye(n) - np.ones((n, n)) / n
    k, l = x @ x.T, y @ y.T

    def hsic(a, b):
        return np.trace(a @ h @ b @ h)

    return hsic(k, l) / np.sqrt(hsic(k, k) * hsic(l, l))


def numpy_mean_cosine(x: np.ndarray, y: np.ndarray) -> float:
    """The mean cosine of token-similarity profiles, token by token."""
    def profiles(z):
        z = z - z.mean(0)
        z = z / np.linalg.norm(z, axis=1, keepdims=True)
        s = z @ z.T
        return [np.delete(s[i], i) for i in range(len(z))]

    px, py = profiles(x), profiles(y)
    return float(np.mean([a @ b / np.linalg.norm(a) / np.linalg.norm(b) for a, b in zip(px, py)]))


def orthogonal(d: int) -> np.ndarray:
    return np.linalg.qr(RNG.normal(size=(d, d)))[0]


def pair(n=60, d1=12, d2=7):
    x = RNG.normal(size=(n, d1))
    y = np.tanh(x @ RNG.normal(size=(d1, d2))) + 0.5 * RNG.normal(size=(n, d2))
    return x, y


# ------------------------------------------------------------------------------------------------ CKA

@pytest.mark.parametrize("n,d1,d2", [(60, 12, 7), (9, 30, 25)])  # feature form and Gram form
def test_cka_matches_numpy(n, d1, d2):
    x, y = pair(n, d1, d2)
    assert analysis.linear_cka(x, y) == pytest.approx(numpy_cka(x, y), abs=1e-5)


def test_cka_invariances_and_identity():
    x, y = pair()
    base = analysis.linear_cka(x, y)
    assert 0.1 < base < 0.99
    assert analysis.linear_cka(x @ orthogonal(12), y) == pytest.approx(base, abs=1e-5)
    assert analysis.linear_cka(x, y @ orthogonal(7)) == pytest.approx(base, abs=1e-5)
    assert analysis.linear_cka(7.3 * x, 0.01 * y) == pytest.approx(base, abs=1e-5)
    assert analysis.linear_cka(x + 50.0, y) == pytest.approx(base, abs=1e-4)  # centred over tokens
    assert analysis.linear_cka(x, x) == pytest.approx(1.0, abs=1e-6)
    assert analysis.linear_cka(x, 3.0 * x @ orthogonal(12)) == pytest.approx(1.0, abs=1e-5)


def test_streaming_equals_one_shot():
    """Co-moments merged over padded batches (with a large common offset) give the one-shot CKA."""
    layers_x = [RNG.normal(size=(90, 6)) + 100.0 for _ in range(2)]
    layers_y = [np.tanh(layers_x[0] @ RNG.normal(size=(6, 5))) + RNG.normal(size=(90, 5)) for _ in range(3)]
    m = analysis.moments_init(2, 6, 3, 5)
    for lo, hi in [(0, 17), (17, 40), (40, 41), (41, 90)]:
        k, pad = hi - lo, 50 - (hi - lo)  # every batch padded to 50 rows of junk
        xb = np.stack([np.concatenate([x[lo:hi], np.full((pad, 6), 1e3)]) for x in layers_x])
        yb = np.stack([np.concatenate([y[lo:hi], np.full((pad, 5), -7.0)]) for y in layers_y])
        w = np.concatenate([np.ones(k), np.zeros(pad)])
        m = analysis.moments_update(m, jnp.asarray(xb, jnp.float32), jnp.asarray(yb, jnp.float32), jnp.asarray(w))
    got = np.asarray(analysis.moments_cka(m))
    want = np.array([[numpy_cka(x, y) for y in layers_y] for x in layers_x])
    assert got.shape == (2, 3)
    np.testing.assert_allclose(got, want, atol=2e-5)
    assert float(m.n) == 90


# ------------------------------------------------------------------------------------------------ mean cosine

def test_mean_cosine_definition_and_invariances():
    x, y = pair(40, 10, 6)
    want = numpy_mean_cosine(x, y)
    assert analysis.mean_cosine(x, y) == pytest.approx(want, abs=1e-5)
    assert analysis.mean_cosine(2.5 * x @ orthogonal(10), y @ orthogonal(6)) == pytest.approx(want, abs=1e-5)
    assert analysis.mean_cosine(x, x) == pytest.approx(1.0, abs=1e-6)
    assert analysis.mean_cosine(x, -x) == pytest.approx(1.0, abs=1e-6)  # a reflection is orthogonal too


def test_mean_cosine_can_be_negative():
    """Token pairs grouped differently: {0,1},{2,3} in x and {0,2},{1,3} in y."""
    x = np.array([[1.0, 0.1], [1.0, -0.1], [-1.0, 0.1], [-1.0, -0.1]])
    y = x[[0, 2, 1, 3]]
    assert analysis.mean_cosine(x, y) == pytest.approx(numpy_mean_cosine(x, y), abs=1e-5)
    assert analysis.mean_cosine(x, y) < -0.2


# ------------------------------------------------------------------------------------------------ parametric

@pytest.fixture(scope="module")
def student_64():
    return random_model(tiny_config(hidden=64, layers=2, inter=128), seed=3)


def numpy_pissa(w: np.ndarray, rank: int) -> dict[str, np.ndarray]:
    """PiSSA factors per layer: ``b = U_r S_r^½``, ``a = S_r^½ V_rᵀ``."""
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    root = np.sqrt(s[:, :rank])
    return {"a": root[:, :, None] * vt[:, :rank], "b": u[:, :, :rank] * root[:, None, :]}


def energy_fraction(w: np.ndarray, rank: int) -> np.ndarray:
    s = np.linalg.svd(w, compute_uv=False)
    return np.sqrt((s[:, :rank] ** 2).sum(1) / (s ** 2).sum(1))


def check_pissa(res: dict, params: dict, rank: int) -> None:
    for name, r in res.items():
        w = np.asarray(params["layers"][name], np.float64)
        np.testing.assert_allclose(r["vs_remaining"], 0.0, atol=1e-5)  # ⟨U_r S_r V_rᵀ, U_>r S_>r V_>rᵀ⟩ = 0
        np.testing.assert_allclose(r["vs_original"], energy_fraction(w, rank), atol=1e-4)  # ‖S_r‖ / ‖S‖
        assert (r["vs_original"] > 0.3).all()


def test_pissa_cosines(student_64):
    params, rank = student_64.params, 8
    names = ("up_proj", "down_proj", "v_proj", "o_proj")
    lora = {"layers": {n: numpy_pissa(np.asarray(params["layers"][n], np.float64), rank) for n in names}}
    res = analysis.parametric_similarity(params, student_64.config, lora, scale=1.0)
    assert set(res) == set(names) and res["up_proj"]["vs_original"].shape == (2,)
    check_pissa(res, params, rank)


def test_pissa_cosines_from_lora_init(student_64):
    lora_mod = pytest.importorskip("pktjax.lora")
    params, rank, alpha = student_64.params, 8, 16.0  # scale 2: the cosines must not depend on it
    targets = ("up_proj", "down_proj")
    _, lora = lora_mod.init(params, student_64.config, rank, alpha, targets, method="pissa")
    res = analysis.parametric_similarity(params, student_64.config, lora, scale=alpha / rank, modules=targets)
    check_pissa(res, params, rank)


def test_unrelated_adapter_is_orthogonal_to_the_weight(student_64):
    """An adapter unrelated to W (what a teacher-extracted init looks like to the student): ≈0 vs the original,
    negative vs the remainder, cos(Δ, W − Δ) ≈ −‖Δ‖ / ‖W − Δ‖."""
    params, cfg = student_64.params, student_64.config
    w = np.asarray(params["layers"]["up_proj"], np.float64)
    a, b = RNG.normal(size=(2, 8, 64)) * 0.3, RNG.normal(size=(2, 128, 8)) * 0.3
    res = analysis.parametric_similarity(params, cfg, {"layers": {"up_proj": {"a": a, "b": b}}})["up_proj"]
    delta = b @ a
    assert np.abs(res["vs_original"]).max() < 0.1
    want = -np.linalg.norm(delta, axis=(1, 2)) / np.linalg.norm(w - delta, axis=(1, 2))
    np.testing.assert_allclose(res["vs_remaining"], want, atol=0.1)
    assert (res["vs_remaining"] < -0.2).all()


# ------------------------------------------------------------------------------------------------ representation

@pytest.fixture(scope="module")
def pair_models():
    return random_model(tiny_config(hidden=48, layers=3, inter=64), 1), random_model(tiny_config(), 2)


def probe(lengths=(12, 30, 30, 21)):
    return [RNG.integers(4, 260, size=k) for k in lengths]


def test_representation_with_itself_has_unit_diagonal(pair_models):
    _, student = pair_models
    chat = [{"messages": [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5."}]}]
    examples = chat + probe((12, 30, 21))
    for metric in ("cka", "cosine"):
        res = analysis.representation_similarity(student, student, examples, metric=metric,
                                                 tokenizer=build_tokenizer(), batch_size=2, cutoff_len=60)
        for mat in res.values():
            assert mat.shape == (2, 2)
            np.testing.assert_allclose(np.diagonal(mat), 1.0, atol=1e-4)
            assert np.all(mat <= 1.0 + 1e-4)


def test_representation_routes_agree_and_count_real_tokens_only(pair_models):
    """Streaming and Gram routes give the same [L_S, L_T] CKA, and both equal CKA on outputs computed without
    any padding."""
    teacher, student = pair_models
    examples = probe((30, 30, 30))  # batches of 2 rows of 64: left padding, then a padded empty row
    feats = analysis.representation_similarity(teacher, student, examples, batch_size=2, route="features")
    grams = analysis.representation_similarity(teacher, student, examples, batch_size=2, route="tokens")
    ids = jnp.asarray(np.stack(examples))
    xs, ys = analysis._outputs_pair(teacher.params, student.params, ids, jnp.ones_like(ids), teacher.config,
                                    student.config, analysis.DEFAULT_MODULES)
    for m in analysis.DEFAULT_MODULES:
        assert feats[m].shape == (2, 3)
        np.testing.assert_allclose(feats[m], grams[m], atol=2e-5)
        want = [[numpy_cka(np.asarray(xs[m][s]), np.asarray(ys[m][t])) for t in range(3)] for s in range(2)]
        np.testing.assert_allclose(feats[m], want, atol=5e-5)


def test_max_tokens_caps_the_probe(pair_models):
    teacher, student = pair_models
    examples = probe()
    first = sum(len(e) for e in examples[:2])
    capped = analysis.representation_similarity(teacher, student, examples, batch_size=2, max_tokens=first)
    short = analysis.representation_similarity(teacher, student, examples[:2], batch_size=2)
    for m in capped:
        np.testing.assert_allclose(capped[m], short[m], atol=1e-6)


# ------------------------------------------------------------------------------------------------ plots, report

def test_plots_and_report(tmp_path):
    layers = np.arange(6)
    param = {"PiSSA": {m: {"vs_remaining": 0.001 * np.sin(layers), "vs_original": 0.3 + 0.02 * layers}
                       for m in ("up_proj", "down_proj")},
             "Seeking": {m: {"vs_remaining": -0.1 - 0.01 * layers, "vs_original": 0.002 * np.cos(layers)}
                         for m in ("up_proj", "down_proj")}}
    rep = {m: RNG.uniform(0.2, 1.0, size=(6, 8)) for m in analysis.DEFAULT_MODULES}
    files = plots.plot_parametric(param, tmp_path / "param") + plots.plot_heatmaps(rep, tmp_path / "rep")
    files += plots.plot_heatmaps({"o_proj": rep["o_proj"] * 2 - 1}, tmp_path / "cos", "cosine", triangle=False)
    for f in files:
        assert f.is_file() and f.stat().st_size > 1000
    assert {f.suffix for f in files} == {".png", ".pdf"}
    text = analysis.markdown_report(param, {"cka": rep}, {"teacher": "t"})
    summary = analysis.heatmap_summary(rep["up_proj"])
    assert f"{summary['mean']:.3f}" in text and "| Seeking | up_proj | -0.125 |" in text


def test_triangle_summary():
    mat = np.arange(12, dtype=float).reshape(3, 4)  # kept: t >= s
    kept = [0, 1, 2, 3, 5, 6, 7, 10, 11]
    assert analysis.heatmap_summary(mat) == pytest.approx({"mean": np.mean(kept), "std": np.std(kept)})
    assert analysis.heatmap_summary(mat, triangle=False)["mean"] == pytest.approx(5.5)


# ------------------------------------------------------------------------------------------------ command line

def test_analyze_command(tmp_path, capsys, pair_models):
    pytest.importorskip("pktjax.lora")
    from pktjax.cli import main

    teacher, student = tmp_path / "teacher", tmp_path / "student"
    for folder, model in zip((teacher, student), pair_models):
        save_model(model, folder)
        build_tokenizer().save_pretrained(folder)
    data = tmp_path / "probe.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"Add {i} and {i + 1}."},
                          {"role": "assistant", "content": f"{2 * i + 1}"}]} for i in range(3)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    argv = ["analyze", "--teacher", str(teacher), "--student", str(student), "--task", str(data), "--out", str(out),
            "--n-examples", "3", "--rank", "4", "--metric", "both", "--cutoff-len", "64", "--batch-size", "2"]
    assert main(argv) == 0
    names = {p.name for p in out.iterdir()}
    for stem in ("representation_cka", "representation_cosine", "parametric_similarity"):
        assert {f"{stem}.png", f"{stem}.pdf"} <= names
    result = json.loads((out / "analysis.json").read_text())
    assert np.shape(result["representation"]["cka"]["up_proj"]["matrix"]) == (2, 3)
    pissa = result["parametric"]["PiSSA"]["up_proj"]
    assert np.abs(pissa["vs_remaining"]).max() < 1e-4 and min(pissa["vs_original"]) > 0.2
    assert "Seeking" in result["parametric"]
    assert "Representation similarity (cka" in (out / "report.md").read_text()
    assert main(argv) == 2  # refuses to write over a finished run
    assert "another analysis run" in capsys.readouterr().err
