"""The report on W&B, through the run's own WandbLogger (rank 0, before the run is finished): the page as an HTML
panel (`report`) and as a file artifact of type "report", and the unit cards as a table with images
(`report/unit_cards`). Offline runs keep all of it in <run>/wandb/ and upload it with `wandb sync`."""
from __future__ import annotations

import re
from pathlib import Path


def wandb_loggers(trainer) -> list:
    from pytorch_lightning.loggers import WandbLogger
    return [lg for lg in getattr(trainer, "loggers", None) or [] if isinstance(lg, WandbLogger)]


def unit_table(report):
    """wandb.Table: one row per unit card (and per prototype card), images where the page has them."""
    import wandb
    columns = ["layer", "unit", "concept", "category", "iou", "interpretable", "class_shares", "featviz",
               "top_patches", "top_images"]
    rows = []
    for layer, cards in report.cards.items():
        for c in cards:
            rows.append([layer, c.unit, c.best_concept, c.category, round(c.iou, 5), c.interpretable,
                         ", ".join(f"{n} {100 * w:.0f}%" for n, w in c.weights),
                         *[wandb.Image(im) if im is not None else None for im in (c.featviz, c.patches, c.top)]])
    for p in report.prototype_cards:
        rows.append(["prototypes", p.index, p.concept, p.class_name, None, p.pushed,
                     ", ".join(f"{n} {100 * w:.0f}%" for n, w in p.weights), None, None,
                     wandb.Image(p.image) if p.image is not None else None])
    return wandb.Table(columns=columns, data=rows) if rows else None


def log_report(trainer, path: Path, report) -> bool:
    """Whether anything was logged (False without a W&B logger)."""
    loggers = wandb_loggers(trainer)
    if not loggers:
        return False
    import wandb
    logged = False
    for lg in loggers:
        # only a W&B run that exists: `experiment` would start one for a run that failed before logging anything
        run = getattr(lg, "_experiment", None)
        if run is None or not hasattr(run, "log_artifact"):   # none yet, or a disabled/dummy run
            continue
        payload = {"report": wandb.Html(path.read_text(encoding="utf-8"), inject=False, data_is_not_path=True)}
        table = unit_table(report)
        if table is not None:
            payload["report/unit_cards"] = table
        run.log(payload)
        name = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"report-{run.id}")
        artifact = wandb.Artifact(name, type="report", description="self-contained HTML report of the run")
        artifact.add_file(str(path), name=path.name)
        run.log_artifact(artifact)
        logged = True
    return logged
