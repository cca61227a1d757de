"""Reasoning graphs and their metrics equal hand counts and networkx; analyse end to end."""

import networkx as nx
import numpy as np
import pytest
import torch
from tolerance import assert_close, close

from probes.graph_metrics import analyse, build_graph, cycle_detection_ratio, graph_metrics


# ---- graph metrics against hand counts ---------------------------------------------------------------
# Steps (1-D vectors so every distance is written out):
#   step  0  1  2  3  4  5  6  7
#   node  A  B  A  C  B  C  B  D          A=0 B=1 C=2 D=3
#   x     0  3  1  7  4  8  2  12
# Edges (|x_t+1 - x_t|): A>B 3, B>A 2, A>C 6, C>B 3, B>C 4, C>B 6 (repeat: min 3, count 2), B>D 10.
HAND_LABELS = [0, 1, 0, 2, 1, 2, 1, 3]
HAND_X = [0.0, 3.0, 1.0, 7.0, 4.0, 8.0, 2.0, 12.0]
# Shortest directed distances (D has no way out):
#   A>B 3, A>C 6, A>D 3+10=13, B>A 2, B>C 4, B>D 10, C>A 3+2=5, C>B 3, C>D 3+10=13
HAND_DISTANCES = {(0, 1): 3, (0, 2): 6, (0, 3): 13, (1, 0): 2, (1, 2): 4, (1, 3): 10, (2, 0): 5, (2, 1): 3, (2, 3): 13}
HAND_HOPS = {(0, 1): 1, (0, 2): 1, (0, 3): 2, (1, 0): 1, (1, 2): 1, (1, 3): 1, (2, 0): 2, (2, 1): 1, (2, 3): 2}
# Undirected: A-B, A-C, B-C, B-D. Local clustering A 1, B 1/3 (of A-C, A-D, C-D only A-C), C 1;
# D has degree 1 and is left out: C = (1 + 1/3 + 1) / 3 = 7/9 (networkx's average over all
# nodes would be 7/12). N = 4, E = 4, k = 2 E / N = 2, C_rand = k / (N - 1) = 2/3,
# L_rand = ln 4 / ln 2 = 2. Hop L = 12/9 = 4/3, weighted L = 59/9.
HAND_C = 7 / 9
HAND_S_HOPS = (HAND_C / (2 / 3)) / ((4 / 3) / 2)  # = 7/4
HAND_S_WEIGHTED = (HAND_C / (2 / 3)) / ((59 / 9) / 2)  # = 21/59


def hand_graph():
    vectors = torch.tensor(HAND_X)[:, None]
    return build_graph(HAND_LABELS, vectors), vectors


def test_graph_edges_keep_the_minimum_distance_and_drop_self_loops():
    graph, _ = hand_graph()
    assert dict(graph.nodes(data="visits")) == {0: 2, 1: 3, 2: 2, 3: 1}
    assert {(a, b): w for a, b, w in graph.edges(data="weight")} == {
        (0, 1): 3.0, (1, 0): 2.0, (0, 2): 6.0, (2, 1): 3.0, (1, 2): 4.0, (1, 3): 10.0
    }
    assert graph.edges[2, 1]["count"] == 2
    assert not any(a == b for a, b in graph.edges)
    self_loop = build_graph([5, 5, 5], torch.zeros(3, 2))
    assert list(self_loop.nodes) == [5] and self_loop.number_of_edges() == 0


def test_metrics_equal_hand_counts_and_networkx():
    graph, _ = hand_graph()
    m = graph_metrics(HAND_LABELS, graph)
    # A is the first node revisited (step 2) with 2 separate visits; B has 3.
    assert (m.has_cycle, m.cycle_count, m.cycle_count_max) == (True, 1, 2)
    assert (m.n_steps, m.n_nodes, m.n_edges) == (8, 4, 6)
    assert close(m.diameter, 13.0)
    assert close(m.average_path_length, 59 / 9)
    assert close(m.average_hops, 4 / 3)
    assert close(m.clustering, HAND_C)
    assert close(m.small_world_hops, 7 / 4) and close(HAND_S_HOPS, 7 / 4)
    assert close(m.small_world_weighted, 21 / 59) and close(HAND_S_WEIGHTED, 21 / 59)
    # networkx's own algorithms agree with the hand table
    nx_distances = {(a, b): d for a, row in nx.all_pairs_dijkstra_path_length(graph) for b, d in row.items() if a != b}
    assert_close(nx_distances, HAND_DISTANCES)
    nx_hops = {(a, b): d for a, row in nx.all_pairs_shortest_path_length(graph) for b, d in row.items() if a != b}
    assert nx_hops == HAND_HOPS
    undirected = nx.Graph(graph.to_undirected())
    local = nx.clustering(undirected)
    assert close(float(np.mean([local[n] for n, d in undirected.degree() if d >= 2])), m.clustering)
    assert close(nx.average_clustering(undirected), 7 / 12)  # not what the paper means


@pytest.mark.parametrize(
    "labels, has_cycle, count, count_max",
    [
        ([0, 0, 0], False, 0, 0),  # staying is not revisiting
        ([0, 0, 1, 2], False, 0, 0),
        ([0, 1, 0], True, 1, 1),  # gap of 2 steps
        ([0, 1, 2, 1, 0, 1, 0], True, 2, 2),  # B first revisited (step 3): visits 3 -> 2; A 3 -> 2
        ([0, 1, 1, 0, 2, 1, 3, 1], True, 1, 2),  # A first revisited, B has 3 visits
        ([], False, 0, 0),
    ],
)
def test_cycle_rules(labels, has_cycle, count, count_max):
    m = graph_metrics(labels, build_graph(labels, torch.zeros(len(labels), 2)))
    assert (m.has_cycle, m.cycle_count, m.cycle_count_max) == (has_cycle, count, count_max)


def test_small_world_is_zero_when_undefined():
    # a path A>B: N=2, k=1, ln k = 0
    m = graph_metrics([0, 1], build_graph([0, 1], torch.tensor([[0.0], [1.0]])))
    assert (m.small_world_hops, m.small_world_weighted, m.clustering) == (0.0, 0.0, 0.0)
    assert (m.diameter, m.average_path_length, m.average_hops) == (1.0, 1.0, 1.0)
    single = graph_metrics([4], build_graph([4], torch.zeros(1, 3)))
    assert (single.n_nodes, single.diameter, single.small_world_hops) == (1, 0.0, 0.0)


def test_cycle_detection_ratio_and_analyse():
    generator = torch.Generator().manual_seed(1)
    corners = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    # sample 0 goes 0,1,0 (a cycle); sample 1 goes 1,2 (none); small noise keeps clusters obvious
    samples = [corners[[0, 1, 0]], corners[[1, 2]]]
    samples = [s + 0.01 * torch.randn(s.shape, generator=generator) for s in samples]
    found = analyse(samples, n_clusters=3, n_init=3)
    assert [m.has_cycle for m in found.metrics] == [True, False]
    assert found.cycle_detection_ratio == 0.5 == cycle_detection_ratio(found.metrics)
    assert found.labels[0][0] == found.labels[0][2] != found.labels[0][1]
    assert found.centers.shape == (3, 2) and len(found.graphs) == 2
    torch_found = analyse(samples, n_clusters=3, n_init=3, kmeans="torch")
    assert [m.has_cycle for m in torch_found.metrics] == [True, False]
    assert close(torch_found.inertia, found.inertia, rtol=1e-3)  # K-means restarts: another local optimum
    assert cycle_detection_ratio([]) == 0.0


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="n_clusters=5 is more than the 3 step vectors"):
        analyse([torch.randn(3, 4)], n_clusters=5)
    with pytest.raises(ValueError, match="one label per step"):
        build_graph([0, 1], torch.zeros(3, 2))
    with pytest.raises(ValueError, match="kmeans"):
        analyse([torch.zeros(2, 2)], 1, kmeans="faiss")


def test_min_steps_leaves_short_samples_out_of_the_ratio(tmp_path):
    def metrics_of(labels):
        return graph_metrics(labels, build_graph(labels, torch.zeros(len(labels), 2)))

    # 0 steps, 1 step, 3 steps with a cycle, 4 steps without one
    samples = [metrics_of([]), metrics_of([0]), metrics_of([0, 1, 0]), metrics_of([0, 1, 2, 3])]
    assert cycle_detection_ratio(samples) == cycle_detection_ratio(samples, 0) == 1 / 4  # the default: all
    assert cycle_detection_ratio(samples, min_steps=1) == 1 / 3  # the released denominator on released vectors
    assert cycle_detection_ratio(samples, min_steps=2) == 1 / 2  # ... and on streaming ones
    assert cycle_detection_ratio(samples, min_steps=4) == 0.0 and cycle_detection_ratio(samples, min_steps=5) == 0.0
    steps = [torch.zeros(0, 2), torch.tensor([[0.0, 0.0], [9.0, 0.0], [0.1, 0.0]]), torch.tensor([[9.0, 0.1]])]
    default, released = analyse(steps, n_clusters=2, n_init=2), analyse(steps, n_clusters=2, n_init=2, min_steps=1)
    assert [m.has_cycle for m in default.metrics] == [False, True, False]
    assert (default.cycle_detection_ratio, default.min_steps) == (1 / 3, 0)
    assert (released.cycle_detection_ratio, released.min_steps) == (1 / 2, 1)
    assert len(released.metrics) == len(released.graphs) == 3  # still measured, only not counted
    loaded = type(released).load(released.save(tmp_path / "found.safetensors"))
    assert (loaded.min_steps, loaded.cycle_detection_ratio) == (1, 1 / 2)
    for bad in (-1, True, 1.5):
        with pytest.raises((ValueError, TypeError)):  # jaxtyping's TypeError under pytest, ours otherwise
            cycle_detection_ratio(samples, min_steps=bad)
    with pytest.raises(ValueError, match="min_steps must be an int >= 0"):
        analyse(steps, n_clusters=2, min_steps=-1)
