"""SimpleCIL: a frozen backbone, class-mean prototypes of the un-augmented training images, a
cosine classifier; nothing trained. Checked against a direct computation on the toy benchmark
(its training transform flips images, so an augmented pass would give other means)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from helpers import ToyImages

from clbench.protocol import Run
from clbench.recipes import resolve_config


def test_prototypes_are_the_class_means_and_predictions_the_nearest_by_cosine(tmp_path):
    cfg = resolve_config("toy", 3, "simplecil", 0, device="cpu")
    run = Run(cfg, tmp_path, progress=False)
    result = run.execute()
    method = run.method
    assert not any(p.requires_grad for p in method.parameters())

    train = ToyImages(8, 0)  # the toy loader's training images, without its flip
    order = result.class_order  # harness label h is original class order[h]
    with torch.no_grad():
        backbone = method.backbone.eval()
        direct = torch.stack([backbone(train.images[torch.from_numpy(train.targets == c)]).mean(0) for c in order])
    torch.testing.assert_close(method.prototypes, direct, rtol=1e-5, atol=1e-6)

    test = ToyImages(4, 1)
    with torch.no_grad():
        feats = backbone(test.images)
    cosine = F.normalize(feats, dim=1) @ F.normalize(direct, dim=1).T
    label = {c: h for h, c in enumerate(order)}
    expected = (cosine.argmax(1).numpy() == np.array([label[c] for c in test.targets])).mean() * 100
    assert abs(result.metrics["acc"] - expected) < 1e-9
    torch.testing.assert_close(method.predict(test.images), cosine, rtol=1e-5, atol=1e-6)

    feature_dim = method.feature_dim
    assert [t.cost["trainable_params"] for t in result.tasks] == [0, 0, 0]
    assert [t.cost["stored_params"] for t in result.tasks] == [0, 0, 0]
    assert [t.cost["stored_features"] for t in result.tasks] == [4 * feature_dim, 8 * feature_dim, 12 * feature_dim]
