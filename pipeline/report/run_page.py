"""The run page, section by section. Each section renders what the run folder holds and is left out when there is
nothing for it, so a failed or interrupted run gets a page with whatever it wrote before it stopped."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable

from pipeline.report import plots
from pipeline.report.folder import RunFolder
from pipeline.report.history import History, metric_history
from pipeline.report.images import img
from pipeline.report.page import esc, figure, fmt, kv_table, page, table
from pipeline.report.units import (PrototypeCard, UnitCard, prototype_anchor, prototype_cards, unit_anchor,
                                   unit_cards)

log = logging.getLogger(__name__)

WIDE = 1100           # px: the widest a figure is shown (and stored)
HALF = 540


class RunReport:
    """Everything the page shows, read once; `html()` renders it, `cards` also feed the W&B table."""

    def __init__(self, path: Path):
        self.run = RunFolder(Path(path))
        self.notes: list[str] = []
        self._read()

    # ----- reading ------------------------------------------------------------------------------------------
    def _read(self) -> None:
        import algorithms  # noqa: F401  (registers every result schema)
        from algorithms.attribution.result import AttributionResult
        from algorithms.capsules import CapsulesResult
        from algorithms.composition_result import CompositionResult
        from algorithms.dissection_result import DissectionEpoch
        from algorithms.dynk_stats import DynKStats
        from algorithms.featviz.result import FeatvizResult
        from algorithms.icnn_metrics import ICNNMetricsResult
        from algorithms.prototypes import PrototypeQuality, PrototypeRecords
        run = self.run
        self.history_source, self.history = metric_history(run.path)
        self.dissection = run.latest("dissection", "dissection.json", DissectionEpoch)
        comp = run.latest("composability", "composability.json", CompositionResult)
        self.composition_epoch, self.composition = comp if comp else (None, None)
        self.featviz = run.latest("featviz", "featviz.json", FeatvizResult)
        self.attribution = run.latest("attribution", "metrics.json", AttributionResult)
        self.prototypes = run.latest("prototypes", "prototypes.json", PrototypeRecords)
        self.quality = run.latest("prototypes", "quality.json", PrototypeQuality)
        self.capsules = run.latest("capsules", "capsules.json", CapsulesResult)
        self.icnn = run.latest("icnn", "icnn_metrics.json", ICNNMetricsResult)
        self.dynk = run.latest("dynconn", "dynconn.json", DynKStats)
        self.cards: dict[str, list[UnitCard]] = unit_cards(run, self.dissection, self.composition, self.featviz,
                                                           self.notes)
        # a ProtoPNet's decision is a sum over prototype similarities: its composition names prototypes, not units
        # of a dissected layer, so the composition's shares go onto the prototype cards
        on_prototypes = (self.composition is not None and self.composition.layer not in self.cards
                         and self.prototypes is not None)
        self.prototype_cards: list[PrototypeCard] = prototype_cards(run, self.prototypes,
                                                                    self.composition if on_prototypes else None)
        self.anchors: dict[tuple[str, int], str] = {(layer, c.unit - 1): c.anchor
                                                    for layer, cards in self.cards.items() for c in cards}
        if on_prototypes:
            self.anchors.update({(self.composition.layer, p.index): p.anchor for p in self.prototype_cards})

    # ----- the page -----------------------------------------------------------------------------------------
    def html(self) -> str:
        run = self.run
        sections: list[tuple[str, str, str]] = []
        for anchor, title, render in self.sections():
            try:
                body = render()
            except Exception as err:  # noqa: BLE001 - one unreadable part never costs the rest of the page
                log.warning("report: section %r failed (%s: %s)", title, type(err).__name__, err, exc_info=True)
                body = f'<p class="err">This section could not be rendered: {esc(type(err).__name__)}: {esc(err)}</p>'
            if body:
                sections.append((anchor, title, body))
        model = self._model_name()
        data = run.select("datamodule._target_", "") or ""
        subtitle = (f'<span class="status {esc(run.status)}">{esc(run.status)}</span> &nbsp;{esc(model)} on '
                    f'{esc(data.rsplit(".", 1)[-1] or "?")} &nbsp;·&nbsp; {esc(run.path.name)}')
        footer = (f"Written {time.strftime('%Y-%m-%d %H:%M:%S')} by report.py from the files of this run folder; "
                  f"rebuild with <code>python report.py {esc(run.path)}</code>.")
        return page(f"Run report: {run.path.name}", subtitle, sections, footer)

    def sections(self) -> list[tuple[str, str, Callable[[], str]]]:
        return [("overview", "Overview", self.overview), ("config", "Config", self.config_section),
                ("metrics", "Final metrics", self.metrics_section),
                ("history", "Over epochs", self.history_section),
                ("units", "Unit cards", self.units_section),
                ("compositions", "Class compositions", self.compositions_section),
                ("prototypes", "Prototypes", self.prototypes_section),
                ("capsules", "Capsules", self.capsules_section),
                ("icnn", "ICNN filters", self.icnn_section),
                ("dynk", "Dynamic-K routing", self.dynk_section),
                ("attribution", "Attribution", self.attribution_section),
                ("featviz", "Feature visualization", self.featviz_section),
                ("dissection", "Dissection figures", self.dissection_section),
                ("other", "Other results", self.other_section),
                ("files", "Files", self.files_section)]

    def _model_name(self) -> str:
        choices = self.run.payload.get("choices") or {}
        target = self.run.select("model._target_", "") or self.run.payload.get("model") or ""
        return str(choices.get("model") or str(target).rsplit(".", 1)[-1] or "?")

    # ----- sections -----------------------------------------------------------------------------------------
    def overview(self) -> str:
        run, p = self.run, self.run.payload
        rows: list[tuple[str, Any]] = [("status", run.status), ("model", self._model_name()),
                                       ("data", (p.get("choices") or {}).get("datamodule")
                                        or str(run.select("datamodule._target_", "?")).rsplit(".", 1)[-1])]
        for key, label in (("epochs_completed", "epochs completed"), ("global_step", "steps"),
                           ("seconds", "seconds"), ("world_size", "processes"), ("best_checkpoint", "best checkpoint")):
            if p.get(key) is not None:
                rows.append((label, p[key]))
        for key in ("test/acc", "val/acc"):
            if self.run.metrics.get(key) is not None:
                rows.append((key, self.run.metrics[key]))
        out = kv_table(rows)
        if p.get("error"):
            out += f'<p class="err">Error: {esc(p["error"])}</p>'
        errors = p.get("interp_errors") or []
        if errors:
            out += "<h3>Interpretation callbacks that failed (the run went on without them)</h3>" + table(
                ("callback", "epoch", "rank", "error"),
                [(e.get("callback"), e.get("epoch"), e.get("rank"), e.get("error")) for e in errors
                 if isinstance(e, dict)])
        secs = p.get("interp_seconds") or {}
        if secs:
            runs = p.get("interp_runs") or {}
            out += "<h3>Interpretation cost</h3>" + table(
                ("callback", "runs", "seconds"), [(k, runs.get(k), v) for k, v in sorted(secs.items())])
        for problem in run.problems + self.notes:
            out += f'<p class="muted">Note: {esc(problem)}</p>'
        return out

    def config_section(self) -> str:
        run, p = self.run, self.run.payload
        if run.config is None and not p:
            return ""
        out = ""
        choices = p.get("choices") or {}
        if choices:
            out += "<h3>Config groups</h3>" + kv_table(sorted(choices.items()))
        overrides = p.get("overrides") or []
        out += "<h3>Command-line overrides</h3>" + (
            f"<pre>{esc(' '.join(overrides))}</pre>" if overrides else '<p class="muted">none</p>')
        keys = ("model._target_", "model.backbone", "model.k", "model.prototypes_per_class", "datamodule._target_",
                "datamodule.image_size", "datamodule.n_train", "datamodule.batch_size", "trainer.max_epochs",
                "trainer.accelerator", "trainer.devices", "seed")
        rows = [(k, run.select(k)) for k in keys if run.select(k) is not None]
        if rows:
            out += "<h3>Main settings</h3>" + kv_table(rows)
        cfg_file = run.path / "config.yaml"
        if cfg_file.is_file():
            out += f"<details><summary>config.yaml (resolved)</summary><pre>{esc(cfg_file.read_text())}</pre></details>"
        return out

    def metrics_section(self) -> str:
        metrics = self.run.metrics
        if not metrics:
            return '<p class="muted">No final metrics (the run stopped before its first validation).</p>'
        groups: dict[str, list[tuple[str, Any]]] = {}
        for k in sorted(metrics):
            head = k.split("/")[0] if not k.startswith("interp/") else "/".join(k.split("/")[:2])
            groups.setdefault(head, []).append((k, metrics[k]))
        order = sorted(groups, key=lambda g: (not g.startswith("test"), not g.startswith("val"),
                                              g.startswith("interp"), g))
        cols = []
        for g in order:
            cols.append(f'<div style="display:inline-block;vertical-align:top;margin-right:16px"><h3>{esc(g)}</h3>'
                        + table(("metric", "value"), [(k[len(g) + 1:] if k.startswith(g + "/") else k, v)
                                                      for k, v in groups[g]]) + "</div>")
        return "".join(cols)

    def history_section(self) -> str:
        hist: History = self.history
        if not hist:
            return '<p class="muted">No per-epoch values: no CSV or W&B log and no interpretation results.</p>'
        ref = hist.get("val/acc")
        out = (f'<p class="muted">Source: {esc(self.history_source)}. Blue: the metric (left axis); grey dashed: '
               f'val/acc (right axis). Hover a point for its value.</p>')
        groups: dict[str, list[str]] = {}
        for k in sorted(hist):
            if k.startswith("interp/"):
                groups.setdefault("/".join(k.split("/")[:2]), []).append(k)
        head = [k for k in ("val/acc", "val/loss", "train/loss_epoch", "train/acc_epoch") if k in hist]
        if head:
            out += ('<div class="plotgroup"><h3>training</h3><div class="plots">'
                    + "".join(plots.epoch_plot(k, hist[k], None if k == "val/acc" else ref) for k in head)
                    + "</div></div>")
        for g, keys in groups.items():
            # the callbacks' own timing is cost, not interpretability: folded away
            main = [k for k in keys if not k.endswith("/seconds")]
            if not main:
                continue
            out += (f'<div class="plotgroup"><h3>{esc(g)}</h3><div class="plots">'
                    + "".join(plots.epoch_plot(k[len(g) + 1:], hist[k], ref) for k in main) + "</div></div>")
        timing = [k for k in sorted(hist) if k.endswith("/seconds")]
        if timing:
            out += ("<details><summary>seconds per interpretation run</summary><div class=\"plots\">"
                    + "".join(plots.epoch_plot(k, hist[k]) for k in timing) + "</div></details>")
        return out

    def units_section(self) -> str:
        if not self.cards:
            return ""
        out = ""
        epoch = self.dissection[0]
        for layer, cards in self.cards.items():
            res = self.dissection[1].layers[layer]
            concepts: dict[str, int] = {}
            for c in cards:
                concepts[c.concept] = concepts.get(c.concept, 0) + 1
            options = "".join(f'<option value="{esc(k)}">{esc(k if k != "-" else "(none: below the IoU threshold)")}'
                              f' ({n})</option>' for k, n in sorted(concepts.items(), key=lambda kv: -kv[1]))
            comp_note = ""
            if self.composition is not None and self.composition.layer == layer:
                comp_note = (f" Class shares: the unit's share of the class's positive evidence (composability, "
                             f"epoch {self.composition_epoch}).")
            fv = self.featviz[1] if self.featviz and self.featviz[1].layer == layer else None
            fv_note = (f" Feature visualizations (featviz, epoch {self.featviz[0]}) exist for units "
                       f"{', '.join(str(u.index + 1) for u in fv.units if u.kind == 'unit')}; the other cards show "
                       f"their top activating probe images from dissection." if fv else "")
            sort = ('<select class="sort"><option value="unit">sort by unit</option><option value="iou">sort by IoU'
                    '</option>' + ('<option value="weight">sort by class share</option>' if comp_note else "")
                    + "</select>")
            out += (f'<div class="cardset"><h3>layer {esc(layer)}: {int(res.summary()["interpretable_units"])} of '
                    f'{res.num_units} units interpretable (IoU ≥ {res.iou_threshold:g}), dissection epoch {epoch}'
                    f'</h3><p class="muted">Unit n is channel n−1.{fv_note}{comp_note}</p>'
                    f'<div class="controls">concept <select class="concept"><option value="">all</option>{options}'
                    f'</select> {sort} <label><input type="checkbox" class="only"> interpretable only</label>'
                    f'<span class="count muted"></span></div><div class="cards">'
                    + "".join(self._unit_card(c) for c in cards) + "</div></div>")
        return out

    @staticmethod
    def _unit_card(c: UnitCard) -> str:
        label = (f"<b>{esc(c.best_concept)}</b> <span class=\"muted\">({esc(c.category)})</span>" if c.interpretable
                 else f'<span class="muted">best: {esc(c.best_concept)}</span>')
        parts = [f'<div class="card{"" if c.interpretable else " uninterpretable"}" id="{c.anchor}" '
                 f'data-unit="{c.unit}" data-iou="{c.iou:.5f}" data-weight="{c.max_weight:.5f}" '
                 f'data-concept="{esc(c.concept)}" data-interpretable="{int(c.interpretable)}">'
                 f'<h4>unit {c.unit} <span class="iou">IoU {c.iou:.3f}</span></h4>{label}']
        if c.featviz is not None:
            parts.append(img(c.featviz, 200, f"feature visualization of unit {c.unit}", photo=True, height=96,
                             pixelated=True))
        if c.patches is not None:
            parts.append(img(c.patches, 200, f"top activating patches of unit {c.unit}", photo=True))
        if c.top is not None:
            parts.append(img(c.top, 200, f"top activating probe images of unit {c.unit}", photo=True))
        if c.weights:
            parts.append("<ul>" + "".join(f"<li>{esc(n)}: {100 * w:.0f}%</li>" for n, w in
                                          sorted(c.weights, key=lambda t: -t[1])) + "</ul>")
        parts.append("</div>")
        return "".join(parts)

    def _unit_link(self, layer: str | None, unit: int, concept: str, share: float) -> str:
        """"unit 17 red 12%" (units 1-based as in the files; prototypes by their index), linked to its card."""
        anchor = self.anchors.get((layer, unit))
        text = f"prototype {unit}" if anchor and anchor.startswith("prototype") else f"unit {unit + 1}"
        label = f"{esc(text)} {esc(concept)} {100 * share:.0f}%"
        return f'<a href="#{anchor}">{label}</a>' if anchor else f"<span>{label}</span>"

    def compositions_section(self) -> str:
        comp = self.composition
        if comp is None:
            return ""
        out = (f'<p class="muted">Epoch {self.composition_epoch}, layer {esc(comp.layer)}: each class as the concepts '
               f'of the units carrying its positive evidence; the links go to those units.</p>')
        out += kv_table(sorted(comp.metrics.items()))
        ibd = {b.name: b for b in comp.ibd}
        rows = []
        for c in comp.classes:
            units = " ".join(self._unit_link(comp.layer, u, n, s) for u, n, s in c.top_units)
            b = ibd.get(c.name)
            rows.append((f'<div class="statement"><span class="cls">{esc(c.name)}</span> = '
                         f'{esc(c.terms() or "(no positive evidence)")}</div>',
                         f'<span class="units">{units}</span>', fmt(c.negative_share), fmt(c.precision),
                         fmt(c.recall), esc(b.statement) if b else ""))
        out += table(("statement", "top units", "negative share", "precision", "recall", "IBD"), rows, raw=True)
        return out

    def prototypes_section(self) -> str:
        run = self.run
        found = run.latest_dir("prototypes", "gallery_p*.png")
        if found is None and self.quality is None and not self.prototype_cards:
            return ""
        out = ""
        if self.quality is not None:
            epoch, q = self.quality
            out += f"<h3>Prototype quality (push of epoch {epoch})</h3>" + kv_table(sorted(q.metrics().items()))
        if self.prototype_cards:
            push_epoch = self.prototypes[0]
            out += (f'<h3>Prototypes (push of epoch {push_epoch})</h3><p class="muted">Each: its source training '
                    f'image with the high-activation box, and the prototype patch.</p><div class="cards">'
                    + "".join(self._prototype_card(p) for p in self.prototype_cards) + "</div>")
        if found is not None:
            epoch, folder = found
            tlt = sorted(folder.glob("this_looks_like_that_*.png"))
            if tlt:
                out += (f'<h3>"This looks like that" (epoch {epoch})</h3>'
                        + "".join(figure(img(p, HALF, p.stem, photo=True), f"test image {p.stem.rsplit('_', 1)[-1]}")
                                  for p in tlt))
            pages = sorted(folder.glob("gallery_p*.png"))
            out += (f"<details><summary>gallery sheets (epoch {epoch})</summary>"
                    + "".join(figure(img(p, WIDE, p.stem, photo=True), p.name) for p in pages) + "</details>")
        return out

    @staticmethod
    def _prototype_card(p: PrototypeCard) -> str:
        parts = [f'<div class="card proto" id="{p.anchor}"><h4>prototype {p.index}</h4>{esc(p.class_name)}']
        if p.image is not None:
            parts.append(img(p.image, 130, f"prototype {p.index}", photo=True))
        parts.append(f'<div class="muted">{"pushed" if p.pushed else "not pushed"}'
                     + (f", distance {fmt(p.distance)}" if p.distance is not None else "")
                     + (f", source image {p.source_index}" if p.source_index >= 0 else "") + "</div>")
        if p.concept:
            parts.append(f"<div>concept: {esc(p.concept)}</div>")
        if p.weights:
            parts.append("<ul>" + "".join(f"<li>{esc(n)}: {100 * w:.0f}%</li>" for n, w in p.weights) + "</ul>")
        return "".join(parts) + "</div>"

    def capsules_section(self) -> str:
        found = self.run.latest_dir("capsules", "*.png")
        if self.capsules is None and found is None:
            return ""
        out = ""
        if self.capsules is not None:
            epoch, res = self.capsules
            out += f"<h3>Epoch {epoch}</h3>" + kv_table(sorted(res.metrics.items()))
            rows = []
            for im in res.images:
                change = im.get("perturbation_change_per_dim") or []
                top = sorted(range(len(change)), key=lambda d: -change[d])[:3]
                rows.append((im.get("index"), im.get("label"), im.get("predicted"), im.get("reconstruction_sse"),
                             ", ".join(f"{d} ({change[d]:.3f})" for d in top)))
            if rows:
                out += table(("image", "label", "predicted", "reconstruction SSE",
                              "dimensions that change the reconstruction most"), rows)
        if found is not None:
            epoch, folder = found
            out += "".join(figure(img(p, HALF, p.stem, photo=p.stem != "coupling_heatmap"), f"{p.name} (epoch {epoch})")
                           for p in sorted(folder.glob("*.png")))
        return out

    def icnn_section(self) -> str:
        if self.icnn is None:
            return ""
        epoch, res = self.icnn
        out = f"<h3>Layer {esc(res.layer)}, epoch {epoch}</h3>" + kv_table(sorted(res.metrics.items()))
        png = self.run.path / "interp" / "icnn" / f"epoch_{epoch:03d}" / "filter_peaks.png"
        if png.is_file():
            out += figure(img(png, WIDE, "filter peaks", photo=True), "top images of each filter with their peaks")
        rows = [(f.get("filter"), f.get("class"), f.get("best_part"), f.get("part_interpretability"),
                 f.get("location_instability"), f.get("threshold")) for f in res.filters]
        out += ("<details><summary>per filter</summary>" + table(
            ("filter", "class", "best part", "part interpretability", "location instability", "threshold"), rows)
            + "</details>")
        return out

    def dynk_section(self) -> str:
        if self.dynk is None:
            return ""
        epoch, res = self.dynk
        out = (f"<h3>Epoch {epoch}: K = {res.k if res.k is not None else 'dense'}, units for "
               f"{100 * res.fraction:.0f}% of the evidence</h3>" + kv_table(sorted(res.metrics.items())))
        if res.per_class:
            head = list(res.per_class[0])
            out += table(head, [[row.get(h) for h in head] for row in res.per_class])
        if res.examples:
            names = [str(row.get("class")) for row in res.per_class]
            layer = self.composition.layer if self.composition is not None else next(iter(self.cards), None)
            rows = []
            for ex in res.examples:
                pred = ex.get("predicted")
                units = ex.get("units") or []
                unit_names = ex.get("unit_names") or [""] * len(units)
                terms = " ".join(self._unit_link(layer, int(u), n or "", float(sh)) for u, n, sh in
                                 zip(units, unit_names, ex.get("shares") or []))
                rows.append((esc(names[pred] if isinstance(pred, int) and pred < len(names) else pred),
                             fmt(ex.get("score")), fmt(ex.get("bias")), f'<span class="units">{terms}</span>'))
            out += ("<h3>Example decisions</h3><p class=\"muted\">Score = bias + the routed units' evidence; "
                    "each unit with its share of the image's absolute evidence.</p>"
                    + table(("predicted", "score", "bias", "units"), rows, raw=True))
        return out

    def attribution_section(self) -> str:
        found = self.run.latest_dir("attribution", "overlays.png")
        if self.attribution is None and found is None:
            return ""
        out = ""
        if self.attribution is not None:
            epoch, res = self.attribution
            from algorithms.attribution.result import METRICS
            metrics = [m for m in METRICS if any(m in v for v in res.metrics.values())]
            out += (f"<h3>Evaluation, epoch {epoch} (layer {esc(res.layer)}, target {esc(res.target)}, "
                    f"{res.num_images} probe images)</h3>"
                    + table(("method", *metrics), [(m, *[v.get(k) for k in metrics]) for m, v in res.metrics.items()]))
        if found is not None:
            epoch, folder = found
            out += figure(img(folder / "overlays.png", WIDE, "attribution overlays", photo=True),
                          f"overlays, epoch {epoch}: one row per probe image (the class explained), one column per method")
        return out

    def featviz_section(self) -> str:
        found = self.run.latest_dir("featviz", "*.png")
        if found is None:
            return ""
        epoch, folder = found
        out = ""
        if self.featviz is not None and self.featviz[0] == epoch:
            res = self.featviz[1]
            out += (f"<p class=\"muted\">Layer {esc(res.layer)}, {res.steps} steps, {esc(res.parametrisation)} "
                    f"parametrisation. The unit visualizations are also on the unit cards.</p>"
                    + kv_table(sorted(res.metrics.items())))
        # the labelled sheets where the run wrote them, else (older runs) the plain grids
        captions = {"unit_sheet.png": "units: optimised image and top activating probe patches",
                    "class_sheet.png": "classes", "filters.png": "first-layer filters"}
        if not (folder / "unit_sheet.png").is_file():
            captions = {"units.png": "units", "classes.png": "classes", "filters.png": "first-layer filters",
                        "patches.png": "top activating patches (one row per unit)"}
        for name, cap in captions.items():
            if (folder / name).is_file():
                sheet = name.endswith("_sheet.png")   # text on it: shown wide, smoothed
                out += figure(img(folder / name, WIDE if sheet else HALF, cap, photo=True, pixelated=not sheet),
                              f"{cap}, epoch {epoch}")
        return out

    def dissection_section(self) -> str:
        found = self.run.latest_dir("dissection", "*.png")
        if found is None:
            return ""
        epoch, folder = found
        return "".join(figure(img(p, WIDE if p.stem.endswith("gallery") else HALF * 2, p.stem,
                                  photo=p.stem.endswith("gallery")), f"{p.name}, epoch {epoch}")
                       for p in sorted(folder.glob("*.png")))

    def other_section(self) -> str:
        """Callbacks this page has no section for (your own methods): their latest figures and result types."""
        known = {"dissection", "composability", "featviz", "attribution", "prototypes", "capsules", "icnn", "dynconn"}
        from core.results import SchemaError, load_result
        out = ""
        for name in self.run.callbacks():
            if name in known:
                continue
            found = self.run.latest_dir(name)
            if found is None:
                continue
            epoch, folder = found
            out += f"<h3>{esc(name)} (epoch {epoch})</h3>"
            for js in sorted(folder.glob("*.json")):
                try:
                    res = load_result(js)
                    out += f"<p>{esc(js.name)}: {esc(type(res).__name__)} (schema {esc(res.schema)})</p>"
                except SchemaError:
                    pass
            out += "".join(figure(img(p, HALF, p.stem), p.name) for p in sorted(folder.glob("*.png")))
        return out

    def files_section(self) -> str:
        run = self.run
        names = ["config.yaml", "metrics.json", "train.log", ".hydra/overrides.yaml", "csv/metrics.csv"]
        links = [f'<li><a href="{esc(n)}">{esc(n)}</a></li>' for n in names if (run.path / n).is_file()]
        for cb in run.callbacks():
            found = run.latest_dir(cb)
            if found:
                for f in sorted(found[1].glob("*.csv")) + sorted(found[1].glob("*.json")):
                    rel = run.rel(f)
                    links.append(f'<li><a href="{esc(rel)}">{esc(rel)}</a></li>')
        wandb_dir = sorted(run.path.glob("wandb/offline-run-*"))
        hint = (f'<p class="muted">Offline W&B run: upload it with <code>wandb sync {esc(wandb_dir[-1])}</code>.</p>'
                if wandb_dir else "")
        return (f'<p class="muted">Relative links into this run folder (the latest epoch of each callback).</p>'
                f'<ul>{"".join(links)}</ul>{hint}') if links else hint

