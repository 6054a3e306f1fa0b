"""Result types of patching and attribution, shared by every analysis that returns them.

:class:`PatchResult` holds the metric after each exact patch
(:func:`~thinklens.circuits.patch`, :func:`~thinklens.circuits.path_patch`);
:class:`AttributionResult` holds first-order estimates of the same numbers
(:func:`~thinklens.circuits.atp`, :meth:`~thinklens.circuits.Circuit.node_effects`), so
the two compare cell by cell. Both live here, below the modules that make them, so that
``attribution`` (which builds circuits) and ``circuit`` (whose node effects are
attribution results) import them without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass

from jaxtyping import Float
from torch import Tensor

from thinklens.circuits.metrics import normalize


@dataclass
class PatchResult:
    """Metric after each patch, with named axes.

    ``values`` has one axis per entry of ``axes``, in that order: ``layer``, then any of
    ``pos``, ``head`` (``kv_head`` for k and v) as swept, or ``sender`` for a list of path
    patching senders; hence the variadic annotation ``"*axes"``.

    Example::

        r = patch(model, pair, "resid_pre", by=("layer", "pos"))
        r.values.shape, r.axes        # (30, 14), ('layer', 'pos')
        r.labels["pos"][9]            # "9: John/ Mary"
        r.normalized()                # (values - corrupt) / (clean - corrupt)
    """

    values: Float[Tensor, "*axes"]  # noqa: F821, F722
    axes: tuple[str, ...]
    labels: dict[str, list]
    metric: str
    clean: float
    corrupt: float
    site: str
    direction: str

    def normalized(self) -> Float[Tensor, "*axes"]:  # noqa: F821, F722
        """0 where the patched run scores like the corrupted run, 1 like the clean one."""
        return normalize(self.values, self.clean, self.corrupt, what=f"metric {self.metric!r}")

    def __repr__(self) -> str:
        shape = ", ".join(f"{a}={n}" for a, n in zip(self.axes, self.values.shape))
        return (f"PatchResult({self.site}, {self.direction}, {self.metric}: [{shape}], "
                f"clean={self.clean:.4g}, corrupt={self.corrupt:.4g})")


@dataclass(repr=False)
class AttributionResult(PatchResult):
    """A :class:`PatchResult` whose values are estimates: ``base value + Δa · grad``.

    Example::

        r = atp(model, pair, "z", by=("layer", "head"))
        exact = patch(model, pair, "z", by=("layer", "head"))
        r.values.shape == exact.values.shape, r.method        # True, 'atp'
    """

    method: str = "atp"

    def __repr__(self) -> str:
        return f"AttributionResult[{self.method}]" + super().__repr__().removeprefix("PatchResult")


__all__ = ["PatchResult", "AttributionResult"]
