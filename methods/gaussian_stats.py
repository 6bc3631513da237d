"""Per-class feature statistics kept as diagonal Gaussians, and heads re-trained on samples of them.

HiDe-Prompt's ``ca_storage_efficient_method='multi-centroid'`` (thu-ml/HiDe-Prompt,
``engines/hide_*_engine.py``: ``_compute_mean`` and ``train_task_adaptive_prediction``):

* after a task, the features of each of its classes are clustered by k-means into
  ``num_centroids`` clusters; each cluster is kept as its mean and diagonal variance;
* later, a head is re-trained on features drawn from N(mean, diag(var) + floor * I) of every
  stored cluster of every class seen so far, with SGD and a cosine schedule, instead of
  on stored images. That is why SD-LoRA's Table 5 does not count HiDe-Prompt as
  rehearsal-free: the statistics are stored data.

The statistics are buffers, so they travel in ``state_dict``; ``grow`` adds empty rows for a
task's classes (what a resumed run rebuilds before ``load_state_dict``).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.cluster import KMeans

from clbench.config import TrainConfig
from clbench.methods.base import build_optimizer


class ClassGaussians(nn.Module):
    """``num_centroids`` k-means clusters per class, each as (mean, diagonal variance, size).

    Buffers, for ``C`` classes grown so far, ``K`` centroids and feature size ``D``:
    ``mean`` and ``var`` are ``[C, K, D]``, ``count`` is ``[C, K]`` (samples in the cluster;
    0 marks an unused slot: a class with fewer than ``2K`` samples gets fewer clusters).
    """

    def __init__(self, dim: int, num_centroids: int):
        super().__init__()
        if num_centroids < 1:
            raise ValueError(f"num_centroids must be at least 1, got {num_centroids}")
        self.dim = dim
        self.num_centroids = num_centroids
        self.register_buffer("mean", torch.zeros(0, num_centroids, dim))
        self.register_buffer("var", torch.zeros(0, num_centroids, dim))
        self.register_buffer("count", torch.zeros(0, num_centroids, dtype=torch.long))

    @property
    def num_classes(self) -> int:
        return self.mean.shape[0]

    def grow(self, num_new: int) -> None:
        """Empty rows for ``num_new`` more classes (filled by ``fit``)."""
        k, d = self.num_centroids, self.dim
        self.mean = torch.cat([self.mean, self.mean.new_zeros(num_new, k, d)])
        self.var = torch.cat([self.var, self.var.new_zeros(num_new, k, d)])
        self.count = torch.cat([self.count, self.count.new_zeros(num_new, k)])

    def fitted(self) -> torch.Tensor:
        """``[C]`` bool: which classes hold statistics."""
        return self.count.sum(1) > 0

    @torch.no_grad()
    def fit(self, features: torch.Tensor, labels: torch.Tensor, classes: range, seed: int,
            n_init: int = 10) -> None:
        """Cluster the features of each class in ``classes`` and store its clusters.

        ``features`` ``[N, D]`` and ``labels`` ``[N]`` hold (at least) every sample of those
        classes. k-means runs in float64 on the CPU (scikit-learn), seeded by ``seed`` + class.
        """
        if classes.stop > self.num_classes:
            raise ValueError(f"statistics hold {self.num_classes} classes; grow() them before fitting "
                             f"classes up to {classes.stop - 1}")
        feats = features.detach().double().cpu().numpy()
        labels = labels.detach().cpu().numpy()
        for c in classes:
            x = feats[labels == c]
            if len(x) == 0:
                raise ValueError(f"no samples of class {c} to compute its statistics from")
            # As official whenever a class has at least 2K samples; below that (where the official
            # KMeans fails or makes singletons, which sampling skips) clusters average two samples.
            k = min(self.num_centroids, max(1, len(x) // 2))
            assignment = KMeans(n_clusters=k, n_init=n_init, random_state=seed + c).fit(x).labels_
            mean = np.zeros((self.num_centroids, self.dim))
            var = np.zeros((self.num_centroids, self.dim))
            count = np.zeros(self.num_centroids, dtype=np.int64)
            for j in range(k):
                members = x[assignment == j]
                mean[j], var[j], count[j] = members.mean(0), members.var(0), len(members)
            self.mean[c] = torch.from_numpy(mean).to(self.mean)
            self.var[c] = torch.from_numpy(var).to(self.var)
            self.count[c] = torch.from_numpy(count).to(self.count)

    def centroids(self, num_classes: int) -> torch.Tensor:
        """``[M, D]``: the means of every used cluster of the first ``num_classes`` classes."""
        return self.mean[:num_classes][self.count[:num_classes] > 0]

    @torch.no_grad()
    def sample(self, num_classes: int, per_centroid: int, total: int,
               variance_floor: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
        """``total`` features (and their class labels) drawn from the classes ``[0, num_classes)``.

        The official code draws ``per_centroid`` samples from every cluster, shuffles that pool
        and uses its first batches; drawing which clusters to sample from as a random subset of
        that pool gives the same distribution without materialising the whole pool. Clusters
        with zero variance (singletons, unused slots) are skipped, as the official
        ``if var.mean() == 0: continue``.
        """
        usable = self.var[:num_classes].mean(-1) > 0
        cls_idx, cen_idx = usable.nonzero(as_tuple=True)
        if len(cls_idx) == 0:
            raise ValueError("no cluster with a non-zero variance to sample from; were the statistics fitted?")
        pool = len(cls_idx) * per_centroid
        pick = torch.randperm(pool, device=self.mean.device)[: min(total, pool)] // per_centroid
        c, k = cls_idx[pick], cen_idx[pick]
        std = (self.var[c, k] + variance_floor).sqrt()
        x = self.mean[c, k] + std * torch.randn_like(std)
        return x.float(), c

    def numel(self) -> int:
        """Numbers stored (means, variances and cluster sizes): the cost report's stored features."""
        return self.mean.numel() + self.var.numel() + self.count.numel()


def retrain_on_samples(logits_of: Callable[[torch.Tensor], torch.Tensor], params: list[nn.Parameter],
                       stats: ClassGaussians, num_seen: int, epochs: int, iterations: int,
                       batch_size: int, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                       variance_floor: float = 1e-4) -> list[float]:
    """Re-train ``params`` on Gaussian samples of the seen classes; returns the mean loss per epoch.

    HiDe's recipe, as in both of its engines: SGD (momentum 0.9) with a cosine schedule over
    ``epochs``; each epoch draws ``batch_size`` samples per stored cluster and makes
    ``iterations`` steps of ``batch_size`` samples (the official ``crct_num``: the number of
    classes of the previous tasks); cross-entropy over the ``num_seen`` classes.
    """
    recipe = TrainConfig(optimizer="sgd", lr=lr, momentum=momentum, weight_decay=weight_decay,
                         schedule="cosine", min_lr=0.0)
    optimizer, scheduler = build_optimizer([{"params": params}], recipe, epochs)
    losses = []
    for _ in range(epochs):
        x, y = stats.sample(num_seen, batch_size, iterations * batch_size, variance_floor)
        total = torch.zeros((), device=x.device)
        steps = 0
        for start in range(0, len(x), batch_size):
            logits = logits_of(x[start:start + batch_size])[:, :num_seen]
            loss = F.cross_entropy(logits, y[start:start + batch_size])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach()
            steps += 1
        scheduler.step()
        losses.append(total.item() / max(steps, 1))
    return losses
