"""Site names: one TransformerLens hook name per activation, globs to select several.

The bridge registers each hook point under its own path (``blocks.3.hook_out``) and,
for most, a TransformerLens alias (``blocks.3.hook_resid_post``). thinklens shows one
name per activation: the TransformerLens name where there is one, otherwise the
bridge's. Either spelling is accepted on input and turned into the shown one.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable

from thinklens.errors import SiteError, did_you_mean

# bridge-internal points that duplicate a named activation or carry no activation
_HIDDEN = re.compile(
    r"(^|\.)(hook_in|hook_out)$|rotary_emb|hook_cos$|hook_sin$|hook_hidden_states$")
_KEEP_ANYWAY = re.compile(r"^blocks\.\d+\.mlp\.hook_(in|out)$")


def canonical_sites(bridge) -> tuple[list[str], dict[str, str]]:
    """(shown site names in model order, any accepted spelling -> shown name)."""
    by_point: dict[int, list[str]] = {}
    order: list[int] = []
    for name, point in bridge.hook_dict.items():
        key = id(point)
        if key not in by_point:
            by_point[key] = []
            order.append(key)
        by_point[key].append(name)
    shown: list[str] = []
    spelling: dict[str, str] = {}
    for key in order:
        names = by_point[key]
        point_name = bridge.hook_dict[names[0]].name or names[0]
        aliases = [n for n in names if n != point_name]
        pick = aliases[0] if aliases else point_name
        if pick == point_name and _HIDDEN.search(pick) and not _KEEP_ANYWAY.match(pick):
            continue
        if point_name.startswith("rotary_emb"):
            continue  # rotary cos/sin tables, not an activation (hook_pos_embed aliases it)
        if bridge._gated_hook_reason(point_name) is not None:
            continue  # needs a use_* flag turned on; not a site of a plain forward pass
        shown.append(pick)
        for n in names:
            spelling[n] = pick
    return _model_order(shown), spelling


def _model_order(names: list[str]) -> list[str]:
    def key(n: str) -> tuple:
        m = re.match(r"blocks\.(\d+)\.", n)
        if n.startswith(("hook_embed", "embed", "hook_pos_embed")):
            return (-1, n)
        if m:
            return (int(m.group(1)), _STAGE.get(n.split(".", 2)[2], 50), n)
        return (10**6, n)
    return sorted(names, key=key)


_STAGE = {"hook_resid_pre": 0, "ln1.hook_scale": 1, "ln1.hook_normalized": 2,
          "attn.hook_q": 3, "attn.hook_k": 4, "attn.hook_v": 5, "attn.hook_rot_q": 6,
          "attn.hook_rot_k": 7, "attn.hook_attn_scores": 8, "attn.hook_pattern": 9,
          "attn.hook_z": 10, "hook_attn_out": 11, "hook_resid_mid": 12, "ln2.hook_scale": 13,
          "ln2.hook_normalized": 14, "mlp.hook_in": 14.5, "mlp.hook_pre": 15, "mlp.hook_pre_linear": 16,
          "mlp.hook_post": 17, "hook_mlp_out": 18, "hook_resid_post": 19}


def resolve_sites(patterns: str | Iterable[str], shown: list[str],
                  spelling: dict[str, str]) -> list[str]:
    """Hook names or globs -> shown site names, deduplicated, in model order.

    Example: ``resolve_sites("blocks.*.hook_resid_post", ...)`` ->
    ``['blocks.0.hook_resid_post', ..., 'blocks.29.hook_resid_post']``.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    picked: set[str] = set()
    for pat in patterns:
        if not isinstance(pat, str):
            raise SiteError(f"site {pat!r} is not a string; give hook names such as "
                            "'blocks.0.hook_resid_post' or globs such as 'blocks.*.hook_resid_post'")
        if pat in spelling:
            picked.add(spelling[pat])
            continue
        hits = [s for s in shown if fnmatch.fnmatchcase(s, pat)]
        if not hits:
            hits = sorted({spelling[n] for n in spelling if fnmatch.fnmatchcase(n, pat)})
        if not hits:
            raise SiteError(f"unknown site {pat!r}.{did_you_mean(pat, shown)} "
                            "See Model.site_names for every valid name.")
        picked.update(hits)
    if not picked:
        raise SiteError("no sites given; pass e.g. sites='blocks.*.hook_resid_post'")
    return [s for s in shown if s in picked]


def layer_of(site: str) -> int | None:
    m = re.match(r"blocks\.(\d+)\.", site)
    return int(m.group(1)) if m else None


def is_pattern_site(site: str) -> bool:
    """Sites shaped ``[batch, head, query, key]`` (moved to query-major when captured)."""
    return site.endswith(("attn.hook_pattern", "attn.hook_attn_scores"))


__all__ = ["canonical_sites", "resolve_sites", "layer_of", "is_pattern_site"]
