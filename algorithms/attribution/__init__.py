"""Attribution maps (Grad-CAM family, saliency, guided backprop, occlusion) and their evaluation against object
masks, as plain code (no Lightning):

- targets.py: `resolve_target` (which class a map explains), `explained_classes`
- methods.py: `GradCAM`, `CAM`, `Saliency`, `GuidedBackprop`, `GuidedGradCAM`, `Occlusion`, `PrototypeMaps`; `METHODS`, `get_method`,
  `make_method`, `attribution_maps`, `cam_unavailable` — one call shape `Method(model, layer).attribute(x, target)`
- maps.py: `upsample`, `heatmap`
- metrics.py: `pointing_game`, `energy_in_mask`, `deletion_curve`, `curve_auc`
- sanity.py: `randomize_top_layers`, `spearman`, `average_ranks` (model-randomisation sanity check)
- masks.py: `ProbeMasks`, `collate_probe`, `probe_items` (probe batches with ground-truth object masks)
- evaluate.py: `evaluate` -> `AttributionTotals` (sums, reducible over ranks) -> metrics
- result.py: `AttributionResult` (schema "attribution")
- render.py: `render_overlays`
"""
from algorithms.attribution.evaluate import COLUMNS, AttributionTotals, evaluate
from algorithms.attribution.maps import heatmap, upsample
from algorithms.attribution.masks import SPLITS, PairsAsItems, ProbeMasks, collate_probe, probe_items
from algorithms.attribution.methods import (CAM, METHODS, Attribution, GradCAM, GuidedBackprop, GuidedGradCAM,
                                            Occlusion, PrototypeMaps, Saliency, attribution_maps, cam_unavailable,
                                            get_method, layer_point, make_method, method_unavailable)
from algorithms.attribution.metrics import (MAX_DELETION_STEPS, curve_auc, deletion_curve, energy_in_mask,
                                            pointing_game)
from algorithms.attribution.render import render_overlays
from algorithms.attribution.result import METRICS, AttributionResult
from algorithms.attribution.sanity import average_ranks, detached_copy, randomize_top_layers, spearman
from algorithms.attribution.targets import TARGETS, explained_classes, resolve_target

__all__ = ["AttributionResult", "AttributionTotals", "Attribution", "CAM", "COLUMNS", "GradCAM", "GuidedBackprop",
           "GuidedGradCAM", "MAX_DELETION_STEPS", "PrototypeMaps", "method_unavailable", "METHODS", "METRICS", "Occlusion", "PairsAsItems", "ProbeMasks",
           "SPLITS", "Saliency", "TARGETS", "attribution_maps", "average_ranks", "cam_unavailable", "collate_probe",
           "curve_auc", "deletion_curve", "detached_copy", "energy_in_mask", "evaluate", "explained_classes",
           "get_method", "heatmap", "layer_point", "make_method", "pointing_game", "probe_items",
           "randomize_top_layers", "render_overlays", "resolve_target", "spearman", "upsample"]
