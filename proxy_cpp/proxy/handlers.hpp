#pragma once
// The proxy's HTTP endpoints (DESIGN.md "HTTP API of the proxy"): dispatch, the simple endpoints, and the
// generate flow that routes a request to a replica and streams its chunks back.
#include <atomic>
#include <optional>
#include <span>
#include <string_view>

#include "proxy/api_keys.hpp"
#include "proxy/connection.hpp"
#include "proxy/limits.hpp"
#include "proxy/log_throttle.hpp"
#include "proxy/retry_budget.hpp"
#include "proxy/router.hpp"

namespace tokenbus::proxy {

class ChunkWriter;
class CompletionFormatter;
class Metrics;

class Handlers {
 public:
  Handlers(Router& router, Metrics& metrics, const ProxyLimits& limits, AccessPolicy access = {})
      : router_(router), metrics_(metrics), limits_(limits), access_(access), retry_budget_(limits.retry) {}

  // Answers one request; returns whether the connection may carry another.
  net::awaitable<bool> handle(Connection& connection, Request& request);

  // From now on /readyz answers 503: the proxy is draining and should get no new requests.
  void set_draining() { draining_ = true; }

  // Answers a request that could not be read (413, 431, 400); the connection is closed afterwards. `reason`:
  // the label of tokenbus_proxy_rejections_total.
  net::awaitable<void> reject(Connection& connection, int status, std::string_view reason, std::string_view message);

 private:
  struct GenerateJob;
  struct QueueWait;
  struct Stream;
  // Routes the request and answers it in its output format: one function per format around one attempt loop.
  net::awaitable<bool> generate(Connection& connection, const Request& request, GenerateJob job);
  net::awaitable<bool> stream_sse(Connection& connection, const Request& request, Stream& stream,
                                  CompletionFormatter& formatter);
  net::awaitable<bool> stream_plain(Connection& connection, const Request& request, Stream& stream);
  net::awaitable<bool> answer_json(Connection& connection, const Request& request, Stream& stream,
                                   const CompletionFormatter& formatter);
  // The attempt loop: calls a replica and hands each chunk to `writer` (whose bytes it writes), until the stream
  // ends, fails after its first text, the client leaves, or no retry is left (a timeout, an error or a refusal
  // before the first text: another replica, within the per-request cap and the retry budget).
  net::awaitable<void> attempts(Connection& connection, Stream& stream, ChunkWriter& writer);
  // What every format does first once the attempts are over: answers a client that left (counted, nothing
  // written), a failure before the head went out (an error status), and returns whether the connection may
  // carry another request; nullopt when the format's own end follows.
  net::awaitable<std::optional<bool>> end_unless_done(Connection& connection, const Request& request,
                                                      const Stream& stream, bool head_sent);
  // Writes the connection's `out` (the end of a streamed body) and counts the request as answered.
  net::awaitable<bool> write_end(Connection& connection, const Stream& stream, bool keep_alive);
  // Routes `job` away from the replicas it `tried`, waiting in the deployment's queue while all are busy;
  // `wait` says how long it waited there and, when refused, why.
  net::awaitable<RouteResult> route(const GenerateJob& job, std::span<const ReplicaHandle* const> tried,
                                    net::any_io_executor executor, QueueWait& wait);

  Router& router_;
  Metrics& metrics_;
  const ProxyLimits limits_;
  const AccessPolicy access_;
  RetryBudget retry_budget_;
  std::atomic<bool> draining_{false};
  LogThrottle unauthorized_log_{std::chrono::seconds(1)};  // a client without a key can send 401s at will
};

}  // namespace tokenbus::proxy
