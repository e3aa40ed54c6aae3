#pragma once
// The loadgen's output on stdout, read by tools/bench_loadgen.py: one JSON object per line.
//
//   {"event":"start","concurrency":C}
//       once, just before the first request starts (the reader starts its CPU meters here)
//   {"event":"request","ok":B,"ttft_us":N|null,"e2e_us":N,"tokens":N,"error":"..."}
//       one per finished request; ttft_us is null when no content token arrived; error is "" when ok
//   {"event":"progress","elapsed_s":F,"requests":N,"failures":N,"tokens":N,"lag_us":[N,...]}
//       every 250 ms: running totals (tokens: content tokens received so far, finished or not) and the
//       lateness of each 10 ms lag-probe tick since the last progress line (this loop's lag)
//   {"event":"end","duration_s":F,"requests":N,"failures":N,"cpu_s":F}
//       once, last: first request start to last request end, and this process's user+system CPU
//
// Request lines are buffered and written together with the next progress line, so the reader wakes up
// four times a second, not once per request.
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

namespace tokenbus::loadgen {

struct RequestOutcome {
  bool ok = false;
  std::int64_t ttft_us = -1;  // -1: no content token
  std::int64_t e2e_us = 0;
  std::size_t tokens = 0;
  std::string error;
};

class Reporter {
 public:
  explicit Reporter(std::FILE* out) : out_(out) {}

  void start(int concurrency);
  void request(const RequestOutcome& outcome);
  void add_tokens(std::size_t n) { tokens_ += n; }
  void lag(std::chrono::microseconds late) { lags_us_.push_back(late.count()); }
  void progress(double elapsed_s);  // writes the progress line after the buffered request lines, flushes
  void end(double duration_s, double cpu_s);

  std::size_t requests() const { return requests_; }
  std::size_t failures() const { return failures_; }

 private:
  void flush();  // writes what is pending

  std::FILE* out_;
  std::string pending_;  // lines not yet written
  std::vector<std::int64_t> lags_us_;
  std::size_t requests_ = 0;
  std::size_t failures_ = 0;
  std::size_t tokens_ = 0;
};

}  // namespace tokenbus::loadgen
