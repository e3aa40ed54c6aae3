#pragma once
// The proxy's Prometheus metrics (prometheus-cpp core: a Registry rendered by /metrics with the
// TextSerializer). The header stays light: the prometheus types live behind a pointer.
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

namespace tokenbus::proxy {

class Router;

enum class Endpoint { kChatCompletions, kCompletions, kChatPlain, kModels, kHealthz, kReadyz, kMetrics, kOther };

class Metrics {
 public:
  Metrics();
  ~Metrics();
  Metrics(const Metrics&) = delete;
  Metrics& operator=(const Metrics&) = delete;

  // One finished request and the status it was answered with (499: the client went away first).
  void count_request(Endpoint endpoint, int status);
  // A request that presented the API key named `name` (names are bounded by the key file).
  void count_request_by_key(std::string_view name);
  // Generate streams open to replicas.
  void stream_started();
  void stream_ended();
  void observe_ttft(double seconds);
  void observe_e2e(double seconds);
  void count_tokens(std::uint64_t tokens);
  // How late an I/O thread's periodic probe timer fired: time that thread's connections waited for it.
  void observe_loop_lag(double seconds);
  // A request sent to another replica before its first token, by why the last attempt failed.
  void count_retry(std::string_view reason);
  // A request that could have been retried and was not: "budget", "max_retries" or "no_replica".
  void count_retry_refused(std::string_view why);
  // A started stream cut for want of a token: "first_token" or "idle".
  void count_stream_timeout(std::string_view kind);
  // A request refused by a deployment's wait queue: "full" or "timeout".
  void count_queue_refusal(std::string_view why);
  // A client connection refused at accept: over the connection cap.
  void count_connection_refused();
  // A bus message the snapshot subscriber dropped unread, by why ("too_large", "too_many_frames", ...).
  void count_bus_dropped(std::string_view why);

  // The Prometheus text exposition, with the snapshot gauges read from `router` at this moment.
  std::string render(const Router& router);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace tokenbus::proxy
