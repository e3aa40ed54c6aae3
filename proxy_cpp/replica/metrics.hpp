#pragma once
// tokenbus-replica's Prometheus metrics: one registry, served by the prometheus-cpp pull Exposer on its own
// civetweb threads (ReplicaServer), so a scrape never occupies a gRPC thread or the response reader.
// Counters and the gauge are lock-free atomics (prometheus-cpp), cheap enough for once per ring record;
// histograms take a lock and are observed at most a few times per call, never per token.
#include <prometheus/counter.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string_view>

namespace tokenbus::v1 {
class FirstTokenTimes;
enum FinishReason : int;  // tokenbus.proto
}

namespace tokenbus::replica {

// How a Generate call ended: the label `result` of tokenbus_replica_generate_calls_total.
enum class CallResult {
  kStop,        // the worker finished it: "stop"
  kLength,      // "length"
  kAbort,       // "abort" (the engine aborted it, or our CANCEL did)
  kError,       // "error" (an engine error, or a finish reason this replica does not know)
  kCancelled,   // the client left or a write to it failed
  kRingFull,    // refused at SUBMIT: the request ring had no room
  kTooLarge,    // refused at SUBMIT: larger than a ring record may be
  kWorkerGone,  // the model worker exited: refused, or failed while open
};
inline constexpr std::size_t kCallResults = 8;

CallResult result_of_finish(tokenbus::v1::FinishReason finish_reason);

// Records and payload bytes (the MessagePack record, without the ring's length word and padding) through
// one ring.
struct RingCounters {
  prometheus::Counter& records;
  prometheus::Counter& bytes;
  void count(std::size_t size) {
    records.Increment();
    bytes.Increment(static_cast<double>(size));
  }
};

class ReplicaMetrics {
 public:
  ReplicaMetrics();
  ReplicaMetrics(const ReplicaMetrics&) = delete;
  ReplicaMetrics& operator=(const ReplicaMetrics&) = delete;

  std::shared_ptr<prometheus::Registry> registry() const { return registry_; }

  // A Generate call entered the handler / ended (OnDone).
  void call_started() { open_calls_.Increment(); }
  void call_ended(CallResult result) {
    open_calls_.Decrement();
    calls_[static_cast<std::size_t>(result)]->Increment();
  }

  RingCounters& request_ring() { return request_ring_; }
  RingCounters& response_ring() { return response_ring_; }

  // A record that found the request ring full waited `seconds` for room before it was written.
  void observe_request_ring_full_wait(double seconds) { request_ring_full_wait_.Observe(seconds); }
  // The response reader slept `seconds` on an empty ring.
  void add_response_ring_idle(double seconds) { response_ring_idle_.Increment(seconds); }

  // The hops inside this node of a call's first token (those of `times` that are known).
  void observe_first_token(const tokenbus::v1::FirstTokenTimes& times);

 private:
  // Declaration order is initialisation order: each family before its members.
  std::shared_ptr<prometheus::Registry> registry_;
  prometheus::Family<prometheus::Counter>& ring_records_;
  prometheus::Family<prometheus::Counter>& ring_bytes_;
  prometheus::Family<prometheus::Histogram>& hops_;
  prometheus::Gauge& open_calls_;
  std::array<prometheus::Counter*, kCallResults> calls_;
  RingCounters request_ring_;
  RingCounters response_ring_;
  prometheus::Histogram& request_ring_full_wait_;
  prometheus::Counter& response_ring_idle_;
  prometheus::Histogram& hop_replica_to_ring_;
  prometheus::Histogram& hop_engine_;
  prometheus::Histogram& hop_ring_to_replica_;
};

}  // namespace tokenbus::replica
