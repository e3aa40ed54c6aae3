"""What the worker drives: an engine that takes requests and reports their outputs to a sink.

Outputs are pushed through an `OutputSink` (callbacks) rather than pulled from one async iterator per
request: the sim engine then emits a token straight from its timer callback to the response ring, with no
task wake-up per token, which keeps one process cheap at hundreds of streams. An engine whose backend yields
a stream per request (vLLM's `AsyncLLM.generate`) runs one task per request that iterates the stream and
calls the sink, so both kinds fit the same protocol.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, TypedDict, get_args

from schemas.ring import SubmitParams

FinishReason = Literal["stop", "length", "abort", "error"]
FINISH_REASONS: tuple[FinishReason, ...] = get_args(FinishReason)


class DuplicateRequestError(ValueError):
    """A submitted request id that is already open."""


class EngineInfo(TypedDict):
    """Sent in the READY record."""

    engine: str
    model: str
    max_model_len: int


# A request's sampling parameters are SUBMIT's params, as declared once with the ring records.
SamplingParams = SubmitParams


@dataclass(frozen=True, slots=True)
class Request:
    id: int  # chosen by the replica, unique among its open requests
    prompt: str
    messages: tuple[tuple[str, str], ...] | None  # (role, content) pairs for chat, else None
    params: SamplingParams

    def prompt_text(self) -> str:
        """The prompt as one text: the prompt itself, or the chat messages' contents joined."""
        if self.messages is None:
            return self.prompt
        return "\n".join(content for _, content in self.messages)


@dataclass(frozen=True, slots=True)
class EngineStats:
    running: int
    waiting: int
    kv_usage: float  # 0..1


class OutputSink(Protocol):
    """Where an engine reports, synchronously, from its own event-loop callbacks or tasks."""

    def tokens(self, request_id: int, text: str, n_tokens: int) -> None:
        """New text of a request, holding `n_tokens` tokens."""

    def finish(
        self,
        request_id: int,
        reason: FinishReason,
        prompt_tokens: int,
        completion_tokens: int,
        error_code: int = 0,
        error_message: str = "",
    ) -> None:
        """The last output of a request; no output for that id follows."""

    def load_changed(self) -> None:
        """`stats()` may now return something else (the sink decides when to read it)."""

    def engine_step(self, seconds: float) -> None:
        """The time one step of the engine took, where the engine knows it (a metric; not called per token)."""

    def engine_failed(self, message: str) -> None:
        """The engine can serve nothing more (e.g. vLLM's engine core died): the worker exits, so that its agent
        reports the replica EXITED and the head replaces it, instead of a READY replica answering only errors."""


class Engine(Protocol):
    async def start(self) -> EngineInfo:
        """Load the engine; requests may be submitted once this returns."""

    def submit(self, request: Request) -> None:
        """Start (or queue) a request. Every accepted request ends with exactly one `sink.finish`.

        Raises DuplicateRequestError, and changes nothing, when the id is already open."""

    def abort(self, request_id: int) -> None:
        """Drop a request at once and report it finished with "abort"; an unknown id is ignored."""

    def stats(self) -> EngineStats: ...

    async def shutdown(self) -> None:
        """Abort every open request (each gets its "abort" finish) and release the engine."""
