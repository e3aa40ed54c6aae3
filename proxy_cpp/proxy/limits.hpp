#pragma once
// Every limit and default of the proxy, stated once. `tokenbus-proxy` flags override the ones marked (flag);
// the rest are fixed. Per-deployment limits (context length, time to first token, idle time between tokens)
// come with the routing snapshot instead (schemas/README.md section 2); those of a request's body (messages, stop
// strings, sampling ranges and defaults) are schemas/request_limits.json's, shared with the worker, read through
// the header CMake generates from it (proxy/request_limits.hpp).
#include <chrono>
#include <cstddef>
#include <cstdint>

namespace tokenbus::proxy {

// Passive outlier detection (Envoy's consecutive-5xx ejection).
struct OutlierPolicy {
  // Failures in a row (connect error, UNAVAILABLE, a stream ending in error or timing out) that eject.
  int consecutive_failures = 3;
  // The n-th ejection of a replica lasts n times this, up to `max_ejection`.
  std::chrono::milliseconds base_ejection{5000};
  std::chrono::milliseconds max_ejection{300000};
  // At most this share of a deployment's replicas is ejected at once (rounded down).
  double max_ejected_fraction = 0.5;
  // Added to the routing score per recent failure, so a replica that just failed never looks least loaded.
  std::int64_t failure_penalty = 1000;
};

// Retries before the first token (Envoy's retry_budget).
struct RetryPolicy {
  int max_retries = 2;             // per request, after the first attempt
  double budget_fraction = 0.2;    // retries open at once, as a share of the requests open
  int min_concurrent_retries = 3;  // ...but always at least this many
};

struct ProxyLimits {
  OutlierPolicy outlier;
  RetryPolicy retry;
  // Requests waiting for a slot when every replica is at max_concurrency, per deployment (flag).
  std::size_t queue_depth = 1024;
  // How long a request waits there before 429 (flag).
  std::chrono::milliseconds queue_timeout{5000};
  // Open client connections; one more is answered 503 and closed (flag).
  std::size_t max_connections = 16384;
  // Header limits, as nginx's and Beast's defaults: one line (request line or field) and field count (431).
  std::size_t max_header_line = 8 * 1024;
  std::size_t max_header_fields = 100;
  std::size_t max_header_bytes = 64 * 1024;
  std::size_t max_body_bytes = 1024 * 1024;  // 413
  // A gRPC deadline on every call: no stream outlives it, whatever the deployment's timeouts.
  std::chrono::seconds max_stream_duration{3600};
  // SIGTERM: open streams get this long to finish before they are cut (flag).
  std::chrono::milliseconds drain_grace{30000};
};

// Retry-After when a deployment has no routable replica and no ejection to wait out: about the time the head
// takes to notice and replace a failed replica.
inline constexpr std::chrono::seconds kNoReplicaRetryAfter{2};
inline constexpr std::chrono::seconds kMaxRetryAfter{60};

}  // namespace tokenbus::proxy
