"""Chat templates Hawker brings: tool calling for ChatML models whose own template ignores ``tools``.

The default model (SmolLM2-Instruct) speaks ChatML, but its template renders
only roles and contents: a request's tools would silently never reach the
model. ``CHATML_TOOLS`` renders the same turns plus the tools, the calls an
assistant made and the tools' answers, in the Hermes/Qwen format that the
``hermes`` tool-call parser reads back (a JSON object with ``name`` and
``arguments`` between ``<tool_call>`` and ``</tool_call>``).
"""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedTokenizerBase

# Rendered with transformers' chat-template environment (trim_blocks, lstrip_blocks; its tojson keeps
# non-ASCII text and writes ", " and ": " separators, as the tool-call grammar does).
CHATML_TOOLS = """\
{%- set first = messages[0] if messages else none -%}
{%- set system = first.content if first is not none and first.role in ("system", "developer") else none -%}
{%- if tools %}
<|im_start|>system
{% if system %}{{ system }}

{% endif %}You can call functions to help with the request. Their signatures, one JSON object per line:
<tools>
{% for tool in tools %}
{{ tool | tojson }}
{% endfor %}
</tools>

To call a function, write a JSON object with its "name" and its "arguments" between <tool_call> and </tool_call>:
<tool_call>
{"name": "function_name", "arguments": {"parameter": "value"}}
</tool_call><|im_end|>
{% elif system %}
<|im_start|>system
{{ system }}<|im_end|>
{% endif %}
{% for message in messages %}
{% if loop.first and system is not none %}
{% elif message.role == "tool" %}
<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% elif message.role == "assistant" %}
<|im_start|>assistant
{% if message.content %}{{ message.content }}{% endif %}
{% for call in message.tool_calls or [] %}
{% if message.content or not loop.first %}{{ "\\n" }}{% endif %}
<tool_call>
{"name": {{ call.function.name | tojson }}, "arguments": {{ call.function.arguments | tojson }}}
</tool_call>
{%- endfor %}
<|im_end|>
{% else %}
<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}
"""


def renders_tools(template: str | None) -> bool:
    """Whether a chat template does anything with ``tools`` (a template that never names them ignores them)."""
    return template is not None and "tools" in template


def is_chatml(template: str | None) -> bool:
    return template is not None and "<|im_start|>" in template


def tools_template(tokenizer: PreTrainedTokenizerBase, configured: str | None) -> str | None:
    """The template to render a request with tools: ``configured`` (``--chat-template``) if given, else the
    model's own if it renders tools, else ``CHATML_TOOLS`` for a ChatML model; None: no template can."""
    if configured is not None:
        return configured
    own = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    if renders_tools(own):
        return own
    return CHATML_TOOLS if is_chatml(own) else None


def read_chat_template(value: str) -> str:
    """``--chat-template``: a file's path, or the template's text itself."""
    path = Path(value).expanduser()
    if "{" not in value and path.is_file():
        return path.read_text(encoding="utf-8")
    if "{" not in value:
        raise ValueError(f"--chat-template {value!r} is neither a file nor a Jinja template")
    return value
