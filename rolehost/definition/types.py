"""The value types every part of the model (`__init__`, `endpoints`, `site`) declares its
keys with, and their base class: one spelling of each rule.

TOML has real integers, booleans and strings: a key takes the one its field says, as it
is. Pydantic's lax mode would turn "8080" into 8080, true into 1 and "yes" or 1 into
True, all of which the published schema refuses; a typo would pass unnoticed. Strict
field by field, not on the whole model: `app` (a Path) and the enums come from TOML
strings, and `controller.configure` re-validates a `model_dump()`, Paths and enums in it.
A TOML float is refused where an integer is expected, 2.0 included: it is a different
type in TOML, as "2" is. (JSON has one number type, so the published schema's "integer"
takes 2.0: see schema.MODEL_ONLY.)
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from rolehost.definition.scalars import parse_duration
from rolehost.definition.schema import DurationSchema

Duration = Annotated[float, BeforeValidator(parse_duration), DurationSchema()]
Integer = Annotated[int, Field(strict=True)]
Boolean = Annotated[bool, Field(strict=True)]
Text = Annotated[str, Field(strict=True)]


class Model(BaseModel):
    """A table of `rolehost.toml`: no unknown key, and frozen once read."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
