"""What every data module shares: splits held as "sources", the cheap train-time augmentation,
normalisation, validation of the configured shape of the data, and the loaders.

A *source* is a Dataset of ``(image01 float [C, H, W] in [0, 1], label int)`` without augmentation; it is what
``vis_dataset`` returns, and the train/val/test/push loaders are views of the same sources, so an index from
``push_dataloader`` points into ``vis_dataset("train")``.

A subclass implements ``_load()`` (build the sources and class names; raise DataError on bad data) and, where the
data has to be fetched or generated first, ``prepare_data()``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from datamodules.errors import DataError

SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class TensorImages(Dataset):
    """A split held in memory as uint8 [N, C, H, W]: decoding never happens per step."""

    def __init__(self, images: torch.Tensor, labels):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"expected uint8 images [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        self.images = images
        self.labels = torch.as_tensor(labels, dtype=torch.long)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i].float().div_(255.0), int(self.labels[i])


def read_image(path, channels: int = 3, box=None, size=None, hint: str = "") -> np.ndarray:
    """Decode one image file to uint8 [H, W, C]; optional crop box (x0, y0, x1, y1), resize to size (int or (h, w)).

    Any decoding failure becomes a DataError naming the file, so a corrupt download is never a bare PIL trace.
    """
    try:
        with Image.open(path) as im:
            im = im.convert("L" if channels == 1 else "RGB")
            if box is not None:
                x0, y0, x1, y1 = box
                # Clip to the image: PIL pads out-of-range crops with black, which would leak into the crop.
                x0, y0 = max(0, int(round(x0))), max(0, int(round(y0)))
                x1, y1 = min(im.width, int(round(x1))), min(im.height, int(round(y1)))
                if x1 > x0 and y1 > y0:
                    im = im.crop((x0, y0, x1, y1))
            if size is not None:
                h, w = (size, size) if isinstance(size, int) else size
                if im.size != (w, h):
                    im = im.resize((w, h), Image.BILINEAR)
            arr = np.array(im, dtype=np.uint8)  # a writable copy: torch.from_numpy warns on read-only arrays
    except (OSError, ValueError, SyntaxError) as e:  # PIL.UnidentifiedImageError is an OSError
        raise DataError(f"cannot read image {path}: {e}. {hint}".strip()) from e
    return arr[:, :, None] if arr.ndim == 2 else arr


class FileImages(Dataset):
    """A split read from image files on demand (CUB, image folders): convert, crop, resize to size x size."""

    def __init__(self, paths, labels, image_size: int, channels: int = 3, boxes=None, hint: str = ""):
        self.paths = [Path(p) for p in paths]
        self.labels = [int(y) for y in labels]
        self.image_size, self.channels, self.boxes, self.hint = image_size, channels, boxes, hint

    def __len__(self):
        return len(self.paths)

    def verify(self, split: str) -> None:
        """Check every file's header and structure once (PIL's verify, no full decode: ~0.3 ms a file), so that a
        corrupt or non-image file is reported before training, not when the test split is read after it."""
        for path in self.paths:
            try:
                with Image.open(path) as im:
                    im.verify()
            except (OSError, ValueError, SyntaxError) as e:
                raise DataError(f"cannot read image {path} ({split} split): {e}. {self.hint}".strip()) from e

    def __getitem__(self, i):
        box = None if self.boxes is None else self.boxes[i]
        arr = read_image(self.paths[i], self.channels, box, self.image_size, self.hint)
        return torch.from_numpy(arr).permute(2, 0, 1).float().div_(255.0), self.labels[i]


def random_shift(x: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Translate [C, H, W] by up to max_shift px in each direction, zero fill: pad + random crop without the pad."""
    dy, dx = torch.randint(-max_shift, max_shift + 1, (2,)).tolist()
    if dy == 0 and dx == 0:
        return x
    h, w = x.shape[-2:]
    out = torch.zeros_like(x)
    out[..., max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        x[..., max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


class ImageSplit(Dataset):
    """A source as the model sees it: (normalised image, label[, index]), with optional flip/shift augmentation."""

    def __init__(self, source: Dataset, mean, std, hflip: bool = False, shift: int = 0, with_index: bool = False):
        self.source = source
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.hflip, self.shift, self.with_index = hflip, shift, with_index

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        x, y = self.source[i]
        if self.hflip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        if self.shift:
            x = random_shift(x, self.shift)
        x = (x - self.mean) / self.std
        return (x, y, i) if self.with_index else (x, y)


def stratified_split(labels, fraction: float, seed: int):
    """Deterministic per-class split: returns (kept indices, carved-out indices), both sorted."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    carved = [rng.permutation(np.flatnonzero(labels == c))[: int(round(fraction * np.sum(labels == c)))]
              for c in np.unique(labels)]
    carved = np.sort(np.concatenate(carved)) if carved else np.zeros(0, dtype=np.int64)
    kept = np.setdiff1d(np.arange(len(labels)), carved)
    return kept, carved


def _fit_stats(values, channels: int, option: str):
    values = tuple(float(v) for v in values)
    if len(values) == channels:
        return values
    if len(values) == 1:
        return values * channels
    if channels == 1:  # e.g. ImageNet statistics for a grey-scale conversion
        return (sum(values) / len(values),)
    raise DataError(f"datamodule.{option} has {len(values)} values but the images have {channels} channels; "
                    f"give {channels} values or 1")


class BaseDataModule(pl.LightningDataModule):
    """Shared constructor, validation and loaders; see the module docstring."""

    # Per data set: the shape of its data (None = known only after reading it) and its normalisation.
    default_num_classes: int | None = None
    default_channels: int | None = 3
    default_image_size: int | None = None
    default_mean: tuple = (0.5,)
    default_std: tuple = (0.5,)

    def __init__(self, data_dir, batch_size: int = 128, num_workers: int = 0, image_size: int | None = None,
                 channels: int | None = None, num_classes: int | None = None, normalize: bool = True,
                 augment: bool = True, shift: int = 0, hflip: bool = False, seed: int = 0,
                 pin_memory: bool = False, mean=None, std=None):
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.data_dir = Path(data_dir).expanduser()
        for folder in (self.data_dir, *self.data_dir.parents):
            if folder.exists():
                if not folder.is_dir():  # else mkdir would report only "File exists" much later
                    raise DataError(f"datamodule.data_dir={data_dir}: {folder} is a file, not a folder; move it away "
                                    f"or point datamodule.data_dir (paths.data_dir, INTERP_DATA_DIR) at a folder")
                break
        self.batch_size, self.num_workers, self.pin_memory = int(batch_size), int(num_workers), bool(pin_memory)
        self.augment, self.shift, self.hflip, self.seed = bool(augment), int(shift), bool(hflip), int(seed)
        # What the config asked for; checked against the data in setup().
        self._requested = {"num_classes": num_classes, "channels": channels, "image_size": image_size}
        self.num_classes = num_classes if num_classes is not None else self.default_num_classes
        self.channels = channels if channels is not None else self.default_channels
        self.image_size = image_size if image_size is not None else self.default_image_size
        self.class_names: list[str] = []
        self._stats_args = (normalize, mean, std)
        self._set_stats(self.channels or 1)
        self._sources: dict[str, Dataset] | None = None

    def _set_stats(self, channels: int):
        normalize, mean, std = self._stats_args
        if normalize:
            self.mean = _fit_stats(mean if mean is not None else self.default_mean, channels, "mean")
            self.std = _fit_stats(std if std is not None else self.default_std, channels, "std")
        else:  # identity normalisation keeps one code path
            self.mean, self.std = (0.0,) * channels, (1.0,) * channels

    # ----- for subclasses -------------------------------------------------------------------------------------
    def _load(self) -> tuple[dict[str, Dataset], list[str]]:
        """Return ({"train"|"val"|"test": source}, class_names); raise DataError on bad data."""
        raise NotImplementedError

    def _where(self) -> str:
        """Where the data lives, for error messages."""
        return str(self.data_dir)

    # ----- Lightning hooks ------------------------------------------------------------------------------------
    def prepare_data(self):
        pass

    def setup(self, stage: str | None = None):
        if self._sources is not None:
            return
        sources, class_names = self._load()
        verified: set[int] = set()
        for split in SPLITS:  # files read on demand: a bad one is found now, not after training
            source = sources.get(split)
            if isinstance(source, FileImages) and id(source) not in verified:
                source.verify(split)
                verified.add(id(source))
        self._check_config("num_classes", len(class_names))
        for split in SPLITS:
            if split not in sources or len(sources[split]) == 0:
                raise DataError(f"the {split} split of {self._where()} is empty; check the data folder "
                                f"(and split options such as val_fraction, test_fraction)")
        c, h, w = sources["train"][0][0].shape
        size = h if h == w else (h, w)
        self._check_config("channels", c)
        self._check_config("image_size", size)
        self.num_classes, self.channels, self.image_size = len(class_names), c, size
        if len(self.mean) != c:
            self._set_stats(c)
        self.class_names = list(class_names)
        self._sources = sources

    def _check_config(self, key: str, value):
        asked = self._requested[key]
        if asked is not None and asked != value:
            raise DataError(f"datamodule.{key}={asked} but the data in {self._where()} has {key}={value}; "
                            f"set datamodule.{key}={value} (the models read ${{datamodule.{key}}})")

    def _source(self, split: str) -> Dataset:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if self._sources is None:
            self.setup()
        return self._sources[split]

    def _loader(self, dataset: Dataset, shuffle: bool, batch_size: int | None = None, drop_last: bool = False,
                generator: torch.Generator | None = None):
        # Every loader draws from a generator of its own, never from torch's global one: a DataLoader draws a seed
        # from its generator each time it is iterated, even unshuffled, so loaders iterated at epoch boundaries (the
        # ProtoPNet push, interpretation probes) would otherwise shift the training shuffle and augmentations
        return DataLoader(dataset, batch_size=batch_size or self.batch_size, shuffle=shuffle,
                          num_workers=self.num_workers, pin_memory=self.pin_memory,
                          persistent_workers=self.num_workers > 0, drop_last=drop_last,
                          generator=generator if generator is not None else torch.Generator())

    @property
    def train_generator(self) -> torch.Generator:
        """The training shuffle's generator: seeded once from the (seed_everything-seeded) global generator, so the
        run's `seed` decides the order; its state travels in every checkpoint (state_dict below), so a resumed run
        draws the same order for its next epoch as the uninterrupted run would."""
        if getattr(self, "_train_generator", None) is None:
            self._train_generator = torch.Generator()
            if getattr(self, "_train_generator_state", None) is not None:  # resumed: no draw from the global one
                self._train_generator.set_state(self._train_generator_state)
            else:
                self._train_generator.manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
        return self._train_generator

    def state_dict(self) -> dict:
        return {"train_generator": self.train_generator.get_state()}

    def load_state_dict(self, state_dict: dict) -> None:
        state = state_dict.get("train_generator")
        if state is not None:
            self._train_generator_state = state
            if getattr(self, "_train_generator", None) is not None:
                self._train_generator.set_state(state)

    def train_dataloader(self):
        source = self._source("train")
        split = ImageSplit(source, self.mean, self.std, hflip=self.augment and self.hflip,
                           shift=self.shift if self.augment else 0)
        # Dropping a ragged last batch keeps BatchNorm from ever seeing a batch of one.
        return self._loader(split, shuffle=True, drop_last=len(split) > self.batch_size,
                            generator=self.train_generator)

    def val_dataloader(self):
        return self._loader(ImageSplit(self._source("val"), self.mean, self.std), shuffle=False)

    def test_dataloader(self):
        return self._loader(ImageSplit(self._source("test"), self.mean, self.std), shuffle=False)

    # ----- for interpretation callbacks -----------------------------------------------------------------------
    def normalize(self, x01: torch.Tensor) -> torch.Tensor:
        mean = torch.as_tensor(self.mean, dtype=x01.dtype, device=x01.device).view(-1, 1, 1)
        std = torch.as_tensor(self.std, dtype=x01.dtype, device=x01.device).view(-1, 1, 1)
        return (x01 - mean) / std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.as_tensor(self.mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        std = torch.as_tensor(self.std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        return x * std + mean

    def vis_dataset(self, split: str = "val") -> Dataset:
        """(image01 float [C, H, W] unnormalised, label) without augmentation, for figures."""
        return self._source(split)

    def push_dataloader(self, batch_size: int | None = None) -> DataLoader:
        """Train images, no augmentation, in order: (normalised images, labels, index into vis_dataset("train"))."""
        split = ImageSplit(self._source("train"), self.mean, self.std, with_index=True)
        return self._loader(split, shuffle=False, batch_size=batch_size)

    def probe_dataset(self, split: str = "val"):
        """Concept-annotated probe set (see datamodules.broden); None for data without concept annotations."""
        return None
