"""ORA (Demirel, Fumero & Locatello, NeurIPS 2025): the largest angle, seen from the ID centre, between a feature and
its projection onto a decision boundary of the predicted class.

berkerdemirel/ORA-OOD-Detection-with-Relative-Angles ``util/ood_methods.py`` ``ora_score`` (lines 156-216) loops over
the classes and builds each projected feature. The angle needs only inner products, so ours computes all classes at
once from the logits and the head's Gram matrix, with no (N, C, L) tensor: with ``u = h - centre``, ``d_c = w_pred -
w_c`` and ``t_c = (f_pred - f_c) / ||d_c||^2``, the projection is ``h - t_c d_c`` and

    cos angle_c = (||u||^2 - t_c <u, d_c>) / (||u|| ||u - t_c d_c||),
    <u, d_c> = (f_pred - b_pred - <w_pred, centre>) - (f_c - b_c - <w_c, centre>),
    ||u - t_c d_c||^2 = ||u||^2 - 2 t_c <u, d_c> + t_c^2 ||d_c||^2.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_ood.scoring.base import Scorer, check_reference, reference_set
from lightning_ood.statistics import FeatureStatistics


class ORA(Scorer):
    """The maximum over the classes c of the angle (divided by pi) between ``h - centre`` and ``h_c - centre``, where
    ``h_c`` is ``h`` projected onto the decision boundary between the predicted class and c; higher = ID. The
    predicted class itself (0 / 0), and any angle that is not a number, count as 0, as in the authors' code (line
    208). ``centre`` is the mean of the class means, unweighted by the class sizes (line 196).

    Args:
        reference: the images of the class means: ``train`` (default, the statistics' training images), ``id_val``
            (held-out ID images), or ``id_test`` (2,000 ID test images that are also scored: the authors' choice,
            ``run_cifar.py`` lines 108-111 and ``run_imagenet_unified.py`` lines 143-146 take the class means of the
            ID test features they score; test-set leakage, which the results flag). A class absent from the
            reference images is left out of the mean.
    """

    def __init__(self, reference: str = "train") -> None:
        super().__init__()
        self.reference = check_reference(reference)

    def fit_statistics(self, stats: FeatureStatistics, head: nn.Linear) -> ORA:
        super().fit_statistics(stats, head)
        if self.reference == "train":
            centre = stats.class_means.double().mean(dim=0)
        else:
            ref = reference_set(stats, self.reference)
            features, labels = ref.features.double(), ref.labels.long().to(ref.features.device)
            present = labels.unique()
            sums = features.new_zeros(head.out_features, features.shape[1]).index_add_(0, labels, features)
            counts = torch.bincount(labels, minlength=head.out_features).double()
            centre = (sums[present] / counts[present, None]).mean(dim=0)
        w = self.weight.double()
        centre = centre.to(w)
        self.centre = centre.to(self.weight.dtype)  # (L,)
        self.offset = (self.bias.double() + w @ centre).to(self.weight.dtype)  # (C,): b_c + <w_c, centre>
        self.gram = (w @ w.T).to(self.weight.dtype)  # (C, C)
        return self

    def score(self, features: Tensor, logits: Tensor) -> Tensor:
        z, gram = logits.double(), self.gram.double()
        predicted = z.argmax(dim=1)
        u = features.double() - self.centre.double()  # (N, L)
        u_sq = (u * u).sum(dim=1, keepdim=True)  # (N, 1)
        a = z - self.offset.double()  # (N, C): <w_c, u>
        along = a.gather(1, predicted[:, None]) - a  # (N, C): <u, d_c>
        d_sq = gram.diagonal()[predicted, None] + gram.diagonal()[None, :] - 2 * gram[predicted]  # (N, C): ||d_c||^2
        t = (z.gather(1, predicted[:, None]) - z) / d_sq  # (N, C); 0 / 0 at the prediction
        moved_sq = (u_sq - 2 * t * along + t * t * d_sq).clamp_min(0)
        cos = (u_sq - t * along) / (u_sq.sqrt().clamp_min(1e-12) * moved_sq.sqrt().clamp_min(1e-12))
        angle = torch.arccos(cos) / torch.pi
        angle = torch.where(angle.isnan(), 0.0, angle)
        return angle.amax(dim=1)


__all__ = ["ORA"]
