"""Family name -> `FamilyMapping`. Add a family: write `convert/<family>.py` with a `MAPPING` and list it here
(and in `models/families.py`)."""

from __future__ import annotations

from rlad_megatron.convert import llama, qwen2, qwen3
from rlad_megatron.convert.common import FamilyMapping
from rlad_megatron.errors import UserError
from rlad_megatron.models.families import ModelSpec

_MAPPINGS: dict[str, FamilyMapping] = {m.family: m for m in (qwen2.MAPPING, qwen3.MAPPING, llama.MAPPING)}


def register(mapping: FamilyMapping) -> None:
    """Add (or replace) a family's name table."""
    _MAPPINGS[mapping.family] = mapping


def supported_families() -> list[str]:
    return sorted(_MAPPINGS)


def mapping_for(spec: ModelSpec | str) -> FamilyMapping:
    """The name table for a spec (or family name); ValueError for a family without a converter."""
    family = spec if isinstance(spec, str) else spec.family
    try:
        return _MAPPINGS[family]
    except KeyError:
        raise UserError(
            f"no HF <-> Megatron converter for family {family!r}; supported: {supported_families()}"
        ) from None
