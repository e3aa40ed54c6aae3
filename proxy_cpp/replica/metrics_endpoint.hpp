#pragma once
// The replica's /metrics: prometheus-cpp's pull Exposer, which serves from civetweb threads of its own, so a
// scrape never waits for, nor holds up, a gRPC thread or the response reader.
#include <memory>
#include <string>

namespace prometheus {
class Exposer;
class Registry;
}  // namespace prometheus

namespace tokenbus::replica {

class MetricsEndpoint {
 public:
  // Serves `registry` at http://BIND/metrics; `bind` is "IP:PORT" or "[IPv6]:PORT", port 0 for any free one.
  // Throws std::runtime_error when it cannot bind (setup, not the data path).
  MetricsEndpoint(const std::string& bind, const std::shared_ptr<prometheus::Registry>& registry);
  // Stops serving, in milliseconds rather than civetweb's poll quantum (see the .cpp).
  ~MetricsEndpoint();
  MetricsEndpoint(const MetricsEndpoint&) = delete;
  MetricsEndpoint& operator=(const MetricsEndpoint&) = delete;

  int port() const { return port_; }

 private:
  std::string host_;  // as in `bind`, without brackets
  std::unique_ptr<prometheus::Exposer> exposer_;
  int port_ = 0;
};

}  // namespace tokenbus::replica
