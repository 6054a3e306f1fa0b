"""Probe data sets: features of chosen sites at labelled tokens, rows aligned across sites.

A probe (Alain & Bengio 2016, "Understanding intermediate layers using linear classifier
probes") reads a label off the activations at one site and token. :func:`probe_data`
turns a :class:`~thinklens.Capture` or :class:`~thinklens.Store` plus labels into rows:

1. **Labelled tokens.** Labels come at one of three levels:

   * ``level="trace"``: one label per trace (``None`` skips the trace); the row is the
     trace's *last captured* token (with ``positions="thinking"``: the end of the
     thinking), so a trace gives one row, not one per token.
   * ``level="sentence"``: a list per trace, one label per sentence; the row is the
     sentence's last token, when it was captured.
   * ``level="token"``: a callable ``(trace, token_index)`` or
     ``(trace_index, trace, token_index)`` returning a label or ``None`` (skip), called on
     captured tokens only; or a list per trace with one label per token.

2. **Position of the features.** ``offset=k`` reads the features ``k`` tokens after the
   labelled token (``-1``: the token before it). For trace labels a position selector
   name (``"prompt"``, ``"thinking"``, ``"answer"``, …) reads the last token it picks.
   Rows whose feature token was not captured are dropped.
3. **Labels to targets.** Integers, strings and bools are classes (``y`` indexes the
   sorted ``classes``); any float makes them regression targets. ``task=`` overrides.
4. **Features.** Each site is read once; the rows of every site are gathered at the same
   (trace, token) pairs, so ``X[s, i]`` and ``X[t, i]`` are the same token.

Rows of one trace are not independent: :func:`split_traces` (and :func:`group_split` on a
:class:`ProbeData`) splits by trace, never by row.
"""

from __future__ import annotations

import inspect
import numbers
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int, Shaped
from torch import Tensor

from thinklens.errors import ConfigError
from thinklens.hooks.positions import POSITION_SELECTORS
from thinklens.hooks.positions import positions as select_positions
from thinklens.hooks.reprs import compact_repr

LEVELS = ("trace", "sentence", "token")     # what a label is attached to
TASKS = ("classification", "regression")


@dataclass
class ProbeData:
    """Rows for a probe: ``X[site, row]`` is the feature vector, ``y[row]`` its target
    (an int64 index into ``classes``, or a float32 regression target), ``groups[row]`` the
    trace it came from and ``positions[row]`` the token its features were read at.

    Example::

        data = probe_data(cap, "blocks.*.hook_resid_post", labels, level="token")
        data.X.shape, data.y.shape   # (4, 3120, 128), (3120,)
        data.classes                 # [0, 1, ..., 9]: y indexes these
        data.groups[:3]              # tensor([0, 0, 1]): trace of each row
    """

    __repr__ = compact_repr  # shapes, not whole tensors (hooks/reprs.py)

    X: Float[Tensor, "site n d"]  # noqa: F722
    y: Shaped[Tensor, " n"]  # noqa: F722
    groups: Int[Tensor, " n"]  # noqa: F722
    positions: Int[Tensor, " n"]  # noqa: F722
    sites: list[str]
    classes: list[Any] | None = None
    task: str = "classification"

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ConfigError(f"task={self.task!r}; valid: {', '.join(TASKS)}")
        if self.X.ndim != 3:
            raise ConfigError(f"X must be [site, n, d], got shape {tuple(self.X.shape)}")
        n = self.X.shape[1]
        for name in ("y", "groups", "positions"):
            if getattr(self, name).shape != (n,):
                raise ConfigError(f"{name} has shape {tuple(getattr(self, name).shape)}; "
                                  f"X has {n} rows, so it must be ({n},)")
        if len(self.sites) != self.X.shape[0]:
            raise ConfigError(f"{len(self.sites)} site names for {self.X.shape[0]} sites in X")
        if self.task == "classification":
            if self.y.dtype != torch.int64:
                raise ConfigError(f"classification targets must be int64 class indices, got "
                                  f"{self.y.dtype}; use task='regression' for float targets")
            self.classes = self.classes if self.classes is not None else \
                list(range(int(self.y.max()) + 1 if n else 0))
            if n and not 0 <= int(self.y.min()) <= int(self.y.max()) < len(self.classes):
                raise ConfigError(f"y holds classes {int(self.y.min())}..{int(self.y.max())} "
                                  f"but classes has {len(self.classes)} entries")
        elif self.classes is not None:
            raise ConfigError("regression data has no classes; pass classes=None")

    @property
    def n_classes(self) -> int:
        """Number of classes (0 for regression)."""
        return len(self.classes or [])

    def __len__(self) -> int:
        return self.X.shape[1]

    def subset(self, rows: Tensor) -> ProbeData:
        """The same data set restricted to ``rows`` (indices or a bool mask)."""
        return ProbeData(self.X[:, rows], self.y[rows], self.groups[rows], self.positions[rows],
                         list(self.sites), self.classes, self.task)


def _three_args(fn: Callable) -> Callable:
    """``fn`` as ``(trace_index, trace, token_index)``; two-argument callables get no index."""
    try:
        params = [p for p in inspect.signature(fn).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    return fn if len(params) >= 3 else (lambda ti, trace, i: fn(trace, i))


def _labelled(traces: list, captured: list[set[int]], labels: Any, level: str
              ) -> list[tuple[int, int, Any]]:
    """(trace index, labelled token, label) for every labelled, captured token."""
    if level not in LEVELS:
        raise ConfigError(f"level={level!r}; valid: {', '.join(LEVELS)}")
    if isinstance(labels, Tensor):
        labels = labels.tolist()
    if level == "token" and callable(labels):
        fn = _three_args(labels)
        return [(ti, i, lab) for ti, tr in enumerate(traces) for i in sorted(captured[ti])
                if (lab := fn(ti, tr, i)) is not None]
    if callable(labels) or isinstance(labels, str) or not isinstance(labels, Sequence):
        raise ConfigError(f"labels for level={level!r} must be a list with one entry per "
                          f"trace, got {type(labels).__name__}; a callable "
                          "(trace, token_index) -> label works with level='token'")
    if len(labels) != len(traces):
        raise ConfigError(f"{len(labels)} labels for {len(traces)} traces; give one entry "
                          "per trace, in the capture's trace order")
    out = []
    for ti, (tr, lab) in enumerate(zip(traces, labels)):
        if level == "trace":
            if isinstance(lab, list | tuple):
                raise ConfigError(f"trace {ti} has a list label {lab!r} at level='trace'; "
                                  "lists per trace are for level='sentence' or 'token'")
            if lab is not None and captured[ti]:
                out.append((ti, max(captured[ti]), lab))
            continue
        want = len(tr.sentences) if level == "sentence" else len(tr)
        if not isinstance(lab, Sequence) or isinstance(lab, str) or len(lab) != want:
            size = len(lab) if isinstance(lab, Sequence) else type(lab).__name__
            raise ConfigError(f"trace {ti} has {want} {level}s but its labels are {size}; "
                              f"give a list of {want} labels (None to skip)")
        ends = [s.end - 1 for s in tr.sentences] if level == "sentence" else range(want)
        out += [(ti, i, v) for i, v in zip(ends, lab) if v is not None and i in captured[ti]]
    return out


def _targets(values: list, task: str | None) -> tuple[Tensor, list | None, str]:
    if task is not None and task not in TASKS:
        raise ConfigError(f"task={task!r}; valid: {', '.join(TASKS)} (None infers it)")
    floats = any(isinstance(v, float) for v in values)
    task = task or ("regression" if floats else "classification")
    if task == "regression":
        bad = [v for v in values if not isinstance(v, numbers.Real)]
        if bad:
            raise ConfigError(f"regression labels must be numbers, got {bad[0]!r}")
        return torch.tensor([float(v) for v in values], dtype=torch.float32), None, task
    try:
        classes = sorted(set(values))
    except TypeError as e:
        raise ConfigError(f"class labels must be comparable (all ints or all str): {e}") from e
    index = {c: k for k, c in enumerate(classes)}
    return torch.tensor([index[v] for v in values], dtype=torch.long), classes, task


def _feature_token(trace, tok: int, spec: int | str, level: str) -> int:
    if isinstance(spec, str):
        if level != "trace":
            raise ConfigError(f"position {spec!r}: selector names apply to level='trace' "
                              "labels; for token or sentence labels give int offsets")
        picked = select_positions(trace, spec)
        return int(picked[-1]) if len(picked) else -1
    if isinstance(spec, bool) or not isinstance(spec, int):
        raise ConfigError(f"position {spec!r} is neither an int offset nor a selector "
                          f"({', '.join(POSITION_SELECTORS)})")
    return tok + spec


def probe_data_at(acts, sites: str | Sequence[str], labels: Any, *, level: str = "token",
                  positions: Sequence[int | str] = (0,), task: str | None = None
                  ) -> list[ProbeData]:
    """One :class:`ProbeData` per entry of ``positions``, over the same labelled rows.

    :func:`probe_data` at several positions: only rows whose features were captured at
    *every* position are kept, so the data sets line up row for row. Each site is read
    once for all positions (the sweep's single pass).

    Example::

        datas = probe_data_at(cap, "blocks.*.hook_resid_post", value, positions=[-1, 0])
        [d.X.shape for d in datas]         # [(4, n, 128), (4, n, 128)]: same rows
    """
    names = _sites(acts, sites)
    traces = list(acts.traces)
    first, tr_idx, pos = acts[names[0]].flat()
    if len(pos) and int(pos.min()) < 0:
        raise ConfigError("this store has no token positions (__positions__) for its rows; "
                          "capture it with model.capture(..., store=path), which records them")
    captured: list[set[int]] = [set() for _ in traces]
    for t, p in zip(tr_idx.tolist(), pos.tolist()):
        captured[t].add(p)
    if not positions:
        raise ConfigError("positions is empty; give int offsets such as [0] or [-2, -1, 0]")
    rows = []
    for ti, tok, lab in _labelled(traces, captured, labels, level):
        feats = [_feature_token(traces[ti], tok, spec, level) for spec in positions]
        if all(f in captured[ti] for f in feats):
            rows.append((ti, tok, lab, feats))
    if not rows:
        raise ConfigError(f"no labelled row has captured features at positions {list(positions)}"
                          "; capture the labelled tokens (e.g. positions='thinking') and check "
                          "that the labels are not all None")
    y, classes, task = _targets([r[2] for r in rows], task)
    groups = torch.tensor([r[0] for r in rows], dtype=torch.long)
    # (trace, token) -> flat row of the capture: one sorted key per captured row
    width = int(pos.max()) + 2
    keys = tr_idx * width + pos
    order = keys.argsort()
    sorted_keys = keys[order]
    want = torch.tensor([[r[0] * width + f for f in r[3]] for r in rows], dtype=torch.long)
    flat_rows = order[torch.searchsorted(sorted_keys, want)]       # [n, position]
    X = None
    for k, name in enumerate(names):
        values = first if k == 0 else acts[name].flat()[0]
        if values.ndim != 2:
            raise ConfigError(f"site {name!r} has per-token shape {tuple(values.shape[1:])}; "
                              "probes need one vector per token (e.g. hook_resid_post)")
        if X is None:
            X = values.new_empty(len(positions), len(names), len(rows), values.shape[1])
        X[:, k] = values[flat_rows.T]                                   # [position, n, d]
    return [ProbeData(X[k], y, groups, torch.tensor([r[3][k] for r in rows]), names,
                      classes, task) for k in range(len(positions))]


def _sites(acts, sites: str | Sequence[str]) -> list[str]:
    pats = [sites] if isinstance(sites, str) else list(sites)
    if not pats:
        raise ConfigError("no sites given; e.g. sites='blocks.*.hook_resid_post'")
    names: list[str] = []
    for p in pats:
        names += [n for n in acts.match(p) if n not in names]
    return names


def probe_data(acts, sites: str | Sequence[str], labels: Any, *, level: str = "token",
               offset: int | str = 0, task: str | None = None) -> ProbeData:
    """Probe rows from a capture or store (see the module docstring for the levels).

    Example (the organism: the value each compute step ``v = x op k = r`` writes, read at
    its second ``=``, the token whose next-token prediction is ``r``)::

        truth = [token_truth(t) for t in cap.traces]
        def value(ti, trace, i):
            t, prev = truth[ti][i], truth[ti][i - 1]
            second_eq = t and t.role == "eq" and prev and prev.role == "const"
            return t.value if second_eq else None
        data = probe_data(cap, "blocks.*.hook_resid_post", value)
        data.X.shape   # (4, n, 128): (site, row, d_model)
    """
    return probe_data_at(acts, sites, labels, level=level, positions=(offset,), task=task)[0]


def split_traces(traces: int | Int[Tensor, " n"], test_frac: float = 0.25, seed: int = 0,  # noqa: F722
                 ) -> tuple[Int[Tensor, " n_train"], Int[Tensor, " n_test"]]:  # noqa: F722
    """Train and test indices with every trace wholly on one side: the one split rule.

    ``traces`` is either the number of traces ``n`` (one row per trace: the indices
    returned are trace indices ``0..n-1``) or ``groups [n]``, the trace id of each row
    (the indices returned are rows). The rule, fixed so that every analysis splitting
    the same traces with the same seed puts the same traces in the test set:

    1. take the distinct trace ids in ascending order (``G`` of them; ``arange(n)`` for
       an int);
    2. permute them with ``torch.randperm(G, generator=torch.Generator().manual_seed(seed))``;
    3. the first ``min(max(1, round(test_frac * G)), G - 1)`` permuted traces are the test
       traces (at least one on each side), the rest train;
    4. return the train and test indices (rows of those traces), each ascending.

    Example::

        train, test = split_traces(torch.tensor([0, 0, 1, 1, 2, 3]), test_frac=0.25)
        train, test                       # rows, e.g. tensor([0, 1, 2, 3, 4]), tensor([5])
        split_traces(8, 0.25, seed=0)     # trace indices: 6 train, 2 test
    """
    if not 0 < test_frac < 1:
        raise ConfigError(f"test_frac={test_frac!r}; choose a fraction in (0, 1) such as 0.25")
    if isinstance(traces, Tensor):
        groups = traces.reshape(-1).long().cpu()
    elif isinstance(traces, numbers.Integral) and not isinstance(traces, bool):
        groups = torch.arange(int(traces))
    else:
        raise ConfigError(f"traces={traces!r}; give the number of traces (int) or the trace "
                          "id of each row (an int tensor)")
    uniq = torch.unique(groups)
    if len(uniq) < 2:
        raise ConfigError(f"{len(uniq)} trace(s) in the data; a split by trace needs at least 2")
    gen = torch.Generator().manual_seed(seed)
    perm = uniq[torch.randperm(len(uniq), generator=gen)]
    n_test = min(max(1, round(test_frac * len(uniq))), len(uniq) - 1)
    is_test = torch.isin(groups, perm[:n_test])
    return (~is_test).nonzero().squeeze(1), is_test.nonzero().squeeze(1)


def group_split(data: ProbeData, test_frac: float = 0.25, seed: int = 0
                ) -> tuple[Int[Tensor, " n_train"], Int[Tensor, " n_test"]]:  # noqa: F722
    """Train and test row indices of ``data``, split by trace with :func:`split_traces`.

    Raises :class:`~thinklens.errors.ConfigError` when a class has no training row.

    Example::

        train, test = group_split(data, test_frac=0.25, seed=0)
        set(data.groups[train].tolist()) & set(data.groups[test].tolist())   # set()
    """
    train, test = split_traces(data.groups, test_frac, seed)
    if data.task == "classification":
        missing = sorted(set(range(data.n_classes)) - set(data.y[train].tolist()))
        if missing:
            names = [data.classes[k] for k in missing]
            raise ConfigError(f"classes {names} have no training row with seed={seed} "
                              f"(counts: {class_balance(data)}); try another seed, more traces, "
                              "or drop or merge the rare classes")
    return train.to(data.groups.device), test.to(data.groups.device)


def class_balance(data: ProbeData | Tensor) -> dict[Any, int]:
    """Rows per class: ``{label: count}`` (class index when given a bare ``y`` tensor)."""
    if isinstance(data, ProbeData):
        if data.task != "classification":
            raise ConfigError("class_balance needs classification data; this is regression")
        counts = Counter(data.y.tolist())
        return {c: counts.get(k, 0) for k, c in enumerate(data.classes or [])}
    return dict(sorted(Counter(data.tolist()).items()))


__all__ = ["LEVELS", "TASKS", "ProbeData", "class_balance", "group_split", "probe_data",
           "probe_data_at", "split_traces"]
