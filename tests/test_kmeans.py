"""K-means over pooled steps: the torch twin against scikit-learn; clear errors."""

import pytest
import torch
from tolerance import close

from probes.kmeans import fit_clusters, kmeans_torch


def sklearn_inertia(X, k, seed, n_init):
    from sklearn.cluster import KMeans

    return KMeans(n_clusters=k, init="k-means++", n_init=n_init, random_state=seed).fit(X.numpy()).inertia_


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("data", ["blobs", "random"])
def test_kmeans_torch_inertia_within_one_percent_of_sklearn(data, seed):
    from sklearn.datasets import make_blobs

    if data == "blobs":
        X, _ = make_blobs(n_samples=600, centers=12, n_features=16, random_state=seed)
        X, k = torch.tensor(X, dtype=torch.float32), 12
    else:
        # Unstructured data has many near-equal local minima: on 500 x 8 Gaussians with K=10,
        # scikit-learn against itself at other seeds is up to 1.7% apart, so 1% tests the seed,
        # not the code. Here its own spread is < 0.3%.
        X, k = torch.randn(2000, 16, generator=torch.Generator().manual_seed(seed)), 5
    labels, centers, inertia = kmeans_torch(X, k, seed=seed, n_init=10)
    reference = sklearn_inertia(X, k, seed, 10)
    assert abs(inertia / reference - 1) < 0.01
    assert labels.shape == (len(X),) and centers.shape == (k, X.shape[1])
    assert close(inertia, float(((X - centers[labels]) ** 2).sum()), precision=torch.float32)
    assert len(torch.unique(labels)) == k


def test_kmeans_torch_handles_duplicate_points_and_k_equal_n():
    X = torch.tensor([[0.0, 0.0]] * 5 + [[1.0, 1.0]] * 5)
    labels, _, inertia = kmeans_torch(X, 2, n_init=2)
    assert close(inertia, 0.0, precision=X.dtype, scale=float((X**2).sum())) and len(set(labels.tolist())) == 2
    _, _, inertia = kmeans_torch(torch.randn(6, 3), 6, n_init=1)
    assert close(inertia, 0.0, precision=X.dtype, scale=float((X**2).sum()))


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="n_clusters=5 is more than the 3 step vectors"):
        fit_clusters([torch.zeros(2, 4), torch.zeros(1, 4)], 5)
    with pytest.raises(ValueError, match="one width"):
        fit_clusters([torch.zeros(2, 4), torch.zeros(2, 3)], 1)
    with pytest.raises(TypeError):  # our message outside pytest, jaxtyping's under it
        fit_clusters(torch.zeros(2, 4), 1)


def test_kmeans_torch_assigns_with_the_triton_kernel_as_with_torch(monkeypatch):
    # The Lloyd loop's assignment is surgery.kernels.nearest_centroid: forced onto the Triton
    # kernel (the interpreter without a GPU), K-means on well-separated blobs ends where torch does.
    pytest.importorskip("triton")
    from sklearn.datasets import make_blobs

    X, _ = make_blobs(n_samples=300, centers=4, n_features=8, random_state=0)
    X = torch.tensor(X, dtype=torch.float32)
    monkeypatch.setenv("SURGERY_KERNELS", "torch")
    labels, centers, inertia = kmeans_torch(X, 4, n_init=2)
    monkeypatch.setenv("SURGERY_KERNELS", "triton")
    labels_triton, centers_triton, inertia_triton = kmeans_torch(X, 4, n_init=2)
    assert torch.equal(labels_triton, labels)
    assert close(inertia_triton, inertia, precision=torch.float32)
