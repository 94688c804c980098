"""Function tools in chat: `tools` and a `tool_choice` that forces a call, served as vLLM serves them.

A named function constrains the output to that function's parameters schema and returns it as the call's
arguments; "required" constrains it to a JSON array of {"name", "parameters"} objects, one of the tools each, and
returns each as a call. "none" generates text (the tools still reach the chat template). "auto" needs the model's
free-form tool-call syntax parsed, which is not served: a 400 naming tool_choice.
"""

import json
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from apex_serve.errors import InvalidArgument
from gateway import structured
from gateway.http_api.strict import StrictBody
from gateway.http_api.structured_fields import Constraint

_NO_PARAMETERS = {"type": "object", "properties": {}}


class FunctionDefinition(StrictBody):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments object; none: no arguments
    strict: bool | None = None  # a forced call always follows the schema


class Tool(StrictBody):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(StrictBody):
    name: str


class NamedToolChoice(StrictBody):
    type: Literal["function"]
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


@dataclass(frozen=True)
class CalledFunction:
    name: str
    arguments: str  # JSON text


def tool_constraint(tools: list[Tool] | None, choice: ToolChoice | None) -> Constraint | None:
    """The constraint a forced tool call puts on the output; None for tool_choice none (or no tools)."""
    if not tools:
        if choice is not None and choice != "none":
            raise InvalidArgument("tool_choice", "needs tools")
        return None
    choice = "auto" if choice is None else choice
    if choice == "none":
        return None
    if choice == "auto":
        raise InvalidArgument(
            "tool_choice", "auto is not supported (the model's own tool-call syntax is not parsed); send "
                           "\"required\", a named function or \"none\""
        )
    if choice == "required":
        return Constraint(structured.json_schema_grammar("tools", _required_schema(tools)), "tools")
    index = next((i for i, t in enumerate(tools) if t.function.name == choice.function.name), None)
    if index is None:
        raise InvalidArgument("tool_choice.function.name", f"no tool named {choice.function.name!r} in tools")
    field = f"tools[{index}].function.parameters"
    return Constraint(structured.json_schema_grammar(field, tools[index].function.parameters or _NO_PARAMETERS), field)


def _required_schema(tools: list[Tool]) -> dict[str, Any]:
    """One call or more, each naming one of the tools and giving its parameters."""
    calls = [
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "enum": [t.function.name]},
                "parameters": t.function.parameters or _NO_PARAMETERS,
            },
            "required": ["name", "parameters"],
            "additionalProperties": False,
        }
        for t in tools
    ]
    return {"type": "array", "minItems": 1, "items": {"anyOf": calls}}


def called_functions(text: str, choice: ToolChoice) -> list[CalledFunction] | None:
    """The calls a forced tool call's output makes; None when the output is not a whole call (cut by max_tokens or
    a stop string), which is then returned as text."""
    if isinstance(choice, NamedToolChoice):
        try:
            json.loads(text)
        except json.JSONDecodeError:
            return None
        return [CalledFunction(choice.function.name, text)]
    try:
        calls = json.loads(text)
    except json.JSONDecodeError:
        return None
    return [CalledFunction(c["name"], json.dumps(c["parameters"], ensure_ascii=False)) for c in calls]


def call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"
