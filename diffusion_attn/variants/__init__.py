"""Diffusion attention variants: what is computed (see docs/internal-api.md section 2).

`VARIANTS` maps registry names to variant classes; "neighborhood" is an alias of "gna".
"""

from __future__ import annotations

from .agentsd import AgentSD
from .base import AttnContext, AttnPlan, TokenLayout, Variant, check_range
from .boundary import Boundary
from .lite import LiteAttention
from .neighborhood import Neighborhood
from .radial import Radial
from .regional import Entity, Regional
from .riflex import RIFLEx
from .softpag import SoftPAG
from .ultravico import UltraViCo

__all__ = [
    "AttnContext",
    "AttnPlan",
    "TokenLayout",
    "Variant",
    "check_range",
    "Radial",
    "Neighborhood",
    "LiteAttention",
    "SoftPAG",
    "UltraViCo",
    "RIFLEx",
    "AgentSD",
    "Boundary",
    "Entity",
    "Regional",
    "VARIANTS",
]

VARIANTS: dict[str, type[Variant]] = {
    "radial": Radial,
    "gna": Neighborhood,
    "neighborhood": Neighborhood,
    "lite": LiteAttention,
    "agentsd": AgentSD,
    "softpag": SoftPAG,
    "ultravico": UltraViCo,
    "riflex": RIFLEx,
}
