"""Graphs for node classification: a seeded stochastic block model and Zachary's karate club.

Every graph is undirected, stored as a directed edge list with both directions of each
edge (``edge_index`` ``(2, E)`` int64, row 0 the source, row 1 the target), without
self-loops (a model adds them where it wants them) and without duplicates. Splits are
boolean node masks, stratified by class (:func:`attnlab.data.splits.stratified_split`):
the transductive setting of Planetoid/GAT, where the whole graph is seen and only the
training nodes' labels are.

* :func:`stochastic_block_model` (Holland et al. 1983): ``C`` communities of equal size
  are the classes; two nodes are joined with probability ``p_in`` inside a community and
  ``p_out`` across. Node features are made so that the graph matters: ``"noisy"`` features
  are the class mean (norm ``signal``) plus unit Gaussian noise, too weak to classify a
  node alone but strong once averaged over its (mostly same-class) neighbours;
  ``"onehot"`` features are node ids, which tell nothing about an unlabelled node.
* :func:`karate_club` (Zachary 1977, "An Information Flow Model for Conflict and Fission
  in Small Groups"): 34 members, 78 friendships, 2 classes (the club each member joined
  after the split, networkx's ``"club"`` attribute), one-hot node-id features. Needs the
  optional ``networkx``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from attnlab.data.splits import stratified_split
from attnlab.util.checks import check_choice, check_float, check_int
from attnlab.util.optional import optional_import

__all__ = ["GraphDataset", "karate_club", "stochastic_block_model", "GRAPH_FRACTIONS"]

# Few labelled nodes, as in semi-supervised node classification.
GRAPH_FRACTIONS = {"train": 0.1, "validation": 0.2, "test": 0.7}
_ROWS = 1024  # rows of the pair matrix drawn at once (bounds the generator's memory)


@dataclass(frozen=True)
class GraphDataset:
    """One graph with node features ``x`` ``(N, F)`` float32, labels ``y`` ``(N,)`` int64,
    ``edge_index`` ``(2, E)`` and boolean node ``masks`` per split."""

    name: str
    x: torch.Tensor
    edge_index: torch.Tensor
    y: torch.Tensor
    masks: dict[str, torch.Tensor]
    classes: tuple[str, ...]
    source: str
    notes: tuple[str, ...] = ()

    @property
    def num_nodes(self) -> int:
        return int(self.y.numel())

    def info(self) -> dict:
        """Sizes and statistics for a run's records."""
        src, dst = self.edge_index
        same = float((self.y[src] == self.y[dst]).float().mean()) if src.numel() else 0.0
        return {"dataset": self.name, "source": self.source, "notes": list(self.notes),
                "classes": list(self.classes), "nodes": self.num_nodes,
                "edges": int(src.numel()), "features": int(self.x.shape[1]),
                "homophily": round(same, 4),
                "sizes": {s: int(m.sum()) for s, m in self.masks.items()}}


def _both_directions(pairs: np.ndarray) -> torch.Tensor:
    """``(M, 2)`` undirected pairs ``i < j`` -> ``(2, 2M)`` edges, sorted by target."""
    both = np.concatenate([pairs, pairs[:, ::-1]])
    both = both[np.lexsort((both[:, 0], both[:, 1]))]
    return torch.from_numpy(np.ascontiguousarray(both.T)).long()


def _masks(y: np.ndarray, fractions: Mapping[str, float], seed: int) -> dict[str, torch.Tensor]:
    out = {}
    for name, idx in stratified_split(y, fractions, seed=seed).items():
        m = torch.zeros(len(y), dtype=torch.bool)
        m[torch.from_numpy(idx)] = True
        out[name] = m
    return out


def _sbm_pairs(y: np.ndarray, p_in: float, p_out: float, rng) -> np.ndarray:
    """Each pair ``i < j`` joined with ``p_in`` (same class) or ``p_out``, a few rows at a
    time."""
    n, found = len(y), []
    for r0 in range(0, n, _ROWS):
        rows = np.arange(r0, min(r0 + _ROWS, n))
        p = np.where(y[rows, None] == y[None, :], p_in, p_out)
        hit = (rng.random((len(rows), n)) < p) & (rows[:, None] < np.arange(n)[None, :])
        i, j = np.nonzero(hit)
        found.append(np.stack([rows[i], j], axis=1))
    return np.concatenate(found) if found else np.zeros((0, 2), dtype=np.int64)


def stochastic_block_model(num_nodes: int = 300, num_classes: int = 3, *, p_in: float = 0.05,
                           p_out: float = 0.005, features: str = "noisy",
                           feature_dim: int = 16, signal: float = 1.0,
                           fractions: Mapping[str, float] | None = None,
                           seed: int = 0) -> GraphDataset:
    """A seeded stochastic block model whose communities are the classes.

    Communities differ in size by at most one node. ``features="noisy"``: ``x_i = mu_{y_i}
    + noise``, ``mu_c`` a random direction of norm ``signal`` and unit Gaussian noise in
    ``feature_dim`` dimensions; ``"onehot"``: ``x`` is the identity (``feature_dim``
    unused). ``fractions`` (default :data:`GRAPH_FRACTIONS`) cut the nodes into stratified
    train/validation/test masks. Everything is drawn from ``numpy.random.default_rng(seed)``.
    """
    who = "stochastic_block_model"
    check_int("num_nodes", num_nodes, low=2, who=who)
    check_int("num_classes", num_classes, low=2, high=num_nodes, who=who)
    p_in = check_float("p_in", p_in, low=0.0, high=1.0, who=who)
    p_out = check_float("p_out", p_out, low=0.0, high=1.0, who=who)
    check_choice("features", features, ("noisy", "onehot"), who=who)
    check_int("feature_dim", feature_dim, low=1, who=who)
    signal = check_float("signal", signal, low=0.0, who=who)
    check_int("seed", seed, low=0, who=who)
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(num_nodes) % num_classes)
    edge_index = _both_directions(_sbm_pairs(y, p_in, p_out, rng))
    if features == "noisy":
        mu = rng.standard_normal((num_classes, feature_dim))
        mu *= signal / np.linalg.norm(mu, axis=1, keepdims=True)
        x = mu[y] + rng.standard_normal((num_nodes, feature_dim))
    else:
        x = np.eye(num_nodes)
    notes = (f"SBM: {num_nodes} nodes, {num_classes} communities, p_in={p_in}, "
             f"p_out={p_out}, seed {seed}",
             f"features: {features}" + (f" ({feature_dim}-d, class-mean norm {signal})"
                                        if features == "noisy" else " (node ids)"))
    return GraphDataset(
        "sbm", torch.from_numpy(x).float(), edge_index, torch.from_numpy(y).long(),
        _masks(y, fractions or GRAPH_FRACTIONS, seed),
        tuple(f"community {c}" for c in range(num_classes)),
        "generated: attnlab.data.graphs.stochastic_block_model", notes)


def karate_club(*, fractions: Mapping[str, float] | None = None, seed: int = 0) -> GraphDataset:
    """Zachary's karate club as networkx ships it: class 0 "Mr. Hi", class 1 "Officer",
    one-hot node-id features, stratified masks (default 30/20/50 %)."""
    nx = optional_import("networkx", extra="data", purpose="karate_club")
    check_int("seed", seed, low=0, who="karate_club")
    g = nx.karate_club_graph()
    nodes = sorted(g.nodes)
    classes = ("Mr. Hi", "Officer")
    y = np.array([classes.index(g.nodes[i]["club"]) for i in nodes])
    pairs = np.array(sorted((min(a, b), max(a, b)) for a, b in g.edges if a != b))
    fractions = fractions or {"train": 0.3, "validation": 0.2, "test": 0.5}
    return GraphDataset(
        "karate", torch.eye(len(nodes)), _both_directions(pairs), torch.from_numpy(y).long(),
        _masks(y, fractions, seed), classes, f"networkx {nx.__version__} karate_club_graph",
        ("Zachary 1977: 34 members, 2 clubs after the split",))
