"""report.html without a browser: what the run page holds (counted against the run's typed results), that it is
written at the end of completed, failed and interrupted runs, that a report failure never fails a run, that images
are stored at the size shown, the W&B panel + table, report.py, and the sweep page (the browser checks are in
tests/test_report_browser.py)."""
from __future__ import annotations

import base64
import io
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from tests.report_runs import SMALL, report_run, report_sweep

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("report")]

QUICK = ["model=cnn", "callbacks=minimal", *SMALL, "logger=csv"]


class Page(HTMLParser):
    """The parts of a report the tests count: elements by id, cards, images with their shown width, links, SVG
    plot titles."""

    def __init__(self, text: str):
        super().__init__()
        self.ids: set[str] = set()
        self.cards: list[dict] = []
        self.images: list[dict] = []
        self.links: list[str] = []
        self.svg_titles: list[str] = []
        self._in_svg_title = False
        self._svg_depth = 0
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "div" and "card" in (a.get("class") or "").split():
            self.cards.append(a)
        if tag == "img":
            self.images.append(a)
        if tag == "a" and "href" in a:
            self.links.append(a["href"])
        if tag == "svg":
            self._svg_depth += 1
            self._first_text = True
        if tag == "text" and self._svg_depth and getattr(self, "_first_text", False):
            self._in_svg_title = True

    def handle_endtag(self, tag):
        if tag == "svg":
            self._svg_depth -= 1
        if tag == "text":
            self._in_svg_title = False

    def handle_data(self, data):
        if self._in_svg_title:
            self.svg_titles.append(data)
            self._in_svg_title = False
            self._first_text = False


def image_size(src: str) -> tuple[int, int]:
    from PIL import Image
    head, data = src.split(",", 1)
    assert head in ("data:image/png;base64", "data:image/jpeg;base64"), head
    with Image.open(io.BytesIO(base64.b64decode(data))) as im:
        return im.size


@pytest.fixture(scope="module")
def run() -> Path:
    return report_run()


@pytest.fixture(scope="module")
def page(run) -> Page:
    return Page((run / "report.html").read_text())


def latest(run: Path, callback: str, filename: str, cls):
    folders = sorted((run / "interp" / callback).glob("epoch_*"))
    folders = [f for f in folders if (f / filename).is_file()]
    return cls.load(folders[-1] / filename)


# ----- the run page ---------------------------------------------------------------------------------------------
def test_the_run_writes_its_page_at_the_end(run):
    report, metrics = run / "report.html", run / "metrics.json"
    assert report.is_file() and report.stat().st_mtime >= metrics.stat().st_mtime
    assert json.loads(metrics.read_text())["status"] == "completed"
    text = report.read_text()
    assert "<script src" not in text and "<link" not in text and "http://" not in text.replace(
        'xmlns="http://www.w3.org/2000/svg"', "")


def test_unit_cards_match_the_dissection(run, page):
    from algorithms.dissection_result import DissectionEpoch
    from algorithms.featviz.result import FeatvizResult
    dissection = latest(run, "dissection", "dissection.json", DissectionEpoch)
    layer, res = next(iter(dissection.layers.items()))
    units = [c for c in page.cards if c.get("id", "").startswith("unit-")]
    assert len(units) == res.num_units
    labels = res.unit_labels()
    _, score = res.best
    for card in units:
        u = int(card["data-unit"])
        assert card["data-concept"] == (labels[u - 1] or "-")
        assert float(card["data-iou"]) == pytest.approx(float(score[u - 1]), abs=1e-5)
    assert sum(c["data-interpretable"] == "1" for c in units) == int(res.summary()["interpretable_units"])
    # featviz's units carry their visualization; every card shows top activating images
    featviz = latest(run, "featviz", "featviz.json", FeatvizResult)
    n_vis = sum(u.kind == "unit" for u in featviz.units)
    alts = [i.get("alt", "") for i in page.images]
    assert sum(a.startswith("feature visualization of unit") for a in alts) == n_vis == 4
    assert sum(a.startswith("top activating patches of unit") for a in alts) == n_vis
    assert sum(a.startswith("top activating probe images of unit") for a in alts) == res.num_units


def test_prototypes_and_compositions_link_to_their_cards(run, page):
    from algorithms.composition_result import CompositionResult
    from algorithms.prototypes import PrototypeRecords
    records = latest(run, "prototypes", "prototypes.json", PrototypeRecords)
    protos = [c for c in page.cards if c.get("id", "").startswith("prototype-")]
    assert len(protos) == len(records.prototypes) == 120
    assert sum(i.get("alt", "").startswith("prototype ") for i in page.images) == sum(
        p["pushed"] for p in records.prototypes)
    tlt = sorted((run / "interp" / "prototypes").glob("epoch_*/this_looks_like_that_*.png"))
    assert tlt and sum(i.get("alt", "").startswith("this_looks_like_that") for i in page.images) == len(
        {p.name for p in tlt})
    # ProtoPNet's composition is over prototypes: every unit a statement names links to that prototype's card
    comp = latest(run, "composability", "composability.json", CompositionResult)
    named = {f"#prototype-{u}" for c in comp.classes for u, _, _ in c.top_units}
    assert named and named <= set(page.links)
    assert all(h[1:] in page.ids for h in page.links if h.startswith("#"))


def test_every_interp_metric_is_plotted_against_epoch(run, page):
    import csv
    with open(run / "csv" / "metrics.csv", newline="") as f:
        logged = {k for row in csv.DictReader(f) for k, v in row.items() if v and k.startswith("interp/")}
    expected = {k.split("/", 2)[2] for k in logged if not k.endswith("/seconds")}
    assert len(expected) > 20
    assert expected <= set(page.svg_titles), expected - set(page.svg_titles)
    assert "val/acc" in page.svg_titles


def test_images_are_stored_at_the_size_shown(page):
    assert len(page.images) > 100
    for im in page.images:
        w, h = image_size(im["src"])
        assert w <= int(im["width"]) and h <= int(im["height"]) + 1, (im.get("alt"), w, h, im["width"])


def test_report_py_rebuilds_the_page(run, tmp_path, capsys):
    import shutil

    import report
    copy = tmp_path / "run"
    shutil.copytree(run, copy, symlinks=True, ignore=shutil.ignore_patterns("checkpoints"))
    (copy / "report.html").unlink()
    assert report.main([str(copy)]) == 0
    out = capsys.readouterr().out
    m = re.search(r"report: (\S+) \((\d+\.\d) s, (\d+\.\d) MB\)", out)
    assert m and Path(m.group(1)) == copy / "report.html"
    assert float(m.group(3)) <= 20
    rebuilt = Page((copy / "report.html").read_text())
    original = Page((run / "report.html").read_text())
    assert len(rebuilt.cards) == len(original.cards) and len(rebuilt.images) == len(original.images)


def test_the_page_is_logged_to_wandb(run):
    from wandb.proto import wandb_internal_pb2 as pb

    from pipeline.report.history import wandb_log_file
    from pipeline.wandb_offline import iter_records
    keys, artifacts = {}, []
    for raw in iter_records(wandb_log_file(run)):
        rec = pb.Record()
        rec.ParseFromString(raw)
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            for item in rec.history.item:   # media are logged as nested keys: ("report", "_type"), ...
                path = [item.key] if item.key else list(item.nested_key)
                keys.setdefault(path[0], {}).update({path[-1]: json.loads(item.value_json)} if len(path) > 1
                                                    else {"value": json.loads(item.value_json)})
        elif kind == "artifact":
            artifacts.append((rec.artifact.type, [e.path for e in rec.artifact.manifest.contents]))
    assert keys["report"]["_type"] == "html-file"
    assert keys["report/unit_cards"]["_type"] == "table-file"
    files = run / "wandb"
    html = list(files.glob("offline-run-*/files/" + keys["report"]["path"]))
    assert html and "unit-" in html[0].read_text()
    table = json.loads(next(files.glob("offline-run-*/files/" + keys["report/unit_cards"]["path"])).read_text())
    assert len(table["data"]) == len(Page((run / "report.html").read_text()).cards)
    assert ("report", ["report.html"]) in artifacts


# ----- failed, interrupted and failing reports -----------------------------------------------------------------
def test_a_failed_run_gets_a_page_with_its_error(run_train, tmp_path):
    from models.base import NonFiniteLossError
    with pytest.raises(NonFiniteLossError):
        run_train([*QUICK, "trainer.max_epochs=3", "+callbacks.poison._target_=tests.helpers.PoisonWeights",
                   "+callbacks.poison.epoch=1"], tmp_path / "run")
    text = (tmp_path / "run" / "report.html").read_text()
    assert 'class="status failed"' in text and "NonFiniteLossError" in text
    assert "val/acc" in Page(text).svg_titles   # the epoch it finished is plotted


def test_an_interrupted_run_gets_a_page(run_train, tmp_path):
    # Lightning turns Ctrl-C into a graceful shutdown ending in SystemExit(1)
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        run_train([*QUICK, "trainer.max_epochs=2", "+callbacks.stop._target_=tests.test_report.Interrupt"],
                  tmp_path / "run")
    text = (tmp_path / "run" / "report.html").read_text()
    assert 'class="status interrupted"' in text
    assert "val/acc" in Page(text).svg_titles   # the epoch before the interrupt is plotted


class Interrupt:
    """A Lightning callback (by duck typing) pressing Ctrl-C after the first epoch."""
    def __new__(cls):
        from pytorch_lightning import Callback

        class _Interrupt(Callback):
            def on_train_epoch_end(self, trainer, pl_module):
                raise KeyboardInterrupt
        return _Interrupt()


def test_a_failing_report_never_fails_the_run(run_train, tmp_path, monkeypatch, caplog):
    from pipeline.report import run_page

    def broken(self):
        raise RuntimeError("report bug")
    monkeypatch.setattr(run_page.RunReport, "html", broken)
    metrics = run_train([*QUICK, "trainer.max_epochs=1"], tmp_path / "run")
    assert "val/acc" in metrics
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "completed"
    assert not (tmp_path / "run" / "report.html").exists()
    assert "report bug" in caplog.text and "python report.py" in caplog.text


# ----- the sweep page -------------------------------------------------------------------------------------------
def test_the_sweep_page_links_every_job(tmp_path):
    import compare
    sweep = report_sweep()
    page = Page((sweep / "report.html").read_text())
    jobs = compare.find_run_dirs(sweep)
    assert len(jobs) == 2
    for job in jobs:
        rel = f"{job.relative_to(sweep).as_posix()}/report.html"
        assert rel in page.links and (sweep / rel).is_file()
    text = (sweep / "report.html").read_text()
    assert "model.optimizer.lr=0.002" in text and "model.optimizer.lr=0.004" in text
    # compositions side by side: one row per class, one column per job
    assert text.count('id="compositions"') == 1 and "red-circle" in text
    # a plot of each default metric against the learning rate
    assert "test/acc" in page.svg_titles and "dissection/interpretable_units" in page.svg_titles


def test_capsule_icnn_and_dynamic_k_sections(tmp_path):
    from pipeline.report import build_run_report
    from tests.report_runs import other_models_run
    path, _ = build_run_report(other_models_run(tmp_path / "run"))
    text = path.read_text()
    page = Page(text)
    assert {"capsules", "icnn", "dynk"} <= page.ids
    assert {i["alt"] for i in page.images} == {"perturbation_00", "coupling_heatmap", "filter peaks"}
    assert "15 (0.150), 14 (0.140), 13 (0.130)" in text          # the capsule dimensions that change most
    assert "circle-top" in text and "K = 5" in text
    assert "unit 4 red 60%" in text and "unit 8  40%" in text   # Dynamic-K example: units 1-based with shares
