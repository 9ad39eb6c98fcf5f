"""response_format and tools on the OpenAI routes: what the output is constrained to, how the
tools reach the prompt, and how the answer is read back.

    plan = parse_structured(body, chat=True)   # 400s name the field (response_format, tools, ...)
    plan.schema                                 # the JSON schema the output must match, or None
    plan.read(text) -> Answer(content, tool_calls)

What constrains what (OpenAI's semantics):
- response_format {"type": "json_object"}: any JSON object; {"type": "json_schema", "json_schema":
  {"name", "schema", "strict"}}: that schema. strict false is constrained too (a 135M model left
  free rarely produces valid JSON; a client asking for a schema wants one).
- tools + tool_choice "required", or {"type": "function", "function": {"name": F}}: the output is
  a tool call, {"name": F, "arguments": <F's parameters schema>} (anyOf the tools for
  "required"), returned as message.tool_calls with finish_reason "tool_calls".
- tools + tool_choice "auto" (the default with tools): free text; an answer that is exactly such
  a call object is returned as tool_calls, anything else as content. "none": free text.
The tools reach the prompt through the chat template when it takes `tools` (Qwen, Llama 3.x,
Hermes templates); a template that ignores them (SmolLM2's) gets them as a system message in the
same JSON shape the constraint enforces (tools_system_prompt), so the model sees what it must say.

The grammar engine is optional (device/runtime/grammar.py, the `structured` extra): a request
that needs a constraint without it is refused with a 400 naming the extra.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from device.runtime import grammar
from device.serve.fields import bad, short
from device.serve.httpd import HTTPError

MAX_TOOLS = 128  # OpenAI's limit
NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's pattern for function and schema names
MAX_DESCRIPTION = 4096
TOOL_CHOICES = ("none", "auto", "required")
ANY_OBJECT: dict[str, Any] = {"type": "object"}


@dataclass(frozen=True)
class ToolSpec:
    name: str
    description: str
    parameters: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        """As OpenAI clients send it, and as chat templates that take `tools` expect it."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}

    def call_schema(self) -> dict[str, Any]:
        return {"type": "object", "properties": {"name": {"const": self.name},
                                                 "arguments": self.parameters},
                "required": ["name", "arguments"], "additionalProperties": False}


@dataclass(frozen=True)
class Answer:
    content: str | None
    tool_calls: list[dict[str, Any]] | None = None


@dataclass(frozen=True)
class StructuredPlan:
    schema: dict[str, Any] | None = None  # constrain the output to it; None: free text
    param: str = "response_format"  # the field that asked for the constraint (for errors)
    tools: tuple[ToolSpec, ...] = ()
    tool_choice: str = "none"  # "none" | "auto" | "required" | "function"
    forced: str | None = None  # the function tool_choice names
    tool_json: list[dict[str, Any]] = field(default_factory=list)

    @property
    def calls_tools(self) -> bool:
        """The answer may be a tool call (so a stream buffers it to return tool_calls)."""
        return bool(self.tools) and self.tool_choice != "none"

    def read(self, text: str) -> Answer:
        if not self.calls_tools:
            return Answer(text)
        call = self._tool_call(text)
        return Answer(None, [call]) if call is not None else Answer(text)

    def _tool_call(self, text: str) -> dict[str, Any] | None:
        try:
            value = json.loads(text)
        except ValueError:
            return None
        names = {t.name for t in self.tools}
        if not (isinstance(value, dict) and value.get("name") in names
                and isinstance(value.get("arguments"), dict)):
            return None
        return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                "function": {"name": value["name"], "arguments": json.dumps(value["arguments"])}}


def tools_system_prompt(tools: tuple[ToolSpec, ...]) -> str:
    """The tools for a chat template that does not render them itself."""
    lines = [json.dumps(t.to_json()["function"]) for t in tools]
    return ("You can call the following functions:\n" + "\n".join(lines) + "\nTo call a function, "
            "answer with only a JSON object: {\"name\": <function name>, \"arguments\": "
            "<an object of its arguments>}.")


def _schema_object(value: Any, param: str) -> dict[str, Any]:
    if value is None:
        return dict(ANY_OBJECT)
    if not isinstance(value, dict):
        raise bad(param, f"expected a JSON Schema object, got {type(value).__name__}")
    return value


def _response_format(body: dict[str, Any]) -> dict[str, Any] | None:
    fmt = body.get("response_format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise bad("response_format", "expected {\"type\": \"text\" | \"json_object\" | \"json_schema\"}")
    if fmt["type"] == "text":
        return None
    if fmt["type"] == "json_object":
        return dict(ANY_OBJECT)
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict):
        raise bad("response_format", "json_schema: expected {\"name\", \"schema\", \"strict\"}")
    name = spec.get("name")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise bad("response_format", f"json_schema.name must match {NAME.pattern} (got {short(name)})")
    if spec.get("strict") is not None and not isinstance(spec["strict"], bool):
        raise bad("response_format", "json_schema.strict must be true or false")
    return _schema_object(spec.get("schema"), "response_format")


def _tools(body: dict[str, Any]) -> tuple[ToolSpec, ...]:
    raw = body.get("tools")
    if raw is None:
        return ()
    if not isinstance(raw, list) or len(raw) > MAX_TOOLS:
        raise bad("tools", f"expected a list of at most {MAX_TOOLS} function tools")
    out: list[ToolSpec] = []
    for i, tool in enumerate(raw):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict):
            raise bad("tools", f"tools[{i}]: expected {{\"type\": \"function\", \"function\": {{...}}}}")
        name, desc = fn.get("name"), fn.get("description")
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise bad("tools", f"tools[{i}].function.name must match {NAME.pattern} (got {short(name)})")
        if desc is not None and (not isinstance(desc, str) or len(desc) > MAX_DESCRIPTION):
            raise bad("tools", f"tools[{i}].function.description: a string of at most {MAX_DESCRIPTION}")
        if any(t.name == name for t in out):
            raise bad("tools", f"tools[{i}]: the function name {name!r} is used twice")
        out.append(ToolSpec(name, desc or "", _schema_object(fn.get("parameters"), "tools")))
    return tuple(out)


def _tool_choice(body: dict[str, Any], tools: tuple[ToolSpec, ...]) -> tuple[str, str | None]:
    choice = body.get("tool_choice")
    if choice is None:
        return ("auto" if tools else "none"), None
    if not tools and choice != "none":
        raise bad("tool_choice", "needs 'tools'")
    if isinstance(choice, str) and choice in TOOL_CHOICES:
        return choice, None
    fn = choice.get("function") if isinstance(choice, dict) else None
    if not (isinstance(choice, dict) and choice.get("type") == "function" and isinstance(fn, dict)):
        raise bad("tool_choice", "expected \"none\", \"auto\", \"required\" or "
                                 "{\"type\": \"function\", \"function\": {\"name\": ...}}")
    name = fn.get("name")
    if not any(t.name == name for t in tools):
        raise bad("tool_choice", f"names {short(name)}, which is not one of the tools")
    return "function", str(name)


def parse_structured(body: dict[str, Any], chat: bool) -> StructuredPlan:
    schema = _response_format(body)
    tools = _tools(body) if chat else ()
    if not chat and body.get("tools") is not None:
        raise bad("tools", "tools are served on /v1/chat/completions only")
    choice, forced = _tool_choice(body, tools) if chat else ("none", None)
    if body.get("parallel_tool_calls") is not None and not isinstance(body["parallel_tool_calls"], bool):
        raise bad("parallel_tool_calls", "expected true or false")
    param = "response_format"
    if choice in ("required", "function"):  # a tool call it must be, whatever response_format says
        calls = [t.call_schema() for t in tools if forced is None or t.name == forced]
        schema, param = (calls[0] if len(calls) == 1 else {"anyOf": calls}), "tool_choice"
    if schema is not None and not grammar.available():
        raise HTTPError(400, f"'{param}' needs the constrained-decoding engine, which this device "
                             f"does not have: {grammar.INSTALL_HINT}", "structured_output_unavailable",
                        param)
    return StructuredPlan(schema, param, tools, choice, forced, [t.to_json() for t in tools])


def compile_constraint(plan: StructuredPlan,
                       compiler: grammar.LazyCompiler) -> grammar.TokenConstraint | None:
    if plan.schema is None:
        return None
    try:
        engine = compiler.get()
    except Exception as e:  # noqa: BLE001 - the engine cannot read this model's tokenizer.json
        # not the schema's fault: no schema would do, so say what is missing, as for no engine
        raise HTTPError(400, f"'{plan.param}' needs constrained decoding, which cannot use this "
                             f"model's tokenizer: {e}", "structured_output_unavailable", plan.param) from e
    try:
        return engine.json_schema(plan.schema)
    except Exception as e:  # noqa: BLE001 - GrammarError, or whatever the engine raises on a schema
        raise HTTPError(400, f"'{plan.param}': the schema cannot be used for constrained decoding: {e}",
                        "invalid_schema", plan.param) from e


# --- the OpenAPI document's view of these fields ---------------------------------------------

_SCHEMA_OBJ = {"type": "object", "description": "a JSON Schema"}
RESPONSE_FORMAT_SCHEMA = {"anyOf": [
    {"type": "object", "required": ["type"], "properties": {"type": {"enum": ["text", "json_object"]}}},
    {"type": "object", "required": ["type", "json_schema"], "properties": {
        "type": {"const": "json_schema"},
        "json_schema": {"type": "object", "required": ["name"], "properties": {
            "name": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
            "description": {"type": "string"}, "schema": _SCHEMA_OBJ,
            "strict": {"type": ["boolean", "null"]}}}}},
    {"type": "null"}],
    "description": "constrain the output to JSON (any object, or a schema); needs the "
                   f"'{grammar.EXTRA}' extra on the device"}
TOOLS_SCHEMA = {"anyOf": [{"type": "array", "maxItems": MAX_TOOLS, "items": {
    "type": "object", "required": ["type", "function"], "properties": {
        "type": {"const": "function"},
        "function": {"type": "object", "required": ["name"], "properties": {
            "name": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
            "description": {"type": "string", "maxLength": MAX_DESCRIPTION},
            "parameters": _SCHEMA_OBJ, "strict": {"type": ["boolean", "null"]}}}}}},
    {"type": "null"}], "description": "function tools (chat only)"}
TOOL_CHOICE_SCHEMA = {"anyOf": [
    {"enum": list(TOOL_CHOICES)},
    {"type": "object", "required": ["type", "function"], "properties": {
        "type": {"const": "function"},
        "function": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}}},
    {"type": "null"}], "description": "required / a named function: the output is that tool call"}
PARALLEL_TOOL_CALLS_SCHEMA = {"type": ["boolean", "null"],
                              "description": "accepted; an answer holds at most one call"}
