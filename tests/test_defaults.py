"""Each default lives in one place: the yaml holds the run defaults, and where the Python class or function that a
yaml entry builds has a default for the same parameter, the two are equal (a notebook call and `train.py` then behave
the same). A Python default of None means "not set here" and is not compared."""
from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest
from omegaconf import DictConfig, ListConfig, OmegaConf

from tests.conftest import ROOT

SKIP_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_"}


def target_defaults(target: str) -> dict:
    """Signature defaults of a class (its __init__ and every base class __init__ it forwards **kwargs to) or a
    function."""
    module, _, name = target.rpartition(".")
    obj = getattr(importlib.import_module(module), name)
    out = {}
    chain = [c.__init__ for c in inspect.getmro(obj) if "__init__" in vars(c)] if inspect.isclass(obj) else [obj]
    for fn in chain:
        try:
            params = inspect.signature(fn).parameters.values()
        except (TypeError, ValueError):
            continue
        for p in params:
            if p.default is not inspect.Parameter.empty and p.name not in out:
                out[p.name] = p.default
    return out


def plain(value):
    return OmegaConf.to_container(value, resolve=False) if isinstance(value, (DictConfig, ListConfig)) else value


def same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b


def entries():
    """(file, key path, node) of every `_target_` node in conf/callbacks and conf/model."""
    for folder in ("callbacks", "model"):
        for f in sorted((ROOT / "conf" / folder).glob("*.yaml")):
            cfg = OmegaConf.load(f)

            def walk(node, path):
                if isinstance(node, DictConfig):
                    if "_target_" in node and not str(node._target_).startswith(("torch.", "pytorch_lightning.")):
                        yield f.relative_to(ROOT).as_posix(), path, node
                    for k in node:
                        if k != "defaults":
                            yield from walk(node._get_node(k), f"{path}.{k}" if path else str(k))
            yield from walk(cfg, "")


CASES = list(entries())


@pytest.mark.parametrize("file,path,node", CASES, ids=[f"{f}:{p}" for f, p, _ in CASES])
def test_yaml_values_equal_the_python_defaults(file, path, node):
    defaults = target_defaults(str(node._target_))
    differ = []
    for key in node:
        if key in SKIP_KEYS or key not in defaults or defaults[key] is None:
            continue
        raw = node._get_node(key)._value() if hasattr(node._get_node(key), "_value") else None
        if isinstance(raw, str) and "${" in raw:
            continue  # interpolated from elsewhere in the config
        value = plain(node[key])
        if isinstance(value, dict) and "_target_" in value:
            continue  # a factory (optimizer, scheduler): built by Hydra
        if not same(value, defaults[key]):
            differ.append(f"{key}: yaml {value!r} vs Python {defaults[key]!r}")
    assert not differ, f"{file} {path} ({node._target_}):\n" + "\n".join(differ)
