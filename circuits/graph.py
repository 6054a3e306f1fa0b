"""The computational graph of edge attribution: senders, receivers and the edges between them.

Nodes (Syed et al. 2023; Hanna et al. 2024; the graph of Conmy et al. 2023, ACDC):

- **senders** write into the residual stream: ``input`` (the embeddings,
  ``blocks.0.hook_resid_pre``), every attention head ``a{layer}.h{head}`` (its output
  ``z_h @ W_O[h]``) and every MLP ``m{layer}`` (``hook_mlp_out``);
- **receivers** read from it: every head's query input ``a{l}.h{h}.q``, every key and
  value input ``a{l}.h{g}.k`` / ``a{l}.h{g}.v`` (``g`` is the KV head: with grouped-query
  attention one KV head feeds several query heads, so its input is one receiver), every
  MLP's input ``m{l}``, and the unembedding ``logits``.

An edge ``u -> v`` exists when ``u`` writes before ``v`` reads: heads of layer ``l``
read senders of layers ``< l``; MLP ``l`` also reads the heads of its own layer; the
logits read every sender. Because a receiver's input is the residual stream at its
layer (before its norm), it equals the sum of its upstream senders' outputs (plus
constant biases), which is what makes edges well defined.

Order: senders ``input, a0.h0 .. a0.h{H-1}, m0, a1.h0, ...``; receivers per layer
``q heads, k KV heads, v KV heads, mlp``, then ``logits``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from torch import Tensor

from thinklens.errors import ConfigError


@dataclass(frozen=True)
class Graph:
    """Sender and receiver names of a model's edge graph.

    Example::

        g = Graph.of(model)                  # organism: 4 layers, 4 heads
        len(g.senders), len(g.receivers)     # (21, 53)
        int(g.valid.sum())                   # 479 edges
        g.edge_name(0, g.receivers.index("logits"))   # 'input->logits'
    """

    n_layers: int
    n_heads: int
    n_kv_heads: int

    @classmethod
    def of(cls, model: Any) -> Graph:
        c = model.config
        return cls(c.n_layers, c.n_heads, c.n_kv_heads)

    def attn_start(self, layer: int) -> int:
        """Number of senders that write before layer ``layer``'s attention reads."""
        return 1 + layer * (self.n_heads + 1)

    @cached_property
    def senders(self) -> list[str]:
        out = ["input"]
        for layer in range(self.n_layers):
            out += [f"a{layer}.h{h}" for h in range(self.n_heads)] + [f"m{layer}"]
        return out

    @cached_property
    def receivers(self) -> list[str]:
        out = []
        for layer in range(self.n_layers):
            out += [f"a{layer}.h{h}.q" for h in range(self.n_heads)]
            out += [f"a{layer}.h{g}.{kv}" for kv in "kv" for g in range(self.n_kv_heads)]
            out.append(f"m{layer}")
        return out + ["logits"]

    def receiver_start(self, layer: int) -> int:
        return layer * (self.n_heads + 2 * self.n_kv_heads + 1)

    @cached_property
    def sender_bound(self) -> Tensor:
        """``[R]``: receiver r reads senders ``0 .. bound[r] - 1``."""
        bound = []
        for layer in range(self.n_layers):
            bound += [self.attn_start(layer)] * (self.n_heads + 2 * self.n_kv_heads)
            bound.append(self.attn_start(layer) + self.n_heads)
        return torch.tensor(bound + [len(self.senders)])

    @cached_property
    def valid(self) -> Tensor:
        """``Bool[S, R]``: which sender -> receiver pairs are edges."""
        return torch.arange(len(self.senders))[:, None] < self.sender_bound[None, :]

    @cached_property
    def sender_index(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.senders)}

    @cached_property
    def receiver_index(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.receivers)}

    def edge_name(self, s: int, r: int) -> str:
        return f"{self.senders[s]}->{self.receivers[r]}"

    def parse_edge(self, name: str) -> tuple[int, int]:
        """``'a0.h1->a2.h3.q'`` -> (sender index, receiver index), or a ConfigError."""
        u, sep, v = str(name).partition("->")
        if not sep or u not in self.sender_index or v not in self.receiver_index:
            raise ConfigError(f"edge {name!r} is not in this graph ({self.describe()}); "
                              "edges are 'sender->receiver', e.g. 'a0.h1->a2.h3.q', "
                              "'input->m0', 'm1->logits'")
        s, r = self.sender_index[u], self.receiver_index[v]
        if not self.valid[s, r]:
            raise ConfigError(f"edge {name!r}: {u} writes after {v} reads; a sender must sit "
                              "in an earlier layer (an MLP also reads its own layer's heads)")
        return s, r

    def node_of_receiver(self, r: int) -> str:
        """The node a receiver belongs to: ``a1.h2.q`` -> ``a1.h2``; KV heads map to the
        first query head they feed."""
        name = self.receivers[r]
        if name.endswith((".k", ".v")) and self.n_kv_heads != self.n_heads:
            layer, g = name.split(".")[:2]
            return f"{layer}.h{int(g[1:]) * (self.n_heads // self.n_kv_heads)}"
        return name.rsplit(".", 1)[0] if name.endswith((".q", ".k", ".v")) else name

    def layer_of(self, node: str) -> float:
        """Drawing height: input -1, heads of layer l at l, MLP l at l + 0.5, logits L."""
        if node == "input":
            return -1.0
        if node == "logits":
            return float(self.n_layers)
        return int(node[1:].split(".")[0]) + (0.5 if node.startswith("m") else 0.0)

    def describe(self) -> str:
        return (f"{self.n_layers} layers, {self.n_heads} heads, {self.n_kv_heads} KV heads: "
                f"{len(self.senders)} senders, {len(self.receivers)} receivers, "
                f"{int(self.valid.sum())} edges")

    def to_dict(self) -> dict:
        return {"n_layers": self.n_layers, "n_heads": self.n_heads,
                "n_kv_heads": self.n_kv_heads}

    @classmethod
    def from_dict(cls, d: Any) -> Graph:
        keys = ("n_layers", "n_heads", "n_kv_heads")
        if not isinstance(d, dict) or any(not isinstance(d.get(k), int) or d[k] < 1
                                          for k in keys):
            raise ConfigError(f"graph {d!r}: expected positive integers {', '.join(keys)}")
        if d["n_heads"] % d["n_kv_heads"]:
            raise ConfigError(f"graph {d!r}: n_heads must be a multiple of n_kv_heads")
        return cls(*(d[k] for k in keys))


__all__ = ["Graph"]
