#pragma once
// Keeps the router's snapshot current (zguide clone pattern): a dedicated thread with a SUB socket on the
// head's PUB endpoint and a DEALER on its ROUTER. What to apply and when to ask the head is decided by a
// SnapshotTracker; this class owns the sockets. Any failure (a ZeroMQ error, a bad message) is logged and
// the loop goes on, re-creating its sockets after a capped backoff, so routing never freezes for good.
// Not an Asio thread: zmq calls block.
#include <atomic>
#include <chrono>
#include <optional>
#include <string>
#include <thread>

#include "proxy/curve_keys.hpp"

namespace tokenbus::proxy {

class Router;
class Metrics;
class SnapshotTracker;

// Who this proxy is to the head: sent in PROXY_REPORT (proxy_report.hpp) with its snapshot version and open
// streams.
struct ProxyIdentity {
  std::string proxy_id;
  std::string addr;  // its HTTP listener as clients reach it
};

class SnapshotSubscriber {
 public:
  // `head_silence`: how long the followed head must be silent before a head with lower versions (a new
  // database) is followed. `metrics` (optional) counts dropped bus messages. With `curve`, both sockets are
  // CURVE clients of the head: a head with another key, or one refusing this client's key, sends nothing. With
  // `identity`, the DEALER also sends PROXY_REPORT at start and every kProxyReportInterval (open streams read from
  // `metrics`).
  SnapshotSubscriber(Router& router, std::string pub_endpoint, std::string router_endpoint,
                     std::chrono::milliseconds head_silence = std::chrono::seconds(3), Metrics* metrics = nullptr,
                     std::optional<CurveClientKeys> curve = std::nullopt,
                     std::optional<ProxyIdentity> identity = std::nullopt);
  ~SnapshotSubscriber();  // stops the thread
  SnapshotSubscriber(const SnapshotSubscriber&) = delete;
  SnapshotSubscriber& operator=(const SnapshotSubscriber&) = delete;

  void start();
  // Returns within one poll interval (250 ms).
  void stop();

 private:
  void run();
  // One life of the sockets; returns normally on stop, throws a zmq::error_t on a socket failure.
  void serve(SnapshotTracker& tracker);

  Router& router_;
  const std::string pub_endpoint_;
  const std::string router_endpoint_;
  const std::chrono::milliseconds head_silence_;
  Metrics* const metrics_;
  const std::optional<CurveClientKeys> curve_;
  const std::optional<ProxyIdentity> identity_;
  std::atomic<bool> stopping_{false};
  std::thread thread_;
};

}  // namespace tokenbus::proxy
