"""DataModules: CIFAR (torchvision or image folders), ImageNet-1k, the offline demo, and the shared base with
``[ID, *OOD]`` test loaders."""

from lightning_ood.data.base import DATA_ROOT_ENV, OODDataModule
from lightning_ood.data.cifar import CIFARDataModule
from lightning_ood.data.demo import DemoDataModule
from lightning_ood.data.imagenet import ImageNetDataModule
from lightning_ood.data.synthetic import SyntheticDataModule

__all__ = [
    "DATA_ROOT_ENV",
    "CIFARDataModule",
    "DemoDataModule",
    "ImageNetDataModule",
    "OODDataModule",
    "SyntheticDataModule",
]
