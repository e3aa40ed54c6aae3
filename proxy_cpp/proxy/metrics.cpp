#include "proxy/metrics.hpp"

#include <prometheus/counter.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>
#include <prometheus/text_serializer.h>

#include <algorithm>
#include <chrono>
#include <vector>

#include "proxy/router.hpp"

namespace tokenbus::proxy {
namespace {

constexpr std::array kEndpointNames = {"chat_completions", "completions", "chat_plain", "models",
                                       "healthz",          "readyz",      "metrics",    "other"};
// Statuses the proxy answers with; their counters (without a deployment) are made up front so that counting
// them is lock-free.
constexpr std::array kStatuses = {200, 400, 401, 404, 405, 413, 414, 429, 431, 499, 500, 502, 503, 504};

prometheus::Histogram::BucketBoundaries fine_buckets() { return {kFineBuckets.begin(), kFineBuckets.end()}; }

// Whole requests: up to minutes of generation.
prometheus::Histogram::BucketBoundaries request_buckets() {
  return {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300};
}

double ns_to_seconds(std::int64_t ns) { return static_cast<double>(ns) / 1e9; }

}  // namespace

std::uint64_t wall_clock_ns() {
  return static_cast<std::uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::system_clock::now().time_since_epoch())
          .count());
}

void DeploymentMetrics::observe_first_token(const FirstTokenStamps& stamps) {
  ttft_->Observe(ns_to_seconds(static_cast<std::int64_t>(stamps[kProxySent] - stamps[kProxyReceived])));
  for (std::size_t hop = 0; hop < kHopNames.size(); ++hop) {
    if (stamps[hop] == 0 || stamps[hop + 1] == 0) continue;  // a replica (or worker) that does not stamp it
    const auto ns = static_cast<std::int64_t>(stamps[hop + 1] - stamps[hop]);
    if (ns < 0) (*skew_)[hop]->Increment();
    hops_[hop]->Observe(ns < 0 ? 0.0 : ns_to_seconds(ns));
  }
}

void DeploymentMetrics::observe_e2e(double seconds) { e2e_->Observe(seconds); }

// The bucket prometheus-cpp's Observe picks: the first bound not below the value.
void InterTokenGaps::observe(double seconds) {
  const auto bound = std::lower_bound(kFineBuckets.begin(), kFineBuckets.end(), seconds);
  ++counts_[static_cast<std::size_t>(bound - kFineBuckets.begin())];
  sum_ += seconds;
  empty_ = false;
}

void DeploymentMetrics::observe_inter_token(const InterTokenGaps& gaps) {
  if (gaps.empty_) return;
  inter_token_->ObserveMultiple(std::vector<double>(gaps.counts_.begin(), gaps.counts_.end()), gaps.sum_);
}

void DeploymentMetrics::observe_queue_wait(double seconds) { queue_wait_->Observe(seconds); }
void DeploymentMetrics::count_tokens(std::uint64_t tokens) { tokens_->Increment(static_cast<double>(tokens)); }

struct Metrics::Impl {
  prometheus::Registry registry;
  prometheus::Family<prometheus::Counter>& requests =
      prometheus::BuildCounter()
          .Name("tokenbus_proxy_requests_total")
          .Help("HTTP requests answered, by endpoint, status and deployment (\"\": none, or not in the snapshot)")
                                                          .Register(registry);
  prometheus::Family<prometheus::Counter>& by_key = prometheus::BuildCounter()
                                                        .Name("tokenbus_proxy_requests_by_key_total")
                                                        .Help("Requests that presented a valid API key, by the key's name")
                                                        .Register(registry);
  prometheus::Gauge& in_flight = prometheus::BuildGauge()
                                     .Name("tokenbus_proxy_in_flight_streams")
                                     .Help("Generate calls open to replicas")
                                     .Register(registry)
                                     .Add({});
  prometheus::Family<prometheus::Histogram>& ttft =
      prometheus::BuildHistogram()
          .Name("tokenbus_proxy_ttft_seconds")
          .Help("Time from a request's arrival to its first generated text written to the client")
          .Register(registry);
  prometheus::Family<prometheus::Histogram>& e2e =
      prometheus::BuildHistogram()
          .Name("tokenbus_proxy_request_duration_seconds")
          .Help("Time from a generate request's arrival to the end of its response")
          .Register(registry);
  prometheus::Family<prometheus::Histogram>& inter_token =
      prometheus::BuildHistogram()
          .Name("tokenbus_proxy_inter_token_seconds")
          .Help("Time between consecutive chunks of generated text written to a streaming client")
          .Register(registry);
  prometheus::Family<prometheus::Histogram>& queue_wait =
      prometheus::BuildHistogram()
          .Name("tokenbus_proxy_queue_wait_seconds")
          .Help("Time a generate request waited in its deployment's queue for a slot (0: no wait)")
          .Register(registry);
  prometheus::Family<prometheus::Histogram>& hops =
      prometheus::BuildHistogram()
          .Name("tokenbus_proxy_first_token_hop_seconds")
          .Help("Time a stream's first token spent in each hop from the proxy's receipt to its write to the client")
          .Register(registry);
  prometheus::Family<prometheus::Counter>& skew =
      prometheus::BuildCounter()
          .Name("tokenbus_proxy_hop_clock_skew_total")
          .Help("First-token hops that came out negative (clocks of two nodes apart), observed as 0")
          .Register(registry);
  prometheus::Family<prometheus::Counter>& tokens = prometheus::BuildCounter()
                                                        .Name("tokenbus_proxy_tokens_total")
                                                        .Help("Generated tokens streamed to clients")
                                                        .Register(registry);
  prometheus::Family<prometheus::Counter>& rejections =
      prometheus::BuildCounter()
          .Name("tokenbus_proxy_rejections_total")
          .Help("Requests the proxy refused itself, before or instead of asking a replica, by reason")
          .Register(registry);
  prometheus::Histogram& loop_lag =
      prometheus::BuildHistogram()
          .Name("tokenbus_proxy_io_loop_lag_seconds")
          .Help("How late each I/O thread's 10 ms probe timer fired: the wait a ready connection sees")
          .Register(registry)
          .Add({}, prometheus::Histogram::BucketBoundaries{0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
                                                           0.025, 0.05, 0.1, 0.25});
  prometheus::Gauge& snapshot_version = prometheus::BuildGauge()
                                            .Name("tokenbus_proxy_snapshot_version")
                                            .Help("Version of the routing snapshot held (0: none yet)")
                                            .Register(registry)
                                            .Add({});
  prometheus::Gauge& snapshot_staleness = prometheus::BuildGauge()
                                              .Name("tokenbus_proxy_snapshot_staleness_seconds")
                                              .Help("Seconds since the last routing snapshot arrived (-1: none yet)")
                                              .Register(registry)
                                              .Add({});
  prometheus::Family<prometheus::Counter>& retries =
      prometheus::BuildCounter()
          .Name("tokenbus_proxy_retries_total")
          .Help("Requests sent to another replica before their first token, by why the last attempt failed")
          .Register(registry);
  prometheus::Family<prometheus::Counter>& retries_refused =
      prometheus::BuildCounter()
          .Name("tokenbus_proxy_retries_refused_total")
          .Help("Failed attempts not retried: retry budget spent, max retries reached, no other replica")
          .Register(registry);
  prometheus::Family<prometheus::Counter>& stream_timeouts =
      prometheus::BuildCounter()
          .Name("tokenbus_proxy_stream_timeouts_total")
          .Help("Streams cut by the deployment's time to first token or idle time between tokens")
          .Register(registry);
  prometheus::Family<prometheus::Counter>& bus_dropped =
      prometheus::BuildCounter()
          .Name("tokenbus_proxy_bus_dropped_total")
          .Help("Bus messages the snapshot subscriber dropped, by reason")
          .Register(registry);
  std::array<std::array<prometheus::Counter*, kStatuses.size()>, kEndpointNames.size()> by_status{};
  std::array<prometheus::Counter*, kHopNames.size()> skew_by_hop{};

  Impl() {
    for (std::size_t e = 0; e < kEndpointNames.size(); ++e) {
      for (std::size_t s = 0; s < kStatuses.size(); ++s) {
        by_status[e][s] = &requests.Add(
            {{"endpoint", kEndpointNames[e]}, {"status", std::to_string(kStatuses[s])}, {"deployment", ""}});
      }
    }
    for (std::size_t h = 0; h < kHopNames.size(); ++h) {
      skew_by_hop[h] = &skew.Add({{"hop", std::string(kHopNames[h])}});
    }
  }
};

Metrics::Metrics() : impl_(std::make_unique<Impl>()) {}
Metrics::~Metrics() = default;

void Metrics::count_request(Endpoint endpoint, int status, std::string_view deployment) {
  const auto e = static_cast<std::size_t>(endpoint);
  if (deployment.empty()) {
    for (std::size_t s = 0; s < kStatuses.size(); ++s) {
      if (kStatuses[s] == status) {
        impl_->by_status[e][s]->Increment();
        return;
      }
    }
  }
  impl_->requests
      .Add({{"endpoint", kEndpointNames[e]},
            {"status", std::to_string(status)},
            {"deployment", std::string(deployment)}})
      .Increment();
}

void Metrics::count_rejection(std::string_view deployment, std::string_view reason) {
  impl_->rejections.Add({{"deployment", std::string(deployment)}, {"reason", std::string(reason)}}).Increment();
}

void Metrics::count_request_by_key(std::string_view name) {
  impl_->by_key.Add({{"key", std::string(name)}}).Increment();
}

DeploymentMetrics& Metrics::deployment(std::string_view deployment) {
  std::lock_guard lock(deployments_mutex_);
  if (const auto it = deployments_.find(deployment); it != deployments_.end()) return *it->second;
  auto series = std::make_unique<DeploymentMetrics>();
  const std::map<std::string, std::string> labels{{"deployment", std::string(deployment)}};
  series->ttft_ = &impl_->ttft.Add(labels, fine_buckets());
  series->e2e_ = &impl_->e2e.Add(labels, request_buckets());
  series->inter_token_ = &impl_->inter_token.Add(labels, fine_buckets());
  series->queue_wait_ = &impl_->queue_wait.Add(labels, fine_buckets());
  series->tokens_ = &impl_->tokens.Add(labels);
  for (std::size_t h = 0; h < kHopNames.size(); ++h) {
    series->hops_[h] = &impl_->hops.Add({{"deployment", std::string(deployment)}, {"hop", std::string(kHopNames[h])}},
                                        fine_buckets());
  }
  series->skew_ = &impl_->skew_by_hop;
  return *deployments_.emplace(std::string(deployment), std::move(series)).first->second;
}

void Metrics::stream_started() { impl_->in_flight.Increment(); }
void Metrics::stream_ended() { impl_->in_flight.Decrement(); }
std::uint64_t Metrics::open_streams() const { return static_cast<std::uint64_t>(impl_->in_flight.Value()); }
void Metrics::observe_loop_lag(double seconds) { impl_->loop_lag.Observe(seconds); }
void Metrics::count_retry(std::string_view reason) { impl_->retries.Add({{"reason", std::string(reason)}}).Increment(); }
void Metrics::count_retry_refused(std::string_view why) {
  impl_->retries_refused.Add({{"why", std::string(why)}}).Increment();
}
void Metrics::count_stream_timeout(std::string_view kind) {
  impl_->stream_timeouts.Add({{"kind", std::string(kind)}}).Increment();
}
void Metrics::count_bus_dropped(std::string_view why) {
  impl_->bus_dropped.Add({{"reason", std::string(why)}}).Increment();
}

std::string_view deployment_label(const Router& router, std::string_view name) {
  const std::shared_ptr<const Snapshot> snapshot = router.snapshot();
  return snapshot && snapshot->find(name) != nullptr ? name : std::string_view();
}

std::string Metrics::render(const Router& router) {
  const std::shared_ptr<const Snapshot> snapshot = router.snapshot();
  impl_->snapshot_version.Set(snapshot ? static_cast<double>(snapshot->version) : 0.0);
  impl_->snapshot_staleness.Set(router.staleness_seconds());
  std::vector<prometheus::MetricFamily> families = impl_->registry.Collect();
  // Per-replica series follow the snapshot (replicas come and go), so they are built afresh for each scrape.
  prometheus::Registry replicas;
  auto& in_flight = prometheus::BuildGauge()
                        .Name("tokenbus_proxy_replica_in_flight")
                        .Help("This proxy's requests open on each replica of the snapshot held")
                        .Register(replicas);
  auto& routed = prometheus::BuildCounter()
                     .Name("tokenbus_proxy_replica_routed_total")
                     .Help("Requests this proxy routed to each replica since its address appeared")
                     .Register(replicas);
  auto& tokens = prometheus::BuildCounter()
                     .Name("tokenbus_proxy_replica_tokens_total")
                     .Help("Generated tokens this proxy streamed from each replica since its address appeared")
                     .Register(replicas);
  auto& score = prometheus::BuildGauge()
                    .Name("tokenbus_proxy_replica_score")
                    .Help("Each replica's routing score now (lowest wins): own in-flight + reported running + waiting + failure penalty")
                    .Register(replicas);
  auto& routable = prometheus::BuildGauge()
                       .Name("tokenbus_proxy_replica_routable")
                       .Help("1 when the replica is READY and healthy in the snapshot held")
                       .Register(replicas);
  auto& ejected = prometheus::BuildGauge()
                      .Name("tokenbus_proxy_replica_ejected")
                      .Help("1 while this proxy has ejected the replica after failures in a row")
                      .Register(replicas);
  auto& ejections = prometheus::BuildCounter()
                        .Name("tokenbus_proxy_replica_ejections_total")
                        .Help("Times this proxy ejected the replica")
                        .Register(replicas);
  auto& failures = prometheus::BuildGauge()
                       .Name("tokenbus_proxy_replica_consecutive_failures")
                       .Help("The replica's failures in a row, as this proxy saw them")
                       .Register(replicas);
  for (const ReplicaRouteView& r : router.replica_views()) {
    const std::map<std::string, std::string> labels{{"deployment", r.deployment}, {"replica", r.id},
                                                    {"address", r.address}};
    in_flight.Add(labels).Set(static_cast<double>(r.in_flight));
    routed.Add(labels).Increment(static_cast<double>(r.routed));
    tokens.Add(labels).Increment(static_cast<double>(r.tokens));
    score.Add(labels).Set(static_cast<double>(r.score));
    routable.Add(labels).Set(r.routable ? 1.0 : 0.0);
    ejected.Add(labels).Set(r.ejected ? 1.0 : 0.0);
    ejections.Add(labels).Increment(static_cast<double>(r.ejections));
    failures.Add(labels).Set(static_cast<double>(r.consecutive_failures));
  }
  for (prometheus::MetricFamily& family : replicas.Collect()) families.push_back(std::move(family));
  return prometheus::TextSerializer().Serialize(families);
}

}  // namespace tokenbus::proxy
