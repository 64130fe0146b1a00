"""tree.state_roles reads and validates a state type's declared roles."""

import dataclasses
from typing import Any, NamedTuple

import pytest

from peftjax import tree

R = tree.StateRole


class Good(NamedTuple):
    count: Any
    mu: Any
    state_roles = {"mu": R.LIKE_PARAMS, "count": R.REPLICATED}


class Missing(NamedTuple):
    count: Any
    mu: Any
    state_roles = {"count": R.REPLICATED}


class Unknown(NamedTuple):
    count: Any
    state_roles = {"count": R.REPLICATED, "nu": R.LIKE_PARAMS}


class NotARole(NamedTuple):
    count: Any
    state_roles = {"count": "replicated"}


@dataclasses.dataclass
class Data:
    count: Any
    state_roles = {"count": R.REPLICATED}


class Plain:
    state_roles = {"count": R.REPLICATED}


def test_roles_in_field_order_and_none_when_undeclared():
    assert list(tree.state_roles(Good(0, 1)).items()) == [
        ("count", R.REPLICATED), ("mu", R.LIKE_PARAMS)]
    assert tree.state_roles(Data(0)) == {"count": R.REPLICATED}
    assert tree.state_roles((0, 1)) is None and tree.state_roles({"a": 1}) is None
    assert tree.state_roles(Good) is None  # the class itself is not a state


def test_bad_declarations_name_the_type_and_field():
    with pytest.raises(ValueError, match=r"Missing\.state_roles.*missing \['mu'\]"):
        tree.state_roles(Missing(0, 1))
    with pytest.raises(ValueError, match=r"Unknown\.state_roles.*unknown \['nu'\]"):
        tree.state_roles(Unknown(0))
    with pytest.raises(TypeError, match=r"NotARole\.state_roles\['count'\].*'replicated'"):
        tree.state_roles(NotARole(0))
    with pytest.raises(TypeError, match=r"Plain\.state_roles: only NamedTuple"):
        tree.state_roles(Plain())
