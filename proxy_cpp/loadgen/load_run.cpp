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
#include <algorithm>
#include <array>
#include <cctype>
#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "common/log.hpp"
#include "loadgen/distribution.hpp"
#include "loadgen/stream_counter.hpp"
#include "loadgen/workload.hpp"

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
constexpr std::size_t kMaxSseLine = 1 << 20;               // as tools/bench/python_client.py's MAX_LINE
constexpr std::size_t kMaxErrorBody = 200;                 // quoted from a non-200 answer

constexpr std::size_t kReadSize = 16 * 1024;  // one socket read
constexpr std::size_t kMaxBuffered = 64 * 1024;  // read but unparsed bytes: a header, or an unfinished chunk header
constexpr auto kFailureBackoff = std::chrono::milliseconds(50);  // a refusing server is not hammered
// Servers close keep-alive connections idle for a while (uvicorn, before vLLM's API, after 5 s; the proxy after
// 30 s), and a request written into one being closed fails: a connection idle longer than this is reopened.
constexpr auto kMaxIdle = std::chrono::seconds(2);
constexpr auto kProgressInterval = std::chrono::milliseconds(250);
constexpr auto kLagProbeInterval = std::chrono::milliseconds(10);  // as the Python client's probe

std::int64_t micros(Clock::duration d) { return std::chrono::duration_cast<std::chrono::microseconds>(d).count(); }

std::int64_t micros_since(Clock::time_point start) { return micros(Clock::now() - start); }

double seconds_between(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

Clock::duration to_duration(double seconds) {
  return std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
}

class Connection;

// What every client shares; touched only on the one I/O thread.
struct Run {
  Run(const Options& opts, Reporter& reporter, net::io_context& io)
      : opts(opts),
        reporter(reporter),
        io(io),
        workload(opts),
        arrivals(seeded_rng(opts.seed, kArrivalStream)),
        progress_timer(io.get_executor()),
        lag_timer(io.get_executor()),
        deadline_timer(io.get_executor()) {}

  // Runs `task` on the loop, counted in `active`: the run ends when the last one ends.
  void spawn(Task<void> task);
  // An idle keep-alive connection (the last released: the warmest), or a new one; handed back with release()
  // after its requests.
  Connection& acquire();
  void release(Connection& connection);
  // Reports a finished request (or a refused arrival) that started at `start` in stage `stage`.
  void report(RequestOutcome& outcome, Clock::time_point start, int stage);
  // Starts every stage whose planned start has come by `now` (and, past the last one's end, ends the closed
  // loop). Called by the stage driver at each border and by each closed-loop client before a request, so a
  // request started after a border belongs to the new stage even when the driver's timer fires late.
  void enter_due_stages(Clock::time_point now);

  const Options& opts;
  Reporter& reporter;
  net::io_context& io;
  Workload workload;
  Rng arrivals;  // --rate's gaps
  tcp::resolver::results_type endpoints;
  Clock::time_point start;
  // borders[i]: stage i's planned start; the last one: the last stage's planned end. Planned from the run's
  // start, so late wake-ups do not make the stages drift.
  std::vector<Clock::time_point> borders;
  std::size_t next_border = 0;  // the first border not yet entered
  int stage = 0;                // the stage running now (the last one once all have ended)
  int target = 0;               // closed-loop clients the stage running now wants: client k runs while k < target
  std::vector<bool> client_running;  // by client k: started and not yet ended
  Clock::time_point hard_deadline;  // requests still open now are cut
  Clock::time_point last_end;
  int active = 0;              // spawned coroutines not yet ended: the stage driver, clients, open-loop requests
  std::size_t in_flight = 0;   // requests sent (or about to be) and not finished
  bool cut = false;            // the hard deadline passed: every socket was closed
  bool connect_failure_logged = false;  // the first one is logged; the rest are counted in the results
  bool timing_malformed_logged = false;
  Timer progress_timer;
  Timer lag_timer;
  Timer deadline_timer;
  std::vector<std::unique_ptr<Connection>> connections;  // every connection object made, idle or busy
  std::vector<Connection*> idle;
};

// One keep-alive connection, one request at a time; which loop drives it is up to the stage.
class Connection {
 public:
  Connection(Run& run, net::io_context& io)
      : run_(run), socket_(io.get_executor()), buffer_(kMaxBuffered), backoff_(io.get_executor()),
        chat_(kMaxSseLine) {}

  // One request of the workload, measured from `start`.
  Task<RequestOutcome> request(Clock::time_point start);

  // The pause after a failure, so that a refusing server is not hammered; ended early by cut().
  Task<void> back_off() {
    error_code ec;
    backoff_.expires_after(kFailureBackoff);
    co_await backoff_.async_wait(net::redirect_error(use_task, ec));
  }

  void mark_idle() { idle_since_ = Clock::now(); }
  // Before a request after a pause: closes the connection when the server may be closing it (kMaxIdle).
  void close_if_idle_too_long() {
    if (Clock::now() - idle_since_ > kMaxIdle) close();
  }

  // The hard deadline: ends whatever this connection waits for (its request then reports "hard deadline").
  void cut() {
    error_code ec;
    socket_.close(ec);
    backoff_.cancel();
  }

 private:
  using Parser = http::response_parser<http::buffer_body>;

  Task<std::string> connect();
  Task<std::string> error_body(Parser& parser);
  Task<std::string_view> read_body(Parser& parser, error_code& ec);
  std::string describe(const char* what, const error_code& ec) const;
  void note_malformed_timing();
  void close();

  Run& run_;
  Socket socket_;
  beast::flat_buffer buffer_;  // bytes read but not yet parsed; bounded by kMaxBuffered
  Timer backoff_;
  ChatStreamCounter chat_;
  PlainStreamCounter plain_;
  TimingParser plain_timing_;            // the plain-text endpoint's X-Tokenbus-Timing trailer
  std::string wire_;                     // the current request's bytes (its capacity is reused)
  Clock::time_point idle_since_;
  std::array<char, kReadSize> piece_{};  // body bytes of the current read
};

void Run::spawn(Task<void> task) {
  ++active;
  net::co_spawn(io.get_executor(), std::move(task), [this](std::exception_ptr e) {
    if (e) log(LogLevel::kError, "loadgen", "a client ended by an exception");
    if (--active == 0) {
      last_end = Clock::now();
      progress_timer.cancel();
      lag_timer.cancel();
      deadline_timer.cancel();
    }
  });
}

Connection& Run::acquire() {
  if (idle.empty()) {
    connections.push_back(std::make_unique<Connection>(*this, io));
    return *connections.back();
  }
  Connection& connection = *idle.back();
  idle.pop_back();
  connection.close_if_idle_too_long();
  return connection;
}

void Run::release(Connection& connection) {
  connection.mark_idle();
  idle.push_back(&connection);
}

void Run::report(RequestOutcome& outcome, Clock::time_point started, int stage) {
  outcome.start_s = seconds_between(start, started);
  outcome.stage = stage;
  reporter.request(outcome);
}

std::string Connection::describe(const char* what, const error_code& ec) const {
  if (run_.cut) return "hard deadline";
  return std::string(what) + ": " + ec.message();
}

void Connection::note_malformed_timing() {
  if (run_.timing_malformed_logged) return;
  run_.timing_malformed_logged = true;
  log(LogLevel::kWarn, "loadgen", "the proxy's first-token stamps are not the JSON object of 7 stamps (their "
      "hops are reported as null; later ones are not logged)");
}

void Connection::close() {
  error_code ec;
  socket_.shutdown(tcp::socket::shutdown_both, ec);
  socket_.close(ec);
  buffer_.clear();
}

Task<std::string> Connection::connect() {
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
Task<std::string_view> Connection::read_body(Parser& parser, error_code& ec) {
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

Task<std::string> Connection::error_body(Parser& parser) {
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

Task<RequestOutcome> Connection::request(Clock::time_point start) {
  const bool chat = run_.opts.endpoint == Endpoint::kChat;
  chat_.reset();
  plain_.reset();
  RequestOutcome out;
  const auto fail = [&](std::string error) {
    out.ok = false;
    out.error = std::move(error);
    out.e2e_us = micros_since(start);
    if (chat) out.hops = chat_.timing();  // a stream that failed after its first token has them too
    close();  // the connection may be mid-message: never reused
    return out;
  };
  if (!socket_.is_open()) {
    if (std::string error = co_await connect(); !error.empty()) co_return fail(std::move(error));
  }
  run_.workload.next(wire_);
  error_code ec;
  co_await net::async_write(socket_, net::buffer(wire_), net::redirect_error(use_task, ec));
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

  // Content arrivals: TTFT at the first, inter-token gaps after it. One clock read per read that brought
  // content, nothing allocated.
  Clock::time_point first_content;
  Clock::time_point last_content;
  const auto on_content = [&](std::size_t chunks) {
    if (chunks == 0) return;
    const Clock::time_point now = Clock::now();
    if (out.chunks == 0) {
      first_content = now;
      out.ttft_us = micros(now - start);
    } else {
      out.itl_max_us = std::max(out.itl_max_us, micros(now - last_content));
    }
    last_content = now;
    out.chunks += chunks;
    out.itl_sum_us = micros(now - first_content);
  };
  while (!parser.is_done()) {
    const std::string_view bytes = co_await read_body(parser, ec);
    if (chat && !chat_.done()) {  // after [DONE] the rest of the message is only drained
      const std::size_t tokens = chat_.feed(bytes);
      on_content(tokens);
      run_.reporter.add_tokens(tokens);
      if (!chat_.error().empty()) {
        out.tokens = chat_.content_chunks();
        co_return fail(chat_.error());
      }
      if (chat_.done()) out.e2e_us = micros_since(start);
    } else if (!chat) {
      on_content(bytes.empty() ? 0 : 1);
      run_.reporter.add_tokens(plain_.feed(bytes));
    }
    if (ec) break;
  }
  if (chat && chat_.timing_malformed()) note_malformed_timing();
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
  if (chat) {
    out.hops = chat_.timing();
  } else {
    out.e2e_us = micros_since(start);
    // Beast keeps a chunked body's trailer fields with the header's.
    if (const auto trailer = parser.get()[kTimingTrailer]; run_.opts.timing && !trailer.empty()) {
      out.hops = plain_timing_.parse(trailer);
      if (!out.hops) note_malformed_timing();
    }
  }
  if (ec || !parser.keep_alive()) close();  // ec: the message after [DONE] did not end well
  co_return out;
}

// Closed-loop client k: requests one after the other on one connection, across stages, while the stage
// running when it would start the next one wants more than k clients. A shrinking stage so ends the surplus
// clients after their current request (which counts in the stage it started in), and a growing one starts
// only the clients not running: the streams open never exceed the larger of the two stages.
Task<void> closed_loop_client(Run& run, int k) {
  Connection& connection = run.acquire();
  for (;;) {
    const Clock::time_point start = Clock::now();
    run.enter_due_stages(start);
    if (k >= run.target || run.cut) break;
    const int stage = run.stage;
    ++run.in_flight;
    RequestOutcome outcome = co_await connection.request(start);
    --run.in_flight;
    run.report(outcome, start, stage);
    if (!outcome.ok && !run.cut) co_await connection.back_off();
  }
  run.client_running[k] = false;
  run.release(connection);
}

// One open-loop arrival; counted in run.in_flight by the arrival loop already.
Task<void> open_loop_request(Run& run, int stage, Clock::time_point start) {
  Connection& connection = run.acquire();
  RequestOutcome outcome = co_await connection.request(start);
  run.release(connection);
  --run.in_flight;
  run.report(outcome, start, stage);
}

// Poisson arrivals at `rate` from `stage_start` to `stage_end`. The times come from the seeded gaps, not
// from when the previous request ended, so a slow server does not lower the offered load; arrivals over
// --max-in-flight fail at once instead of queueing here, which would hide the overload.
Task<void> open_loop(Run& run, int stage, double rate, Clock::time_point stage_start, Clock::time_point stage_end) {
  Timer timer(run.io.get_executor());
  error_code ec;
  for (Clock::time_point arrival = stage_start + to_duration(exponential_gap_s(run.arrivals, rate));
       arrival < stage_end; arrival += to_duration(exponential_gap_s(run.arrivals, rate))) {
    timer.expires_at(arrival);
    co_await timer.async_wait(net::redirect_error(use_task, ec));
    const Clock::time_point now = Clock::now();
    if (run.in_flight >= static_cast<std::size_t>(run.opts.max_in_flight)) {
      RequestOutcome refused;
      refused.error = "over max-in-flight";
      run.report(refused, now, stage);
      continue;
    }
    ++run.in_flight;  // here, not in the request: the arrivals due at once must see it
    run.spawn(open_loop_request(run, stage, now));
  }
}

void Run::enter_due_stages(Clock::time_point now) {
  while (next_border < borders.size() && borders[next_border] <= now) {
    const std::size_t border = next_border++;
    if (border == opts.stages.size()) {  // the last stage's end: the clients stop after their requests
      target = 0;
      break;
    }
    stage = static_cast<int>(border);
    const Stage& current = opts.stages[border];
    reporter.stage(stage, current, seconds_between(start, now));
    target = current.concurrency;
    if (current.rate > 0) {
      log(LogLevel::kInfo, "loadgen", "stage %d: %.1f requests/s for %.1f s", stage, current.rate,
          current.duration_s);
      spawn(open_loop(*this, stage, current.rate, borders[border], borders[border + 1]));
      continue;
    }
    log(LogLevel::kInfo, "loadgen", "stage %d: %d clients for %.1f s", stage, current.concurrency,
        current.duration_s);
    if (client_running.size() < static_cast<std::size_t>(target)) client_running.resize(target, false);
    for (int k = 0; k < target; ++k) {
      if (client_running[k]) continue;  // one still running from an earlier stage goes on
      client_running[k] = true;
      spawn(closed_loop_client(*this, k));
    }
  }
}

// Enters each stage at its planned start, and ends the closed loop at the last one's end; the clients
// themselves enter a stage whose border they reach first.
Task<void> run_stages(Run& run) {
  Timer timer(run.io.get_executor());
  error_code ec;
  run.enter_due_stages(Clock::now());
  while (run.next_border < run.borders.size()) {
    timer.expires_at(run.borders[run.next_border]);
    co_await timer.async_wait(net::redirect_error(use_task, ec));
    run.enter_due_stages(Clock::now());
  }
}

Task<void> report_progress(Run& run) {
  error_code ec;
  while (run.active > 0) {
    run.progress_timer.expires_after(kProgressInterval);
    co_await run.progress_timer.async_wait(net::redirect_error(use_task, ec));
    if (run.active == 0) break;  // cancelled by the last client: the end line follows
    run.reporter.progress(seconds_between(run.start, Clock::now()), run.in_flight);
  }
}

// How late a 10 ms timer fires: the wait any ready stream of this loop saw too.
Task<void> probe_lag(Run& run) {
  error_code ec;
  while (run.active > 0) {
    const Clock::time_point due = Clock::now() + kLagProbeInterval;
    run.lag_timer.expires_at(due);
    co_await run.lag_timer.async_wait(net::redirect_error(use_task, ec));
    if (ec) break;
    run.reporter.lag(std::chrono::duration_cast<std::chrono::microseconds>(Clock::now() - due));
  }
}

// One timer for every connection's hard deadline (no timer per read: that costs CPU on every token).
Task<void> cut_at_hard_deadline(Run& run) {
  error_code ec;
  run.deadline_timer.expires_at(run.hard_deadline);
  co_await run.deadline_timer.async_wait(net::redirect_error(use_task, ec));
  if (ec || run.active == 0) co_return;  // cancelled: every request finished in time
  log(LogLevel::kWarn, "loadgen", "hard deadline: cutting the %zu requests still open", run.in_flight);
  run.cut = true;
  for (auto& connection : run.connections) connection->cut();
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
  double total_s = 0;
  for (const Stage& stage : opts.stages) total_s += stage.duration_s;
  log(LogLevel::kInfo, "loadgen", "start: %zu stage(s) to %s:%u (%s endpoint, model %s) for %.1f s", opts.stages.size(),
      opts.host.c_str(), opts.port, opts.endpoint == Endpoint::kChat ? "chat" : "plain", opts.model.c_str(),
      total_s);

  reporter.start(opts.stages.front());
  run.start = Clock::now();
  run.borders.push_back(run.start);
  for (const Stage& stage : opts.stages) run.borders.push_back(run.borders.back() + to_duration(stage.duration_s));
  run.hard_deadline = run.borders.back() + to_duration(opts.grace_s);
  run.spawn(run_stages(run));
  net::co_spawn(io.get_executor(), report_progress(run), net::detached);
  net::co_spawn(io.get_executor(), probe_lag(run), net::detached);
  net::co_spawn(io.get_executor(), cut_at_hard_deadline(run), net::detached);
  io.run();

  const double duration_s = seconds_between(run.start, run.last_end);
  reporter.end(duration_s, cpu_seconds());
  log(LogLevel::kInfo, "loadgen", "stop: %zu requests, %zu failed, in %.3f s", reporter.requests(),
      reporter.failures(), duration_s);
  return 0;
}

}  // namespace tokenbus::loadgen
