"""Diffusion attention variants: what is computed (see docs/internal-api.md section 2).

`VARIANTS` maps registry names to variant classes; each variant file registers its class with
`@register_variant` (name and aliases: "neighborhood" is an alias of "gna"). Importing this package
imports every variant, so `VARIANTS` is complete.
"""

from __future__ import annotations

from .base import VARIANTS, AttnContext, AttnPlan, TokenLayout, Variant, check_range, register_variant

# registration order is the order `attnplug list` and error messages show
# isort: off
from .radial import Radial
from .neighborhood import Neighborhood
from .lite import LiteAttention
from .agentsd import AgentSD
from .softpag import SoftPAG
from .ultravico import UltraViCo
from .riflex import RIFLEx
from .regional import Entity, Regional
from .boundary import Boundary
# isort: on

__all__ = [
    "AttnContext",
    "AttnPlan",
    "TokenLayout",
    "Variant",
    "check_range",
    "register_variant",
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
