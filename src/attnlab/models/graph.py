"""Graph attention networks for node classification, on any graph mechanism.

:class:`GATLayer` is eq. 5 of Veličković et al. 2018 ("Graph Attention Networks"),
``h'_i = ||_{k=1..K} sigma(sum_{j in N(i)} alpha^k_ij W^k h_j)``, and eq. 6 (the mean of the
``K`` heads) for an output layer. :class:`GATClassifier` is the paper's transductive Cora
model (Sec. 3.3): dropout 0.6 on each layer's input, a first layer of ``K = 8`` heads of
``F' = 8`` features with ELU, and an output layer of one head with ``C`` features (the
logits; the softmax is the loss's). The attention weights are dropped with the same
probability while training.

The attention is a registered graph mechanism (``list_mechanisms(inputs="graph")``):

* ``"gat"``: one projection ``W h`` per head serves as q, k and v, as in the paper;
* ``"graph_dot"``: separate ``W_Q h``, ``W_K h``, ``W_V h`` (Shi et al. 2021's
  TransformerConv; with one shared ``W`` the score of ``j`` for ``i`` would be symmetric).

``dense=True`` computes the same layer as a masked dense softmax over ``N x N`` pairs
(:meth:`~attnlab.mechanisms.graph.GraphMechanism.dense`) with the same parameters: a
reference path for comparison, O(N^2) memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from attnlab.mechanisms.graph import add_self_loops, to_adjacency
from attnlab.models.blocks import ModelBase
from attnlab.registry import create_for, get, list_mechanisms
from attnlab.util.checks import check_bool, check_float, check_int, did_you_mean

__all__ = ["GATClassifier", "GATLayer", "graph_mechanism"]


def graph_mechanism(who: str, mechanism) -> str:
    """The canonical name of a graph mechanism, else ``ValueError`` with the ones there are."""
    known = list_mechanisms(inputs="graph")
    try:
        spec = get(mechanism)
    except ValueError:
        raise ValueError(f"{who}: mechanism must be one of {known}; got {mechanism!r}"
                         f"{did_you_mean(mechanism, known)}") from None
    if spec.inputs != "graph":
        raise ValueError(f"{who}: mechanism {spec.name!r} takes {spec.inputs!r} inputs, not a "
                         f"graph; choose one of {known}")
    return spec.name


def _check_features(who: str, x, width: int) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != width \
            or not x.is_floating_point():
        got = (f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor)
               else type(x).__name__)
        raise ValueError(f"{who}: x must be floating (N, {width}) node features; got {got}")


class GATLayer(nn.Module):
    """One multi-head graph attention layer: ``(N, in_features) -> (N, K F')`` (``concat``)
    or ``(N, F')`` (the mean of the heads), then ``activation`` (``"elu"`` or ``None``).

    ``forward(x, edge_index)`` takes the edge list as given (add self-loops first where
    ``i`` should attend itself). Each output feature has a bias, as in the paper's
    reference code; a node with no in-edge gets the bias alone.
    """

    def __init__(self, in_features: int, out_features: int, num_heads: int = 1, *,
                 mechanism: str = "gat", mechanism_kwargs: dict | None = None,
                 concat: bool = True, activation: str | None = "elu", dropout: float = 0.0,
                 dense: bool = False) -> None:
        super().__init__()
        who = "GATLayer"
        self.in_features = check_int("in_features", in_features, who=who)
        self.out_features = check_int("out_features", out_features, who=who)
        self.num_heads = check_int("num_heads", num_heads, who=who)
        self.concat, self.dense = check_bool("concat", concat, who=who), check_bool(
            "dense", dense, who=who)
        if activation not in ("elu", None):
            raise ValueError(f"{who}: activation must be 'elu' or None; got {activation!r}")
        self.activation = activation
        self.dropout = check_float("dropout", dropout, low=0.0, high=1.0, high_inclusive=False,
                                   who=who)
        name = graph_mechanism(who, mechanism)
        mechanism_kwargs = dict(mechanism_kwargs or {})
        clash = sorted({"head_dim", "num_heads"} & set(mechanism_kwargs))
        if clash:
            raise ValueError(f"{who}: mechanism_kwargs may not set {clash}: the layer sets "
                             f"them (out_features, num_heads)")
        # "gat": the paper's one W for target, source and message; else W_Q, W_K, W_V.
        self.shared = name == "gat"
        width = num_heads * out_features
        self.proj = nn.Linear(in_features, width * (1 if self.shared else 3), bias=False)
        self.attn = create_for(name, head_dim=out_features, num_heads=num_heads,
                               **mechanism_kwargs)
        self.bias = nn.Parameter(torch.zeros(width if concat else out_features))
        nn.init.xavier_uniform_(self.proj.weight)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        _check_features("GATLayer", x, self.in_features)
        N, H, Fo = x.shape[0], self.num_heads, self.out_features
        # (N, parts * H * F') -> parts tensors (1, H, N, F'): one graph, a batch of one
        parts = self.proj(x).view(N, -1, H, Fo).permute(1, 2, 0, 3).unsqueeze(1)
        q, k, v = (parts[0],) * 3 if self.shared else (parts[0], parts[1], parts[2])
        p = self.dropout if self.training else 0.0
        if self.dense:
            out = self.attn.dense(q, k, v, adjacency=to_adjacency(edge_index, N), dropout_p=p)
        else:
            out = self.attn(q, k, v, edge_index=edge_index, dropout_p=p)
        out = out[0].transpose(0, 1)                                    # (N, H, F')
        out = out.reshape(N, H * Fo) if self.concat else out.mean(dim=1)
        out = out + self.bias
        return F.elu(out) if self.activation == "elu" else out


class GATClassifier(ModelBase):
    """The paper's two-layer GAT for node classification: ``forward(x (N, F), edge_index
    (2, E)) -> logits (N, num_classes)``.

    ``hidden`` features per head times ``heads`` in the first layer (ELU, concatenated),
    ``output_heads`` averaged in the output layer; ``dropout`` on both layers' inputs and on
    the attention weights; ``self_loops`` adds ``i -> i`` where missing, as the paper's
    neighbourhood includes ``i``. ``dense`` selects the masked-dense reference path.
    """

    def __init__(self, in_features: int, num_classes: int, *, hidden: int = 8,
                 heads: int = 8, output_heads: int = 1, dropout: float = 0.6,
                 mechanism: str = "gat", mechanism_kwargs: dict | None = None,
                 self_loops: bool = True, dense: bool = False) -> None:
        super().__init__()
        who = "GATClassifier"
        check_int("num_classes", num_classes, low=2, who=who)
        mechanism = graph_mechanism(who, mechanism)
        self.self_loops = check_bool("self_loops", self_loops, who=who)
        self.config = {"in_features": in_features, "num_classes": num_classes,
                       "hidden": hidden, "heads": heads, "output_heads": output_heads,
                       "dropout": dropout, "mechanism": mechanism,
                       "mechanism_kwargs": dict(mechanism_kwargs or {}),
                       "self_loops": self_loops, "dense": dense}
        common = dict(mechanism=mechanism, mechanism_kwargs=mechanism_kwargs, dropout=dropout,
                      dense=dense)
        self.hidden = GATLayer(in_features, hidden, heads, concat=True, activation="elu",
                               **common)
        self.out = GATLayer(hidden * heads, num_classes, output_heads, concat=False,
                            activation=None, **common)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        _check_features("GATClassifier", x, self.hidden.in_features)
        if self.self_loops:
            edge_index = add_self_loops(edge_index, x.shape[0])
        h = self.hidden(self.dropout(x), edge_index)
        return self.out(self.dropout(h), edge_index)
