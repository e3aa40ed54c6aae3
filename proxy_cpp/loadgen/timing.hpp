#pragma once
// The proxy's per-hop first-token times of one stream (contract C1 of issue 8): with `X-Tokenbus-Timing: 1`
// the proxy follows the first content event with one SSE comment line
//   : tokenbus-timing {"proxy_received_ns":N,"routed_ns":N,"replica_received_ns":N,"ring_written_ns":N,
//                      "engine_produced_ns":N,"ring_read_ns":N,"proxy_sent_ns":N}
// (wall-clock ns since the epoch, taken by the proxy, the replica and the worker); a chunked plain-text body
// carries the same JSON in its trailer field X-Tokenbus-Timing. The loadgen reports the differences of
// consecutive stamps, the hops.
#include <array>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <memory>
#include <optional>
#include <string_view>

namespace tokenbus::loadgen {

inline constexpr std::string_view kTimingCommentPrefix = ": tokenbus-timing ";
inline constexpr std::string_view kTimingTrailer = "X-Tokenbus-Timing";

inline constexpr std::size_t kHops = 6;
// In order; hop i spans stamp i to stamp i + 1 of kStampNames, so the hops add up to the proxy's TTFT.
inline constexpr std::array<std::string_view, kHops> kHopNames = {
    "queue_and_route", "proxy_to_replica", "replica_to_ring", "engine", "ring_to_replica", "replica_to_client"};
inline constexpr std::array<std::string_view, kHops + 1> kStampNames = {
    "proxy_received_ns", "routed_ns",    "replica_received_ns", "ring_written_ns",
    "engine_produced_ns", "ring_read_ns", "proxy_sent_ns"};

struct FirstTokenHops {
  static constexpr std::int64_t kUnknown = std::numeric_limits<std::int64_t>::min();
  // Microseconds; kUnknown when a stamp it spans is 0 (not taken: a replica or worker older than C1).
  // Negative when the clocks of two nodes disagree by more than the hop took.
  std::array<std::int64_t, kHops> hop_us{};
  std::int64_t proxy_ttft_us = 0;  // proxy_sent - proxy_received: the TTFT the proxy saw
};

// The hops from the seven stamps in kStampNames order; nullopt when the proxy's own two are not set.
std::optional<FirstTokenHops> hops_from_stamps(const std::array<std::int64_t, kHops + 1>& stamps_ns);

// Parses the JSON object of the comment, reusing its buffers from one stream to the next.
class TimingParser {
 public:
  TimingParser();
  ~TimingParser();
  TimingParser(const TimingParser&) = delete;
  TimingParser& operator=(const TimingParser&) = delete;

  // The hops, or nullopt when `json` is not an object with the seven stamps as integers (extra keys are fine).
  std::optional<FirstTokenHops> parse(std::string_view json);

 private:
  struct Json;  // simdjson, kept out of this header
  std::unique_ptr<Json> json_;
};

}  // namespace tokenbus::loadgen
