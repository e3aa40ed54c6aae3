#pragma once
// The proxy's HTTP endpoints (DESIGN.md "HTTP API of the proxy"): dispatch, the simple endpoints, and the
// generate flow that routes a request to a replica and streams its chunks back.
#include <string_view>

#include "proxy/connection.hpp"

namespace tokenbus::proxy {

class Router;
class Metrics;

class Handlers {
 public:
  Handlers(Router& router, Metrics& metrics) : router_(router), metrics_(metrics) {}

  // Answers one request; returns whether the connection may carry another.
  net::awaitable<bool> handle(Connection& connection, Request& request);

  // Answers a request that could not be read (413, 431, 400); the connection is closed afterwards.
  net::awaitable<void> reject(Connection& connection, int status, std::string_view message);

 private:
  struct GenerateJob;
  net::awaitable<bool> generate(Connection& connection, const Request& request, GenerateJob job);

  Router& router_;
  Metrics& metrics_;
};

}  // namespace tokenbus::proxy
