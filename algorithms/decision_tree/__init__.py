"""The decision tree over a network's rationales (Zhang, Yang, Ma, Wu, "Interpreting CNNs via Decision Trees",
CVPR 2019): per image the decomposition of its predicted class score over a probe layer's units
(rationale.py), a bottom-up tree of sparse shared decision modes (build.py, tree.py), descended to explain an image;
typed result (result.py) and figure (render.py). Plain code, no Lightning; callbacks/decision_tree.py schedules it.

    rat = collect_rationales(model, loader)                          # exact for a UnitHead, else grad x activation
    res = build_tree(rat, labels=Labels.from_dissection(dissection, probe.class_concepts), class_names=names)
    explain(res, rho, pred, labels=...)[0].statement(res)            # "red-circle via node 5 (depth 3): red 52% ..."
"""
from algorithms.decision_tree.rationale import Rationales, collect_rationales  # noqa: F401
from algorithms.decision_tree.result import DecisionTreeResult, TreeNode  # noqa: F401
from algorithms.decision_tree.tree import Explanation, Labels, build_tree, descend, explain  # noqa: F401
