"""Hook-name validation with near-match suggestions."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mechscope.errors import MechscopeError, near_matches

if TYPE_CHECKING:
    from mechscope.models.load import Model


def check_hook_name(model: "Model", name: str) -> str:
    """Return ``name`` if the model has a hook point of that name, else raise a clear error."""
    names = sorted(model.bridge.hook_dict.keys())
    if name in model.bridge.hook_dict:
        return name
    raise MechscopeError(
        f"The model has no hook named '{name}'.{near_matches(name, names)} "
        f"(Hook names look like 'blocks.3.hook_resid_post'; there are {len(names)} in all.)"
    )
