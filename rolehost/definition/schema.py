"""The published JSON schema of `rolehost.toml` (`rolehost schema`), as the model makes it.

The model's fields give most of it. What the model checks in its own validators (with
messages that name the rule) is stated here a second time, for the schema alone, with the
markers below; and what JSON Schema cannot state at all is named in MODEL_ONLY, which the
schema publishes. tests/test_schema.py holds the two to the same verdicts.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, GetJsonSchemaHandler
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import CoreSchema, core_schema

from rolehost.definition.scalars import DURATION_SYNTAX, MAX_DURATION, duration_pattern

# For the schema alone, where the model checks the rule itself, with a message that names
# it and never shows a value (a secret's, perhaps).
NO_NUL = "^[^\\u0000]*$"
VARIABLE_NAME = "^[^=\\u0000]+$"  # a part of an environment variable's name
# Python's white space (what str.strip removes), spelled out: `\s` is another set in
# each engine. (tests/test_schema.py checks it against str.isspace.)
BLANK = ("\\t\\n\\u000b\\u000c\\r\\u001c-\\u001f \\u0085\\u00a0\\u1680\\u2000-\\u200a"
         "\\u2028\\u2029\\u202f\\u205f\\u3000")
NOT_BLANK = f"^[^\\u0000]*[^\\u0000{BLANK}][^\\u0000]*$"
# What shlex.split reads without an error (a quote closed, no lone backslash at the end),
# whose first word is not empty (as `''` or `"" x` would make it).
SPLITS = ("^(?![ \\t\\r\\n]*(?:''|\"\")+(?:[ \\t\\r\\n]|$))"
          "(?:[^'\"\\\\]|\\\\[\\s\\S]|'[^']*'|\"(?:[^\"\\\\]|\\\\[\\s\\S])*\")*$")


class SchemaOnly:
    """Keywords the schema adds to a value's, for a rule the model checks itself."""

    def __init__(self, **keywords: Any) -> None:
        self.keywords = keywords

    def __get_pydantic_json_schema__(
        self, schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return {**handler(schema), **self.keywords}


class DurationSchema:
    """A duration's JSON schema: a number of seconds or a string with a unit, both held to
    the bounds of the field it is used in (WithJsonSchema would drop them: the schema said
    `minimum: 0` where the model wants more than 0)."""

    def __get_pydantic_json_schema__(
        self, schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        number = {**handler(schema), "type": "number"}
        # A bound given inside an annotation (as an optional duration's must be) comes
        # through under its pydantic name.
        for ours, theirs in (("gt", "exclusiveMinimum"), ("ge", "minimum"),
                             ("lt", "exclusiveMaximum"), ("le", "maximum")):
            if ours in number:
                number[theirs] = number.pop(ours)
        if "exclusiveMinimum" not in number:
            number.setdefault("minimum", 0)
        number.setdefault("maximum", MAX_DURATION)
        low = number.get("exclusiveMinimum", number.get("minimum", 0))
        text = duration_pattern(low, "exclusiveMinimum" not in number, number["maximum"])
        return {"anyOf": [number, {"type": "string", "pattern": text}],
                "description": DURATION_SYNTAX}


# What the published schema cannot state, and the model checks: JSON Schema cannot
# compare two values, nor tell 2.0 from 2. Published with it (`x-model-only`), so that an
# editor's user knows what `rolehost check` adds, and tests/test_schema.py which
# disagreements to expect: none other.
MODEL_ONLY = {
    "integral-float": "an integer key refuses `2.0`: a TOML float is not an integer, but JSON "
                      "has one type of number",
    "backoff-order": "`service.backoff_max` is at least `service.backoff_initial`, their "
                     "defaults included",
    "site-endpoint": "a role's `site.endpoint` names one of its http endpoints; without "
                     "it, the role has exactly one endpoint, an http one",
    "unique-ports": "each port, an endpoint's, an instance endpoint's or the metrics', is "
                    "used once in the service, whatever the host",
    "instance-ports": "an instance endpoint's `public_ports` run from a lower port to a "
                      "higher one, with one for each of its role's `instances`",
    "endpoint-names": "an endpoint's name is used once in its role, whatever its kind "
                      "(input, internal or instance)",
    "one-name-per-variable": "no two settings of a role, nor two of its local resources, "
                             "have names that make one environment variable (upper case, "
                             "`-` as `_`)",
    "float-precision": "a duration string finer than a float (over 15 significant digits, "
                       "or under 1e-300) is read as the nearest float, which may be across "
                       "a bound",
}


class _Generator(GenerateJsonSchema):
    def dict_schema(self, schema: core_schema.DictSchema) -> JsonSchemaValue:
        # A key's pattern goes to propertyNames: under patternProperties, where pydantic
        # puts it, a key that did not match was let through with any value.
        json_schema = super().dict_schema(schema)
        if (patterns := json_schema.pop("patternProperties", None)) is not None:
            [(pattern, values)] = patterns.items()
            json_schema["propertyNames"] = {**json_schema.get("propertyNames", {}),
                                            "pattern": pattern}
            json_schema["additionalProperties"] = values
        return json_schema


def model_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The JSON schema of one of the model's classes."""
    return model.model_json_schema(schema_generator=_Generator)


def published(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema of the whole file, as `rolehost schema` prints it."""
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "rolehost.toml"
    schema["description"] += (" Beyond what this schema says, `rolehost check` requires: "
                              + "; ".join(MODEL_ONLY.values()) + ".")
    schema["x-model-only"] = MODEL_ONLY
    return schema
