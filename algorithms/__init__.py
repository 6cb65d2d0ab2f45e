"""Interpretation methods as plain code: model, layer and images in; tensors and typed results out.

No module here imports pytorch_lightning: every method works on any model that offers the protocol of
core/protocol.py, from a notebook as well as from the callbacks in callbacks/, which only schedule, shard, reduce,
render and log. Imports point down only: algorithms use core/, models/ (Lightning-free parts) and datamodules/
(data formats), never callbacks/ or pipeline/.
"""

# the modules whose typed results core.results.load_result must know (each registers its schemas on import)
from algorithms import capsules, composability, dissection_result, dynk_stats, icnn_metrics, prototypes  # noqa: F401
from algorithms.attribution import result as _attribution_result  # noqa: F401
from algorithms.decision_tree import result as _decision_tree_result  # noqa: F401
from algorithms.featviz import result as _featviz_result  # noqa: F401
from algorithms.gan import result as _gan_result  # noqa: F401
