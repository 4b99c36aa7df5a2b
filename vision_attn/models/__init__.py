"""timm model names registered by attnplug (import side effect, like timm's own families)."""

from __future__ import annotations

import importlib

_FAMILIES = ("agent_deit", "coord_eca")
_loaded: list[str] = []
for _name in _FAMILIES:
    importlib.import_module(f"{__name__}.{_name}")
    _loaded.append(_name)


def registered_names() -> list[str]:
    """All timm model names that attnplug registers (timm keys its registry by module name)."""
    import timm

    return sorted(n for fam in _loaded for n in timm.list_models(module=fam))
