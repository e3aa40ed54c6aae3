#pragma once
// Keeps the router's snapshot current (zguide clone pattern): a dedicated thread with a SUB socket on the
// head's PUB endpoint and a DEALER on its ROUTER. It asks for the full snapshot at start (and again until
// one arrives: the head may not be up yet), on a version gap, and when the head has been silent for a
// while; it applies only versions newer than the one held. Not an Asio thread: zmq calls block.
#include <atomic>
#include <string>
#include <thread>

namespace tokenbus::proxy {

class Router;

class SnapshotSubscriber {
 public:
  SnapshotSubscriber(Router& router, std::string pub_endpoint, std::string router_endpoint);
  ~SnapshotSubscriber();  // stops the thread
  SnapshotSubscriber(const SnapshotSubscriber&) = delete;
  SnapshotSubscriber& operator=(const SnapshotSubscriber&) = delete;

  void start();
  // Returns within one poll interval (250 ms).
  void stop();

 private:
  void run();

  Router& router_;
  const std::string pub_endpoint_;
  const std::string router_endpoint_;
  std::atomic<bool> stopping_{false};
  std::thread thread_;
};

}  // namespace tokenbus::proxy
