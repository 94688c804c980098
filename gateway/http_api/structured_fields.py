"""The request fields that constrain the output to a structure: OpenAI's `response_format`, vLLM's
`structured_outputs` and its older `guided_json`, `guided_regex`, `guided_choice` and `guided_grammar`. A request
sets at most one of them (or a forced tool call, gateway/http_api/tools.py); it becomes one llguidance grammar,
together with the API field a compile error is to name."""

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import ConfigDict, Field

from apex_serve.errors import InvalidArgument
from gateway import structured
from gateway.http_api.strict import StrictBody


@dataclass(frozen=True)
class Constraint:
    grammar: str  # an llguidance grammar
    field: str  # the API field it was built from, named by a compile error


class JsonSchemaSpec(StrictBody):
    name: str
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None  # the output always follows the schema, strict or not


class ResponseFormat(StrictBody):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None


class StructuredOutputs(StrictBody):
    """vLLM's: exactly one constraint. Its other options (whitespace pattern, structural tags) are refused as
    unknown fields rather than ignored."""

    model_config = ConfigDict(strict=True, extra="forbid")

    json_: str | dict[str, Any] | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class StructuredFields(StrictBody):
    """The fields both endpoints take."""

    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    def constraints(self) -> list[Constraint]:
        """The constraint of each field set (one at most is served)."""
        found = []
        if self.response_format is not None and (c := _response_format(self.response_format)) is not None:
            found.append(c)
        if self.structured_outputs is not None:
            found.append(_structured_outputs(self.structured_outputs))
        if self.guided_json is not None:
            found.append(Constraint(structured.json_schema_grammar("guided_json", self.guided_json), "guided_json"))
        if self.guided_regex is not None:
            found.append(Constraint(structured.regex_grammar("guided_regex", self.guided_regex), "guided_regex"))
        if self.guided_choice is not None:
            found.append(Constraint(structured.choice_grammar("guided_choice", self.guided_choice), "guided_choice"))
        if self.guided_grammar is not None:
            found.append(Constraint(structured.cfg_grammar("guided_grammar", self.guided_grammar), "guided_grammar"))
        return found


def only_one(constraints: list[Constraint]) -> Constraint | None:
    """The one constraint of a request; InvalidArgument naming two of them when it sets more."""
    if len(constraints) > 1:
        first, second = (c.field.split(".")[0] for c in constraints[:2])
        raise InvalidArgument(second, f"cannot be combined with {first}: send one structured-output constraint")
    return constraints[0] if constraints else None


def _response_format(fmt: ResponseFormat) -> Constraint | None:
    if fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return Constraint(structured.ANY_JSON_OBJECT, "response_format")
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise InvalidArgument("response_format.json_schema.schema", "type json_schema needs json_schema.schema")
    field = "response_format.json_schema.schema"
    return Constraint(structured.json_schema_grammar(field, fmt.json_schema.schema_), field)


def _structured_outputs(spec: StructuredOutputs) -> Constraint:
    found: list[Constraint] = []
    if spec.json_ is not None:
        found.append(Constraint(structured.json_schema_grammar("structured_outputs.json", spec.json_),
                                "structured_outputs.json"))
    if spec.regex is not None:
        found.append(Constraint(structured.regex_grammar("structured_outputs.regex", spec.regex),
                                "structured_outputs.regex"))
    if spec.choice is not None:
        found.append(Constraint(structured.choice_grammar("structured_outputs.choice", spec.choice),
                                "structured_outputs.choice"))
    if spec.grammar is not None:
        found.append(Constraint(structured.cfg_grammar("structured_outputs.grammar", spec.grammar),
                                "structured_outputs.grammar"))
    if spec.json_object:
        found.append(Constraint(structured.ANY_JSON_OBJECT, "structured_outputs.json_object"))
    if len(found) != 1:
        names = ", ".join(c.field for c in found) or "none"
        raise InvalidArgument(
            "structured_outputs", f"needs exactly one of json, regex, choice, grammar, json_object; got {names}"
        )
    return found[0]
