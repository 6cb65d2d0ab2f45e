"""Interpretation callbacks. Each file holds one method: the algorithm as plain functions/classes at the top
(model, layer, images in; tensors out), the Lightning callback (schedule, shard, reduce, render, log) below."""
