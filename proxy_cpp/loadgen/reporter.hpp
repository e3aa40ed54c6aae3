#pragma once
// The loadgen's output on stdout, read by `tokenbus bench` (tools/bench/loadgen.py): one JSON object per
// line. This comment is the protocol's definition. Times "since the run's start" count from the start line.
//
//   {"event":"start","concurrency":C|null}
//       once, just before the first request starts (the reader starts its CPU meters here); the first
//       stage's concurrency, null when it is open loop
//   {"event":"stage","index":I,"concurrency":C|null,"rate":R|null,"start_s":F}
//       when stage I (from 0) starts: closed loop with C clients (rate null) or open loop at R requests/s
//       (concurrency null); start_s since the run's start. Stages follow each other without a gap. Closed-loop
//       client k runs across stages while the stage running wants more than k clients: at a border to a
//       stage of C clients, clients k < C send their next request in it, the missing ones start, and those
//       k >= C (all of them for an open-loop stage) finish their current request and stop. So at most
//       max(C before, C after) closed-loop requests are open across a border, C soon after it.
//   {"event":"request","ok":B,"ttft_us":N|null,"e2e_us":N,"tokens":N,"error":"...","start_s":F,"stage":I,
//    "itl_max_us":N,"itl_sum_us":N,"chunks":N[,"hops_us":{...}|null,"proxy_ttft_us":N|null]}
//       one per finished request (or refused arrival, below), in the order they finished.
//       ttft_us: null when no content arrived. error: "" when ok. start_s: when it started, since the run's
//       start; stage: the stage running when it started (a request running at a border finishes and counts
//       there).
//       chunks: the pieces of content received (chat: SSE events with content; plain: socket reads with
//       text); itl_sum_us: from the first to the last of them; itl_max_us: the longest gap between two
//       consecutive ones (pieces read together are 0 apart). The mean inter-token latency is
//       itl_sum_us / (chunks - 1) when chunks >= 2.
//       Only with --timing: hops_us {"queue_and_route","proxy_to_replica","replica_to_ring","engine",
//       "ring_to_replica","replica_to_client": N|null} from the proxy's `: tokenbus-timing` comment (chat)
//       or X-Tokenbus-Timing trailer (plain), see timing.hpp; a hop is null when a stamp it spans was not
//       taken, and negative under cross-node clock skew. proxy_ttft_us: the TTFT the proxy saw, which the
//       hops add up to (within 1 us per hop: each is truncated to whole microseconds). Both null when the
//       stream had no stamps, or malformed ones (logged once on stderr).
//       Open loop (--rate): an arrival while --max-in-flight requests are open is not sent, but reported
//       here at once: ok false, error "over max-in-flight", e2e_us 0, tokens 0.
//   {"event":"progress","elapsed_s":F,"requests":N,"failures":N,"tokens":N,"in_flight":N,"stage":I,
//    "lag_us":[N,...]}
//       every 250 ms: running totals (tokens: content tokens received so far, finished or not), the
//       requests open now, the stage running now (the last one once all have ended), and the lateness of
//       each 10 ms lag-probe tick since the last progress line (this loop's lag)
//   {"event":"end","duration_s":F,"requests":N,"failures":N,"cpu_s":F}
//       once, last: first request start to last request end, and this process's user+system CPU
//
// Request lines are buffered and written together with the next progress line, so the reader wakes up
// four times a second, not once per request; a stage line is written at once (after the request lines
// buffered before it).
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <optional>
#include <string>
#include <vector>

#include "loadgen/options.hpp"
#include "loadgen/timing.hpp"

namespace tokenbus::loadgen {

struct RequestOutcome {
  bool ok = false;
  std::int64_t ttft_us = -1;  // -1: no content token
  std::int64_t e2e_us = 0;
  std::size_t tokens = 0;
  std::string error;
  double start_s = 0;
  int stage = 0;
  std::int64_t itl_max_us = 0;
  std::int64_t itl_sum_us = 0;
  std::size_t chunks = 0;
  std::optional<FirstTokenHops> hops;  // reported only with --timing
};

class Reporter {
 public:
  // `timing`: request lines carry hops_us and proxy_ttft_us (--timing).
  explicit Reporter(std::FILE* out, bool timing = false) : out_(out), timing_(timing) {}

  void start(const Stage& first);
  void stage(int index, const Stage& stage, double start_s);
  void request(const RequestOutcome& outcome);
  void add_tokens(std::size_t n) { tokens_ += n; }
  void lag(std::chrono::microseconds late) { lags_us_.push_back(late.count()); }
  // Writes the progress line after the buffered request lines, flushes.
  void progress(double elapsed_s, std::size_t in_flight);
  void end(double duration_s, double cpu_s);

  std::size_t requests() const { return requests_; }
  std::size_t failures() const { return failures_; }

 private:
  void flush();  // writes what is pending

  std::FILE* out_;
  bool timing_;
  std::string pending_;  // lines not yet written
  std::vector<std::int64_t> lags_us_;
  std::size_t requests_ = 0;
  std::size_t failures_ = 0;
  std::size_t tokens_ = 0;
  int stage_ = 0;  // the last stage started
};

}  // namespace tokenbus::loadgen
