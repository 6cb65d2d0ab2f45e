"""Data modules: one file per data set, all sharing datamodules.base.BaseDataModule (see its docstring)."""
from datamodules.errors import DataError

__all__ = ["DataError"]
