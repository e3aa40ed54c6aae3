#pragma once
// The HTTP/1.1 server: an accept loop and one coroutine per connection over N I/O threads, each thread
// running its own io_context (a connection, its gRPC call's wake-ups and its watch all live on one thread,
// so no strands are needed). Light header: Asio and Beast stay in http_server.cpp.
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>

#include "proxy/api_keys.hpp"
#include "proxy/limits.hpp"

namespace tokenbus::proxy {

class Router;
class Metrics;

class HttpServer {
 public:
  // `access`: which routes need an API key (none by default); its keys must outlive the server.
  HttpServer(Router& router, Metrics& metrics, int threads, const ProxyLimits& limits = {}, AccessPolicy access = {});
  ~HttpServer();  // stops if still running
  HttpServer(const HttpServer&) = delete;
  HttpServer& operator=(const HttpServer&) = delete;

  // Binds and listens on host:port (port 0: any free port). Returns the bound port, or 0 with `error` set.
  std::uint16_t listen(const std::string& host, std::uint16_t port, std::string& error);
  // Starts accepting and the I/O threads.
  void start();
  // Stops accepting, closes every connection (open generations are cancelled at their replicas), waits up to
  // `grace` for them to end and joins the threads. Returns false if some were still open at the deadline:
  // their coroutines were abandoned, and the process should exit without running destructors.
  bool stop(std::chrono::milliseconds grace);
  // A graceful stop (SIGTERM): stops accepting, says not ready, closes idle connections, lets requests being
  // answered finish for up to `grace`, then stops as above (cutting what is left).
  bool drain(std::chrono::milliseconds grace);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace tokenbus::proxy
