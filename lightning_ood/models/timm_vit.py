"""The paper's ViT-B/16 (Table V): timm's ``vit_base_patch16_224``, pre-trained on ImageNet-21k and fine-tuned on
ImageNet-1k, behind the backbone contract (an optional dependency: ``pip install 'lightning-ood[timm]'``).

- features: the 768-d class token after the encoder's final LayerNorm (timm's ``forward_head(..., pre_logits=True)``,
  what its head reads); head: timm's ``head`` Linear. State-dict keys are timm's behind ``net.`` plus ``head.*``.
- ``weights``: a pretrained tag of ``vit_base_patch16_224`` (``augreg2_in21k_ft_in1k``, timm's default and the
  ``DEFAULT`` here; ``augreg_in21k_ft_in1k``, the original AugReg fine-tune), read from the Hugging Face cache and
  downloaded when online, or the path of a local ``model.safetensors`` / ``.pth`` with timm's keys or this backbone's.
- Normalisation: mean = std = (0.5, 0.5, 0.5), as timm's configuration of these weights; its evaluation resizes the
  shorter side to 248 (crop 0.9) with bicubic interpolation and centre-crops 224 (``configs/imagenet_vit_b_16.yaml``).
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

from lightning_ood.checkpoints import load_state_dict
from lightning_ood.errors import CheckpointError, ConfigError
from lightning_ood.models.base import Backbone
from lightning_ood.models.formats import load_checked
from lightning_ood.normalization import Normalization

ARCH = "vit_base_patch16_224"
TAGS = ("augreg2_in21k_ft_in1k", "augreg_in21k_ft_in1k")
WEIGHTS_FILE = "model.safetensors"
TIMM_NORMALIZATION = Normalization((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "timm's configuration of vit_base_patch16_224")


def require_timm():
    try:
        import timm
    except ImportError as err:
        raise ConfigError(
            f"The {ARCH} backbone needs timm: pip install 'lightning-ood[timm]' (make install installs it)."
        ) from err
    return timm


def hub_repo(tag: str) -> str:
    return f"timm/{ARCH}.{tag}"


def cached_weights(tag: str) -> Path:
    """The ``model.safetensors`` of ``tag`` from the Hugging Face cache, downloaded when missing and online."""
    import huggingface_hub
    from huggingface_hub.constants import HF_HUB_CACHE

    repo = hub_repo(tag)
    cached = huggingface_hub.try_to_load_from_cache(repo, WEIGHTS_FILE)
    if isinstance(cached, str):
        return Path(cached)
    try:
        return Path(huggingface_hub.hf_hub_download(repo, WEIGHTS_FILE))
    except Exception as err:  # offline (LocalEntryNotFoundError, connection errors), a read-only cache
        raise CheckpointError(
            f"Cannot load the {ARCH}.{tag} weights: {WEIGHTS_FILE} of https://huggingface.co/{repo} is not in the "
            f"Hugging Face cache {HF_HUB_CACHE} and downloading it failed ({type(err).__name__}). Without network "
            f"access, download that file elsewhere, place it on this machine and pass --model.weights "
            f"<path to {WEIGHTS_FILE}>."
        ) from err


def read_weights_file(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise CheckpointError(
            f"Weights file {path} does not exist. For {ARCH}, model.weights takes a pretrained tag "
            f"({', '.join(TAGS)}, DEFAULT) or the path of a local {WEIGHTS_FILE} / .pth state dict."
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file as load_safetensors

        try:
            return load_safetensors(str(path))
        except Exception as err:  # truncated or not a safetensors file
            raise CheckpointError(f"Weights file {path} cannot be read as safetensors ({err}).") from err
    return load_state_dict(path)


class TimmViTB16(Backbone):
    """timm's ViT-B/16 at 224 px, split into ``net`` (features) and ``head``.

    Args:
        num_classes: output classes of the head; the pretrained weights need the 1000 ImageNet-1k classes.
        weights: ``None`` (random initialisation), a pretrained tag (``DEFAULT`` = ``augreg2_in21k_ft_in1k``,
            ``augreg_in21k_ft_in1k``), or the path of a local state dict.
    """

    image_size = 224

    def __init__(self, num_classes: int = 1000, weights: str | None = None) -> None:
        super().__init__()
        timm = require_timm()
        net = timm.create_model(ARCH, pretrained=False, num_classes=num_classes)
        self.weights_normalization: Normalization | None = None
        if weights is not None:
            path = Path(weights).expanduser()
            tag = TAGS[0] if weights.upper() == "DEFAULT" else weights
            if tag in TAGS and not path.exists():
                if num_classes != 1000:
                    raise ConfigError(
                        f"The {ARCH}.{tag} weights classify the 1000 ImageNet-1k classes but the model is built for "
                        f"{num_classes} classes; use them on ImageNet-1k."
                    )
                path, source = cached_weights(tag), f"{ARCH}.{tag}"
            else:
                source = f"Weights file {path}"
            state = read_weights_file(path)
            if state and all(k.startswith(("net.", "head.")) for k in state):  # this backbone's own keys
                state = {k.removeprefix("net."): v for k, v in state.items()}
            load_checked(net, state, "head.weight", source, f"timm's {ARCH}")
            self.weights_normalization = TIMM_NORMALIZATION
        self.head: nn.Linear = net.head
        net.reset_classifier(0)  # net(x) now returns the pre-logits class token
        self.net = net
        self.feature_dim = self.head.in_features

    def features(self, x: Tensor) -> Tensor:  # (N, 3, 224, 224) -> (N, 768)
        self.check_image_size(x, self.image_size, ARCH, f"set --data.image_size {self.image_size}")
        return self.net(x)

    def blocks(self) -> dict[str, nn.Module]:
        return {f"blocks.{i}": block for i, block in enumerate(self.net.blocks)}


def vit_base_patch16_224(num_classes: int = 1000, weights: str | None = None) -> TimmViTB16:
    """timm ViT-B/16 (ImageNet-21k pre-trained, ImageNet-1k fine-tuned weights): 768-d features."""
    return TimmViTB16(num_classes, weights)


__all__ = ["TimmViTB16", "vit_base_patch16_224"]
