"""Small helpers on a model's module tree, for every stage that edits it."""

from __future__ import annotations

from torch import nn


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule ``name`` (a dotted path) is."""
    parent_name, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, attr, new)
