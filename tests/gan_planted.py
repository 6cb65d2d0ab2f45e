"""A generator with known units (test helper): layer "units" has 12 channels; units 0-2 draw concept 1, units 3-5
concept 2, units 6-8 concept 3 (concept c fills image channel c-1 where any of its units is on), units 9-11 draw
nothing. Its segmenter reads the image channels back (the ground truth of this generator)."""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

UNITS = 12
LATENT = UNITS * 4 * 4
OWNER = torch.tensor([1, 1, 1, 2, 2, 2, 3, 3, 3, 0, 0, 0])     # concept drawn by each unit (0 = none)


class ChannelSegmenter(nn.Module):
    concept_names = ["-", "red", "green", "blue"]
    concept_categories = ["", "color", "color", "color"]

    def concept_probabilities(self, x):
        return torch.cat([torch.zeros_like(x[:, :1]), x], dim=1)

    def embedding(self, x):
        return x.mean(dim=(2, 3))

    def class_scores(self, x):
        return 10 * x.mean(dim=(2, 3))


class Units(nn.Module):
    def __init__(self):
        super().__init__()
        # one latent coordinate per unit and position, on where it exceeds 2.3 (~1%): independent, sparse units
        self.fc = nn.Linear(LATENT, UNITS * 4 * 4)
        with torch.no_grad():
            self.fc.weight.copy_(torch.eye(LATENT))
            self.fc.bias.fill_(-2.3)

    def forward(self, z):
        return F.relu(self.fc(z).view(-1, UNITS, 4, 4))


class Render(nn.Module):
    def forward(self, r):
        up = F.interpolate(r, size=(16, 16), mode="bilinear", align_corners=False)
        chans = [up[:, OWNER == c].amax(dim=1) for c in (1, 2, 3)]
        return (torch.stack(chans, 1) > 0.05).float()


class PlantedGenerator(nn.Module):
    latent_dim = LATENT

    def __init__(self, segmenter=True):
        super().__init__()
        torch.manual_seed(0)
        self.units = Units()
        self.render = Render()
        self.concept_segmenter = ChannelSegmenter() if segmenter else None

    def probe_layers(self):
        return OrderedDict([("units", self.units), ("render", self.render)])

    def sample_latent(self, n, generator=None):
        return torch.randn(n, LATENT, generator=generator)

    def generate(self, z):
        return self.render(self.units(z))

    forward = generate

    def latent_affine(self):
        return self.units.fc.weight, self.units.fc.bias
