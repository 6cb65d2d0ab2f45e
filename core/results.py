"""Typed results: what each interpretation method returns, written to and read from the run folder as JSON.

Every result class names its `schema` and `schema_version`; `to_json()` writes them, `from_json()` checks them and
rebuilds the object, so compare.py, the report and the tests read results through the class that wrote them,
never by guessing keys. Changing a result's fields means raising its `schema_version` (and reading the old one in
`from_json` where that is possible).

    result.save(run / "interp/dissection/epoch_002/dissection.json")
    DissectionResult.load(path).summary()
    load_result(path)        # any result: the class is looked up by the file's schema
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

from core.io import write_json


class SchemaError(ValueError):
    """A JSON file is not the result it is read as (another schema, a newer version, or corrupt)."""


_REGISTRY: dict[str, type["Result"]] = {}


class Result:
    """Base of every typed result. Subclasses set `schema` and `schema_version` and implement `payload()` (a
    JSON-ready dict) and `from_payload(d)` (the inverse)."""

    schema: ClassVar[str] = ""
    schema_version: ClassVar[int] = 1

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.schema:
            _REGISTRY[cls.schema] = cls

    # subclasses
    def payload(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_payload(cls, data: dict[str, Any], version: int):
        raise NotImplementedError

    # shared
    def to_json(self) -> dict[str, Any]:
        return {"schema": self.schema, "schema_version": self.schema_version, **self.payload()}

    @classmethod
    def from_json(cls, data: dict[str, Any]):
        if not isinstance(data, dict) or "schema" not in data:
            raise SchemaError(f"not a typed result (no 'schema' key); expected {cls.schema!r}")
        if cls.schema and data["schema"] != cls.schema:
            raise SchemaError(f"this is a {data['schema']!r} result, not {cls.schema!r}")
        version = int(data.get("schema_version", 0))
        if version > cls.schema_version:
            raise SchemaError(f"{cls.schema!r} result of schema version {version}; this code reads up to "
                              f"{cls.schema_version}: update the project to read it")
        body = {k: v for k, v in data.items() if k not in ("schema", "schema_version")}
        return cls.from_payload(body, version)

    def save(self, path: str | Path) -> Path:
        return write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path):
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
            raise SchemaError(f"{path}: unreadable ({err})") from err
        try:
            return cls.from_json(data)
        except SchemaError as err:
            raise SchemaError(f"{path}: {err}") from err


def result_class(schema: str) -> type[Result]:
    if schema not in _REGISTRY:
        raise SchemaError(f"unknown result schema {schema!r}; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[schema]


def load_result(path: str | Path) -> Result:
    """Any typed result file: its class is found by the file's `schema` (the module defining it must be imported;
    algorithms/__init__.py imports all of them)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SchemaError(f"{path}: unreadable ({err})") from err
    if not isinstance(data, dict) or "schema" not in data:
        raise SchemaError(f"{path}: not a typed result (no 'schema' key)")
    return result_class(data["schema"]).from_json(data)
