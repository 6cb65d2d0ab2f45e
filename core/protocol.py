"""What a model offers to interpretation methods: the one contract between models/ and algorithms/ + callbacks/.

Every interpretation method needs only what is listed here, never a model class. A model (a `ClassifierModule`
subclass, a plain `LightningModule` or any `nn.Module`) that implements `Interpretable` gets every generic method
(dissection, attribution, feature visualisation); each optional capability below unlocks the methods that need it.
Callbacks decide whether they apply with `isinstance(model, <capability>)` (the protocols are runtime-checkable, so
no base class is needed: the members just have to exist).

    class MyNet(LightningModule):
        def probe_layers(self):                      # named layers in forward order
            return OrderedDict([("conv1", self.conv1), ("conv2", self.conv2)])
        def class_scores(self, x):                   # [B, K] what decisions and attributions are about
            return self(x)

See docs/extending.md for worked examples.

| capability | members | unlocks |
|---|---|---|
| `Interpretable` | `probe_layers()`, `class_scores(x)`; optional `default_probe_layer: str`, `layer_pooling: dict` | dissection, attribution, featviz, ICNN metrics on any layer |
| `UnitHead` | `unit_contributions(x)`, `unit_layer: str` | composability + IBD, CAM, Dynamic-K statistics of a dense head |
| `RoutedUnitHead` | `UnitHead` + `routed_mask(a)` | routed evidence in composability, Dynamic-K statistics |
| `PrototypeModel` | prototype vectors, similarity maps, last layer, push records | prototype gallery, "this looks like that", purity |
| `CapsuleModel` | `capsules(x)`, `decode(poses, classes)` | capsule-dimension perturbations, coupling maps |
| `FilterTemplateModel` | `filter_class(layer)`, `template_layers` | ICNN location instability and part interpretability |
| `GenerativeModel` | `latent_dim`, `probe_layers()`, `generate(z)`, `latent_affine()`, `concept_segmenter` | GAN dissection, unit interventions, latent directions |
| `ConceptSegmenter` | `concept_names`, `concept_probabilities(x)`, `embedding(x)`, `class_scores(x)` | the measuring instrument of the GAN methods |
"""
from __future__ import annotations

from typing import Any, Mapping, Protocol, runtime_checkable

import torch
from torch import nn


def protocol_members(capability: type) -> list[str]:
    """The members a capability requires (its methods and annotated attributes)."""
    attrs = getattr(capability, "__protocol_attrs__", None)
    if attrs is None:  # Python < 3.12
        from typing import _get_protocol_attrs  # type: ignore[attr-defined]
        attrs = _get_protocol_attrs(capability)
    return sorted(m for m in attrs if not m.startswith("_"))


class _CapabilityMeta(type(Protocol)):
    """isinstance(model, <capability>) asks hasattr for every member. Python 3.12 changed runtime-checkable
    protocols to look members up statically (inspect.getattr_static), which cannot see what nn.Module keeps in
    _parameters, _buffers and _modules (a prototype vector, a last layer): with it ProtoPNet would not be a
    PrototypeModel. hasattr sees them on every Python version. As in typing, a method set to None counts as absent."""

    def __instancecheck__(cls, instance) -> bool:
        if not getattr(cls, "_is_protocol", False):
            return super().__instancecheck__(instance)
        for m in protocol_members(cls):
            if not hasattr(instance, m):
                return False
            # as in typing: a method member set to None on the instance marks "not implemented"
            if callable(getattr(cls, m, None)) and getattr(instance, m) is None:
                return False
        return True


@runtime_checkable
class Interpretable(Protocol, metaclass=_CapabilityMeta):
    """The minimum: named probe layers and class scores.

    - `probe_layers()` -> ordered mapping name -> nn.Module, in forward order; each module's output is a feature map
      (conv stages) or a tensor a method can read. Names are what configs use (`callbacks.dissection.layers=[...]`).
    - `class_scores(x)` -> [B, K]: the per-class scores that decisions and attributions are about (logits; capsule
      lengths for CapsNet). It must be differentiable with respect to every probe layer's output.
    - optional attribute `default_probe_layer: str`: the layer methods probe when none is configured; without it the
      last probe layer is the default.
    - optional attribute `layer_pooling: dict[str, str]`: probe layer name -> "max" where the model itself reads that
      layer's map through its maximum over positions (ProtoPNet's similarity maps: a prototype's evidence is its
      best-matching patch); every other layer is read through its spatial mean (a global-average-pooled head).
      Feature visualisation measures a unit's activation the way the model reads it (core.probe.layer_pooling).
    """

    def probe_layers(self) -> Mapping[str, nn.Module]: ...

    def class_scores(self, x: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class UnitHead(Protocol, metaclass=_CapabilityMeta):
    """The decision is a sum over units: score_c = sum_j a_j W_cj (+ a bias that does not depend on the image).

    - `unit_contributions(x)` -> (activations a [B, D], class weights W [K, D]); the evidence of unit j for class c on
      an image is a_j W_cj.
    - `unit_layer: str`: the probe layer whose channels are the D units (its spatial mean, or its max for prototypes,
      is a), so that dissection's concept labels of that layer name the units of the decision.
    """

    unit_layer: str

    def unit_contributions(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


@runtime_checkable
class RoutedUnitHead(UnitHead, Protocol, metaclass=_CapabilityMeta):
    """A `UnitHead` whose decision uses only some connections per image (Dynamic-K: the K largest votes).

    - `routed_mask(a)` -> bool [B, K, D] from the unit activations a [B, D] of `unit_contributions(x)`: True where the
      connection of unit j to class c is used, so that score_c = sum_j routed[c, j] a_j W_cj + b_c. It takes the
      units, not the images, because routing is the head's business: the evidence of a batch then costs one pass
      through the network below the head.
    """

    def routed_mask(self, units: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class PrototypeModel(Protocol, metaclass=_CapabilityMeta):
    """Prototypical parts (ProtoPNet): a decision is a weighted sum of prototype similarities.

    - `prototype_vectors` [m, D], `prototype_classes` [m] (owning class), `prototype_active` bool [m]
    - `prototype_features(x)` -> patch features [B, D, H, W]; `distances(z)` -> the distance of every prototype to
      every patch of z, [B, m, H, W] (ProtoPNet: squared L2); `similarity_maps(x)` -> [B, m, H, W], a decreasing
      function of `distances(prototype_features(x))`
    - `last_layer`: nn.Linear(m, K) from similarities to class scores
    - `last_push`: the latest push record (models.protopnet_push.PushResult) or None; `push_history`: one dict per
      push with its epoch
    """

    prototype_vectors: torch.Tensor
    prototype_active: torch.Tensor
    last_layer: nn.Module
    last_push: Any
    push_history: list

    @property
    def prototype_classes(self) -> torch.Tensor: ...

    def prototype_features(self, x: torch.Tensor) -> torch.Tensor: ...

    def distances(self, z: torch.Tensor) -> torch.Tensor: ...

    def similarity_maps(self, x: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class CapsuleModel(Protocol, metaclass=_CapabilityMeta):
    """Capsules with routing (CapsNet).

    - `capsules(x, labels=None, reconstruct=True)` -> an object with `lengths` [B, K], `poses` [B, K, d],
      `couplings` [B, I, K], `reconstruction` and `target` (images in [0, 1]) when reconstructing
    - `decode(poses [N, K, d], classes [N])` -> images [N, C, H, W] in [0, 1]
    - `primary_types`, `grid_size`: the primary-capsule grid (I = types x grid x grid)
    """

    primary_types: int
    grid_size: int

    def capsules(self, x: torch.Tensor, labels: torch.Tensor | None = None, reconstruct: bool = True) -> Any: ...

    def decode(self, poses: torch.Tensor, classes: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class FilterTemplateModel(Protocol, metaclass=_CapabilityMeta):
    """Filters trained towards one part at one position (the interpretable CNN's templates).

    - `template_layers`: probe layer names of the filters' (unmasked) maps, lowest first (empty when no filter has a
      template, e.g. the ICNN baseline)
    - `filter_class(layer=-1)` -> [F] the category each filter of that layer is assigned to
    """

    template_layers: list

    def filter_class(self, layer: int = -1) -> torch.Tensor: ...


@runtime_checkable
class GenerativeModel(Protocol, metaclass=_CapabilityMeta):
    """An image generator G(z) (GAN Dissection, SeFa; docs/gan.md).

    - `latent_dim: int`; `sample_latent(n, generator=None)` -> z [n, latent_dim] from the training prior
    - `generate(z)` -> images [n, C, H, W] in [0, 1]; `probe_layers()` -> the generator's named feature maps in
      forward order (units = channels), hooked by the GAN methods while `generate` runs
    - `latent_affine()` -> (A [D, latent_dim], b [D]): the first step from z is y = A z + b (SeFa's closed form)
    - `concept_segmenter`: a `ConceptSegmenter` that labels concepts on generated images, or None (then the GAN
      methods raise a ConfigError that names the model option to set)
    """

    latent_dim: int
    concept_segmenter: Any

    def sample_latent(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor: ...

    def generate(self, z: torch.Tensor) -> torch.Tensor: ...

    def probe_layers(self) -> Mapping[str, nn.Module]: ...

    def latent_affine(self) -> tuple[torch.Tensor, torch.Tensor]: ...


@runtime_checkable
class ConceptSegmenter(Protocol, metaclass=_CapabilityMeta):
    """Pixel concept labels on images in [0, 1] (the role of the parsing network in GAN Dissection).

    - `concept_names`: ["-", name_1, ...] as in the Broden vocabulary (index 0 = unlabelled)
    - `concept_probabilities(x)` -> [B, C+1, H, W] per-pixel, per-concept probabilities (multi-label: a pixel may
      be "circle", "red" and "striped" at once); a concept is present where it exceeds 0.5
    - `embedding(x)` -> [B, F] image features (the domain Fréchet distance); `class_scores(x)` -> [B, K]
    """

    concept_names: list

    def concept_probabilities(self, x: torch.Tensor) -> torch.Tensor: ...

    def embedding(self, x: torch.Tensor) -> torch.Tensor: ...

    def class_scores(self, x: torch.Tensor) -> torch.Tensor: ...


CAPABILITIES = (Interpretable, UnitHead, RoutedUnitHead, PrototypeModel, CapsuleModel, FilterTemplateModel,
                GenerativeModel, ConceptSegmenter)


def capabilities(model: Any) -> list[str]:
    """Names of the capabilities `model` offers (for messages and the run report)."""
    return [c.__name__ for c in CAPABILITIES if isinstance(model, c)]


def describe_missing(model: Any, capability: type) -> str:
    """Which members of `capability` the model lacks, for an error message."""
    missing = [m for m in protocol_members(capability) if not hasattr(model, m)]
    return (f"{type(model).__name__} does not offer {capability.__name__} (missing: {', '.join(missing) or '?'}; "
            f"see core/protocol.py and docs/extending.md)")
