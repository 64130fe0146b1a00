# SPDX-License-Identifier: Apache-2.0
"""How the fields of an optimizer (or training) state relate to the parameters.

A state type declares, per field, one role out of a closed set, so that a
consumer (``peftjax.shard.state_shardings``) can place every leaf without
knowing the type:

* ``StateRole.REPLICATED``: counters, PRNG key data, hyperparameters; each
  device holds the whole field.
* ``StateRole.LIKE_PARAMS``: a tree whose leaf paths end with a parameter's
  path (``mu/<path>``, ``inner_state/0/nu/<path>``): Adam moments, and
  low-rank moments ``(batch..., r, out)`` / ``(batch..., in, r)`` of a
  projected parameter. A leaf follows the parameter whose path its own path
  ends with; a leaf that matches no parameter is replicated. This is also
  what an undeclared state (``optax.ScaleByAdamState``) gets.
* ``StateRole.PROJECTOR``: a tree like the parameters holding a projector
  basis per parameter, the parameter's batch axes flattened in front:
  ``(S, in, r)`` or ``(S, out, r)``, a pair ``(.../0, .../1)`` for two-sided
  projectors. The leaf's path starts with the parameter's path.
* ``StateRole.SPARSE_SLOTS``: ``{path: (batch..., k)}`` arrays aligned with
  the sparse delta's ``values`` at ``<path>/values`` of the trained tree
  (SpIEL's candidates and gradient sums).

The declaration is a class attribute ``state_roles``, a mapping from every
field name to its role, on a ``NamedTuple`` or dataclass state::

    class MyState(NamedTuple):
        count: jax.Array
        mu: Any
        state_roles = {"count": StateRole.REPLICATED, "mu": StateRole.LIKE_PARAMS}

``state_roles(node)`` reads and validates it.

Exports: ``StateRole``, ``state_roles``.
"""

import dataclasses
import enum
from collections.abc import Mapping
from typing import Any


class StateRole(enum.Enum):
    """The role of one state field relative to the parameters (see the module doc).

    Members: ``REPLICATED``, ``LIKE_PARAMS``, ``PROJECTOR``, ``SPARSE_SLOTS``.

    Example:
      >>> StateRole.LIKE_PARAMS.value
      'like_params'
    """

    REPLICATED = "replicated"
    LIKE_PARAMS = "like_params"
    PROJECTOR = "projector"
    SPARSE_SLOTS = "sparse_slots"


def _field_names(node: Any) -> tuple[str, ...] | None:
    if isinstance(node, tuple) and hasattr(type(node), "_fields"):
        return tuple(type(node)._fields)
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        return tuple(f.name for f in dataclasses.fields(node))
    return None


def state_roles(node: Any) -> dict[str, StateRole] | None:
    """Returns the roles a state node's type declares, or None if it declares none.

    Args:
      node: any pytree node; a ``NamedTuple`` or dataclass instance whose
        class has a ``state_roles`` attribute declares roles.

    Returns:
      ``{field name: StateRole}`` covering every field, in field order, or
      None when ``node``'s type has no ``state_roles`` attribute.

    Raises:
      TypeError: the declaring type is not a ``NamedTuple`` or dataclass, or
        a role is not a ``StateRole``.
      ValueError: the declaration misses a field or names one the type does
        not have.

    Example:
      >>> from typing import Any, NamedTuple
      >>> class S(NamedTuple):
      ...     count: Any
      ...     mu: Any
      ...     state_roles = {"count": StateRole.REPLICATED,
      ...                    "mu": StateRole.LIKE_PARAMS}
      >>> state_roles(S(0, {}))["mu"]
      <StateRole.LIKE_PARAMS: 'like_params'>
      >>> state_roles((0, {})) is None
      True
    """
    if isinstance(node, type):
        return None
    declared = getattr(type(node), "state_roles", None)
    if declared is None:
        return None
    name = type(node).__qualname__
    fields = _field_names(node)
    if fields is None:
        raise TypeError(f"{name}.state_roles: only NamedTuple and dataclass states "
                        "can declare state roles (the roles name their fields)")
    if not isinstance(declared, Mapping):
        raise TypeError(f"{name}.state_roles must map field names to StateRole, "
                        f"got {type(declared).__name__}")
    missing = [f for f in fields if f not in declared]
    extra = [f for f in declared if f not in fields]
    if missing or extra:
        raise ValueError(f"{name}.state_roles must name every field of {fields} once: "
                         f"missing {missing}, unknown {extra}")
    out = {}
    for f in fields:
        role = declared[f]
        if not isinstance(role, StateRole):
            raise TypeError(f"{name}.state_roles[{f!r}] must be a StateRole "
                            f"({', '.join(r.name for r in StateRole)}), got {role!r}")
        out[f] = role
    return out
