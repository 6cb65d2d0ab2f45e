"""Writers of tiny data sets in the real on-disk formats, for the data-layer tests.

Each writer produces exactly what the upstream release ships (IDX ubyte files, CIFAR pickles, the CUB text files, a
Broden folder written by hand), so the loaders are tested against the format rather than against our own writer.
"""
from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
from PIL import Image


def write_idx(path: Path, array: np.ndarray, gz: bool = False):
    """IDX ubyte as on yann.lecun.com: magic 0x00000800 + ndim (uint8 data), big-endian dims, raw bytes."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    data = struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        with gzip.open(f"{path}.gz", "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def write_mnist(root: Path, folder: str = "MNIST", n_train: int = 40, n_test: int = 20, gz: bool = False, seed=0):
    """<root>/<folder>/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]; returns the arrays written."""
    rng = np.random.default_rng(seed)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        write_idx(root / folder / "raw" / f"{prefix}-images-idx3-ubyte", images, gz)
        write_idx(root / folder / "raw" / f"{prefix}-labels-idx1-ubyte", labels, gz)
        out[prefix] = (images, labels)
    return out


CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_cifar10(root: Path, per_batch: int = 10, n_test: int = 20, seed=0):
    """cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta} as pickled dicts: 'data' uint8 [N, 3072]
    (the R plane, then G, then B, each row-major 32x32), 'labels' list; returns {file: (images HWC, labels)}."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, n in [(f"data_batch_{k}", per_batch) for k in range(1, 6)] + [("test_batch", n_test)]:
        images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=n)]
        entry = {"batch_label": name, "labels": labels, "filenames": [f"{name}_{i}.png" for i in range(n)],
                 "data": images.transpose(0, 3, 1, 2).reshape(n, 3072)}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)
        out[name] = (images, labels)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": CIFAR_CLASSES, "num_cases_per_batch": per_batch, "num_vis": 3072}, f, protocol=2)
    return out


def write_cub(root: Path, n_classes: int = 3, per_class: int = 4, size=(48, 40)):
    """A CUB_200_2011 folder. Every image is blue with a red bird box (x, y, w, h) listed in bounding_boxes.txt;
    images 1 and 3 of each class are test images. Returns {image id: (relative path, class id, box, is_train)}."""
    base = root / "CUB_200_2011"
    (base / "images").mkdir(parents=True, exist_ok=True)
    w, h = size
    info, image_id = {}, 0
    for c in range(1, n_classes + 1):
        cdir = f"{c:03d}.Bird_{c}"
        (base / "images" / cdir).mkdir(exist_ok=True)
        for k in range(per_class):
            image_id += 1
            box = (4 + k, 6 + c, 20 + 2 * k, 16 + c)
            arr = np.zeros((h, w, 3), np.uint8)
            arr[..., 2] = 255
            x, y, bw, bh = box
            arr[y:y + bh, x:x + bw] = (255, 0, 0)
            rel = f"{cdir}/Bird_{c}_{k:04d}.jpg"
            Image.fromarray(arr).save(base / "images" / rel, quality=100, subsampling=0)
            info[image_id] = (rel, c, box, int(k not in (1, 3)))
    lines = {
        "images.txt": [f"{i} {v[0]}" for i, v in info.items()],
        "image_class_labels.txt": [f"{i} {v[1]}" for i, v in info.items()],
        "train_test_split.txt": [f"{i} {v[3]}" for i, v in info.items()],
        "bounding_boxes.txt": [f"{i} {v[2][0]:.1f} {v[2][1]:.1f} {v[2][2]:.1f} {v[2][3]:.1f}" for i, v in info.items()],
        "classes.txt": [f"{c} {c:03d}.Bird_{c}" for c in range(1, n_classes + 1)],
    }
    for name, rows in lines.items():
        (base / name).write_text("\n".join(rows) + "\n")
    return info


def write_imagefolder(root: Path, classes=("cat", "dog", "emu"), per_class: int = 10, splits=("train",), size=20):
    """<root>/<split>/<class>/<k>.png; each class has its own grey level (class k -> 40 + 80 k)."""
    for split in splits:
        for k, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.fromarray(np.full((size, size + 4, 3), 40 + 80 * k, np.uint8)).save(d / f"{i}.png")


def save_rgb_label(path: Path, ids: np.ndarray):
    """A Broden label PNG written by hand: R = id % 256, G = id // 256."""
    rgb = np.zeros(ids.shape + (3,), np.uint8)
    rgb[..., 0], rgb[..., 1] = ids % 256, ids // 256
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)


def write_real_broden_style(root: Path):
    """A tiny folder laid out like broden1_224: 8x8 JPEG images in images/ade20k/, half-size (4x4) label maps,
    a category cell "color(3);object(1)", two part maps in one cell, ids above 255, and image-level scene labels.

    Concepts: 1 black (color), 2 red (color(3);object(1) -> color), 3 wall (object), 4 door (part),
    5 handle (part), 6 street (scene), 300 sky (object; numbers may have gaps)."""
    (root / "images" / "ade20k").mkdir(parents=True)
    (root / "index.csv").write_text(
        "image,split,ih,iw,sh,sw,color,object,material,part,scene,texture\n"
        "ade20k/a.jpg,train,8,8,4,4,ade20k/a_color.png,ade20k/a_object.png,,"
        "ade20k/a_part_1.png;ade20k/a_part_2.png,6,\n"
        "ade20k/b.jpg,val,8,8,4,4,,ade20k/b_object.png,,,6,\n"
        "ade20k/c.jpg,val,8,8,4,4,,,,,,\n")
    (root / "label.csv").write_text(
        "number,name,category,frequency,coverage,syns\n"
        "1,black,color(2),2,0.5,\n"
        "2,red,color(3);object(1),3,0.2,\n"
        "3,wall,object(5),5,1.0,walls\n"
        "4,door,part(1),1,0.1,\n"
        "5,handle,part(1),1,0.1,\n"
        "6,street,scene(2),2,2.0,\n"
        "300,\"sky, blue\",object(1),1,0.3,\n")
    (root / "category.csv").write_text(
        "name,first,last,count,frequency\ncolor,1,2,2,1\nobject,2,300,3,2\nmaterial,0,0,0,0\npart,4,5,2,1\n"
        "scene,6,6,1,2\ntexture,0,0,0,0\n")
    (root / "c_color.csv").write_text("code,number,name,frequency,coverage\n1,1,black,2,0.5\n2,2,red,3,0.2\n")
    for name, value in (("a", 60), ("b", 120), ("c", 200)):
        Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(root / "images" / "ade20k" / f"{name}.jpg")
    img = root / "images" / "ade20k"
    save_rgb_label(img / "a_color.png", np.array([[1, 1, 2, 2]] * 4))
    save_rgb_label(img / "a_object.png", np.array([[3, 3, 300, 300]] * 2 + [[0, 0, 3, 3]] * 2))
    save_rgb_label(img / "a_part_1.png", np.array([[4, 0, 0, 0]] * 4))
    save_rgb_label(img / "a_part_2.png", np.array([[0, 5, 0, 0]] * 4))
    save_rgb_label(img / "b_object.png", np.full((4, 4), 300))


def write_places365_easyformat(root: Path, n_classes: int = 365, per_class: int = 1, size: int = 16):
    """places365_standard/ as places365standard_easyformat.tar unpacks it: train/<category>/<8 digits>.jpg and
    val/<category>/<8 digits>.jpg, plus test -> val (the link conf/experiment/dynconn_resnet18_places365.yaml asks
    for, since Places365's test labels are not public). Class k is a grey level; returns the category names."""
    base = root / "places365_standard"
    names = [f"category_{k:03d}" for k in range(n_classes)]
    n = 0
    for split in ("train", "val"):
        for k, name in enumerate(names):
            d = base / split / name
            d.mkdir(parents=True, exist_ok=True)
            for _ in range(per_class):
                n += 1
                Image.fromarray(np.full((size, size, 3), k % 256, np.uint8)).save(d / f"{n:08d}.jpg")
    (base / "test").symlink_to("val", target_is_directory=True)
    return names
