"""digits, MNIST / Fashion-MNIST / CIFAR-10 (torchvision formats), CUB-200-2011, image folders, and shared pieces."""
import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.base import random_shift, stratified_split
from datamodules.cub200 import CUB200DataModule
from datamodules.digits import DigitsDataModule
from datamodules.errors import DataError
from datamodules.imagefolder import ImageFolderDataModule
from datamodules.torchvision_sets import CIFAR10DataModule, FashionMNISTDataModule, MNISTDataModule
from tests.data_fixtures import CIFAR_CLASSES, write_cifar10, write_cub, write_imagefolder, write_mnist

torch.set_num_threads(1)


def _all_images(dm, split):
    return dm.vis_dataset(split).images


# ----- digits -------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits():
    dm = DigitsDataModule()
    dm.setup()
    return dm


def test_digits_shape_values_and_stratified_split(digits):
    sizes = [len(digits.vis_dataset(s)) for s in ("train", "val", "test")]
    assert sum(sizes) == 1797 and sizes[2] == pytest.approx(0.2 * 1797, abs=10)
    x, y = digits.vis_dataset("test")[0]
    assert x.shape == (1, 28, 28) and 0 <= x.min() and x.max() <= 1 and x.max() > 0.9
    per_class = np.bincount(np.concatenate([digits.vis_dataset(s).labels.numpy() for s in ("train", "val", "test")]))
    test_counts = np.bincount(digits.vis_dataset("test").labels.numpy(), minlength=10)
    assert np.array_equal(test_counts, np.round(0.2 * per_class))  # stratified
    val_share = np.bincount(digits.vis_dataset("val").labels.numpy(), minlength=10) / per_class
    assert np.abs(val_share - 0.1).max() < 0.01
    # splits are disjoint: no test image appears in train
    train = _all_images(digits, "train").flatten(1).float()
    test = _all_images(digits, "test").flatten(1).float()
    assert torch.cdist(test, train).min(1).values.gt(0).float().mean() > 0.95
    again = DigitsDataModule()
    again.setup()
    assert torch.equal(_all_images(again, "val"), _all_images(digits, "val"))
    assert digits.num_classes == 10 and digits.channels == 1 and digits.image_size == 28
    batch, labels = next(iter(digits.train_dataloader()))
    assert batch.shape == (128, 1, 28, 28) and labels.dtype == torch.long


def test_digits_faithful_to_sklearn(digits):
    from sklearn.datasets import load_digits
    d = load_digits()
    # at image_size=8 the resize is the identity: images and labels are sklearn's, up to uint8 rounding
    x = DigitsDataModule(image_size=8)
    x.setup()
    img, label = x.vis_dataset("train")[0]
    matches = np.flatnonzero((np.abs(d.images / 16.0 - img.numpy()[0]).reshape(len(d.images), -1) < 0.003).all(1))
    assert len(matches) >= 1 and d.target[matches[0]] == label
    # at 28 px, averaging back down to 8x8 recovers the digit
    big = torch.nn.functional.adaptive_avg_pool2d(digits.vis_dataset("train").images[:50].float() / 255, 8)
    small = x.vis_dataset("train").images[:50].float() / 255
    corr = np.corrcoef(big.flatten().numpy(), small.flatten().numpy())[0, 1]
    assert corr > 0.95


def test_digits_config_mismatch(tmp_path):
    with pytest.raises(DataError, match=r"datamodule\.num_classes=12 but the data in sklearn.* has num_classes=10; "
                                        r"set datamodule\.num_classes=10"):
        DigitsDataModule(num_classes=12).setup()
    with pytest.raises(DataError, match=r"datamodule\.channels=3 .* has channels=1"):
        DigitsDataModule(channels=3).setup()


# ----- MNIST / Fashion-MNIST ----------------------------------------------------------------------------------------

def test_mnist_from_gz_idx_files(tmp_path):
    written = write_mnist(tmp_path, n_train=50, n_test=20, gz=True)
    dm = MNISTDataModule(tmp_path, val_fraction=0.2)
    dm.setup()
    assert [len(dm.vis_dataset(s)) for s in ("train", "val", "test")] == [40, 10, 20]
    test_images, test_labels = written["t10k"]
    x, y = dm.vis_dataset("test")[3]
    assert torch.equal((x * 255).round().byte()[0], torch.from_numpy(test_images[3])) and y == test_labels[3]
    assert dm.class_names[0] == "0 - zero" and dm.mean == (0.1307,)
    val = dm.vis_dataset("val").images.flatten(1)
    train = dm.vis_dataset("train").images.flatten(1)
    assert not (val[:, None] == train[None]).all(-1).any()  # disjoint


def test_fashion_mnist_from_raw_idx_files(tmp_path):
    write_mnist(tmp_path, folder="FashionMNIST", n_train=30, n_test=10)
    dm = FashionMNISTDataModule(tmp_path, val_fraction=0.0)
    dm.setup()
    assert len(dm.vis_dataset("train")) == 30 and dm.vis_dataset("val") is dm.vis_dataset("test")
    assert dm.class_names[0] == "T-shirt/top"


def test_mnist_missing_and_corrupt(tmp_path):
    with pytest.raises(DataError) as e:
        MNISTDataModule(tmp_path).setup()
    msg = str(e.value)
    assert f"{tmp_path}/MNIST/raw" in msg and "datamodule.download=true" in msg and "train-images-idx3-ubyte" in msg
    write_mnist(tmp_path, n_train=20, n_test=10)
    (tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x0c\x03rubbish")
    with pytest.raises(DataError, match=r"cannot read MNIST from .*MNIST/raw.*corrupt"):
        MNISTDataModule(tmp_path).setup()
    with pytest.raises(DataError, match=r"datamodule\.image_size=32 but .* has image_size=28"):
        write_mnist(tmp_path, n_train=100, n_test=10)
        MNISTDataModule(tmp_path, image_size=32).setup()


# ----- CIFAR-10 -----------------------------------------------------------------------------------------------------

def test_cifar10_pickles(tmp_path):
    written = write_cifar10(tmp_path, per_batch=10, n_test=20)
    with pytest.raises(DataError) as e:  # the default checks the official md5s
        CIFAR10DataModule(tmp_path).setup()
    assert "data_batch_1 does not match the md5" in str(e.value) and "verify_checksums=false" in str(e.value)
    dm = CIFAR10DataModule(tmp_path, verify_checksums=False, val_fraction=0.0)
    dm.setup()
    assert len(dm.vis_dataset("train")) == 50 and len(dm.vis_dataset("test")) == 20
    images, labels = written["data_batch_2"]
    x, y = dm.vis_dataset("train")[12]  # the third image of the second batch
    assert torch.equal((x * 255).round().byte(), torch.from_numpy(images[2]).permute(2, 0, 1)) and y == labels[2]
    assert dm.class_names == CIFAR_CLASSES and dm.channels == 3 and dm.image_size == 32
    assert dm.hflip and dm.shift == 4


def test_cifar10_missing(tmp_path):
    with pytest.raises(DataError, match=r"CIFAR-10 not found: data_batch_1.* missing in .*cifar-10-batches-py.*"
                                        r"datamodule\.download=true"):
        CIFAR10DataModule(tmp_path).setup()


# ----- CUB-200-2011 -------------------------------------------------------------------------------------------------

def test_cub_crops_to_bounding_box(tmp_path):
    info = write_cub(tmp_path)
    dm = CUB200DataModule(tmp_path, image_size=16, val_fraction=0.0, num_classes=3)
    dm.setup()
    assert len(dm.vis_dataset("train")) == 6 and len(dm.vis_dataset("test")) == 6
    assert dm.class_names == ["Bird_1", "Bird_2", "Bird_3"]
    for split in ("train", "test"):
        for x, y in dm.vis_dataset(split):
            assert x.shape == (3, 16, 16)
            # the box is red on a blue image: the crop must be all red (JPEG ringing aside)
            assert x[0].mean() > 0.9 and x[2].mean() < 0.1
    assert sorted(y for _, y in dm.vis_dataset("test")) == [0, 0, 1, 1, 2, 2]
    uncropped = CUB200DataModule(tmp_path / "CUB_200_2011", image_size=16, val_fraction=0.0, crop=False,
                                 num_classes=3)
    uncropped.setup()
    assert uncropped.vis_dataset("train")[0][0][2].mean() > 0.3  # blue background is back
    withval = CUB200DataModule(tmp_path, image_size=16, val_fraction=0.5, num_classes=3)
    withval.setup()
    assert len(withval.vis_dataset("val")) == 3 and len(withval.vis_dataset("train")) == 3
    assert len(info) == 12


def test_cub_errors(tmp_path):
    with pytest.raises(DataError, match=r"CUB-200-2011 not found: images\.txt.* missing in .*CUB_200_2011.*"
                                        r"datamodule\.download=true"):
        CUB200DataModule(tmp_path).setup()
    write_cub(tmp_path)
    with pytest.raises(DataError, match=r"datamodule\.num_classes=200 but .* has num_classes=3"):
        CUB200DataModule(tmp_path, image_size=16, num_classes=200).setup()
    (tmp_path / "CUB_200_2011" / "images" / "002.Bird_2" / "Bird_2_0000.jpg").write_bytes(b"garbage")
    dm = CUB200DataModule(tmp_path, image_size=16, num_classes=3, val_fraction=0.0)
    # found by setup(), before any training, not when the split is first read
    with pytest.raises(DataError, match=r"cannot read image .*Bird_2_0000\.jpg \(train split\).*listed in .*images\.txt"):
        dm.setup()
    with open(tmp_path / "CUB_200_2011" / "images.txt", "a") as f:
        f.write("99 001.Bird_1/extra.jpg\n")
    with pytest.raises(DataError, match=r"image_class_labels\.txt has no entry for image id\(s\) \[99\]"):
        CUB200DataModule(tmp_path, image_size=16, num_classes=3).setup()


# ----- image folders ------------------------------------------------------------------------------------------------

def test_imagefolder_carves_val_and_test(tmp_path):
    write_imagefolder(tmp_path, per_class=10)
    dm = ImageFolderDataModule(tmp_path, image_size=12, num_classes=3, val_fraction=0.2, test_fraction=0.2,
                               batch_size=4)
    dm.setup()
    sizes = [len(dm.vis_dataset(s)) for s in ("train", "val", "test")]
    assert sizes == [18, 6, 6] and dm.class_names == ["cat", "dog", "emu"]
    paths = [set(dm.vis_dataset(s).paths) for s in ("train", "val", "test")]
    assert not (paths[0] & paths[1]) and not (paths[0] & paths[2]) and not (paths[1] & paths[2])
    for x, y in dm.vis_dataset("val"):
        assert x.shape == (3, 12, 12) and torch.allclose(x, torch.full_like(x, (40 + 80 * y) / 255), atol=1e-6)
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (4, 3, 12, 12) and torch.allclose(dm.denormalize(x)[0], dm.vis_dataset("val")[0][0], atol=1e-5)
    grey = ImageFolderDataModule(tmp_path, image_size=12, channels=1, num_classes=3)
    grey.setup()
    assert grey.vis_dataset("train")[0][0].shape == (1, 12, 12) and len(grey.mean) == 1


def test_imagefolder_with_val_and_test_trees(tmp_path):
    write_imagefolder(tmp_path, per_class=4, splits=("train", "val", "test"))
    dm = ImageFolderDataModule(tmp_path, image_size=8, num_classes=3)
    dm.setup()
    assert [len(dm.vis_dataset(s)) for s in ("train", "val", "test")] == [12, 12, 12]
    assert all(p.parts[-3] == "test" for p in dm.vis_dataset("test").paths)


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DataError, match=r"train not found; an image folder data set needs .*/train/<class>/<image>"):
        ImageFolderDataModule(tmp_path, num_classes=3).setup()
    write_imagefolder(tmp_path, per_class=4, splits=("train", "val"))
    with pytest.raises(DataError, match=r"datamodule\.num_classes=5 but the data in .* has num_classes=3; "
                                        r"set datamodule\.num_classes=3"):
        ImageFolderDataModule(tmp_path, image_size=8, num_classes=5).setup()
    (tmp_path / "val" / "yak").mkdir()
    with pytest.raises(DataError, match=r"has class folder\(s\) \['yak'\] that .*train lacks"):
        ImageFolderDataModule(tmp_path, image_size=8).setup()
    (tmp_path / "val" / "yak").rmdir()
    (tmp_path / "train" / "dog" / "2.png").write_bytes(b"corrupt")
    dm = ImageFolderDataModule(tmp_path, image_size=8, test_fraction=0.25, num_classes=3, batch_size=20)
    with pytest.raises(DataError, match=r"cannot read image .*train/dog/2\.png"):
        dm.setup()
        list(dm.push_dataloader())
    with pytest.raises(DataError, match=r"datamodule\.channels=2"):
        ImageFolderDataModule(tmp_path, channels=2)


# ----- shared pieces ------------------------------------------------------------------------------------------------

def test_random_shift_moves_content_and_zero_fills():
    torch.manual_seed(0)
    x = torch.arange(1, 26, dtype=torch.float32).view(1, 5, 5)
    seen = set()
    for _ in range(50):
        y = random_shift(x, 2)
        # y is x translated by exactly one offset in [-2, 2]^2, the uncovered border zero
        shifted = [(a, b) for a in range(-2, 3) for b in range(-2, 3)
                   if torch.equal(y, _translate(x, a, b))]
        assert len(shifted) == 1
        seen.add(shifted[0])
    assert len(seen) > 10


def _translate(x, dy, dx):
    out = torch.zeros_like(x)
    h, w = x.shape[-2:]
    for i in range(h):
        for j in range(w):
            if 0 <= i + dy < h and 0 <= j + dx < w:
                out[..., i + dy, j + dx] = x[..., i, j]
    return out


def test_stratified_split_is_deterministic_and_per_class():
    labels = np.repeat(np.arange(4), 10)
    kept, carved = stratified_split(labels, 0.3, seed=1)
    assert np.bincount(labels[carved]).tolist() == [3, 3, 3, 3]
    assert sorted(np.concatenate([kept, carved]).tolist()) == list(range(40))
    assert np.array_equal(carved, stratified_split(labels, 0.3, seed=1)[1])
    assert not np.array_equal(carved, stratified_split(labels, 0.3, seed=2)[1])


def test_normalize_round_trip_any_shape(digits):
    x = torch.rand(2, 1, 5, 5, dtype=torch.float64)
    assert torch.allclose(digits.denormalize(digits.normalize(x)), x)
    assert digits.normalize(x).dtype == torch.float64
    flat = DigitsDataModule(normalize=False)
    assert torch.equal(flat.normalize(x), x) and flat.mean == (0.0,)


def test_grey_png_is_read_as_rgb_and_val_fraction_zero_validates_on_test(tmp_path):
    write_imagefolder(tmp_path, per_class=2, splits=("train", "test"))
    Image.fromarray(np.full((6, 6), 77, np.uint8)).save(tmp_path / "train" / "cat" / "grey.png")
    dm = ImageFolderDataModule(tmp_path, image_size=6, num_classes=3, val_fraction=0)
    dm.setup()
    assert dm.vis_dataset("val") is dm.vis_dataset("test") and len(dm.vis_dataset("train")) == 7
    grey = [x for x, _ in dm.vis_dataset("train") if abs(x[0, 0, 0].item() - 77 / 255) < 1e-6]
    assert len(grey) == 1 and grey[0].shape == (3, 6, 6) and torch.allclose(grey[0], grey[0][0:1].expand(3, 6, 6))
