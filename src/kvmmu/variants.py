"""Formulations of the shadow-zero NX assumption under v5.17 (the review's question).

A :class:`Variant` says which NX assumption ``reset_shadow_zero_bits_mask``
builds the shadow-zero table with, for flavors ``shadow`` and
``shadow_npt``, and whether that call sits inside the role-equality guard.
The four built-in variants are ordinary Variant objects; they also carry a
native rule so the core does not call back into Python, and the test suite
checks that each ``uses_nx`` function and its native rule agree.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Union

import numpy as np

UsesNx = Callable[[Dict[str, np.ndarray], np.ndarray, Any, str], Any]


@dataclass(frozen=True)
class Variant:
    """A v5.17 formulation of the shadow-zero table's NX assumption.

    ``uses_nx(role_fields, guests, host, flavor)`` is called once per batch
    with the decoded fields of each state's new role (``kvmmu.unpack_role``),
    the GUEST_DTYPE records, the HostConfig and the flavor; it returns one
    bool per state. ``inside_guard=False`` recomputes the table on every init,
    as patch 01/23 did, even when the role is unchanged.

    >>> import kvmmu, numpy as np
    >>> always = kvmmu.Variant("always_nx", uses_nx=lambda rf, g, host, fl: np.ones(len(g), bool))
    >>> g = kvmmu.guests(cr0=0, maxphyaddr=40)
    >>> ctx = kvmmu.init_mmu(g, "shadow", kvmmu.HostConfig(tdp_enabled=False), variant=always)
    >>> hex(int(ctx["shadow_zero"][0][0, 0]))  # PAE shadow root: bits 46..62 reserved, 63 free
    '0x7fffc00000000000'
    """

    name: str
    uses_nx: UsesNx
    inside_guard: bool = True
    native_rule: Optional[int] = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise TypeError("Variant.name must be a non-empty str")
        if not callable(self.uses_nx):
            raise TypeError(f"Variant {self.name!r}: uses_nx must be callable")
        if not isinstance(self.inside_guard, bool):
            raise TypeError(f"Variant {self.name!r}: inside_guard must be a bool")

    def __reduce__(self):
        # built-ins unpickle to the very same objects (engine checks identity)
        if BUILTIN_VARIANTS.get(self.name) is self:
            return (resolve_variant, (self.name,))
        return (Variant, (self.name, self.uses_nx, self.inside_guard, self.native_rule))


def _efer_nx(rf: Dict[str, np.ndarray]) -> np.ndarray:
    return rf["efer_nx"].astype(bool)


def _v517(rf, guests, host, flavor):
    # released v5.17: guest NX, or any shadow MMU when TDP is off
    return _efer_nx(rf) | (not host.tdp_enabled)


def _role_derived(rf, guests, host, flavor):
    # what the v5.18 root role encodes: NX forced for the non-nested shadow MMU
    if flavor == "shadow":
        return np.ones(len(guests), dtype=bool)
    return _efer_nx(rf)


def _literal(rf, guests, host, flavor):
    return _efer_nx(rf)


# Native rule numbers match the NX_* enum in _core.pyx.
BUILTIN_VARIANTS: Dict[str, Variant] = {
    "v517": Variant("v517", _v517, True, native_rule=0),
    "patch01": Variant("patch01", _role_derived, False, native_rule=1),
    "final": Variant("final", _role_derived, True, native_rule=1),
    "literal": Variant("literal", _literal, True, native_rule=2),
}


def resolve_variant(variant: Union[str, Variant]) -> Variant:
    """A built-in variant by name, or a user Variant as is."""
    if isinstance(variant, Variant):
        return variant
    if isinstance(variant, str) and variant in BUILTIN_VARIANTS:
        return BUILTIN_VARIANTS[variant]
    raise ValueError(f"variant must be one of {tuple(BUILTIN_VARIANTS)} or a kvmmu.Variant, "
                     f"got {variant!r}")


def as_python_variant(variant: Union[str, Variant]) -> Variant:
    """The same formulation without its native rule: forces the Python callback path."""
    v = resolve_variant(variant)
    return Variant(v.name, v.uses_nx, v.inside_guard)
