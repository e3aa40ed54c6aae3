"""The load a bench run applies: its stages (closed or open loop), the lengths it draws, the request it sends.

Parsed once here from the command line; both clients (the C++ loadgen and the Python fallback) get the same
values, the loadgen as its own flags (see `tools.bench.loadgen.loadgen_argv`).
"""

from __future__ import annotations

import argparse
import math
import random
import re
from dataclasses import dataclass

# `C:DUR` with DUR in seconds ("20s", "1.5s") or minutes ("2m")
_STAGE = re.compile(r"(\d+):(\d+(?:\.\d*)?|\.\d+)(s|m)?")
MAX_STAGES = 1000  # the loadgen's limit too
MAX_CONCURRENCY = 100_000


@dataclass(frozen=True)
class Stage:
    """Closed loop (`concurrency` clients, each one request at a time) or open loop (Poisson arrivals at `rate`
    requests/s), for `duration_s`. Requests are started during the stage and count in it wherever they end."""

    duration_s: float
    concurrency: int | None = None
    rate: float | None = None

    def describe(self) -> str:
        """What the stage applies, for tables and plot labels."""
        return f"{self.concurrency} streams" if self.rate is None else f"{self.rate:g} req/s"


def parse_stages(spec: str) -> tuple[Stage, ...]:
    """`--stages C:DURs,C:DURs,...`, e.g. `64:20s,256:30s,64:20s`: closed-loop stages back to back.

    argparse type: a bad spec is a usage error naming the part that is wrong.
    """
    stages = []
    for part in spec.split(","):
        match = _STAGE.fullmatch(part.strip())
        if match is None:
            raise argparse.ArgumentTypeError(f"{part!r} is not CONCURRENCY:SECONDS (e.g. 64:20s, 256:1.5s, 8:2m)")
        concurrency = int(match[1])
        duration_s = float(match[2]) * (60.0 if match[3] == "m" else 1.0)
        if not 1 <= concurrency <= MAX_CONCURRENCY:
            raise argparse.ArgumentTypeError(f"{part!r}: concurrency must be from 1 to {MAX_CONCURRENCY}")
        if duration_s <= 0:
            raise argparse.ArgumentTypeError(f"{part!r}: the duration must be more than 0")
        stages.append(Stage(duration_s, concurrency=concurrency))
    if len(stages) > MAX_STAGES:
        raise argparse.ArgumentTypeError(f"{len(stages)} stages: at most {MAX_STAGES}")
    return tuple(stages)


def format_stages(stages: tuple[Stage, ...]) -> str:
    """Closed-loop stages as the loadgen's `--stages` wants them (durations in seconds)."""
    return ",".join(f"{s.concurrency}:{s.duration_s!r}s" for s in stages)


@dataclass(frozen=True)
class LengthDist:
    """A distribution of lengths (output tokens, prompt words): each draw rounded and at least 1."""

    kind: str  # fixed, uniform, normal, lognormal
    params: tuple[float, ...]

    def __str__(self) -> str:
        return ":".join([self.kind, *(str(int(p)) if p == int(p) else repr(p) for p in self.params)])

    def draw(self, rng: random.Random) -> int:
        a = self.params[0]
        if self.kind == "fixed":
            value = a
        elif self.kind == "uniform":
            value = rng.uniform(a, self.params[1])
        elif self.kind == "normal":
            value = rng.gauss(a, self.params[1])
        else:  # lognormal: params are the median and the sigma of the log
            value = rng.lognormvariate(math.log(a), self.params[1])
        return max(1, round(value))


# kind: (parameter names, a check of their values, what the check wants)
_DISTS = {
    "fixed": (("N",), lambda p: p[0] >= 1 and p[0] == int(p[0]), "N an integer >= 1"),
    "uniform": (("A", "B"), lambda p: 1 <= p[0] <= p[1], "1 <= A <= B"),
    "normal": (("MEAN", "SD"), lambda p: p[0] > 0 and p[1] >= 0, "MEAN > 0, SD >= 0"),
    "lognormal": (("MEDIAN", "SIGMA"), lambda p: p[0] > 0 and p[1] >= 0, "MEDIAN > 0, SIGMA >= 0"),
}
DIST_HELP = "fixed:N, uniform:A:B, normal:MEAN:SD or lognormal:MEDIAN:SIGMA (draws rounded, at least 1)"


def parse_dist(spec: str) -> LengthDist:
    """argparse type of `--max-tokens-dist` and `--prompt-len-dist`."""
    kind, *rest = spec.split(":")
    if kind not in _DISTS:
        raise argparse.ArgumentTypeError(f"{spec!r}: wants {DIST_HELP}")
    names, valid, wants = _DISTS[kind]
    try:
        params = tuple(float(p) for p in rest)
    except ValueError:
        params = ()
    if len(params) != len(names) or not all(math.isfinite(p) for p in params):
        raise argparse.ArgumentTypeError(f"{spec!r}: wants {kind}:{':'.join(names)}")
    if not valid(params):
        raise argparse.ArgumentTypeError(f"{spec!r}: wants {wants}")
    return LengthDist(kind, params)


@dataclass(frozen=True)
class BenchConfig:
    url: str
    model: str
    stages: tuple[Stage, ...]
    max_tokens: LengthDist = LengthDist("fixed", (32,))
    endpoint: str = "chat"  # chat: OpenAI SSE; plain: /v1/chat/{model}
    prompt: str = "What is machine learning?"
    prompt_len: LengthDist | None = None  # drawn prompts of this many words, instead of `prompt`
    seed: int = 0
    max_in_flight: int = 10_000  # open loop: arrivals while this many requests are open fail at once

    @property
    def duration_s(self) -> float:
        return sum(s.duration_s for s in self.stages)

    def to_json(self) -> dict[str, object]:
        return {
            "url": self.url,
            "model": self.model,
            "endpoint": self.endpoint,
            "stages": [{"concurrency": s.concurrency, "rate": s.rate, "duration_s": s.duration_s} for s in self.stages],
            "max_tokens": str(self.max_tokens),
            "prompt": self.prompt if self.prompt_len is None else None,
            "prompt_len": None if self.prompt_len is None else str(self.prompt_len),
            "seed": self.seed,
        }
