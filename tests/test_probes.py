"""Probes: agreement with scikit-learn, splits by trace, bootstrap CIs, and the organism's
ground truth (the value a compute step writes is linearly readable where it is computed)."""

from __future__ import annotations

import warnings

import pytest
import torch
from _typecheck import unchecked
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import accuracy_score, balanced_accuracy_score, r2_score, roc_auc_score
from sklearn.preprocessing import StandardScaler

from thinklens.errors import ConfigError
from thinklens.probes import metrics as M
from thinklens.probes.data import (
    ProbeData,
    class_balance,
    group_split,
    probe_data,
    probe_data_at,
    split_traces,
)
from thinklens.probes.linear import fit_probe
from thinklens.probes.sweeps import sweep
from thinklens.zoo.evaluate import heldout_problems
from thinklens.zoo.organism import token_truth

SITES = "blocks.*.hook_resid_post"


def gaussian_mixture(n_traces=150, per_trace=6, d=16, n_classes=4, n_sites=3, seed=0,
                     dtype=torch.float64) -> ProbeData:
    """Class means grow with the site index: site 0 is nearly noise, the last is separable."""
    g = torch.Generator().manual_seed(seed)
    n = n_traces * per_trace
    y = torch.randint(n_classes, (n,), generator=g)
    mu = torch.randn(n_classes, d, generator=g)
    X = torch.stack([mu[y] * 0.4 * s + torch.randn(n, d, generator=g) + 3.0
                     for s in range(n_sites)]).to(dtype)
    return ProbeData(X, y, torch.arange(n) // per_trace, torch.zeros(n, dtype=torch.long),
                     [f"site{s}" for s in range(n_sites)])


def sklearn_probe(X, y, train, test, C, **kw):
    """The reference: StandardScaler fitted on train, then LogisticRegression."""
    sc = StandardScaler().fit(X[train].numpy())
    m = LogisticRegression(C=C, **kw).fit(sc.transform(X[train].numpy()), y[train].numpy())
    return m, sc


# ---- scikit-learn agreement --------------------------------------------------------------

@pytest.mark.parametrize("n_classes,class_weight", [(4, None), (4, "balanced"), (2, None)])
def test_logistic_matches_sklearn_on_gaussian_mixture(n_classes, class_weight):
    data = gaussian_mixture(n_classes=n_classes)
    train, test = group_split(data)
    res = fit_probe(data, (train, test), l2=0.5, class_weight=class_weight, tol=1e-9,
                    max_iter=2000)
    proba = res.predict_proba(data.X)
    for s in range(3):
        m, sc = sklearn_probe(data.X[s], data.y, train, test, C=2.0, tol=1e-10, max_iter=5000,
                              class_weight=class_weight)
        ref = torch.from_numpy(m.predict_proba(sc.transform(data.X[s].numpy())))
        torch.testing.assert_close(proba[s], ref, atol=1e-4, rtol=0)
        acc = accuracy_score(data.y[test].numpy(), m.predict(sc.transform(data.X[s, test].numpy())))
        assert abs(float(res.test["accuracy"][s]) - acc) <= 0.01
    assert res.W.shape == (3, 16, 1 if n_classes == 2 else n_classes)  # binary: one logit
    assert float(res.test["accuracy"][2]) > 0.9 > float(res.test["accuracy"][0])


def test_ridge_matches_sklearn():
    data = gaussian_mixture()
    y = data.X[2, :, :3].sum(1) + torch.randn(len(data), dtype=torch.float64)
    reg = ProbeData(data.X, y, data.groups, data.positions, data.sites, task="regression")
    train, test = group_split(reg)
    res = fit_probe(reg, (train, test), kind="ridge", l2=3.0)
    for s in range(3):
        sc = StandardScaler().fit(reg.X[s, train].numpy())
        m = Ridge(alpha=3.0).fit(sc.transform(reg.X[s, train].numpy()), y[train].numpy())
        torch.testing.assert_close(res.W[s, :, 0], torch.from_numpy(m.coef_), atol=1e-5, rtol=0)
        pred = m.predict(sc.transform(reg.X[s, test].numpy()))
        assert abs(float(res.test["r2"][s]) - r2_score(y[test].numpy(), pred)) < 1e-6


def test_ridge_sweep_reads_a_linear_target_and_its_control_does_not():
    data = gaussian_mixture(dtype=torch.float32)
    y = data.X[2, :, :3].sum(1) + torch.randn(len(data), generator=torch.Generator().manual_seed(2))
    reg = ProbeData(data.X, y, data.groups, data.positions, data.sites, task="regression")
    res = sweep(reg, kind="ridge", n_boot=100)
    assert float(res.grid("r2")[0, 2]) > 0.7 and float(res.grid("control").max()) < 0.05
    assert res.best() == (0, "site2")


def test_metrics_match_sklearn():
    g = torch.Generator().manual_seed(1)
    n = 300
    y = torch.randint(3, (n,), generator=g)
    proba = torch.softmax(torch.randn(n, 3, generator=g) + 2 * torch.nn.functional.one_hot(y), 1)
    proba = (proba * 20).round() / 20  # ties, which AUROC must count half
    proba = (proba / proba.sum(1, keepdim=True)).double()
    pred, w = proba.argmax(1), torch.rand(n, generator=g).double()
    yn, pn, prn, wn = y.numpy(), pred.numpy(), proba.numpy(), w.numpy()
    cases = [
        (M.accuracy(y, pred), accuracy_score(yn, pn)),
        (M.accuracy(y, pred, w), accuracy_score(yn, pn, sample_weight=wn)),
        (M.balanced_accuracy(y, pred, 3), balanced_accuracy_score(yn, pn)),
        (M.balanced_accuracy(y, pred, 3, w), balanced_accuracy_score(yn, pn, sample_weight=wn)),
        (M.auroc(y, proba), roc_auc_score(yn, prn, multi_class="ovr")),
        (M.auroc(y, proba, w), roc_auc_score(yn, prn, multi_class="ovr", sample_weight=wn)),
        (M.auroc((y == 1).long(), proba[:, 1]), roc_auc_score(yn == 1, prn[:, 1])),
        (M.auroc((y == 1).long(), proba[:, 1], w),
         roc_auc_score(yn == 1, prn[:, 1], sample_weight=wn)),
        (M.r2(proba[:, 0], proba[:, 1]), r2_score(prn[:, 0], prn[:, 1])),
        (M.r2(proba[:, 0], proba[:, 1], w), r2_score(prn[:, 0], prn[:, 1], sample_weight=wn)),
    ]
    for ours, ref in cases:
        assert abs(float(ours) - ref) < 1e-9
    # batched: leading axes broadcast, one value per row of predictions
    assert M.accuracy(y, torch.stack([pred, y])).tolist() == [accuracy_score(yn, pn), 1.0]


def test_ece_hand_computed():
    # top-label confidences and whether the argmax is right; bins (k/10, (k+1)/10]
    conf = torch.tensor([0.95, 0.91, 0.99, 0.85, 0.62, 0.55], dtype=torch.float64)
    right = torch.tensor([1, 1, 0, 0, 1, 1])
    y = torch.zeros(6, dtype=torch.long)
    rest = (1 - conf) / 2
    proba = torch.stack([conf, rest, rest], 1)
    proba[right == 0] = proba[right == 0][:, [1, 0, 2]]  # argmax class 1: wrong
    # bin 9: {0.95 ok, 0.91 ok, 0.99 wrong}: |2/3 - 0.95|; bins 8, 6, 5 hold one row each
    hand = (3 * abs(2 / 3 - 0.95) + abs(0 - 0.85) + abs(1 - 0.62) + abs(1 - 0.55)) / 6
    assert abs(float(M.ece(y, proba)) - hand) < 1e-12


# ---- data sets and splits ----------------------------------------------------------------

def test_group_split_keeps_traces_whole():
    data = gaussian_mixture()
    for seed in range(5):
        train, test = group_split(data, test_frac=0.3, seed=seed)
        assert not set(data.groups[train].tolist()) & set(data.groups[test].tolist())
        assert len(train) + len(test) == len(data)
        assert abs(len(torch.unique(data.groups[test])) / 150 - 0.3) < 0.01
    rare = data.subset(torch.arange(len(data)))
    rare.y[rare.groups == 0] = 4  # class 4 lives in one trace only
    rare.classes = [0, 1, 2, 3, 4]
    test_only = next(s for s in range(50)
                     if 0 in rare.groups[group_split(data, seed=s)[1]].tolist())
    with pytest.raises(ConfigError, match=r"classes \[4\] have no training row"):
        group_split(rare, seed=test_only)
    assert class_balance(rare)[4] == 6


def test_split_traces_rule_for_rows_and_for_trace_counts():
    # the documented rule, written out: permute the sorted trace ids, the first
    # min(max(1, round(f * G)), G - 1) are test
    groups = torch.tensor([5, 5, 2, 9, 9, 9, 2, 7, 11, 11, 3, 3])
    uniq = [2, 3, 5, 7, 9, 11]
    for seed in range(6):
        for frac in (0.1, 0.25, 0.5, 0.99):
            perm = torch.randperm(6, generator=torch.Generator().manual_seed(seed)).tolist()
            n_test = min(max(1, round(frac * 6)), 5)
            want = {uniq[k] for k in perm[:n_test]}
            train, test = split_traces(groups, frac, seed)
            assert test.tolist() == [i for i, g in enumerate(groups.tolist()) if g in want]
            assert train.tolist() == [i for i, g in enumerate(groups.tolist()) if g not in want]
            # an int n splits trace indices exactly as n rows with groups arange(n)
            a, b = split_traces(6, frac, seed), split_traces(torch.arange(6), frac, seed)
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    data = gaussian_mixture()
    tr, te = group_split(data, 0.25, 3)
    assert torch.equal(tr, split_traces(data.groups, 0.25, 3)[0])
    with pytest.raises(ConfigError, match="test_frac=1.5"):
        split_traces(10, 1.5)
    with pytest.raises(ConfigError, match="at least 2"):
        split_traces(torch.zeros(4, dtype=torch.long))


def test_probe_data_errors():
    with unchecked(), pytest.raises(ConfigError, match="X has 3 rows"):
        ProbeData(torch.zeros(1, 3, 2), torch.zeros(4, dtype=torch.long),
                  torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long), ["a"])
    data = gaussian_mixture()
    with pytest.raises(ConfigError, match="kind='ridge' fits regression"):
        fit_probe(data, kind="ridge")
    with pytest.raises(ConfigError, match="class_weight='even'; valid"):
        fit_probe(data, class_weight="even")


# ---- the organism ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def organism_run(organism):
    """300 held-out problems (depths 1-4), thought through and captured at the thinking."""
    problems = [p for depth in (1, 2, 3, 4) for p in heldout_problems(depth, 75)]
    traces = organism.think_batch([p.prompt for p in problems], max_new_tokens=60,
                                  batch_size=128, progress=False)  # depth 4 needs 51
    cap = organism.capture(traces, sites=SITES, positions="thinking", progress=False)
    return cap, [token_truth(t) for t in traces]


def computed_value(truth):
    """Label of the second ``=`` of a compute step (``v = x op k =``): the value ``v`` gets.

    That ``=`` is where the model must produce the result (its next token), so the value
    should be readable there; at the result token itself it would be read off the token.
    """
    def label(ti, trace, i):
        t, prev = truth[ti][i], truth[ti][i - 1]
        ok = t is not None and t.phase == "compute" and t.role == "eq"
        return t.value if ok and prev is not None and prev.role == "const" else None
    return label


def test_probe_data_rows_are_the_captured_tokens(organism_run):
    cap, truth = organism_run
    data = probe_data(cap, SITES, computed_value(truth))
    assert data.X.shape[:2] == (4, len(data)) and data.classes == list(range(10))
    acts = cap["blocks.2.hook_resid_post"]
    for i in (0, len(data) // 2, len(data) - 1):
        tr, pos = int(data.groups[i]), int(data.positions[i])
        slot = (acts.positions[tr] == pos).nonzero().item()
        torch.testing.assert_close(data.X[2, i], acts.values[tr, slot], atol=0, rtol=0)
        assert cap.traces[tr].tokens[pos] == "=" and cap.traces[tr].tokens[pos + 1].isdigit()
    shifted = probe_data(cap, "blocks.0.hook_resid_post", computed_value(truth), offset=1)
    assert set(cap.traces[int(t)].tokens[int(p)] for t, p in
               zip(shifted.groups, shifted.positions)) <= set("0123456789")
    sentence = [[s.tag for s in t.sentences] for t in cap.traces]   # one label per sentence
    by_sentence = probe_data(cap, SITES, sentence, level="sentence")
    assert by_sentence.classes == ["computation", "lookup"]
    with pytest.raises(ConfigError, match="give a list of"):
        probe_data(cap, SITES, [s[:-1] for s in sentence], level="sentence")
    with pytest.raises(ConfigError, match="level='trace'"):
        probe_data(cap, SITES, lambda tr, i: 0, level="trace")


def test_probe_data_reads_a_store_like_a_capture(organism, organism_run, tmp_path):
    cap, _ = organism_run
    traces = cap.traces[150:170]  # depths 3 and 4: several compute steps each
    got = []
    for store in (None, tmp_path / "acts"):
        acts = organism.capture(traces, sites=SITES, positions="thinking", store=store,
                                progress=False)
        got.append(probe_data(acts, SITES, computed_value([token_truth(t) for t in traces])))
    assert len(got[0]) >= 20
    # a store keeps input order, memory batches by length: SDPA's masks differ, floats only
    torch.testing.assert_close(got[0].X, got[1].X, atol=1e-5, rtol=1e-5)
    for field in ("y", "groups", "positions"):
        assert torch.equal(getattr(got[0], field), getattr(got[1], field)), field


def test_organism_computed_value_is_linearly_decodable(organism_run):
    cap, truth = organism_run
    res = sweep(cap, SITES, computed_value(truth), positions=[0], n_boot=200)
    acc, ctrl = res.grid("accuracy")[0], res.grid("control")[0]
    print("\nvalue at the compute step's '=' (10 classes): accuracy by layer",
          [round(a, 3) for a in acc.tolist()], "control", [round(c, 3) for c in ctrl.tolist()],
          f"n_train={res.n_train} n_test={res.n_test}")
    best = int(acc.argmax())
    assert float(acc[best]) >= 0.95
    assert float(ctrl.max()) <= 0.30
    assert float(res.selectivity[0, best]) >= 0.6
    lo, hi = res.ci["accuracy"][0, best]
    assert lo <= acc[best] <= hi


def test_logistic_matches_sklearn_on_organism(organism_run):
    cap, truth = organism_run

    def value(ti, trace, i):  # every compute-phase token: the value of its step's variable
        t = truth[ti][i]
        return t.value if t is not None and t.phase == "compute" else None

    data = probe_data(cap, SITES, value)
    train, test = group_split(data, seed=1)
    res = fit_probe(data, (train, test), l2=1.0, tol=1e-4, max_iter=500)
    for s in range(4):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m, sc = sklearn_probe(data.X[s].double(), data.y, train, test, C=1.0, tol=1e-4,
                                  max_iter=500)
        acc = accuracy_score(data.y[test].numpy(),
                             m.predict(sc.transform(data.X[s, test].double().numpy())))
        assert abs(float(res.test["accuracy"][s]) - acc) <= 0.01, (s, acc)


def test_sweep_grid_over_positions_and_selectors(organism, organism_run):
    cap, truth = organism_run
    res = sweep(cap, SITES, computed_value(truth), positions=[-1, 0, 1], n_boot=50)
    assert res.grid().shape == (3, 4) and res.ci["accuracy"].shape == (3, 4, 2)
    assert res.best()[0] in (0, 1) and float(res.grid()[2].min()) > 0.9  # the result token
    traces = cap.traces[::5]  # per-trace label (depth), read at the end of prompt / thinking
    small = organism.capture(traces, sites=SITES, positions="all", progress=False)
    depth = [len(t.sentences) // 2 + 1 for t in traces]
    datas = probe_data_at(small, SITES, depth, level="trace", positions=["prompt", "thinking"])
    assert [d.X.shape[:2] for d in datas] == [(4, len(traces))] * 2
    assert all(int(p) == t.prompt_span.end - 1 for t, p in zip(traces, datas[0].positions))
    assert all(int(p) == t.think_span.end - 1 for t, p in zip(traces, datas[1].positions))
    res = sweep(datas, n_boot=20)
    assert res.grid().shape == (2, 4)


# ---- bootstrap ---------------------------------------------------------------------------

def test_bootstrap_ci_contains_estimate_and_narrows():
    widths = []
    for n_traces in (40, 400):
        data = gaussian_mixture(n_traces=n_traces, per_trace=5, n_sites=2, dtype=torch.float32)
        res = sweep(data, n_boot=200, test_frac=0.5)
        lo, hi = res.ci["accuracy"][0].unbind(-1)
        acc = res.grid()[0]
        assert bool(((lo <= acc) & (acc <= hi)).all())
        assert bool((res.ci["selectivity"][0, :, 0] <= res.selectivity[0]).all())
        widths.append(hi - lo)
    assert bool((widths[1] < 0.6 * widths[0]).all()), widths


def test_mlp_probe_reads_what_a_linear_one_cannot():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(1, 1200, 2, generator=g)
    y = ((X[0, :, 0] > 0) ^ (X[0, :, 1] > 0)).long()  # XOR: no linear boundary
    data = ProbeData(X, y, torch.arange(1200) // 4, torch.zeros(1200, dtype=torch.long), ["x"])
    split = group_split(data)
    linear = fit_probe(data, split)
    mlp = fit_probe(data, split, kind="mlp", hidden=16, l2=1e-3, max_iter=400)
    assert float(linear.test["accuracy"][0]) < 0.65 < 0.9 < float(mlp.test["accuracy"][0])
    assert mlp.predict(X).shape == (1, 1200)
