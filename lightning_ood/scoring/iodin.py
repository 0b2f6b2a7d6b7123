"""iODIN: ODIN with a one-value perturbation (Regmi, "Image-based Outlier Synthesis With Training Data", arXiv
2411.10794, the ASCOOD paper; OpenOOD's ``iodin`` postprocessor).

ODIN (:mod:`lightning_ood.scoring.odin`) steps every input value against the gradient of the cross-entropy of the
temperature-scaled prediction. iODIN steps only the one input value, over all channels and positions of an image,
where that gradient is largest in absolute value; everything else is ODIN's: the step is the gradient's sign (a zero
gradient counting as +1) divided by the channel's normalisation std, the score the maximum softmax at temperature T of
the perturbed image. A tie for the largest gradient picks the first value in (channel, row, column) order, as
``argmax`` over the flattened gradient does in the authors' code (sudarshanregmi/ASCOOD and OpenOOD,
``openood/postprocessors/iodin_postprocessor.py`` lines 14-23 and 35-45).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from lightning_ood.scoring.odin import ODIN


class IODIN(ODIN):
    """ODIN that perturbs only the input value with the largest absolute gradient of each image; ODIN's arguments
    and defaults, which are the authors':

    Args:
        temperature: softmax temperature T (1000, ``configs/postprocessors/iodin.yml`` line 5 in OpenOOD and ASCOOD).
        epsilon: perturbation magnitude (0.0014, the same files, line 6), in pixel units with ``scale_by_std``.
        scale_by_std: divide the step by the per-channel normalisation std (the authors do).
        base: a :class:`LogitScorer` whose modified logits replace the head's (as for ODIN).
    """

    # OpenOOD's sweep (iodin.yml lines 8-9); the authors' own (ASCOOD iodin.yml line 9) extends epsilon to 0.0098
    search_space: ClassVar[dict[str, tuple]] = {"temperature": (1, 10, 100, 1000), "epsilon": (0.0014, 0.0028)}

    def direction(self, grad: Tensor) -> Tensor:  # (N, 3, H, W) -> (N, 3, H, W): one non-zero value per image
        flat = grad.flatten(1)
        keep = torch.zeros_like(flat).scatter_(1, flat.abs().argmax(dim=1, keepdim=True), 1.0)
        return super().direction(grad) * keep.view_as(grad)


__all__ = ["IODIN"]
