"""Broden writer/reader: round trip, a hand-written real-Broden-style folder, and every bad input."""
import csv

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from datamodules.broden import (BrodenDataset, Concept, decode_label_map, parse_category_cell, read_label_png,
                                write_broden)
from datamodules.errors import DataError
from tests.data_fixtures import write_real_broden_style

torch.set_num_threads(1)


def _concepts():
    # 300 concepts so that ids above 255 need the G channel (id = R + 256 * G); category by id % 4:
    # 0 object (4, 256, 300), 1 part (257), 2 color, 3 scene (7, 11, 15).
    cats = ["object", "part", "color", "scene"]
    return [Concept(f"c{i}", cats[i % 4]) for i in range(1, 301)]


@pytest.fixture
def written(tmp_path):
    concepts = _concepts()
    root = tmp_path / "broden"
    records = []
    for i in range(3):
        obj = np.zeros((6, 6), np.int64)
        obj[:3] = 256 if i == 0 else 4
        obj[3:, :2] = 300
        part = np.zeros((6, 6), np.int64)
        part[0, 0] = 257
        records.append({"image": f"set/{i}.png", "split": "train" if i < 2 else "val",
                        "pixels": np.full((12, 12, 3), 10 * i, np.uint8),
                        "seg": {"object": [obj], "part": [part, part * 0]},
                        "labels": {"scene": [7 + 4 * i]}, "extra": {"class": i}})
    write_broden(root, records, concepts, categories=("color", "object", "part", "scene"))
    return root, records


def test_round_trip_decodes_ids_above_255_and_image_labels(written):
    root, records = written
    ds = BrodenDataset(root, split="train", mean=(0, 0, 0), std=(1, 1, 1))
    assert len(ds) == 2 and ds.num_concepts == 300 and ds.seg_size == (6, 6)
    item = ds[0]
    assert item["seg"].shape == (3, 6, 6)  # object + two part maps
    assert item["seg"][0, 0, 0] == 256 and item["seg"][0, 5, 0] == 300 and item["seg"][1, 0, 0] == 257
    assert (item["seg"][2] == 0).all()
    assert torch.equal(item["image_labels"].nonzero().flatten(), torch.tensor([7]))
    assert item["label"] == 0 and item["index"] == 0
    assert torch.allclose(item["raw"], torch.zeros(3, 12, 12)) and torch.equal(item["image"], item["raw"])
    assert ds[1]["image_labels"].nonzero().flatten().tolist() == [11]
    # The R + 256 * G encoding on disk.
    rgb = np.asarray(Image.open(root / "images" / "set" / "0_object.png"))
    assert tuple(rgb[0, 0]) == (0, 1, 0) and tuple(rgb[5, 0]) == (300 - 256, 1, 0)
    # Tables: category cell, frequency, category ranges, per-category file.
    labels = {int(r["number"]): r for r in csv.DictReader(open(root / "label.csv"))}
    assert labels[300]["category"] == "object(3)" and labels[300]["frequency"] == "3"
    assert labels[256]["frequency"] == "1" and labels[4]["frequency"] == "2" and float(labels[300]["coverage"]) == pytest.approx(3 * 6 / 36)
    cats = {r["name"]: r for r in csv.DictReader(open(root / "category.csv"))}
    assert cats["object"]["first"] == "4" and cats["object"]["last"] == "300" and cats["object"]["count"] == "75"
    assert cats["scene"]["frequency"] == "3" and cats["part"]["frequency"] == "3"
    c_obj = list(csv.DictReader(open(root / "c_object.csv")))
    assert c_obj[0] == {"code": "1", "number": "4", "name": "c4", "frequency": "2", "coverage": "1.0000"}
    assert ds.category_of(257) == "part" and ds.concept_names[256] == "c256"
    assert BrodenDataset(root, split="val")[0]["label"] == 2


def test_items_collate_with_fixed_shapes(written):
    root, _ = written
    batch = next(iter(DataLoader(BrodenDataset(root), batch_size=3)))
    assert batch["seg"].shape == (3, 3, 6, 6) and batch["seg"].dtype == torch.long
    assert batch["image_labels"].shape == (3, 301) and batch["image_labels"].dtype == torch.bool
    assert batch["index"].tolist() == [0, 1, 2]


def test_real_broden_style_folder(tmp_path):
    write_real_broden_style(tmp_path)
    ds = BrodenDataset(tmp_path, split="train", image_size=16)
    assert ds.category_names == ["color", "object", "material", "part", "scene", "texture"]
    assert ds.category_of(2) == "color"  # "color(3);object(1)": the largest count wins
    assert ds.concept_names[300] == "sky, blue" and ds.concept_names[7] == "" and ds.num_concepts == 300
    assert ds.seg_size == (4, 4)  # half-size masks kept
    item = ds[0]
    assert item["image"].shape == (3, 16, 16)
    assert item["seg"].shape == (4, 4, 4)  # color, object, two part maps
    seg = item["seg"]
    assert seg[0, 0].tolist() == [1, 1, 2, 2]
    assert seg[1, 0].tolist() == [3, 3, 300, 300]
    assert seg[2, :, 0].tolist() == [4] * 4 and seg[3, :, 1].tolist() == [5] * 4
    assert item["image_labels"].nonzero().flatten().tolist() == [6]
    assert item["label"] == -1
    val = BrodenDataset(tmp_path, split="val")
    # L is the folder's maximum (4), so val items (one map or none) are padded with zero maps.
    assert val[0]["seg"].shape == (4, 4, 4) and (val[0]["seg"][1:] == 0).all() and (val[0]["seg"][0] == 300).all()
    assert val[1]["seg"].abs().sum() == 0 and not val[1]["image_labels"].any()
    assert val[0]["raw"].shape == (3, 8, 8)  # image_size=None keeps ih x iw
    assert len(BrodenDataset(tmp_path)) == 3


def test_parse_category_cell():
    assert parse_category_cell("color(123);object(4)") == "color"
    assert parse_category_cell("object(4);color(123)") == "color"
    assert parse_category_cell("part") == "part"
    assert parse_category_cell("") == ""


def test_single_channel_label_png_holds_ids(tmp_path):
    Image.fromarray(np.array([[0, 7], [255, 3]], np.uint8)).save(tmp_path / "l.png")
    assert read_label_png(tmp_path / "l.png").tolist() == [[0, 7], [255, 3]]
    assert decode_label_map(Image.fromarray(np.array([[[44, 1, 9]]], np.uint8))).tolist() == [[300]]


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match=r"Broden folder .*nowhere not found"):
        BrodenDataset(tmp_path / "nowhere")


def test_non_broden_folder_names_what_is_missing(tmp_path):
    (tmp_path / "label.csv").write_text("number,name,category\n")
    with pytest.raises(DataError) as e:
        BrodenDataset(tmp_path)
    msg = str(e.value)
    assert f"index.csv, category.csv, images/ not found in {tmp_path}" in msg
    assert "a Broden folder needs index.csv, label.csv, category.csv and images/" in msg


def test_missing_columns(tmp_path):
    write_real_broden_style(tmp_path)
    (tmp_path / "index.csv").write_text("image,split\nx.jpg,train\n")
    with pytest.raises(DataError, match=r"index.csv lacks the column\(s\) \['ih', 'iw', 'sh', 'sw'\]"):
        BrodenDataset(tmp_path)


def test_missing_and_corrupt_files_name_the_file(tmp_path):
    write_real_broden_style(tmp_path)
    (tmp_path / "images" / "ade20k" / "a.jpg").unlink()
    with pytest.raises(DataError, match=r"cannot read image .*ade20k/a\.jpg.*listed in .*index\.csv.*dlbroden"):
        BrodenDataset(tmp_path, split="train")[0]
    (tmp_path / "images" / "ade20k" / "b_object.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"cannot read label map .*b_object\.png"):
        BrodenDataset(tmp_path, split="val", hint="delete it and regenerate")[0]


def test_unknown_split_and_out_of_range_ids(tmp_path):
    write_real_broden_style(tmp_path)
    with pytest.raises(DataError, match=r"no rows with split='test' \(splits found: \['train', 'val'\]\)"):
        BrodenDataset(tmp_path, split="test")
    text = (tmp_path / "index.csv").read_text().replace(",6,\n", ",999,\n", 1)
    (tmp_path / "index.csv").write_text(text)
    with pytest.raises(DataError, match=r"ade20k/a\.jpg .* uses concept ids \[999\] beyond the 300 concepts"):
        BrodenDataset(tmp_path, split="train")[0]


def test_cache_and_limit(written):
    root, _ = written
    ds = BrodenDataset(root, cache=True, limit=2)
    assert len(ds) == 2
    first = ds[1]
    for p in (root / "images" / "set").glob("1*"):
        p.unlink()
    assert torch.equal(ds[1]["seg"], first["seg"])  # served from memory
