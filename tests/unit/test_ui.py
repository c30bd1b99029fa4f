"""The chat page's logic without a server: conversation building, model order, streamed replies."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("gradio", reason="needs the server extra: hack/setup.sh server")

from kubetune.server import ui


def test_conversation_from_gradio_history() -> None:
    history = [
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
        {"role": "assistant", "content": "Hello."},
        {"role": "assistant", "content": {"path": "/tmp/image.png"}},  # not text: left out
    ]
    assert ui.conversation("And now?", history) == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "And now?"},
    ]


class FakeClient:
    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.models = SimpleNamespace(
            list=lambda: SimpleNamespace(
                data=[
                    SimpleNamespace(id="zeta", parent="base"),
                    SimpleNamespace(id="base", parent=None),
                    SimpleNamespace(id="alpha", parent="base"),
                ]
            )
        )
        self.chat = SimpleNamespace(completions=SimpleNamespace(create=self._create))

    def _create(self, **request: Any) -> list[Any]:
        self.requests.append(request)
        pieces = ["The", " capital", None, " is Paris."]
        return [SimpleNamespace(choices=[SimpleNamespace(delta=SimpleNamespace(content=p))]) for p in pieces]


def test_models_base_first_and_reply_streams() -> None:
    chat = ui.Chat("http://server:8000/v1")
    fake = FakeClient()
    chat.client = fake  # type: ignore[assignment]
    assert chat.models() == ["base", "alpha", "zeta"]
    assert list(chat.reply("Capital of France?", [], "alpha")) == ["The", "The capital", "The capital is Paris."]
    assert fake.requests[0]["model"] == "alpha" and fake.requests[0]["stream"] is True


def test_page_builds() -> None:
    page = ui.build("http://server:8000/v1")
    assert page.title == ui.TITLE
