#include "replica/metrics_endpoint.hpp"

#include <netdb.h>
#include <prometheus/exposer.h>
#include <prometheus/registry.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <stdexcept>
#include <thread>

namespace tokenbus::replica {
namespace {

// Where a local connection reaches a listener bound to `host` (a wildcard bind answers on loopback).
std::string connectable(const std::string& host) {
  if (host == "0.0.0.0") return "127.0.0.1";
  if (host == "::") return "::1";
  return host;
}

// One TCP connection to host:port, closed at once; failures are of no interest (the listener may be gone).
void poke(const addrinfo& address) {
  const int fd = ::socket(address.ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return;
  ::connect(fd, address.ai_addr, address.ai_addrlen);
  ::close(fd);
}

}  // namespace

MetricsEndpoint::MetricsEndpoint(const std::string& bind, const std::shared_ptr<prometheus::Registry>& registry) {
  const auto colon = bind.rfind(':');
  if (colon == std::string::npos) throw std::runtime_error("expected IP:PORT");
  host_ = bind.substr(0, colon);
  if (host_.size() >= 2 && host_.front() == '[' && host_.back() == ']') host_ = host_.substr(1, host_.size() - 2);
  exposer_ = std::make_unique<prometheus::Exposer>(bind);
  exposer_->RegisterCollectable(registry);
  port_ = exposer_->GetListeningPorts().front();
}

MetricsEndpoint::~MetricsEndpoint() {
  // Debian's civetweb checks its stop flag only between polls of the listening socket, which last 2 s
  // (SOCKET_TIMEOUT_QUANTUM, fixed at its build), so a plain stop delays every replica's exit by up to 2 s.
  // A connection wakes that poll: connect every few ms while the exposer stops; the first one after the stop
  // flag is set ends the wait.
  addrinfo hints{};
  hints.ai_flags = AI_NUMERICHOST | AI_NUMERICSERV;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* address = nullptr;
  if (::getaddrinfo(connectable(host_).c_str(), std::to_string(port_).c_str(), &hints, &address) != 0) {
    exposer_.reset();  // the slow way
    return;
  }
  std::atomic<bool> stopped{false};
  std::thread waker([&] {
    while (!stopped.load(std::memory_order_acquire)) {
      poke(*address);
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
  });
  exposer_.reset();
  stopped.store(true, std::memory_order_release);
  waker.join();
  ::freeaddrinfo(address);
}

}  // namespace tokenbus::replica
