"""`tokenbus chat DEPLOYMENT`: an interactive streaming chat through a proxy's OpenAI chat completions API.

The session keeps the history and sends all of it with each question; tokens are printed as their SSE events
arrive, and after each answer a dim line gives its time to first token, tokens/s and token counts (the usage the
proxy reports). Ctrl-C during an answer cancels that request's task, which closes the stream (the proxy then
cancels the call, and the engine aborts the request); the session goes on. Ctrl-C at the prompt only clears it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tools.arg_types import positive_int

API_KEY_ENV = "TOKENBUS_API_KEY"
DEFAULT_URL = "http://127.0.0.1:8000"
CONNECT_TIMEOUT_S = 10.0
HELP = "/reset clears the history, /quit (or Ctrl-D) leaves, Ctrl-C stops an answer"


def add_parser(sub: Any) -> None:
    p = sub.add_parser("chat", help="an interactive streaming chat with a deployment, through a proxy")
    p.add_argument("deployment")
    p.add_argument("--url", default=DEFAULT_URL, help=f"the proxy (default {DEFAULT_URL})")
    p.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV) or None,
        help=f"for a proxy with --api-keys (default ${API_KEY_ENV} when set)",
    )
    p.add_argument("--max-tokens", type=positive_int, help="per answer (default: the deployment's)")
    p.set_defaults(func=main)


@dataclass
class Answer:
    text: str = ""
    started: float = field(default_factory=time.monotonic)
    first_token: float | None = None  # when the first text arrived
    ended: float | None = None
    chunks: int = 0
    usage: dict[str, int] | None = None  # the proxy's count, sent at the end of a complete stream
    stopped: bool = False  # Ctrl-C
    error: str = ""

    def summary(self) -> str:
        """The dim line after an answer: TTFT, tokens/s after the first token, token counts."""
        parts = []
        if self.first_token is not None:
            parts.append(f"TTFT {(self.first_token - self.started) * 1000:.0f} ms")
        tokens = self.usage.get("completion_tokens") if self.usage else None
        end = self.ended or time.monotonic()
        if tokens is not None and tokens > 1 and self.first_token is not None and end > self.first_token:
            parts.append(f"{(tokens - 1) / (end - self.first_token):.1f} tokens/s")
        if tokens is not None:
            parts.append(f"{tokens} tokens")
        if self.usage and "prompt_tokens" in self.usage:
            parts.append(f"prompt {self.usage['prompt_tokens']} tokens")
        if self.stopped:
            parts.append(f"stopped after {self.chunks} chunks")
        return " · ".join(parts)


async def ask(url: str, headers: dict[str, str], body: dict[str, Any], write: Callable[[str], None]) -> Answer:
    """One streamed answer, each piece of text passed to `write` as it comes; SIGINT ends it early."""
    import aiohttp  # imported on use, as every command's start would pay for it

    answer = Answer()
    task = asyncio.current_task()
    assert task is not None  # run by asyncio.run
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, task.cancel)
    timeout = aiohttp.ClientTimeout(sock_connect=CONNECT_TIMEOUT_S)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.post(f"{url}/v1/chat/completions", json=body, headers=headers) as resp,
        ):
            if resp.status != 200:
                answer.error = f"{resp.status}: {_error_message(await resp.text())}"
                return answer
            async for raw in resp.content:
                if not _event(raw.decode(errors="replace").strip(), answer, write):
                    break
    except asyncio.CancelledError:
        answer.stopped = True  # leaving the `async with` closed the connection: the proxy cancels the call
    except aiohttp.ClientError as e:
        answer.error = f"{url}: {e or type(e).__name__}"
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        answer.ended = time.monotonic()
    return answer


def _event(line: str, answer: Answer, write: Callable[[str], None]) -> bool:
    """Takes in one SSE line; False at the end of the stream."""
    if not line.startswith("data:"):
        return True  # blank separators and comments
    data = line.removeprefix("data:").strip()
    if data == "[DONE]":
        return False
    event = json.loads(data)
    if "error" in event:
        answer.error = str(event["error"].get("message", event["error"]))
        return False
    if event.get("usage"):
        answer.usage = event["usage"]
    for choice in event.get("choices", []):
        text = (choice.get("delta") or {}).get("content") or ""
        if text:
            if answer.first_token is None:
                answer.first_token = time.monotonic()
            answer.chunks += 1
            answer.text += text
            write(text)
    return True


def _error_message(body: str) -> str:
    """The message of an OpenAI error body, else the body itself."""
    with contextlib.suppress(ValueError, AttributeError, TypeError):
        return str(json.loads(body)["error"]["message"])
    return body.strip()[:500]


def main(opts: argparse.Namespace) -> int:
    import readline  # noqa: F401  (input() gets line editing and history)

    from rich.console import Console

    console = Console(highlight=False)
    headers = {"Authorization": f"Bearer {opts.api_key}"} if opts.api_key else {}
    history: list[dict[str, str]] = []
    console.print(f"chat with [bold]{opts.deployment}[/bold] at {opts.url}; {HELP}", style="dim")

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    while True:
        try:
            line = input("you> ")
        except EOFError:  # Ctrl-D
            print()
            return 0
        except KeyboardInterrupt:  # at the prompt: a fresh line, as a shell does
            print()
            continue
        command = line.strip()
        if command == "/quit":
            return 0
        if command == "/reset":
            history.clear()
            console.print("history cleared", style="dim")
            continue
        if not command:
            continue
        if command.startswith("/"):
            console.print(HELP, style="dim")
            continue
        question = {"role": "user", "content": line}
        body: dict[str, Any] = {
            "model": opts.deployment,
            "messages": [*history, question],
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if opts.max_tokens is not None:
            body["max_tokens"] = opts.max_tokens
        answer = asyncio.run(ask(opts.url, headers, body, write))
        if answer.text:
            print()
            # what was shown stays what the model is told it said, a stopped answer too
            history += [question, {"role": "assistant", "content": answer.text}]
        if answer.error:
            console.print(f"error: {answer.error}", style="red", markup=False)
        summary = answer.summary()
        if summary:
            console.print(summary, style="dim")
