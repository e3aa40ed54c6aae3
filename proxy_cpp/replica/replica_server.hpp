#pragma once
// tokenbus-replica's service: a gRPC server (callback API) in front of the model worker's two rings. It is
// the producer of the request ring and the consumer of the response ring. main.cpp only parses arguments,
// handles signals and runs it; the tests run it in-process.
#include <chrono>
#include <memory>
#include <string>

#include "ring/shm_ring.hpp"

namespace tokenbus::replica {

struct ReplicaOptions {
  std::string listen = "127.0.0.1:0";
  // Where /metrics is served (Prometheus text format): an IP address and a port, 0 for any free one.
  std::string metrics_bind = "127.0.0.1:0";
  std::string replica_id;
  ring::RingFds request_ring;
  ring::RingFds response_ring;
  // How long the response reader sleeps before checking that the worker's process still exists.
  std::chrono::milliseconds peer_check_interval{500};
};

class ReplicaServer {
 public:
  // Attaches both rings (throws ring::RingError with a message naming the problem).
  explicit ReplicaServer(ReplicaOptions options);
  ~ReplicaServer();  // shutdown(0) if still running
  ReplicaServer(const ReplicaServer&) = delete;
  ReplicaServer& operator=(const ReplicaServer&) = delete;

  // Binds and starts serving gRPC and metrics, and starts the response reader; false with `error` set if it
  // cannot bind either.
  bool start(std::string& error);
  // The bound port (after start()).
  int port() const;
  // The metrics endpoint's bound port (after start()).
  int metrics_port() const;
  // Readable (an eventfd) once the model worker is gone; every open stream has then been failed.
  int worker_gone_fd() const;
  // Time since the last Health or Stats call (from an agent), or since construction before the first.
  std::chrono::milliseconds since_last_control_call() const;
  // Stops accepting calls, lets open streams finish for up to `grace` (then cancels them), stops the
  // reader. Safe to call once; the destructor calls it if nobody did.
  void shutdown(std::chrono::milliseconds grace);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace tokenbus::replica
