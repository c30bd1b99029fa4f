"""The chat page of a ModelServer: pick the base model or one of its adapters, chat, watch tokens stream.

    kubetune ui --endpoint http://NAME.NAMESPACE.svc:8000/v1 [--port 7860] [--host 0.0.0.0]

The server's API key, when it has one, comes from OPENAI_API_KEY (the rendered Deployment sets it from the
ModelServer's Secret).

It talks to the server's OpenAI-compatible endpoint only: the models come from GET /v1/models (the base model
and every adapter loaded at that moment, refreshed on each page load and on request), replies from a streamed
chat completion. Decoding settings are the server's defaults (the ModelServer's generationDefaults).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from typing import Any, cast

import gradio as gr
from openai import OpenAI
from openai.types.chat import ChatCompletionMessageParam

TITLE = "kubetune chat"


def message_text(content: Any) -> str:
    """The text of a chat message's content as Gradio hands it over (a string or a list of parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(message_text(part) for part in content)
    if isinstance(content, dict) and content.get("type", "text") == "text":
        return str(content.get("text", ""))
    return ""


def conversation(message: str, history: list[dict[str, Any]]) -> list[dict[str, str]]:
    """The OpenAI messages for `history` (as Gradio keeps it) plus the new user message."""
    messages = [{"role": m["role"], "content": message_text(m.get("content"))} for m in history]
    return [m for m in messages if m["role"] in ("user", "assistant", "system") and m["content"]] + [
        {"role": "user", "content": message}
    ]


class Chat:
    """The OpenAI client of one server and what the page calls."""

    def __init__(self, endpoint: str) -> None:
        api_key = os.environ.get("OPENAI_API_KEY") or "not-needed"
        self.client = OpenAI(base_url=endpoint, api_key=api_key, timeout=300)

    def models(self) -> list[str]:
        """The base model first, then its adapters by name."""
        cards = self.client.models.list().data
        base = [m.id for m in cards if not getattr(m, "parent", None)]
        return base + sorted(m.id for m in cards if getattr(m, "parent", None))

    def choices(self) -> Any:
        """The model dropdown with the models loaded now (the current choice kept when still there)."""
        try:
            names = self.models()
        except Exception as err:  # the page stays usable while the server starts
            gr.Warning(f"cannot list models: {err}")
            return gr.update()
        return gr.update(choices=names, value=names[0] if names else None)

    def reply(self, message: str, history: list[dict[str, Any]], model: str | None) -> Iterator[str]:
        """The assistant's answer, growing token by token."""
        if not model:
            raise gr.Error("pick a model first")
        messages = cast(list[ChatCompletionMessageParam], conversation(message, history))
        stream = self.client.chat.completions.create(model=model, messages=messages, stream=True)
        text = ""
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
                yield text


def build(endpoint: str) -> gr.Blocks:
    """The page for the server at `endpoint` (its /v1 base URL)."""
    chat = Chat(endpoint)
    with gr.Blocks(title=TITLE, analytics_enabled=False) as page:
        gr.Markdown(f"# {TITLE}\nServer: `{endpoint}`. Pick the base model or an adapter, then ask.")
        with gr.Row():
            model = gr.Dropdown(label="Model", choices=[], scale=4, elem_id="model")
            refresh = gr.Button("Refresh models", scale=1, elem_id="refresh")
        gr.ChatInterface(chat.reply, additional_inputs=[model], fill_height=False)
        page.load(chat.choices, outputs=model)
        refresh.click(chat.choices, outputs=model)
    return page


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kubetune ui", description="The Gradio chat page of a ModelServer.")
    parser.add_argument("--endpoint", required=True, help="the server's OpenAI base URL, e.g. http://HOST:8000/v1")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--host", default="0.0.0.0")
    args = parser.parse_args(argv)
    build(args.endpoint).queue().launch(server_name=args.host, server_port=args.port, show_error=True, ssr_mode=False)
    return 0
