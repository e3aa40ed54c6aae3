#pragma once
// The proxy's Prometheus metrics (prometheus-cpp core: a Registry rendered by /metrics with the
// TextSerializer). The header stays light: the prometheus types live behind pointers.
#include <array>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>

namespace prometheus {
class Counter;
class Histogram;
}  // namespace prometheus

namespace tokenbus::proxy {

class Router;

enum class Endpoint { kChatCompletions, kCompletions, kChatPlain, kModels, kHealthz, kReadyz, kMetrics, kOther };

// Where a stream's first token was at each hop (schemas/README.md, "Where each millisecond goes"): wall-clock
// (system_clock) nanoseconds since the epoch, in hop order; 0 when unknown (a replica that does not stamp).
enum Stamp : std::size_t {
  kProxyReceived,
  kRouted,
  kReplicaReceived,
  kRingWritten,
  kEngineProduced,
  kRingRead,
  kProxySent,
  kStampCount
};
using FirstTokenStamps = std::array<std::uint64_t, kStampCount>;
inline constexpr std::array<std::string_view, kStampCount> kStampNames = {
    "proxy_received_ns", "routed_ns",   "replica_received_ns", "ring_written_ns",
    "engine_produced_ns", "ring_read_ns", "proxy_sent_ns"};
// Hop i runs from stamp i to stamp i + 1.
inline constexpr std::array<std::string_view, kStampCount - 1> kHopNames = {
    "queue_and_route", "proxy_to_replica", "replica_to_ring", "engine", "ring_to_replica", "replica_to_client"};

// Wall-clock nanoseconds now: the clock every process stamps with, so that stamps of one node line up.
std::uint64_t wall_clock_ns();

// Bucket bounds of token-scale latencies, in seconds: a hop inside a node takes tens of microseconds, a first
// token up to seconds.
inline constexpr std::array<double, 17> kFineBuckets = {0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005,
                                                        0.01,   0.025,   0.05,   0.1,   0.25,   0.5,
                                                        1,      2.5,     5,      10,    30};

// The gaps between the chunks of one stream, counted here and added to the deployment's histogram once, when
// the stream ends (DeploymentMetrics::observe_inter_token): one lock of the shared histogram per stream
// instead of one per token. Used by one coroutine at a time.
class InterTokenGaps {
 public:
  void observe(double seconds);

 private:
  friend class DeploymentMetrics;
  std::array<std::uint32_t, kFineBuckets.size() + 1> counts_{};  // the last: over every bound
  double sum_ = 0.0;
  bool empty_ = true;
};

// The series of one deployment that a request updates, resolved once per request so that nothing per token
// looks labels up. Owned by Metrics, valid as long as it.
class DeploymentMetrics {
 public:
  // TTFT (proxy_sent - proxy_received) and each hop whose two stamps are known. A negative hop (clocks of two
  // nodes apart) is observed as 0 and counted as skew.
  void observe_first_token(const FirstTokenStamps& stamps);
  void observe_e2e(double seconds);
  // The gaps between consecutive chunks written to the client of one stream, at its end.
  void observe_inter_token(const InterTokenGaps& gaps);
  // Time the request waited for a slot in the deployment's queue (0: it did not wait).
  void observe_queue_wait(double seconds);
  void count_tokens(std::uint64_t tokens);

 private:
  friend class Metrics;
  prometheus::Histogram* ttft_ = nullptr;
  prometheus::Histogram* e2e_ = nullptr;
  prometheus::Histogram* inter_token_ = nullptr;
  prometheus::Histogram* queue_wait_ = nullptr;
  prometheus::Counter* tokens_ = nullptr;
  std::array<prometheus::Histogram*, kHopNames.size()> hops_{};
  const std::array<prometheus::Counter*, kHopNames.size()>* skew_ = nullptr;
};

class Metrics {
 public:
  Metrics();
  ~Metrics();
  Metrics(const Metrics&) = delete;
  Metrics& operator=(const Metrics&) = delete;

  // One finished request and the status it was answered with (499: the client went away first).
  // `deployment`: a name of the snapshot held, or "" (label() makes it so).
  void count_request(Endpoint endpoint, int status, std::string_view deployment = {});
  // A request the proxy refused itself (no replica asked), by why: "unauthorized", "bad_request", ...
  void count_rejection(std::string_view deployment, std::string_view reason);
  // A request that presented the API key named `name` (names are bounded by the key file).
  void count_request_by_key(std::string_view name);
  // The series of `deployment` (a name of the snapshot held, or ""); created on first use.
  DeploymentMetrics& deployment(std::string_view deployment);
  // Generate streams open to replicas.
  void stream_started();
  void stream_ended();
  std::uint64_t open_streams() const;
  // How late an I/O thread's periodic probe timer fired: time that thread's connections waited for it.
  void observe_loop_lag(double seconds);
  // A request sent to another replica before its first token, by why the last attempt failed.
  void count_retry(std::string_view reason);
  // A request that could have been retried and was not: "budget", "max_retries" or "no_replica".
  void count_retry_refused(std::string_view why);
  // A started stream cut for want of a token: "first_token" or "idle".
  void count_stream_timeout(std::string_view kind);
  // A bus message the snapshot subscriber dropped unread, by why ("too_large", "too_many_frames", ...).
  void count_bus_dropped(std::string_view why);

  // The Prometheus text exposition, with the snapshot gauges read from `router` at this moment.
  std::string render(const Router& router);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  std::mutex deployments_mutex_;  // guards deployments_ (taken once per request, never per token)
  std::map<std::string, std::unique_ptr<DeploymentMetrics>, std::less<>> deployments_;
};

// `name` when the snapshot held by `router` has that deployment, else "": what a `deployment` label may hold, so
// that a client naming models at random cannot grow the series without bound.
std::string_view deployment_label(const Router& router, std::string_view name);

}  // namespace tokenbus::proxy
