#include "loadgen/load_run.hpp"

#include <sys/resource.h>

#include <utility>  // before Asio: Boost 1.74's awaitable.hpp needs it under g++ 12

#include <boost/asio/basic_waitable_timer.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/connect.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/redirect_error.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/write.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/http/buffer_body.hpp>
#include <boost/beast/http/message.hpp>
#include <boost/beast/http/parser.hpp>
#include <boost/beast/http/read.hpp>
#include <boost/beast/http/string_body.hpp>
#include <boost/beast/http/write.hpp>
#include <array>
#include <cctype>
#include <chrono>
#include <memory>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "common/log.hpp"
#include "loadgen/stream_counter.hpp"

namespace tokenbus::loadgen {
namespace {

namespace net = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = net::ip::tcp;
using boost::system::error_code;
using Clock = std::chrono::steady_clock;

// The concrete executor everywhere instead of Asio's type-erased default: measurably less CPU per token.
using Executor = net::io_context::executor_type;
template <typename T>
using Task = net::awaitable<T, Executor>;
constexpr net::use_awaitable_t<Executor> use_task;
using Socket = net::basic_stream_socket<tcp, Executor>;
using Timer = net::basic_waitable_timer<Clock, net::wait_traits<Clock>, Executor>;

// Limits on what the server may send.
constexpr std::uint32_t kHeaderLimit = 16 * 1024;
constexpr std::uint64_t kBodyLimit = 64ull * 1024 * 1024;  // one streamed response
constexpr std::size_t kMaxSseLine = 1 << 20;               // as tools/bench_client.py's MAX_LINE
constexpr std::size_t kMaxErrorBody = 200;                 // quoted from a non-200 answer

constexpr std::size_t kReadSize = 16 * 1024;  // one socket read
constexpr std::size_t kMaxBuffered = 64 * 1024;  // read but unparsed bytes: a header, or an unfinished chunk header
constexpr auto kFailureBackoff = std::chrono::milliseconds(50);  // a refusing server is not hammered
constexpr auto kProgressInterval = std::chrono::milliseconds(250);
constexpr auto kLagProbeInterval = std::chrono::milliseconds(10);  // as the Python client's probe

std::int64_t micros_since(Clock::time_point start) {
  return std::chrono::duration_cast<std::chrono::microseconds>(Clock::now() - start).count();
}

double seconds_between(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

std::string percent_encode(std::string_view s) {
  static constexpr char kHex[] = "0123456789ABCDEF";
  std::string out;
  for (const unsigned char c : s) {
    if (std::isalnum(c) || c == '-' || c == '.' || c == '_' || c == '~') {
      out += static_cast<char>(c);
    } else {
      out += '%';
      out += kHex[c >> 4];
      out += kHex[c & 15];
    }
  }
  return out;
}

// The request every client sends, serialized once: the body is that of tools/bench_client.py.
std::string serialized_request(const Options& o) {
  http::request<http::string_body> req;
  req.version(11);
  req.method(http::verb::post);
  const bool ipv6 = o.host.find(':') != std::string::npos;
  req.set(http::field::host, (ipv6 ? "[" + o.host + "]" : o.host) + ":" + std::to_string(o.port));
  req.set(http::field::user_agent, "tokenbus-loadgen");
  if (o.endpoint == Endpoint::kChat) {
    req.target("/v1/chat/completions");
    req.set(http::field::content_type, "application/json");
    req.body() = nlohmann::json{
        {"model", o.model},
        {"messages", {{{"role", "user"}, {"content", o.prompt}}}},
        {"stream", true},
        {"stream_options", {{"include_usage", true}}},
        {"max_tokens", o.max_tokens},
        {"ignore_eos", true},
    }.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  } else {
    req.target("/v1/chat/" + percent_encode(o.model) + "?max_tokens=" + std::to_string(o.max_tokens));
    req.set(http::field::content_type, "text/plain");
    req.body() = o.prompt;
  }
  req.prepare_payload();
  std::ostringstream out;
  out << req;
  return out.str();
}

// What every client shares; touched only on the one I/O thread.
struct Run {
  Run(const Options& opts, Reporter& reporter, net::io_context& io)
      : opts(opts),
        reporter(reporter),
        wire(serialized_request(opts)),
        progress_timer(io.get_executor()),
        lag_timer(io.get_executor()),
        deadline_timer(io.get_executor()) {}

  const Options& opts;
  Reporter& reporter;
  const std::string wire;
  tcp::resolver::results_type endpoints;
  Clock::time_point start;
  Clock::time_point stop_starting_at;  // no request starts after this
  Clock::time_point hard_deadline;     // requests still open now are cut
  Clock::time_point last_end;
  int clients_left = 0;
  bool cut = false;                     // the hard deadline passed: every socket was closed
  bool connect_failure_logged = false;  // the first one is logged; the rest are counted in the results
  Timer progress_timer;
  Timer lag_timer;
  Timer deadline_timer;
};

// One closed-loop client: one keep-alive connection, one request at a time.
class Client {
 public:
  Client(Run& run, net::io_context& io)
      : run_(run), socket_(io.get_executor()), buffer_(kMaxBuffered), backoff_(io.get_executor()),
        chat_(kMaxSseLine) {}

  Task<void> loop() {
    error_code ec;
    while (Clock::now() < run_.stop_starting_at && !run_.cut) {
      const RequestOutcome outcome = co_await request();
      run_.reporter.request(outcome);
      if (!outcome.ok && !run_.cut) {
        backoff_.expires_after(kFailureBackoff);
        co_await backoff_.async_wait(net::redirect_error(use_task, ec));
      }
    }
  }

  // The hard deadline: ends whatever this client waits for (it then reports "hard deadline").
  void cut() {
    error_code ec;
    socket_.close(ec);
    backoff_.cancel();
  }

 private:
  using Parser = http::response_parser<http::buffer_body>;

  Task<RequestOutcome> request();
  Task<std::string> connect();
  Task<std::string> error_body(Parser& parser);
  Task<std::string_view> read_body(Parser& parser, error_code& ec);
  std::string describe(const char* what, const error_code& ec) const;
  void close();

  Run& run_;
  Socket socket_;
  beast::flat_buffer buffer_;  // bytes read but not yet parsed; bounded by kMaxBuffered
  Timer backoff_;
  ChatStreamCounter chat_;
  PlainStreamCounter plain_;
  std::array<char, kReadSize> piece_{};  // body bytes of the current read
};

std::string Client::describe(const char* what, const error_code& ec) const {
  if (run_.cut) return "hard deadline";
  return std::string(what) + ": " + ec.message();
}

void Client::close() {
  error_code ec;
  socket_.shutdown(tcp::socket::shutdown_both, ec);
  socket_.close(ec);
  buffer_.clear();
}

Task<std::string> Client::connect() {
  error_code ec;
  // No timeout of its own: on loopback a connect is answered at once, elsewhere the hard deadline ends it.
  co_await net::async_connect(socket_, run_.endpoints, net::redirect_error(use_task, ec));
  if (ec) {
    std::string error = describe("connect", ec);
    if (!run_.connect_failure_logged && !run_.cut) {
      run_.connect_failure_logged = true;
      log(LogLevel::kWarn, "loadgen", "connect to %s:%u failed: %s (retrying; later failures are only counted)",
          run_.opts.host.c_str(), run_.opts.port, error.c_str());
    }
    close();
    co_return error;
  }
  // Without it a request's last bytes could wait for the server's delayed ACK.
  socket_.set_option(tcp::no_delay(true), ec);
  co_return std::string();
}

// Body bytes of the response, through Beast's parser: what the buffered bytes hold, else what the next socket
// read brings (one read parses every complete chunk in it). Empty when only framing was parsed; `ec` set on a
// read or parse error, or at the end of the connection.
Task<std::string_view> Client::read_body(Parser& parser, error_code& ec) {
  auto& body = parser.get().body();
  body.data = piece_.data();
  body.size = piece_.size();
  const auto taken = [&] { return std::string_view(piece_.data(), piece_.size() - body.size); };
  for (;;) {
    if (buffer_.size() > 0) {
      buffer_.consume(parser.put(buffer_.data(), ec));
      if (ec == http::error::need_buffer) {  // piece_ is full: the caller takes it and asks again
        ec = {};
        co_return taken();
      }
      if (ec && ec != http::error::need_more) co_return taken();  // malformed, or over a limit
      ec = {};
      if (parser.is_done() || !taken().empty()) co_return taken();
    }
    if (buffer_.size() + kReadSize > buffer_.max_size()) {
      ec = http::error::buffer_overflow;  // an endless chunk header or trailer
      co_return taken();
    }
    const std::size_t n =
        co_await socket_.async_read_some(buffer_.prepare(kReadSize), net::redirect_error(use_task, ec));
    buffer_.commit(n);
    if (ec == net::error::eof) {
      parser.put_eof(ec);  // completes a body that ends with the connection, else partial_message
      if (!ec && !parser.is_done()) ec = http::error::partial_message;
      co_return taken();
    }
    if (ec) co_return taken();
  }
}

Task<std::string> Client::error_body(Parser& parser) {
  std::string body;
  error_code ec;
  while (!parser.is_done() && body.size() < kMaxErrorBody) {
    const std::string_view bytes = co_await read_body(parser, ec);
    body.append(bytes.substr(0, kMaxErrorBody - body.size()));
    if (ec) break;
  }
  while (!body.empty() && std::isspace(static_cast<unsigned char>(body.back()))) body.pop_back();
  co_return body;
}

Task<RequestOutcome> Client::request() {
  const Clock::time_point start = Clock::now();
  RequestOutcome out;
  const auto fail = [&](std::string error) {
    out.ok = false;
    out.error = std::move(error);
    out.e2e_us = micros_since(start);
    close();  // the connection may be mid-message: never reused
    return out;
  };
  if (!socket_.is_open()) {
    if (std::string error = co_await connect(); !error.empty()) co_return fail(std::move(error));
  }
  error_code ec;
  co_await net::async_write(socket_, net::buffer(run_.wire), net::redirect_error(use_task, ec));
  if (ec) co_return fail(describe("write", ec));

  Parser parser;
  parser.header_limit(kHeaderLimit);
  parser.body_limit(kBodyLimit);
  co_await http::async_read_header(socket_, buffer_, parser, net::redirect_error(use_task, ec));
  if (ec) co_return fail(describe("read header", ec));
  // Eager: each put() parses every complete chunk buffered (read_body hands their bytes over at once).
  parser.eager(true);
  if (const unsigned status = parser.get().result_int(); status != 200) {
    std::string body = co_await error_body(parser);
    co_return fail("HTTP " + std::to_string(status) + ": " + body);
  }

  const bool chat = run_.opts.endpoint == Endpoint::kChat;
  chat_.reset();
  plain_.reset();
  while (!parser.is_done()) {
    const std::string_view bytes = co_await read_body(parser, ec);
    if (chat && !chat_.done()) {  // after [DONE] the rest of the message is only drained
      const std::size_t tokens = chat_.feed(bytes);
      if (tokens > 0 && out.ttft_us < 0) out.ttft_us = micros_since(start);
      run_.reporter.add_tokens(tokens);
      if (!chat_.error().empty()) {
        out.tokens = chat_.content_chunks();
        co_return fail(chat_.error());
      }
      if (chat_.done()) out.e2e_us = micros_since(start);
    } else if (!chat) {
      if (!bytes.empty() && out.ttft_us < 0) out.ttft_us = micros_since(start);
      run_.reporter.add_tokens(plain_.feed(bytes));
    }
    if (ec) break;
  }
  if (ec && !(chat && chat_.done())) {
    out.tokens = chat ? chat_.content_chunks() : plain_.tokens();
    co_return fail(describe("read", ec));
  }
  if (chat && !chat_.done()) {
    out.tokens = chat_.content_chunks();
    co_return fail("incomplete stream (no [DONE])");
  }
  out.ok = true;
  out.tokens = chat ? chat_.tokens() : plain_.tokens();
  if (!chat) out.e2e_us = micros_since(start);
  if (ec || !parser.keep_alive()) close();  // ec: the message after [DONE] did not end well
  co_return out;
}

Task<void> report_progress(Run& run) {
  error_code ec;
  while (run.clients_left > 0) {
    run.progress_timer.expires_after(kProgressInterval);
    co_await run.progress_timer.async_wait(net::redirect_error(use_task, ec));
    if (run.clients_left == 0) break;  // cancelled by the last client: the end line follows
    run.reporter.progress(seconds_between(run.start, Clock::now()));
  }
}

// How late a 10 ms timer fires: the wait any ready stream of this loop saw too.
Task<void> probe_lag(Run& run) {
  error_code ec;
  while (run.clients_left > 0) {
    const Clock::time_point due = Clock::now() + kLagProbeInterval;
    run.lag_timer.expires_at(due);
    co_await run.lag_timer.async_wait(net::redirect_error(use_task, ec));
    if (ec) break;
    run.reporter.lag(std::chrono::duration_cast<std::chrono::microseconds>(Clock::now() - due));
  }
}

// One timer for every client's hard deadline (no timer per read: that costs CPU on every token).
Task<void> cut_at_hard_deadline(Run& run, std::vector<std::unique_ptr<Client>>& clients) {
  error_code ec;
  run.deadline_timer.expires_at(run.hard_deadline);
  co_await run.deadline_timer.async_wait(net::redirect_error(use_task, ec));
  if (ec || run.clients_left == 0) co_return;  // cancelled: every client finished in time
  log(LogLevel::kWarn, "loadgen", "hard deadline: cutting the %d clients still waiting", run.clients_left);
  run.cut = true;
  for (auto& client : clients) client->cut();
}

double cpu_seconds() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  const auto secs = [](const timeval& t) { return static_cast<double>(t.tv_sec) + t.tv_usec / 1e6; };
  return secs(usage.ru_utime) + secs(usage.ru_stime);
}

}  // namespace

int run_load(const Options& opts, Reporter& reporter) {
  net::io_context io{1};
  Run run(opts, reporter, io);
  {
    // Once, before the load and before the loop runs: blocking here delays nothing.
    tcp::resolver resolver(io);
    error_code ec;
    run.endpoints = resolver.resolve(opts.host, std::to_string(opts.port), ec);
    if (ec) {
      log(LogLevel::kError, "loadgen", "cannot resolve %s: %s", opts.host.c_str(), ec.message().c_str());
      return 1;
    }
  }
  log(LogLevel::kInfo, "loadgen", "start: %d clients to %s:%u (%s endpoint, model %s) for %.1f s",
      opts.concurrency, opts.host.c_str(), opts.port, opts.endpoint == Endpoint::kChat ? "chat" : "plain",
      opts.model.c_str(), opts.duration_s);

  std::vector<std::unique_ptr<Client>> clients;
  for (int i = 0; i < opts.concurrency; ++i) clients.push_back(std::make_unique<Client>(run, io));
  reporter.start(opts.concurrency);
  run.start = Clock::now();
  run.stop_starting_at = run.start + std::chrono::duration_cast<Clock::duration>(
                                         std::chrono::duration<double>(opts.duration_s));
  run.hard_deadline = run.stop_starting_at + std::chrono::duration_cast<Clock::duration>(
                                                 std::chrono::duration<double>(opts.grace_s));
  run.clients_left = opts.concurrency;
  for (auto& client : clients) {
    net::co_spawn(io.get_executor(), client->loop(), [&run](std::exception_ptr e) {
      if (e) log(LogLevel::kError, "loadgen", "a client ended by an exception");
      if (--run.clients_left == 0) {
        run.last_end = Clock::now();
        run.progress_timer.cancel();
        run.lag_timer.cancel();
        run.deadline_timer.cancel();
      }
    });
  }
  net::co_spawn(io.get_executor(), report_progress(run), net::detached);
  net::co_spawn(io.get_executor(), probe_lag(run), net::detached);
  net::co_spawn(io.get_executor(), cut_at_hard_deadline(run, clients), net::detached);
  io.run();

  const double duration_s = seconds_between(run.start, run.last_end);
  reporter.end(duration_s, cpu_seconds());
  log(LogLevel::kInfo, "loadgen", "stop: %zu requests, %zu failed, in %.3f s", reporter.requests(),
      reporter.failures(), duration_s);
  return 0;
}

}  // namespace tokenbus::loadgen
