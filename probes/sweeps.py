"""Probe sweeps: every site (layer) x position at once, with a control and bootstrap CIs.

:func:`sweep` answers "where, and when, is this label linearly readable?":

1. **One pass.** Each site is read once from the capture or store; the labelled rows are
   gathered at every requested position (int offsets from the labelled token, or selector
   names for trace labels), keeping only rows whose features exist at *all* positions so
   the whole grid compares the same examples (:func:`thinklens.probes.data.probe_data_at`).
2. **Split by trace** (:func:`~thinklens.probes.data.group_split`) and standardise each
   (position, site) on its training rows.
3. **Fit every (position, site) probe in one batched fit**, together with its *control*.
   Hewitt & Liang 2019 ("Designing and interpreting probes with control tasks") read a
   probe's accuracy against the same probe trained on a control task, labels the
   representation cannot explain; selectivity = accuracy - control accuracy. Their
   control tasks give each word type a fixed random label; here the control is the
   simpler permutation baseline: the training labels shuffled among the training rows
   (``torch.randperm`` seeded with ``seed + 1``; class frequencies kept), fitted with the
   row weights of the *shuffled* labels (so ``class_weight="balanced"`` balances the
   control's classes too) and scored on the true test labels. Its accuracy is what a probe
   gets from the label prior and from memorising training rows (R² for regression).
   For regression the control's test R² is often far below 0 (a probe that memorised
   shuffled targets predicts worse than their mean: -6.98 was seen on 24 traces), and
   ``R² - control R²`` would then exceed 1 and mean nothing. Predicting the training
   mean scores R² ≈ 0 with no representation at all, so regression selectivity is
   ``R² - max(control R², 0)``: at most R², 0 when the probe does no better than the
   better of the mean and the control. ``control["r2"]`` keeps the raw control R².
4. **Bootstrap** (Efron & Tibshirani 1993): resample the *test traces* with replacement
   ``n_boot`` times; each resample is a row weighting, so every metric of every probe and
   resample comes from one weighted, vectorised call
   (:func:`~thinklens.probes.metrics.bootstrap_weights`). Intervals are the 2.5 and 97.5
   percentiles; selectivity's interval pairs probe and control on the same resample.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from thinklens.errors import ConfigError
from thinklens.hooks.reprs import compact_repr

from . import metrics as _metrics
from ._fit import fit_params, probe_output, row_weights, standardize
from .data import ProbeData, group_split, probe_data_at


@dataclass
class SweepResult:
    """Test metrics of a probe per (position, site), with control and 95 % intervals.

    Example::

        res = sweep(cap, "blocks.*.hook_resid_post", labels, positions=[-1, 0, 1])
        res.grid("accuracy").shape     # (position, site) = (3, 4)
        res.ci["accuracy"][1, 3]       # tensor([0.96, 0.99]): offset 0, last layer
        res.selectivity[1]             # accuracy - control accuracy, per site
        print(res.table(position=0))   # site x metric, markdown

    ``metrics``, ``train`` and ``control`` map a metric name to its test value, train value
    and control probe's test value; ``ci`` maps a metric (and ``"selectivity"``,
    ``"control"``) to its 95 % bootstrap interval ``[low, high]`` in the last axis.
    ``selectivity`` is accuracy - control accuracy, or for regression
    R² - max(control R², 0) (module docstring, step 3).
    """

    __repr__ = compact_repr  # shapes, not whole tensors (hooks/reprs.py)

    sites: list[str]
    positions: list[int | str]
    task: str
    classes: list[Any] | None
    metrics: dict[str, Float[Tensor, "position site"]]  # noqa: F722
    train: dict[str, Float[Tensor, "position site"]]  # noqa: F722
    control: dict[str, Float[Tensor, "position site"]]  # noqa: F722
    ci: dict[str, Float[Tensor, "position site 2"]]  # noqa: F722
    selectivity: Float[Tensor, "position site"]  # noqa: F722
    n_train: int
    n_test: int
    n_test_traces: int
    balance: dict[str, dict] | None = None  # classification: {"train"|"test": {class: rows}}

    @property
    def main_metric(self) -> str:
        return "accuracy" if self.task == "classification" else "r2"

    def grid(self, metric: str | None = None) -> Tensor:
        """``[position, site]`` grid of a test metric (or ``"selectivity"``, ``"control"``)."""
        metric = metric or self.main_metric
        if metric == "selectivity":
            return self.selectivity
        if metric == "control":
            return self.control[self.main_metric]
        if metric not in self.metrics:
            raise ConfigError(f"no metric {metric!r}; valid: {', '.join(self.metrics)}, "
                              "selectivity, control")
        return self.metrics[metric]

    def best(self, metric: str | None = None) -> tuple[int | str, str]:
        """``(position, site)`` of the highest test value of ``metric``."""
        g = torch.nan_to_num(self.grid(metric), nan=-1e9)
        k = int(g.argmax())
        return self.positions[k // g.shape[1]], self.sites[k % g.shape[1]]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (tensors as nested lists); :meth:`from_dict` restores it."""
        lists = {name: {k: v.tolist() for k, v in getattr(self, name).items()}
                 for name in ("metrics", "train", "control", "ci")}
        return {"sites": self.sites, "positions": self.positions, "task": self.task,
                "classes": self.classes, **lists, "selectivity": self.selectivity.tolist(),
                "n_train": self.n_train, "n_test": self.n_test,
                "n_test_traces": self.n_test_traces,
                "balance": None if self.balance is None else
                {k: [[c, n] for c, n in v.items()] for k, v in self.balance.items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SweepResult:
        t = {name: {k: torch.tensor(v) for k, v in d[name].items()}
             for name in ("metrics", "train", "control", "ci")}
        return cls(d["sites"], d["positions"], d["task"], d["classes"], t["metrics"],
                   t["train"], t["control"], t["ci"], torch.tensor(d["selectivity"]),
                   d["n_train"], d["n_test"], d["n_test_traces"],
                   None if d.get("balance") is None else
                   {k: {c: n for c, n in v} for k, v in d["balance"].items()})

    def table(self, position: int = 0) -> str:
        """Markdown table, site x metric, at the ``position``-th position of the sweep."""
        names = [*self.metrics, "control", "selectivity"]
        head = "| site | " + " | ".join(names) + " |"
        rows = [head, "|---|" + "---:|" * len(names)]
        for s, site in enumerate(self.sites):
            cells = []
            for name in names:
                v = float(self.grid(name)[position, s])
                ci = self.ci.get(name)
                cells.append(f"{v:.3f}" + (f" [{float(ci[position, s, 0]):.3f}, "
                                           f"{float(ci[position, s, 1]):.3f}]" if ci is not None
                                           else ""))
            rows.append(f"| {site} | " + " | ".join(cells) + " |")
        return "\n".join(rows)


def _boot_scores(task, y, out, n_classes, w, chunk_elems=1 << 24) -> dict[str, Tensor]:
    """Metrics of ``out [P, R, n, ...]`` under each resample ``w [B, n]`` -> ``[P, R, B]``.

    Every metric for the probe (``R`` index 0); the main metric only for the control.
    """
    per_row = out[0, 0].numel() * w.shape[0]                         # n * C * B
    step = max(1, chunk_elems // per_row)
    parts = [_metrics.score(task, y, out[i: i + step, :1].unsqueeze(2), n_classes, w)
             for i in range(0, out.shape[0], step)]
    boot = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    if out.shape[1] > 1:
        main = "accuracy" if task == "classification" else "r2"
        pred = out[:, 1:].argmax(-1) if task == "classification" else out[:, 1:]
        fn = _metrics.accuracy if task == "classification" else _metrics.r2
        boot[main] = torch.cat([boot[main], fn(y, pred.unsqueeze(2), w)], 1)
    return boot


def sweep(acts, sites: str | Sequence[str] = "blocks.*.hook_resid_post", labels: Any = None,
          *, level: str = "token", positions: Sequence[int | str] = (0,),
          kind: str = "logistic", l2: float = 1.0, class_weight: Any = None,
          control: bool = True, n_boot: int = 200, test_frac: float = 0.25, seed: int = 0,
          max_iter: int = 200, tol: float = 1e-4, hidden: int = 64,
          device: str | torch.device | None = None, task: str | None = None) -> SweepResult:
    """Probe every site at every position (see the module docstring).

    ``acts`` is a Capture or Store (with ``labels`` and ``level`` as for
    :func:`~thinklens.probes.data.probe_data`), or ready :class:`ProbeData` (one, or one
    per position, over the same rows). ``device="cuda"`` fits there.

    Example::

        res = sweep(cap, labels=computed_value, positions=[-5, -1, 0])
        res.grid().shape, res.best()      # (3, 4), (0, 'blocks.1.hook_resid_post')
    """
    if isinstance(acts, ProbeData):
        acts = [acts]
    if isinstance(acts, list | tuple) and acts and all(isinstance(a, ProbeData) for a in acts):
        datas, pos_names = list(acts), list(range(len(acts)))
        if any(not (torch.equal(d.y, datas[0].y) and torch.equal(d.groups, datas[0].groups))
               for d in datas):
            raise ConfigError("the ProbeData given as positions must hold the same rows "
                              "(equal y and groups); build them with probes.probe_data_at")
    else:
        datas = probe_data_at(acts, sites, labels, level=level, positions=positions,
                              task=task)
        pos_names = list(positions)
    d0 = datas[0]
    train, test = group_split(d0, test_frac, seed)
    n_pos, n_site = len(datas), len(d0.sites)
    Xtr, Xte, _, _ = standardize([x for d in datas for x in d.X], train, test,
                                 device=device)                       # [P*S, n, d] each
    dev, dtype = Xtr.device, Xtr.dtype
    y_tr, y_te = d0.y[train].to(dev), d0.y[test].to(dev)
    Y = [y_tr]
    if control:
        gen = torch.Generator().manual_seed(seed + 1)
        Y.append(y_tr[torch.randperm(len(y_tr), generator=gen).to(dev)])
    # each label set's row weights from its own labels: under class_weight="balanced" a
    # shuffled row weighs what its *shuffled* class weighs
    weight = torch.stack([row_weights(d0, labels.cpu(), class_weight) for labels in Y])
    params = fit_params(kind, Xtr, torch.stack(Y), d0.task, d0.n_classes,
                        weight.to(dev, dtype), l2=l2, max_iter=max_iter, tol=tol,
                        hidden=hidden, seed=seed)
    out_te = probe_output(params.output(Xte), d0.task)                  # [P*S, R, n_test, ...]
    out_tr = probe_output(params.output(Xtr), d0.task)[:, 0]
    point = _metrics.score(d0.task, y_te, out_te, d0.n_classes)         # [P*S, R]
    train_scores = _metrics.score(d0.task, y_tr, out_tr, d0.n_classes)
    w = _metrics.bootstrap_weights(d0.groups[test], n_boot, seed).to(dev)
    boot = _boot_scores(d0.task, y_te, out_te, d0.n_classes, w)        # [P*S, R, B]
    main = "accuracy" if d0.task == "classification" else "r2"

    def grid(t: Tensor) -> Tensor:
        return t.reshape(n_pos, n_site, *t.shape[1:]).cpu()

    ci = {k: grid(_metrics.percentile_ci(v[:, 0])) for k, v in boot.items()}
    if control:
        base, boot_base = point[main][:, 1], boot[main][:, 1]
        if d0.task == "regression":  # see the module docstring, step 3: baseline R² >= 0
            base, boot_base = base.clamp(min=0), boot_base.clamp(min=0)
        selectivity = point[main][:, 0] - base
        ci["selectivity"] = grid(_metrics.percentile_ci(boot[main][:, 0] - boot_base))
        ci["control"] = grid(_metrics.percentile_ci(boot[main][:, 1]))
        ctrl = {k: grid(v[:, 1]) for k, v in point.items()}
    else:
        selectivity = torch.full_like(point[main][:, 0], float("nan"))
        ctrl = {k: grid(torch.full_like(v[:, 0], float("nan"))) for k, v in point.items()}
    return SweepResult(list(d0.sites), pos_names, d0.task, d0.classes,
                       {k: grid(v[:, 0]) for k, v in point.items()},
                       {k: grid(v) for k, v in train_scores.items()}, ctrl, ci, grid(selectivity),
                       len(train), len(test), int(torch.unique(d0.groups[test]).numel()),
                       _balance(d0, train, test))


def _balance(data: ProbeData, train: Tensor, test: Tensor) -> dict[str, dict] | None:
    """Rows per class on each side of the split (None for regression)."""
    if data.task != "classification":
        return None
    return {side: {c: int((data.y[idx] == k).sum()) for k, c in enumerate(data.classes)}
            for side, idx in (("train", train), ("test", test))}


__all__ = ["SweepResult", "sweep"]
