"""Structured-output plumbing without a model: the request fields (response_format, tools,
tool_choice) and their 400s, the clear 400 naming the extra when the grammar engine is absent,
reading a tool call back, OpenAI's penalties, and the binary tensor data codec."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device.runtime import grammar
from device.runtime.sampling import SamplingParams, penalize
from device.serve import kserve_binary, openai_api, structured
from device.serve.httpd import HTTPError

HI = [{"role": "user", "content": "hi"}]
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def _refused(body: dict[str, Any], chat: bool = True) -> HTTPError:
    with pytest.raises(HTTPError) as e:
        openai_api.parse_generation(body, chat)
    assert e.value.status == 400
    return e.value


@pytest.mark.parametrize("extra,param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a b"}}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": []}}},
     "response_format"),
    ({"tools": [TOOL, TOOL]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "x" * 65}}]}, "tools"),
    ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "other"}}}, "tool_choice"),
    ({"tools": [TOOL], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [TOOL], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f"}}]}]},
     "messages[0].tool_calls"),
    ({"frequency_penalty": -2.5}, "frequency_penalty"),
])
def test_structured_fields_are_checked_and_name_the_field(extra: dict[str, Any], param: str) -> None:
    assert _refused({"messages": HI, **extra}).param == param


def test_tools_are_for_chat_only() -> None:
    assert _refused({"prompt": "hi", "tools": [TOOL]}, chat=False).param == "tools"


def test_without_the_engine_a_constraint_is_a_400_naming_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(grammar, "available", lambda: False)
    err = _refused({"messages": HI, "response_format": {"type": "json_object"}})
    assert err.param == "response_format" and "edge-toolkit[structured]" in err.message
    assert err.code == "structured_output_unavailable"
    err = _refused({"messages": HI, "tools": [TOOL], "tool_choice": "required"})
    assert err.param == "tool_choice" and "[structured]" in err.message
    # tools the model may or may not call need no grammar
    call = openai_api.parse_generation({"messages": HI, "tools": [TOOL]}, chat=True)
    assert call.plan.schema is None and call.plan.tool_choice == "auto"


def test_a_tokenizer_the_grammar_engine_cannot_read_is_not_blamed_on_the_schema() -> None:
    """llguidance refuses some tokenizers (a WordPiece decoder: "can't determine decoder
    type"); every response_format was then a 400 "the schema cannot be used", code
    invalid_schema, whatever the schema: the client was told to fix what was not wrong."""
    class Unreadable:
        def get(self) -> Any:
            raise ValueError("can't determine decoder type")

    plan = structured.StructuredPlan({"type": "object"}, "response_format")
    with pytest.raises(HTTPError) as e:
        structured.compile_constraint(plan, Unreadable())  # type: ignore[arg-type]
    assert e.value.status == 400 and e.value.code == "structured_output_unavailable", e.value.message
    assert e.value.param == "response_format" and "tokenizer" in e.value.message
    assert "schema cannot be used" not in e.value.message


def test_a_tokenizer_the_engine_refused_is_not_read_again(tmp_path: Path) -> None:
    """The failure is kept: a served bundle's tokenizer.json does not change, and every later
    response_format request would otherwise read and parse it again under the lock."""
    path = tmp_path / "tokenizer.json"
    path.write_text("{not json")
    compiler = grammar.LazyCompiler(str(path), 8, [0])
    with pytest.raises(Exception) as first:
        compiler.get()
    path.unlink()  # a second read would now be a FileNotFoundError
    with pytest.raises(Exception) as second:
        compiler.get()
    assert str(second.value) == (str(first.value) or type(first.value).__name__)
    assert not isinstance(second.value, FileNotFoundError)


def test_what_each_choice_constrains() -> None:
    plan = structured.parse_structured({"response_format": {"type": "json_object"}}, chat=True)
    assert plan.schema == {"type": "object"}
    named = structured.parse_structured({"tools": [TOOL], "tool_choice": {
        "type": "function", "function": {"name": "get_weather"}},
        "response_format": {"type": "text"}}, chat=True)
    assert named.schema is not None and named.param == "tool_choice"
    assert named.schema["properties"]["name"] == {"const": "get_weather"}
    assert named.schema["properties"]["arguments"] == TOOL["function"]["parameters"]
    two = {**TOOL, "function": {**TOOL["function"], "name": "other"}}
    required = structured.parse_structured({"tools": [TOOL, two], "tool_choice": "required"}, chat=True)
    assert required.schema is not None and len(required.schema["anyOf"]) == 2
    none = structured.parse_structured({"tools": [TOOL], "tool_choice": "none"}, chat=True)
    assert none.schema is None and not none.calls_tools


def test_a_tool_call_is_read_back_only_when_it_names_a_tool() -> None:
    plan = structured.parse_structured({"tools": [TOOL]}, chat=True)
    answer = plan.read('{"name": "get_weather", "arguments": {"city": "Oslo"}}')
    assert answer.content is None and answer.tool_calls is not None
    fn = answer.tool_calls[0]["function"]
    assert fn["name"] == "get_weather" and json.loads(fn["arguments"]) == {"city": "Oslo"}
    for text in ('{"name": "rm", "arguments": {}}', "It is sunny.", '{"name": "get_weather"}'):
        assert plan.read(text).content == text and plan.read(text).tool_calls is None


def test_tools_reach_a_template_that_ignores_them_as_a_system_message() -> None:
    plan = structured.parse_structured({"tools": [TOOL]}, chat=True)
    clean = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
             {"role": "assistant", "content": "", "tool_calls": [
                 {"id": "c1", "type": "function", "function": {"name": "get_weather",
                                                              "arguments": '{"city": "Oslo"}'}}]}]
    out = openai_api._without_tools_template(clean, plan)
    assert out[0]["content"].startswith("Be brief.") and '"name": "get_weather"' in out[0]["content"]
    assert json.loads(out[2]["content"]) == {"name": "get_weather", "arguments": {"city": "Oslo"}}


def test_penalties_follow_openais_definition() -> None:
    logits = np.array([1.0, 2.0, 3.0, 4.0], np.float32)
    counts = np.array([0, 1, 3, 0], np.int32)
    out = penalize(logits, counts, SamplingParams(presence_penalty=0.5, frequency_penalty=0.25))
    assert out.tolist() == [1.0, 2.0 - 0.25 - 0.5, 3.0 - 0.75 - 0.5, 4.0]
    assert logits.tolist() == [1.0, 2.0, 3.0, 4.0]  # the backend's buffer is not written


def test_binary_tensor_data_round_trip() -> None:
    texts = ["a", "", "héllo"]
    tail = b"".join(len(t.encode()).to_bytes(4, "little") + t.encode() for t in texts)
    ids = np.arange(6, dtype="<i8")
    inputs = [{"name": "text", "datatype": "BYTES", "shape": [3],
               "parameters": {"binary_data_size": len(tail)}},
              {"name": "ids", "datatype": "INT64", "shape": [2, 3], "data": ids.tolist()}]
    out = kserve_binary.resolve_inputs(inputs, tail, 16)
    assert out[0]["data"] == texts and out[1] is inputs[1]
    with pytest.raises(HTTPError, match="announce"):
        kserve_binary.resolve_inputs(inputs, tail + b"x", 16)
    header = {"outputs": [{"name": "embedding", "datatype": "FP32", "shape": [2, 2], "data": [0] * 4}]}
    vecs = np.array([[1.5, -2.0], [0.25, 8.0]], np.float32)
    raw, n = kserve_binary.binary_response(header, {"embedding": vecs})
    head = json.loads(raw[:n])
    assert "data" not in head["outputs"][0] and head["outputs"][0]["parameters"]["binary_data_size"] == 16
    assert np.array_equal(np.frombuffer(raw[n:], "<f4").reshape(2, 2), vecs)
    assert kserve_binary.wants_binary({"parameters": {"binary_data_output": True}})
    assert not kserve_binary.wants_binary({"parameters": {"binary_data_output": True},
                                           "outputs": [{"name": "embedding"}]})


def test_a_template_that_takes_tools_renders_them_itself() -> None:
    """Qwen / Llama 3.x / Hermes templates read `tools`: they get the tools as OpenAI sends
    them, and the conversation is left as it is (no system message of ours)."""
    from device.runtime.tokenizer import BundleTokenizer

    tok = BundleTokenizer.__new__(BundleTokenizer)  # the template alone, no tokenizer files
    tok.config, tok._template = {}, None
    tok.template_src = ("{% for t in tools or [] %}[{{ t.function.name }}]{% endfor %}"
                        "{% for m in messages %}{{ m.role }}:{{ m.content }};{% endfor %}")
    assert tok.renders_tools
    plan = structured.parse_structured({"tools": [TOOL]}, chat=True)
    assert tok.render_chat(HI, tools=plan.tool_json) == "[get_weather]user:hi;"
    assert tok.render_chat(HI) == "user:hi;"
