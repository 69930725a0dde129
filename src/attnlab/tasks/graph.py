"""Node classification on one graph: a stochastic block model ("sbm") and Zachary's karate
club ("karate").

Transductive, as GAT's Cora experiments (Veličković et al. 2018, Sec. 3.3): the model sees
the whole graph and every node's features; the loss counts the training nodes' labels
only, and a split is scored on its own nodes. One training batch is the whole graph, so an
epoch is one optimiser step. Models: ``"gat"`` (:class:`~attnlab.models.graph.GATClassifier`
on the edge list) and ``"gat_dense"`` (the same model through the masked-dense reference
path); ``config.mechanism`` is a graph mechanism (``list_mechanisms(inputs="graph")``:
``gat`` or ``graph_dot``). Metrics: accuracy, macro-F1, per-class F1, confusion matrix.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as nnf

from attnlab.data.graphs import GraphDataset, karate_club, stochastic_block_model
from attnlab.models.graph import GATClassifier, graph_mechanism
from attnlab.tasks.common import classification_report, eval_mode, transformer_kwargs
from attnlab.train.config import ConfigError, TrainConfig
from attnlab.train.task import Task, register_task

__all__ = ["NodeClassification", "SBM", "Karate"]

_MODEL_KEYS = ("hidden", "heads", "output_heads", "dropout", "self_loops")


class NodeClassification(Task):
    """Base of the node classification tasks; subclasses implement :meth:`load`."""

    kind = "classification"
    metric = "accuracy"
    models = ("gat", "gat_dense")
    count_unit = "nodes"
    options: dict[str, Any] = {"train_fraction": 0.1, "validation_fraction": 0.2,
                               "data_seed": 0}
    # The paper's Cora recipe: lr 0.005, L2 5e-4, full-batch steps; no warm-up or clipping.
    defaults = {"model": "gat", "mechanism": "gat", "max_steps": 200, "batch_size": 1,
                "lr": 5e-3, "weight_decay": 5e-4, "warmup_steps": 0, "grad_clip": None,
                "eval_every": 10}

    def __init__(self, config: TrainConfig, run_dir=None) -> None:
        super().__init__(config, run_dir)
        try:
            graph_mechanism(f"task {self.name!r}", config.mechanism)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def load(self) -> GraphDataset:
        raise NotImplementedError

    def fractions(self) -> dict[str, float]:
        tr, va = self.opts["train_fraction"], self.opts["validation_fraction"]
        ok = all(isinstance(f, (int, float)) and not isinstance(f, bool) and f > 0
                 for f in (tr, va)) and tr + va < 1
        if not ok:
            raise ConfigError(f"task {self.name!r}: train_fraction and validation_fraction "
                              f"must be > 0 and sum to < 1 (the rest is the test split); got "
                              f"{tr!r} and {va!r}")
        return {"train": tr, "validation": va, "test": 1.0 - tr - va}

    def setup(self) -> None:
        try:
            self.data = self.load()
        except ConfigError:
            raise
        except (TypeError, ValueError) as e:
            raise ConfigError(f"task {self.name!r}: {e}") from None
        self._info = self.data.info()
        self.save_json("data.json", self._info)

    def info(self) -> dict[str, Any]:
        return self._info

    def build_model(self) -> GATClassifier:
        cfg = self.config
        kw = transformer_kwargs(cfg.model_kwargs, _MODEL_KEYS, where=f"task {self.name!r}")
        return GATClassifier(self.data.x.shape[1], len(self.data.classes),
                             mechanism=cfg.mechanism, mechanism_kwargs=cfg.mechanism_kwargs,
                             dense=cfg.model == "gat_dense", **kw)

    def _graph(self, split: str) -> dict[str, torch.Tensor]:
        d = self.data
        return {"x": d.x, "edge_index": d.edge_index, "labels": d.y, "mask": d.masks[split]}

    def train_batches(self, epoch: int):
        return [self._graph("train")]  # the whole graph, every epoch

    def loss(self, model, batch):
        logits = model(batch["x"], batch["edge_index"])
        mask = batch["mask"]
        return nnf.cross_entropy(logits[mask].float(), batch["labels"][mask]), int(mask.sum())

    def evaluate(self, model, split, max_batches=None):
        device = next(model.parameters()).device
        b = {k: t.to(device) for k, t in self._graph(split).items()}
        with eval_mode(model):
            preds = model(b["x"], b["edge_index"]).argmax(-1)
        mask = b["mask"]
        return classification_report(preds[mask].cpu(), b["labels"][mask].cpu(),
                                     self.data.classes)


@register_task
class SBM(NodeClassification):
    """Communities of a stochastic block model, from weak node features and the graph."""

    name = "sbm"
    summary = "Node classification on a stochastic block model (communities = classes)"
    options = {**NodeClassification.options, "num_nodes": 300, "num_classes": 3,
               "p_in": 0.05, "p_out": 0.005, "features": "noisy", "feature_dim": 16,
               "signal": 1.0}

    def load(self) -> GraphDataset:
        o = self.opts
        return stochastic_block_model(
            o["num_nodes"], o["num_classes"], p_in=o["p_in"], p_out=o["p_out"],
            features=o["features"], feature_dim=o["feature_dim"], signal=o["signal"],
            fractions=self.fractions(), seed=o["data_seed"])


@register_task
class Karate(NodeClassification):
    """Zachary's karate club: which club each member joined (needs networkx)."""

    name = "karate"
    summary = "Zachary's karate club (34 nodes, 2 clubs), node-id features; needs networkx"
    options = {**NodeClassification.options, "train_fraction": 0.3}
    defaults = {**NodeClassification.defaults, "max_steps": 100}

    def load(self) -> GraphDataset:
        return karate_club(fractions=self.fractions(), seed=self.opts["data_seed"])
