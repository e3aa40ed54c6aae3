#pragma once
// The proxy's Prometheus metrics (prometheus-cpp core: a Registry rendered by /metrics with the
// TextSerializer). The header stays light: the prometheus types live behind a pointer.
#include <cstdint>
#include <memory>
#include <string>

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
  // Generate streams open to replicas.
  void stream_started();
  void stream_ended();
  void observe_ttft(double seconds);
  void observe_e2e(double seconds);
  void count_tokens(std::uint64_t tokens);
  // How late an I/O thread's periodic probe timer fired: time that thread's connections waited for it.
  void observe_loop_lag(double seconds);

  // The Prometheus text exposition, with the snapshot gauges read from `router` at this moment.
  std::string render(const Router& router);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace tokenbus::proxy
