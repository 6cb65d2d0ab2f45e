"""Feature visualization by optimisation (Olah et al., Distill 2017) as three small vocabularies the caller
composes — objectives, parametrisations, transforms — plus what a unit responds to in the data. Plain code (no
Lightning):

- objectives.py: `Objective` (+, -, scaling), `channel`, `neuron`, `class_logit`, `diversity`; `unit_objective`,
  `featviz_jobs` (many units and classes as one batch)
- parametrisations.py: `FourierImage`, `PixelImage`, `PARAMETRISATIONS`, `colour_correlation_sqrt`
- transforms.py: `pad`, `jitter`, `random_scale`, `random_rotate`, `compose` (fused affine), `fit_size`,
  `standard_transforms`
- optimise.py: `visualize`, `objective_forward`, `unit_activation`, `optimised_layer`, `visualize_units`
- dataset_examples.py: `top_activations` (`top_activations_of_maps` from maps already computed), `keep_top`, `crop_patches`, `first_layer_filters`
- result.py: `FeatvizResult` (schema "featviz"), `featviz_result`, `GAIN_FLOOR`
- render.py: `save_grid`, `save_patch_grid`, `patch_crops`, `save_unit_sheet` (a labelled sheet: unit, visualisation, top patches), `unit_label`

    param = FourierImage(batch=8, channels=3, size=64, device=model.device)
    obj = channel("backbone.conv4:pre_relu", range(8)) - 0.1 * diversity("backbone.conv4")
    images01, info = visualize(model, obj, param, standard_transforms(64 / 224), steps=256, normalize=dm.normalize)
"""
from algorithms.featviz.dataset_examples import (TopActivations, crop_patches, first_layer_filters, keep_top,
                                                 no_top_activations, top_activations,
                                                 top_activations_of_maps)
from algorithms.featviz.objectives import (Objective, channel, class_logit, diversity, featviz_jobs, neuron,
                                           unit_objective)
from algorithms.featviz.optimise import (objective_forward, objective_points, optimised_layer, unit_activation,
                                         visualize, visualize_units)
from algorithms.featviz.parametrisations import (IMAGENET_COLOUR_SQRT, PARAMETRISATIONS, FourierImage, PixelImage,
                                                 colour_correlation_sqrt)
from algorithms.featviz.render import patch_crops, save_grid, save_patch_grid, save_unit_sheet, unit_label
from algorithms.featviz.result import GAIN_FLOOR, FeatvizResult, FeatvizUnit, TopPatches, featviz_result
from algorithms.featviz.transforms import (AffineTransform, compose, fit_size, jitter, pad, random_rotate,
                                           random_scale, standard_transforms)

__all__ = ["AffineTransform", "FeatvizResult", "FeatvizUnit", "FourierImage", "GAIN_FLOOR", "IMAGENET_COLOUR_SQRT",
           "Objective", "PARAMETRISATIONS", "PixelImage", "TopActivations", "TopPatches", "channel", "class_logit",
           "colour_correlation_sqrt", "compose", "crop_patches", "diversity", "featviz_jobs", "featviz_result",
           "first_layer_filters", "fit_size", "jitter", "keep_top", "neuron", "no_top_activations",
           "objective_forward", "objective_points", "optimised_layer", "pad", "patch_crops", "random_rotate", "random_scale",
           "save_grid", "save_patch_grid", "save_unit_sheet", "standard_transforms", "top_activations", "top_activations_of_maps", "unit_activation",
           "unit_label", "unit_objective", "visualize", "visualize_units"]
