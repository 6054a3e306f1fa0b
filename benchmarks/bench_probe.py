"""(d) Probe sweep over every layer: thinklens's batched probes vs a per-layer scikit-learn loop.

1. Data. ``organism``: ``--traces`` held-out problems (depths 1-4), thought through by
   the bundled organism, ``hook_resid_post`` of every layer captured at every thinking
   token; label = the value of the variable each thinking token's step is about
   (``TokenTruth.value``, 10 classes). ``synthetic``: ``--layers`` x ``--rows`` x
   ``--d-model`` Gaussian features of ``--traces-synthetic`` traces, 10 classes whose
   means grow with the layer (early layers near chance, late ones well separated).
2. Split by trace (25 % test, one split for both methods).
3. Compared, interleaved in rounds (``common.interleaved``), equal outputs:

   * ``probe``: thinklens ``fit_probe`` (every layer in one batched L-BFGS) vs, for each
     layer, ``StandardScaler`` + ``LogisticRegression(C=1/l2)`` + ``predict_proba`` and
     accuracy, balanced accuracy, one-vs-rest AUROC and ECE on train and test rows.
     Same ``tol`` and ``max_iter`` on both sides; both accuracies are reported.
   * ``sweep``: thinklens ``sweep`` (probe + shuffled-label control + 200 bootstrap
     resamples of test traces, CIs of four metrics and of selectivity) vs the per-layer
     loop fitting probe and control and bootstrapping the test *accuracy* only (less
     work than thinklens does: the ratio is conservative).

The ratio is the median over rounds of sklearn time / thinklens time in the same round,
on CPU time (this process, all threads) and wall time.
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch
from common import command_line, interleaved, machine_info, save, setup_threads, summary, table

from thinklens.probes.data import ProbeData, group_split, probe_data
from thinklens.probes.linear import fit_probe
from thinklens.probes.sweeps import sweep


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--case", choices=["organism", "synthetic", "both"], default="both")
    p.add_argument("--traces", type=int, default=500, help="organism traces")
    p.add_argument("--layers", type=int, default=24, help="synthetic layers")
    p.add_argument("--rows", type=int, default=20000, help="synthetic rows")
    p.add_argument("--d-model", type=int, default=512, help="synthetic width")
    p.add_argument("--traces-synthetic", type=int, default=500, help="synthetic traces")
    p.add_argument("--l2", type=float, default=1.0, help="L2 strength; sklearn C = 1 / l2")
    p.add_argument("--tol", type=float, default=1e-4, help="both sides (sklearn's default)")
    p.add_argument("--max-iter", type=int, default=100, help="both sides (sklearn's default)")
    p.add_argument("--n-boot", type=int, default=200)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-sweep", action="store_true", help="time the probe comparison only")
    p.add_argument("--device", default="cpu", help="thinklens's device (sklearn: always CPU)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="JSON path (default results/probe-DEVICE.json)")
    return p.parse_args(argv)


def organism_data(n_traces: int) -> ProbeData:
    import thinklens
    from thinklens.zoo.evaluate import heldout_problems
    from thinklens.zoo.organism import token_truth

    model = thinklens.load("organism", device="cpu")
    problems = [p for d in (1, 2, 3, 4) for p in heldout_problems(d, n_traces // 4)]
    traces = model.think_batch([p.prompt for p in problems], max_new_tokens=60, batch_size=128,
                               progress=False)
    cap = model.capture(traces, sites="blocks.*.hook_resid_post", positions="thinking",
                        progress=False)
    truth = [token_truth(t) for t in traces]

    def value(ti, trace, i):
        t = truth[ti][i]
        return t.value if t is not None and t.var else None

    return probe_data(cap, "blocks.*.hook_resid_post", value)


def synthetic_data(layers: int, rows: int, d: int, traces: int, seed: int = 0) -> ProbeData:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(10, (rows,), generator=g)
    mu = torch.randn(10, d, generator=g) / d ** 0.5
    X = torch.empty(layers, rows, d)
    for k in range(layers):
        X[k] = mu[y] * (6.0 * k / max(1, layers - 1)) + torch.randn(rows, d, generator=g)
    groups = torch.arange(rows) * traces // rows
    return ProbeData(X, y, groups, torch.zeros(rows, dtype=torch.long),
                     [f"blocks.{k}.hook_resid_post" for k in range(layers)])


def _ece(y, proba, bins=10):
    conf, pred = proba.max(1), proba.argmax(1)
    k = np.clip(np.ceil(conf * bins).astype(int) - 1, 0, bins - 1)
    gap = np.bincount(k, weights=(pred == y) - conf, minlength=bins)
    return np.abs(gap).sum() / len(y)


def sklearn_probe(data, train, test, args, control=False, n_boot=0):
    """The per-layer loop; returns test accuracy per layer."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score
    from sklearn.preprocessing import StandardScaler

    y = data.y.numpy()
    ytr = y[train]
    rng = np.random.default_rng(0)
    groups = data.groups[test].numpy()
    uniq = np.unique(groups)
    rows_of = {t: np.flatnonzero(groups == t) for t in uniq}
    accs = []
    for k in range(data.X.shape[0]):
        X = data.X[k].numpy()
        sc = StandardScaler().fit(X[train])
        Xtr, Xte = sc.transform(X[train]), sc.transform(X[test])
        label_sets = [ytr, rng.permutation(ytr)] if control else [ytr]
        for j, labels in enumerate(label_sets):
            m = LogisticRegression(C=1 / args.l2, tol=args.tol, max_iter=args.max_iter)
            m.fit(Xtr, labels)
            for Xs, ys in ((Xtr, ytr), (Xte, y[test])):
                proba = m.predict_proba(Xs)
                pred = m.classes_[proba.argmax(1)]
                acc = accuracy_score(ys, pred)
                if n_boot == 0:
                    balanced_accuracy_score(ys, pred)
                    roc_auc_score(ys, proba, multi_class="ovr", labels=m.classes_)
                    _ece(ys, proba)
            if j == 0:
                accs.append(acc)
            for _ in range(n_boot):  # bootstrap the test accuracy over whole traces
                pick = rng.choice(uniq, len(uniq))
                rows = np.concatenate([rows_of[t] for t in pick])
                accuracy_score(y[test][rows], pred[rows])
    return accs


def run_case(name, data, args, warmup: int) -> dict:
    train, test = group_split(data, seed=0)
    dev_data = ProbeData(data.X.to(args.device), data.y, data.groups, data.positions,
                         data.sites, data.classes, data.task) if args.device != "cpu" else data
    print(f"\n## {name}: X {tuple(data.X.shape)} ({data.X.numel() * 4 / 1e9:.2f} GB), "
          f"{data.n_classes} classes, {len(train)} train / {len(test)} test rows", flush=True)
    fns = {
        "sklearn probe loop": lambda: sklearn_probe(data, train, test, args),
        "thinklens fit_probe": lambda: fit_probe(dev_data, (train, test), l2=args.l2,
                                                 tol=args.tol, max_iter=args.max_iter),
    }
    if not args.skip_sweep:
        fns["sklearn sweep loop"] = lambda: sklearn_probe(data, train, test, args, control=True,
                                                          n_boot=args.n_boot)
        fns["thinklens sweep"] = lambda: sweep(dev_data, l2=args.l2, tol=args.tol,
                                               max_iter=args.max_iter, n_boot=args.n_boot,
                                               seed=0)
    times, last = interleaved(fns, repeats=args.repeats, warmup=warmup, device=args.device,
                              keep=list(fns))
    acc_sk = np.array(last["sklearn probe loop"])
    acc_tl = last["thinklens fit_probe"].test["accuracy"].numpy()
    out = {"shape": list(data.X.shape), "n_train": len(train), "n_test": len(test),
           "accuracy_sklearn": acc_sk.tolist(), "accuracy_thinklens": acc_tl.tolist(),
           "max_abs_accuracy_difference": float(np.abs(acc_sk - acc_tl).max()),
           "lbfgs_iterations_thinklens": last["thinklens fit_probe"].n_iter}
    pairs = [("probe", "sklearn probe loop", "thinklens fit_probe")]
    if not args.skip_sweep:
        pairs.append(("sweep", "sklearn sweep loop", "thinklens sweep"))
        out["sweep_accuracy_thinklens"] = last["thinklens sweep"].grid()[0].tolist()
        out["sweep_control_thinklens"] = last["thinklens sweep"].grid("control")[0].tolist()
    rows = []
    for what, sk, tl in pairs:
        s = summary(times, base=tl)
        out[what] = {"sklearn": s[sk], "thinklens": s[tl]}
        rows.append([f"{name}: {what}", f"{s[sk]['wall']['median_s']:.2f}",
                     f"{s[tl]['wall']['median_s']:.2f}", f"{s[sk]['cpu']['ratio']:.2f}x",
                     f"{s[sk]['wall']['ratio']:.2f}x"])
    out["table_rows"] = rows
    print(f"accuracy by layer, sklearn:   {np.round(acc_sk, 3).tolist()}")
    print(f"accuracy by layer, thinklens: {np.round(acc_tl, 3).tolist()}")
    return out


def main(argv=None) -> None:
    args = parse_args(argv)
    setup_threads(args.threads)
    warnings.filterwarnings("ignore")  # sklearn's ConvergenceWarning at max_iter, both sides
    results, rows = {}, []
    t0 = time.perf_counter()
    if args.case in ("organism", "both"):
        results["organism"] = run_case("organism", organism_data(args.traces), args, warmup=1)
        rows += results["organism"]["table_rows"]
    if args.case in ("synthetic", "both"):
        data = synthetic_data(args.layers, args.rows, args.d_model, args.traces_synthetic)
        # no warm-up round: each call runs for seconds, and imports are warm by now
        results["synthetic"] = run_case("synthetic", data, args, warmup=int(args.case != "both"))
        rows += results["synthetic"]["table_rows"]
    print(table(rows, ["case: comparison", "sklearn median s (wall)", "thinklens median s (wall)",
                       "sklearn / thinklens (CPU time)", "sklearn / thinklens (wall)"]))
    path = save(f"probe-{args.device.split(':')[0]}", {
        "benchmark": "probe", "command": command_line(), "machine": machine_info(args.device),
        "config": vars(args), "results": results,
        "total_s": time.perf_counter() - t0}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
