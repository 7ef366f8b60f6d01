"""The top-level Python API: every documented name resolves to the object in its module."""

from __future__ import annotations

import importlib

import pytest

import redblue


@pytest.mark.parametrize("name", sorted(redblue._EXPORTS))
def test_every_export_is_the_module_object(name: str) -> None:
    module = importlib.import_module(redblue._EXPORTS[name])
    assert getattr(redblue, name) is getattr(module, name)
    assert name in redblue.__all__


def test_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        redblue.nope  # noqa: B018
