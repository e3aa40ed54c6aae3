#include "proxy/http_server.hpp"

#include <utility>  // before Asio: Boost 1.74's awaitable.hpp needs it under g++ 12

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/redirect_error.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/write.hpp>
#include <boost/beast/http/error.hpp>
#include <boost/beast/http/parser.hpp>
#include <boost/beast/http/read.hpp>
#include <atomic>
#include <condition_variable>
#include <list>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

#include "common/log.hpp"
#include "proxy/connection.hpp"
#include "proxy/handlers.hpp"
#include "proxy/metrics.hpp"
#include "proxy/openai_response.hpp"

namespace tokenbus::proxy {
namespace {

using tcp = net::ip::tcp;
using boost::system::error_code;

// After refusing a request whose body was not read, the connection is closed only after the client's
// remaining bytes are drained (bounded), so that the client reads the answer instead of a reset.
constexpr std::size_t kLingerBytes = 4 * 1024 * 1024;
constexpr std::chrono::seconds kLingerTime{2};
// How often each I/O thread measures its own lag (a timer's lateness), for the loop-lag histogram.
constexpr std::chrono::milliseconds kLagProbeInterval{10};

std::string peer_name(const tcp::socket& socket) {
  error_code ec;
  const tcp::endpoint peer = socket.remote_endpoint(ec);
  return ec ? std::string("?") : peer.address().to_string() + ":" + std::to_string(peer.port());
}

// One I/O thread and the connections it serves.
struct Worker {
  net::io_context context{1};
  std::optional<net::executor_work_guard<net::io_context::executor_type>> work{context.get_executor()};
  std::list<Connection*> connections;  // touched only on this worker's thread
  net::steady_timer lag_probe{context};  // cancelled by stop(), which ends the probe loop
  std::thread thread;
};

}  // namespace

struct HttpServer::Impl {
  Impl(Router& router, Metrics& metrics, int threads, const ProxyLimits& limits, AccessPolicy access)
      : limits(limits), metrics(metrics), handlers(router, metrics, limits, access) {
    for (int i = 0; i < std::max(threads, 1); ++i) workers.push_back(std::make_unique<Worker>());
  }

  net::awaitable<void> accept_loop();
  net::awaitable<void> session(Worker& worker, tcp::socket socket);
  net::awaitable<void> linger(Connection& c);
  net::awaitable<void> probe_lag(Worker& worker);
  void connection_ended();
  void refuse(tcp::socket& socket);
  // Shuts down every connection (or only the idle ones) of every worker, on their own threads.
  void shut_connections(bool idle_only);
  bool wait_live(std::chrono::milliseconds grace);

  const ProxyLimits limits;
  Metrics& metrics;
  Handlers handlers;
  std::vector<std::unique_ptr<Worker>> workers;
  std::optional<tcp::acceptor> acceptor;  // on workers[0]
  std::atomic<bool> stopping{false};
  bool started = false;
  bool stopped = false;

  std::mutex live_mutex;
  std::condition_variable live_cv;
  int live = 0;  // connections whose coroutine has not ended; guarded by live_mutex
};

net::awaitable<void> HttpServer::Impl::accept_loop() {
  std::size_t next = 0;
  net::steady_timer backoff(workers[0]->context);
  for (;;) {
    Worker& worker = *workers[next++ % workers.size()];
    tcp::socket socket(worker.context);
    error_code ec;
    co_await acceptor->async_accept(socket, net::redirect_error(net::use_awaitable, ec));
    if (stopping) break;
    if (ec) {
      // e.g. out of file descriptors: wait a little instead of spinning on the error
      log(LogLevel::kWarn, "proxy", "accept failed: %s", ec.message().c_str());
      backoff.expires_after(std::chrono::milliseconds(50));
      co_await backoff.async_wait(net::redirect_error(net::use_awaitable, ec));
      continue;
    }
    bool over_cap = false;
    {
      std::lock_guard lock(live_mutex);
      over_cap = static_cast<std::size_t>(live) >= limits.max_connections;
      if (!over_cap) ++live;
    }
    if (over_cap) {
      refuse(socket);
      continue;
    }
    // Without it the first token of a keep-alive stream waits for the client's delayed ACK.
    socket.set_option(tcp::no_delay(true), ec);
    net::co_spawn(worker.context, session(worker, std::move(socket)), [this](std::exception_ptr e) {
      if (e) log(LogLevel::kError, "proxy", "connection coroutine ended by an exception");
      connection_ended();
    });
  }
  log(LogLevel::kInfo, "proxy", "stopped accepting");
}

net::awaitable<void> HttpServer::Impl::probe_lag(Worker& worker) {
  error_code ec;
  while (!stopping) {
    const auto due = std::chrono::steady_clock::now() + kLagProbeInterval;
    worker.lag_probe.expires_at(due);
    co_await worker.lag_probe.async_wait(net::redirect_error(net::use_awaitable, ec));
    if (ec) break;  // cancelled: stopping
    metrics.observe_loop_lag(std::chrono::duration<double>(std::chrono::steady_clock::now() - due).count());
  }
}

void HttpServer::Impl::refuse(tcp::socket& socket) {
  // One non-blocking write of a canned answer, then close: a flood of connections costs no coroutine each.
  static const std::string kRefusal = [] {
    const std::string body = error_json(503, "too many open connections", {});
    return "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
           "Connection: close\r\nContent-Length: " + std::to_string(body.size()) + "\r\n\r\n" + body;
  }();
  error_code ec;
  metrics.count_rejection("", "connection_limit");
  log(LogLevel::kWarn, "proxy", "connection from %s refused: %zu connections open (the cap)",
      peer_name(socket).c_str(), limits.max_connections);
  socket.non_blocking(true, ec);
  socket.write_some(net::buffer(kRefusal), ec);
  socket.shutdown(tcp::socket::shutdown_both, ec);
  socket.close(ec);
}

void HttpServer::Impl::connection_ended() {
  std::lock_guard lock(live_mutex);
  if (--live == 0) live_cv.notify_all();
}

net::awaitable<void> HttpServer::Impl::linger(Connection& c) {
  error_code ec;
  c.stream.socket().shutdown(tcp::socket::shutdown_send, ec);
  c.stream.expires_after(kLingerTime);
  std::size_t drained = 0;
  char sink[16 * 1024];
  while (drained < kLingerBytes) {
    const std::size_t n =
        co_await c.stream.async_read_some(net::buffer(sink), net::redirect_error(net::use_awaitable, ec));
    if (ec) break;
    drained += n;
  }
}

net::awaitable<void> HttpServer::Impl::session(Worker& worker, tcp::socket socket) {
  Connection c{beast::tcp_stream(std::move(socket)), {}, {}, {}};
  c.peer = peer_name(c.stream.socket());
  const auto registration = worker.connections.insert(worker.connections.end(), &c);
  const boost::system::error_category& http_errors = http::make_error_code(http::error::end_of_stream).category();
  error_code ec;
  while (!stopping) {
    http::request_parser<http::string_body> parser;
    parser.header_limit(static_cast<std::uint32_t>(limits.max_header_bytes));
    parser.body_limit(limits.max_body_bytes);
    c.stream.expires_after(kIoTimeout);
    co_await http::async_read_header(c.stream, c.buffer, parser, net::redirect_error(net::use_awaitable, ec));
    if (!ec) {
      // Beast bounds the whole header; one line and the number of fields are bounded here, as nginx does.
      const Request& head = parser.get();
      std::size_t fields = 0;
      std::size_t longest = 0;
      for (const auto& f : head) {
        ++fields;
        longest = std::max(longest, f.name_string().size() + f.value().size() + 2);
      }
      if (head.target().size() > limits.max_header_line) {
        log(LogLevel::kWarn, "proxy", "414 to %s: request target of %zu bytes", c.peer.c_str(), head.target().size());
        co_await handlers.reject(c, 414, "uri_too_long", "the request target is too long");
        co_await linger(c);
        break;
      }
      if (fields > limits.max_header_fields || longest > limits.max_header_line) {
        log(LogLevel::kWarn, "proxy", "431 to %s: %zu header fields, longest %zu bytes", c.peer.c_str(), fields,
            longest);
        co_await handlers.reject(c, 431, "header_too_large",
                                 fields > limits.max_header_fields ? "too many header fields" : "a header field is too long");
        co_await linger(c);
        break;
      }
    }
    if (!ec && !parser.is_done()) {
      const auto expect = parser.get()[http::field::expect];
      if (beast::iequals(expect, "100-continue")) {
        static constexpr std::string_view kContinue = "HTTP/1.1 100 Continue\r\n\r\n";
        co_await net::async_write(c.stream, net::buffer(kContinue), net::redirect_error(net::use_awaitable, ec));
      }
      if (!ec) {
        c.stream.expires_after(kIoTimeout);
        co_await http::async_read(c.stream, c.buffer, parser, net::redirect_error(net::use_awaitable, ec));
      }
    }
    if (ec == http::error::body_limit) {
      log(LogLevel::kWarn, "proxy", "413 to %s: body over %zu bytes", c.peer.c_str(), limits.max_body_bytes);
      co_await handlers.reject(c, 413, "too_large", "the request body is too large");
      co_await linger(c);
      break;
    }
    if (ec == http::error::header_limit) {
      log(LogLevel::kWarn, "proxy", "431 to %s: header over %zu bytes", c.peer.c_str(), limits.max_header_bytes);
      co_await handlers.reject(c, 431, "header_too_large", "the request header is too large");
      co_await linger(c);
      break;
    }
    if (ec.category() == http_errors && ec != http::error::end_of_stream && ec != http::error::partial_message) {
      log(LogLevel::kWarn, "proxy", "400 to %s: bad HTTP: %s", c.peer.c_str(), ec.message().c_str());
      co_await handlers.reject(c, 400, "bad_request", "malformed HTTP request: " + ec.message());
      co_await linger(c);
      break;
    }
    if (ec) break;  // closed, reset or idle past the timeout: nothing to answer
    c.stream.expires_never();
    Request request = parser.release();
    c.busy = true;
    const bool again = co_await handlers.handle(c, request);
    c.busy = false;
    if (!again) break;
  }
  c.stream.socket().shutdown(tcp::socket::shutdown_both, ec);
  worker.connections.erase(registration);
}

HttpServer::HttpServer(Router& router, Metrics& metrics, int threads, const ProxyLimits& limits, AccessPolicy access)
    : impl_(std::make_unique<Impl>(router, metrics, threads, limits, access)) {}

HttpServer::~HttpServer() { stop(std::chrono::seconds(5)); }

std::uint16_t HttpServer::listen(const std::string& host, std::uint16_t port, std::string& error) {
  error_code ec;
  const net::ip::address address = net::ip::make_address(host, ec);
  if (ec) {
    error = "bad listen address '" + host + "': " + ec.message();
    return 0;
  }
  tcp::acceptor& acceptor = impl_->acceptor.emplace(impl_->workers[0]->context);
  const tcp::endpoint endpoint(address, port);
  acceptor.open(endpoint.protocol(), ec);
  if (!ec) acceptor.set_option(tcp::acceptor::reuse_address(true), ec);
  if (!ec) acceptor.bind(endpoint, ec);
  if (!ec) acceptor.listen(net::socket_base::max_listen_connections, ec);
  if (ec) {
    error = "cannot listen on " + host + ":" + std::to_string(port) + ": " + ec.message();
    return 0;
  }
  const std::uint16_t bound = acceptor.local_endpoint(ec).port();
  log(LogLevel::kInfo, "proxy", "bound %s:%u", host.c_str(), bound);
  return bound;
}

void HttpServer::start() {
  impl_->started = true;
  net::co_spawn(impl_->workers[0]->context, impl_->accept_loop(), [](std::exception_ptr e) {
    if (e) log(LogLevel::kError, "proxy", "accept loop ended by an exception");
  });
  for (std::size_t i = 0; i < impl_->workers.size(); ++i) {
    Worker& worker = *impl_->workers[i];
    net::co_spawn(worker.context, impl_->probe_lag(worker), net::detached);
    worker.thread = std::thread([&worker] { worker.context.run(); });
  }
  log(LogLevel::kInfo, "proxy", "serving on %zu I/O threads", impl_->workers.size());
}

void HttpServer::Impl::shut_connections(bool idle_only) {
  // Shutting a socket down ends whatever its coroutine waits for: a read sees the end of the stream, a
  // write fails, and a streaming response's client watch reports the client gone, cancelling the call.
  for (auto& worker : workers) {
    net::post(worker->context, [w = worker.get(), idle_only] {
      for (Connection* c : w->connections) {
        if (idle_only && c->busy) continue;
        error_code ec;
        c->stream.socket().shutdown(tcp::socket::shutdown_both, ec);
      }
    });
  }
}

bool HttpServer::Impl::wait_live(std::chrono::milliseconds grace) {
  std::unique_lock lock(live_mutex);
  return live_cv.wait_for(lock, grace, [this] { return live == 0; });
}

bool HttpServer::drain(std::chrono::milliseconds grace) {
  if (!impl_->started || impl_->stopped) return true;
  int open = 0;
  {
    std::lock_guard lock(impl_->live_mutex);
    open = impl_->live;
  }
  log(LogLevel::kInfo, "proxy", "draining: not accepting, %d connections open, up to %.1f s for them to finish",
      open, std::chrono::duration<double>(grace).count());
  impl_->stopping = true;
  impl_->handlers.set_draining();
  net::post(impl_->workers[0]->context, [this] {
    error_code ec;
    impl_->acceptor->close(ec);
  });
  impl_->shut_connections(/*idle_only=*/true);
  const bool drained = impl_->wait_live(grace);
  if (!drained) log(LogLevel::kWarn, "proxy", "drain grace over: cutting the streams still open");
  return stop(std::chrono::seconds(5)) && drained;
}

bool HttpServer::stop(std::chrono::milliseconds grace) {
  if (!impl_->started || std::exchange(impl_->stopped, true)) return true;
  impl_->stopping = true;
  net::post(impl_->workers[0]->context, [this] {
    error_code ec;
    impl_->acceptor->close(ec);
  });
  for (auto& worker : impl_->workers) net::post(worker->context, [w = worker.get()] { w->lag_probe.cancel(); });
  impl_->shut_connections(/*idle_only=*/false);
  const bool drained = impl_->wait_live(grace);
  if (!drained) {
    std::lock_guard lock(impl_->live_mutex);
    log(LogLevel::kWarn, "proxy", "%d connections still open after the grace period", impl_->live);
  }
  for (auto& worker : impl_->workers) {
    worker->work.reset();
    if (!drained) worker->context.stop();
  }
  for (auto& worker : impl_->workers) {
    if (worker->thread.joinable()) worker->thread.join();
  }
  log(LogLevel::kInfo, "proxy", "HTTP server stopped");
  return drained;
}

}  // namespace tokenbus::proxy
