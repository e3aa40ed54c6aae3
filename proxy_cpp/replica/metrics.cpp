#include "replica/metrics.hpp"

#include "tokenbus.pb.h"

namespace tokenbus::replica {
namespace {

constexpr std::array<const char*, kCallResults> kResultNames = {
    "stop", "length", "abort", "error", "cancelled", "ring_full", "too_large", "worker_gone"};

// From tens of microseconds (a ring hop on an idle node) to the engine's queueing under load.
prometheus::Histogram::BucketBoundaries hop_buckets() {
  return {0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
          0.05,    0.1,    0.25,    0.5,    1,     2.5,    5,     10,   30};
}

prometheus::Family<prometheus::Counter>& counter_family(prometheus::Registry& registry, const char* name,
                                                        const char* help) {
  return prometheus::BuildCounter().Name(name).Help(help).Register(registry);
}

std::uint64_t hop_or_zero(std::uint64_t from, std::uint64_t to) { return to > from ? to - from : 0; }

double seconds(std::uint64_t ns) { return static_cast<double>(ns) / 1e9; }

}  // namespace

CallResult result_of_finish(tokenbus::v1::FinishReason finish_reason) {
  switch (finish_reason) {
    case tokenbus::v1::FINISH_REASON_STOP: return CallResult::kStop;
    case tokenbus::v1::FINISH_REASON_LENGTH: return CallResult::kLength;
    case tokenbus::v1::FINISH_REASON_ABORT: return CallResult::kAbort;
    default: return CallResult::kError;
  }
}

ReplicaMetrics::ReplicaMetrics()
    : registry_(std::make_shared<prometheus::Registry>()),
      ring_records_(counter_family(*registry_, "tokenbus_replica_ring_records_total",
                                   "Records through a shared-memory ring (request: SUBMIT and CANCEL written by the "
                                   "replica; response: every record read from the worker)")),
      ring_bytes_(counter_family(*registry_, "tokenbus_replica_ring_bytes_total",
                                 "Payload bytes (the MessagePack records) through a shared-memory ring")),
      hops_(prometheus::BuildHistogram()
                .Name("tokenbus_replica_first_token_hop_seconds")
                .Help("Hops of a call's first token inside this node: replica_to_ring (Generate received to SUBMIT "
                      "written), engine (SUBMIT written to the engine's first token), ring_to_replica (first token "
                      "to its TOKENS record read)")
                .Register(*registry_)),
      open_calls_(prometheus::BuildGauge()
                      .Name("tokenbus_replica_open_calls")
                      .Help("Generate calls open on this replica")
                      .Register(*registry_)
                      .Add({})),
      request_ring_{ring_records_.Add({{"ring", "request"}}), ring_bytes_.Add({{"ring", "request"}})},
      response_ring_{ring_records_.Add({{"ring", "response"}}), ring_bytes_.Add({{"ring", "response"}})},
      request_ring_full_wait_(
          prometheus::BuildHistogram()
              .Name("tokenbus_replica_request_ring_full_wait_seconds")
              .Help("How long a record that found the request ring full waited for room before it was written "
                    "(CANCELs: a SUBMIT that finds the ring full is refused at once, result=\"ring_full\")")
              .Register(*registry_)
              .Add({}, hop_buckets())),
      response_ring_idle_(counter_family(*registry_, "tokenbus_replica_response_ring_idle_seconds_total",
                                         "Time the response reader slept on an empty response ring (its rate is "
                                         "the fraction of time the reader had nothing to do)")
                              .Add({})),
      hop_replica_to_ring_(hops_.Add({{"hop", "replica_to_ring"}}, hop_buckets())),
      hop_engine_(hops_.Add({{"hop", "engine"}}, hop_buckets())),
      hop_ring_to_replica_(hops_.Add({{"hop", "ring_to_replica"}}, hop_buckets())) {
  auto& calls = counter_family(*registry_, "tokenbus_replica_generate_calls_total",
                               "Generate calls ended, by how: the worker's finish reason (stop, length, abort, "
                               "error), cancelled by the client, or refused (ring_full, too_large, worker_gone)");
  for (std::size_t i = 0; i < kCallResults; ++i) calls_[i] = &calls.Add({{"result", kResultNames[i]}});
}

void ReplicaMetrics::observe_first_token(const tokenbus::v1::FirstTokenTimes& times) {
  hop_replica_to_ring_.Observe(seconds(hop_or_zero(times.replica_received_ns(), times.ring_written_ns())));
  if (times.engine_produced_ns() == 0) return;  // a worker that does not stamp its first TOKENS record
  hop_engine_.Observe(seconds(hop_or_zero(times.ring_written_ns(), times.engine_produced_ns())));
  hop_ring_to_replica_.Observe(seconds(hop_or_zero(times.engine_produced_ns(), times.ring_read_ns())));
}

}  // namespace tokenbus::replica
