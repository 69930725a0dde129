"""Node classification: the graphs (SBM, karate club), the GAT layer and classifier, and the
"sbm"/"karate" tasks through the training loop.

Evidence: the SBM is seeded, undirected, loop- and duplicate-free, stratified, and its
features alone classify worse than features averaged over the graph (the graph matters);
the karate club matches networkx's own attributes; a small SBM trains above chance in a
few steps; the masked-dense path gives the same logits (and accuracy) as the edge list at
equal weights.
"""

from __future__ import annotations

import json

import pytest
import torch

import attnlab.tasks.graph  # noqa: F401  (registers "sbm" and "karate")
from attnlab.data.graphs import GraphDataset, karate_club, stochastic_block_model
from attnlab.models.graph import GATClassifier, GATLayer
from attnlab.tasks import get_task, list_tasks
from attnlab.train.config import ConfigError
from attnlab.train.loop import load_trained, train

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL_SBM = {"num_nodes": 60, "num_classes": 2, "p_in": 0.2, "p_out": 0.02,
             "train_fraction": 0.2}


def check_graph(d: GraphDataset) -> None:
    """Undirected (each edge both ways), no self-loop, no duplicate, masks a partition."""
    n = d.num_nodes
    pairs = set(map(tuple, d.edge_index.t().tolist()))
    assert len(pairs) == d.edge_index.shape[1]
    assert all((i, j) in pairs for j, i in pairs) and all(i != j for i, j in pairs)
    assert d.edge_index.dtype == torch.int64 and int(d.edge_index.max()) < n
    total = sum(m.long() for m in d.masks.values())
    assert torch.equal(total, torch.ones(n, dtype=torch.long))
    assert d.x.shape[0] == n and d.x.dtype == torch.float32


def nearest_mean_accuracy(x, y) -> float:
    """Accuracy of the nearest class mean (the means taken from all labels: an oracle)."""
    means = torch.stack([x[y == c].mean(0) for c in range(int(y.max()) + 1)])
    return float((torch.cdist(x, means).argmin(1) == y).float().mean())


# ---------------------------------------------------------------- data
def test_sbm_is_seeded_and_well_formed():
    a, b, c = (stochastic_block_model(200, 4, seed=s) for s in (0, 0, 1))
    for d in (a, c):
        check_graph(d)
    assert torch.equal(a.x, b.x) and torch.equal(a.edge_index, b.edge_index)
    assert not torch.equal(a.y, c.y)
    assert torch.bincount(a.y).tolist() == [50] * 4
    for m in a.masks.values():  # stratified: every class in every split
        assert torch.bincount(a.y[m], minlength=4).min() > 0
    onehot = stochastic_block_model(50, 2, features="onehot")
    assert torch.equal(onehot.x, torch.eye(50))


def test_sbm_edges_follow_p_in_and_p_out():
    d = stochastic_block_model(400, 2, p_in=0.1, p_out=0.01, seed=3)
    src, dst = d.edge_index
    same = d.y[src] == d.y[dst]
    pairs_in, pairs_out = 2 * (200 * 199 // 2), 200 * 200  # node pairs, each edge stored twice
    assert abs(int(same.sum()) / 2 / pairs_in - 0.1) < 0.01      # ~7 standard deviations
    assert abs(int((~same).sum()) / 2 / pairs_out - 0.01) < 0.003


def test_sbm_features_alone_are_not_enough():
    """Averaging over each node's neighbours (and itself) classifies far better than the
    node's own features, even with the class means known: attention over the graph matters."""
    d = stochastic_block_model(seed=0)
    src, dst = d.edge_index
    n = d.num_nodes
    avg = d.x.clone().index_add(0, dst, d.x[src])
    avg /= (1 + torch.zeros(n).index_add(0, dst, torch.ones(src.numel())))[:, None]
    alone, graph = nearest_mean_accuracy(d.x, d.y), nearest_mean_accuracy(avg, d.y)
    assert alone < 0.75 and graph > alone + 0.15, (alone, graph)


def test_karate_club_matches_networkx():
    nx = pytest.importorskip("networkx")
    g = nx.karate_club_graph()
    d = karate_club(seed=0)
    check_graph(d)
    assert d.num_nodes == 34 and d.edge_index.shape[1] == 2 * g.number_of_edges() == 156
    assert d.classes == ("Mr. Hi", "Officer")
    assert [d.classes[c] for c in d.y.tolist()] == [g.nodes[i]["club"] for i in range(34)]
    assert set(map(tuple, d.edge_index.t().tolist())) == {
        e for a, b in g.edges for e in ((a, b), (b, a))}


def test_bad_sbm_arguments_are_refused():
    with pytest.raises(ValueError, match="p_in"):
        stochastic_block_model(p_in=1.5)
    with pytest.raises(ValueError, match="features must be one of"):
        stochastic_block_model(features="noisey")
    with pytest.raises(ValueError, match="num_classes"):
        stochastic_block_model(4, 5)


# ---------------------------------------------------------------- model
def test_gat_layer_shapes_and_heads():
    d = stochastic_block_model(30, 2, seed=1)
    cat = GATLayer(16, 5, 3, concat=True)
    avg = GATLayer(16, 5, 3, concat=False, activation=None)
    assert cat(d.x, d.edge_index).shape == (30, 15) and avg(d.x, d.edge_index).shape == (30, 5)
    assert (cat(d.x, d.edge_index) > -1).all()  # ELU's range
    assert len(list(GATLayer(16, 5, 3, mechanism="graph_dot").proj.parameters())) == 1
    assert GATLayer(16, 5, 3, mechanism="graph_dot").proj.out_features == 3 * 15
    with pytest.raises(ValueError, match=r"x must be floating \(N, 16\)"):
        cat(d.x[:, :4], d.edge_index)
    with pytest.raises(ValueError, match="mechanism must be one of.*did you mean 'gat'"):
        GATLayer(16, 5, 3, mechanism="gta")
    with pytest.raises(ValueError, match="takes 'qkv' inputs, not a graph"):
        GATLayer(16, 5, 3, mechanism="sdpa")
    with pytest.raises(ValueError, match="may not set"):
        GATLayer(16, 5, 3, mechanism_kwargs={"num_heads": 2})


@pytest.mark.parametrize("mechanism", ["gat", "graph_dot"])
def test_dense_path_gives_the_same_logits(mechanism):
    d = stochastic_block_model(80, 3, seed=2)
    torch.manual_seed(0)
    edge = GATClassifier(16, 3, mechanism=mechanism).eval()
    dense = GATClassifier(16, 3, mechanism=mechanism, dense=True).eval()
    dense.load_state_dict(edge.state_dict())
    with torch.no_grad():
        a, b = edge(d.x, d.edge_index), dense(d.x, d.edge_index)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert torch.equal(a.argmax(-1), b.argmax(-1))


def test_self_loops_are_the_models_choice():
    d = stochastic_block_model(30, 2, seed=4)
    torch.manual_seed(0)
    with_loops = GATClassifier(16, 2).eval()
    without = GATClassifier(16, 2, self_loops=False).eval()
    without.load_state_dict(with_loops.state_dict())
    loops = torch.arange(30).expand(2, -1)
    with torch.no_grad():
        torch.testing.assert_close(with_loops(d.x, d.edge_index),
                                   without(d.x, torch.cat([d.edge_index, loops], 1)))
        assert not torch.allclose(with_loops(d.x, d.edge_index), without(d.x, d.edge_index))


# ---------------------------------------------------------------- tasks
def run(tmp_path, task, *, steps=30, mechanism="gat", model="gat", lr=0.02, **kw):
    cfg = get_task(task).make_config(max_steps=steps, eval_every=steps, mechanism=mechanism,
                                     model=model, lr=lr, task_kwargs=kw)
    return train(cfg, tmp_path / f"{task}-{mechanism}-{model}", progress=False)


def test_tasks_are_registered_with_valid_defaults():
    for name in ("sbm", "karate"):
        assert name in list_tasks()
        t = get_task(name)
        cfg = t.make_config()
        assert cfg.model == t.models[0] == "gat" and cfg.mechanism == "gat"
        assert t.metric == "accuracy"


@pytest.mark.parametrize("mechanism", ["gat", "graph_dot"])
def test_small_sbm_trains_above_chance(tmp_path, mechanism):
    r = run(tmp_path, "sbm", mechanism=mechanism, **SMALL_SBM)
    data = json.loads((r.run_dir / "data.json").read_text())
    assert data["nodes"] == 60 and data["sizes"]["train"] == 12
    assert r.test["accuracy"] > 0.75 and r.test["n"] == data["sizes"]["test"]  # chance: 0.5


def test_dense_model_scores_the_same_at_equal_weights(tmp_path):
    r = run(tmp_path, "sbm", steps=5, **SMALL_SBM)
    task, model = load_trained(r.run_dir)
    cfg = task.config.replace(model="gat_dense")
    dense_task = get_task("sbm")(cfg)
    dense_task.setup()
    dense = dense_task.build_model()
    dense.load_state_dict(model.state_dict())
    for split in ("validation", "test"):
        assert task.evaluate(model, split) == dense_task.evaluate(dense, split)


KARATE_STEPS = 20


def test_karate_trains(tmp_path):
    pytest.importorskip("networkx")
    r = run(tmp_path, "karate", steps=KARATE_STEPS)
    assert r.test["n"] == 17 and r.test["accuracy"] > 0.7  # chance: about 0.5


def test_bad_task_configs_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="takes 'qkv' inputs, not a graph"):
        get_task("sbm")(get_task("sbm").make_config(mechanism="sdpa"))
    with pytest.raises(ConfigError, match="model must be one of"):
        get_task("sbm")(get_task("sbm").make_config(model="transformer"))
    with pytest.raises(ConfigError, match="train_fraction and validation_fraction"):
        get_task("sbm")(get_task("sbm").make_config(
            task_kwargs={"train_fraction": 0.9, "validation_fraction": 0.2})).setup()
    with pytest.raises(ConfigError, match="task 'sbm'.*p_out"):
        get_task("sbm")(get_task("sbm").make_config(task_kwargs={"p_out": -1})).setup()
    with pytest.raises(ConfigError, match="did you mean 'hidden'"):
        t = get_task("sbm")(get_task("sbm").make_config(model_kwargs={"hiden": 4}))
        t.setup()
        t.build_model()


def test_train_batches_are_the_whole_graph_every_epoch():
    t = get_task("sbm")(get_task("sbm").make_config(task_kwargs=SMALL_SBM))
    t.setup()
    a, b = t.train_batches(0), t.train_batches(7)
    assert len(a) == 1 and all(torch.equal(a[0][k], b[0][k]) for k in a[0])
    assert torch.equal(a[0]["mask"], t.data.masks["train"])
