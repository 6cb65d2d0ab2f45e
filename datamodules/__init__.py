"""Data modules, one file per data set, all built on datamodules.base.BaseDataModule.

    shapes          generated concept set in the Broden format (default; probe_dataset with concepts + landmarks)
    digits          scikit-learn's 8x8 digits at 28x28, the offline stand-in for MNIST
    torchvision_sets  mnist, fashion_mnist, cifar10 (no download unless download=true)
    cub200          CUB-200-2011 cropped to the bird boxes (ProtoPNet)
    imagefolder     any <root>/train/<class>/<image> tree
    broden          the Broden format: writer and BrodenDataset reader (also reads the real Broden)

Every bad or missing input raises datamodules.errors.DataError, whose message names the path or config option and
the fix.
"""
from datamodules.errors import DataError

__all__ = ["DataError"]
