#include "proxy/handlers.hpp"

#include <boost/asio/redirect_error.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/write.hpp>
#include <boost/beast/http/write.hpp>
#include <simdjson.h>

#include <atomic>
#include <charconv>
#include <optional>

#include "common/log.hpp"
#include "proxy/metrics.hpp"
#include "proxy/openai_request.hpp"
#include "proxy/openai_response.hpp"
#include "proxy/replica_call.hpp"
#include "proxy/router.hpp"
#include "proxy/slot_queue.hpp"

namespace tokenbus::proxy {
namespace {

using Clock = std::chrono::steady_clock;
using boost::system::error_code;

constexpr std::uint32_t kPlainDefaultMaxTokens = 64;
constexpr std::size_t kWatchBytes = 4096;
// How often a request waiting for a slot or a first snapshot looks again, woken or not.
constexpr std::chrono::milliseconds kQueueRecheck{100};
// How many replicas a generate request was sent to (1 + retries): on every response to one.
constexpr std::string_view kAttemptsHeader = "X-Tokenbus-Attempts";
// A request with this header set to 1 gets its first token's stamps (schemas/README.md, "Where each millisecond
// goes"): an SSE comment after the first event, a trailer of a chunked plain-text body, a header of a JSON body.
constexpr std::string_view kTimingHeader = "X-Tokenbus-Timing";

double seconds_since(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }

std::string_view path_of(std::string_view target) { return target.substr(0, target.find('?')); }

// The value of `name` in the target's query string, if present.
std::optional<std::string_view> query_param(std::string_view target, std::string_view name) {
  const std::size_t q = target.find('?');
  if (q == std::string_view::npos) return std::nullopt;
  std::string_view query = target.substr(q + 1);
  while (!query.empty()) {
    const std::size_t amp = query.find('&');
    const std::string_view pair = query.substr(0, amp);
    const std::size_t eq = pair.find('=');
    if (pair.substr(0, eq) == name) return eq == std::string_view::npos ? std::string_view() : pair.substr(eq + 1);
    if (amp == std::string_view::npos) break;
    query.remove_prefix(amp + 1);
  }
  return std::nullopt;
}

// The endpoint a request for `path` is counted under when it is refused before dispatch.
Endpoint endpoint_of(std::string_view path) {
  if (path == "/v1/chat/completions") return Endpoint::kChatCompletions;
  if (path == "/v1/completions") return Endpoint::kCompletions;
  if (path == "/v1/models") return Endpoint::kModels;
  if (path == "/metrics") return Endpoint::kMetrics;
  if (path.starts_with("/v1/chat/")) return Endpoint::kChatPlain;
  return Endpoint::kOther;
}

std::string next_request_id() {
  static std::atomic<std::uint64_t> counter{0};
  return "tb-" + std::to_string(counter.fetch_add(1, std::memory_order_relaxed) + 1);
}

// The HTTP status for a gRPC status code of a failed call.
int http_status_for(int grpc_code) {
  switch (grpc_code) {
    case 3: return 400;   // INVALID_ARGUMENT
    case 4: return 504;   // DEADLINE_EXCEEDED
    case 8: return 429;   // RESOURCE_EXHAUSTED
    case 14: return 503;  // UNAVAILABLE: the replica is unreachable
    default: return 502;
  }
}

// What a response may carry besides its status and body, and how it is counted.
struct Extra {
  std::string_view allow;                // 405: the allowed method
  std::chrono::seconds retry_after{0};   // 429, 503: when to come back (1 s when not given)
  int attempts = 0;                      // generate requests: replicas tried (X-Tokenbus-Attempts)
  bool challenge = false;                // 401: says which credentials to send (WWW-Authenticate)
  std::string_view deployment;           // the deployment label (deployment_label()); "" when none
  std::string_view rejection;            // a refusal by the proxy itself: its reason in rejections_total
  std::string_view timing;               // the X-Tokenbus-Timing header (the first token's stamps as JSON)
};

// The first token's stamps as one JSON object, in hop order.
std::string timing_json(const FirstTokenStamps& stamps) {
  std::string out = "{";
  for (std::size_t i = 0; i < stamps.size(); ++i) {
    if (i > 0) out += ',';
    out += '"';
    out += kStampNames[i];
    out += "\":";
    out += std::to_string(stamps[i]);
  }
  out += '}';
  return out;
}

// Writes a complete (non-streamed) response; returns whether the connection may carry another request.
net::awaitable<bool> write_response(Connection& c, const Request& req, Metrics& metrics, Endpoint endpoint,
                                    int status, std::string body, std::string_view content_type, Extra extra = {}) {
  http::response<http::string_body> res;
  res.version(req.version());
  res.result(static_cast<unsigned>(status));
  res.set(http::field::content_type, content_type);
  if (status == 429 || status == 503) {
    res.set(http::field::retry_after, std::to_string(std::max<std::int64_t>(extra.retry_after.count(), 1)));
  }
  if (!extra.allow.empty()) res.set(http::field::allow, extra.allow);
  if (extra.attempts > 0) res.set(kAttemptsHeader, std::to_string(extra.attempts));
  if (extra.challenge) res.set(http::field::www_authenticate, "Bearer");
  if (!extra.timing.empty()) res.set(kTimingHeader, extra.timing);
  res.keep_alive(req.keep_alive());
  res.body() = std::move(body);
  res.prepare_payload();
  // Counted before the answer goes out: whoever reads the answer finds the refusal already counted.
  if (!extra.rejection.empty()) metrics.count_rejection(extra.deployment, extra.rejection);
  c.stream.expires_after(kIoTimeout);
  error_code ec;
  co_await http::async_write(c.stream, res, net::redirect_error(net::use_awaitable, ec));
  metrics.count_request(endpoint, status, extra.deployment);
  co_return !ec && res.keep_alive();
}

net::awaitable<bool> write_error(Connection& c, const Request& req, Metrics& metrics, Endpoint endpoint, int status,
                                 std::string_view message, std::string_view param = {}, Extra extra = {}) {
  return write_response(c, req, metrics, endpoint, status, error_json(status, message, param), "application/json",
                        extra);
}

// Chunked transfer coding written in place: the constructor reserves room for the size line, close()
// fills it in. Without chunking (an HTTP/1.0 client) the bytes go out as they are.
class ChunkFrame {
 public:
  ChunkFrame(std::string& out, bool chunked) : out_(out), chunked_(chunked), start_(out.size()) {
    if (chunked_) out_.append(kReserve, '\0');
  }

  // Ends the frame. An empty one is dropped: a zero-size chunk would end the body.
  void close() {
    if (!chunked_) return;
    const std::size_t size = out_.size() - start_ - kReserve;
    if (size == 0) {
      out_.resize(start_);
      return;
    }
    char line[kReserve];
    char* end = std::to_chars(line, line + kReserve - 2, size, 16).ptr;
    *end++ = '\r';
    *end++ = '\n';
    out_.replace(start_, kReserve, line, static_cast<std::size_t>(end - line));
    out_ += "\r\n";
  }

 private:
  static constexpr std::size_t kReserve = 18;  // 16 hex digits and CRLF
  std::string& out_;
  const bool chunked_;
  const std::size_t start_;
};

// Writes as much of `bytes` to the client as its socket takes now, without waiting (the socket is in
// non-blocking mode): a streamed chunk usually goes out whole here, on this thread, with no timer, handler or
// suspension. Returns the bytes written; `ec` is set only when the client is gone.
std::size_t write_now(Connection& c, std::string_view bytes, error_code& ec) {
  const std::size_t written = c.stream.socket().write_some(net::buffer(bytes), ec);
  if (ec == net::error::would_block || ec == net::error::try_again) ec = {};
  return written;
}

// Ends a chunked body, with the timing trailer when it is given.
void append_last_chunk(std::string& out, bool chunked, std::string_view timing = {}) {
  if (!chunked) return;
  out += "0\r\n";
  if (!timing.empty()) {
    out += kTimingHeader;
    out += ": ";
    out += timing;
    out += "\r\n";
  }
  out += "\r\n";
}

// Watches the client's socket while a request is served. A read ending in an error means the client went
// away, so its generation must be cancelled; bytes that arrive are a pipelined next request, kept in the
// connection's buffer. Each attempt's call is attached while it runs, so that the watch can wake it.
class ClientWatch {
 public:
  explicit ClientWatch(Connection& c)
      : c_(c), signal_(c.stream.get_executor(), net::steady_timer::time_point::max()) {
    pending_ = true;
    c_.stream.socket().async_read_some(c_.buffer.prepare(kWatchBytes), [this](error_code ec, std::size_t n) {
      pending_ = false;
      if (n > 0) {
        c_.buffer.commit(n);
      } else if (ec != net::error::operation_aborted) {
        gone_ = true;
        if (call_ != nullptr) call_->wake();
      }
      signal_.cancel();
    });
  }

  bool gone() const { return gone_; }
  void attach(ReplicaCall* call) { call_ = call; }

  // Stops watching; returns once the read has completed. Await before destruction.
  net::awaitable<void> stop() {
    error_code ec;
    call_ = nullptr;
    if (pending_) c_.stream.socket().cancel(ec);
    while (pending_) co_await signal_.async_wait(net::redirect_error(net::use_awaitable, ec));
  }

 private:
  Connection& c_;
  ReplicaCall* call_ = nullptr;
  net::steady_timer signal_;  // cancelled when the read completes
  bool pending_ = false;
  bool gone_ = false;
};

// Whether an attempt that produced no text may be sent to another replica (an empty reason: it may not), and
// whether that retry may draw on the budget. Only retries after a sign of load (the replica refused for load,
// or was too slow to answer) are budgeted, and only when they would land on a replica with requests already
// waiting: there they would feed an overload. A replica that is dead, broken or stuck did no work for the
// request, and its retries are bounded by the per-request cap and by its ejection.
struct RetryKind {
  std::string_view reason;
  bool budgeted = false;
};

// What the end of one attempt (not a timeout) means, decided in one place: the failure the client would be
// told of (none on success), whether it counts against the replica (outlier detection: overload and the
// client's own errors do not), and whether another replica may be tried.
struct AttemptEnd {
  std::optional<std::pair<int, std::string>> failure;
  bool replica_failed = false;
  RetryKind retry;
};

AttemptEnd classify_end(const CallStatus& status, bool final_seen, v1::FinishReason finish_reason,
                        std::uint32_t engine_error, const std::string& engine_message) {
  if (final_seen) {
    if (finish_reason == v1::FINISH_REASON_ERROR) {
      const int code = engine_error >= 400 && engine_error <= 599 ? static_cast<int>(engine_error) : 500;
      const bool engine_fault = engine_error >= 500;  // 4xx: the request itself is wrong
      return {std::pair(code, engine_message.empty() ? "the engine failed" : engine_message), engine_fault,
              engine_fault ? RetryKind{"engine_error"} : RetryKind{}};
    }
    if (finish_reason == v1::FINISH_REASON_ABORT) {
      return {std::pair(503, "the engine aborted the request"), true, {"engine_abort"}};
    }
    return {};
  }
  if (status.ok()) return {std::pair(502, "replica ended the stream without a final chunk"), false, {"no_final_chunk"}};
  AttemptEnd end{std::pair(http_status_for(status.code), "replica call failed: " + status.message), true, {}};
  switch (status.code) {
    case 3: end.replica_failed = false; break;  // INVALID_ARGUMENT: the request itself is wrong
    case 4: break;                               // DEADLINE_EXCEEDED: the stream's own deadline
    case 8: end.replica_failed = false; end.retry = {"resource_exhausted", true}; break;
    case 14: end.retry = {"unavailable"}; break;
    default: end.retry = {"call_error"}; break;
  }
  return end;
}


// The response head of a streamed answer, sent with its first bytes (a retry before them is invisible but for
// the attempts header).
struct StreamHead {
  std::string_view content_type;  // with its CRLF-ended header lines
  std::string_view request_id;
  bool chunked = true;  // HTTP/1.1: chunked transfer coding; HTTP/1.0: the body ends by closing
  bool keep_alive = true;
  bool trailer = false;  // the body ends with the timing trailer (declared here)

  void append(std::string& out, int attempts) const {
    out += chunked ? "HTTP/1.1 200 OK\r\n" : "HTTP/1.0 200 OK\r\n";
    out += content_type;
    out += "X-Request-Id: ";
    out += request_id;
    out += "\r\n";
    out += kAttemptsHeader;
    out += ": ";
    out += std::to_string(attempts);
    out += chunked ? "\r\nTransfer-Encoding: chunked\r\n" : "\r\n";
    if (trailer) {
      out += "Trailer: ";
      out += kTimingHeader;
      out += "\r\n";
    }
    if (!keep_alive) out += "Connection: close\r\n";
    out += "\r\n";
  }
};

}  // namespace

// How an output format turns the replica's chunks into bytes for the client; the attempt loop writes them.
class ChunkWriter {
 public:
  virtual ~ChunkWriter() = default;
  // Appends to `out` what the client gets for a chunk's `text` (maybe empty). `finish` is the engine's reason
  // on the final chunk of a stream that ended well, else FINISH_REASON_NONE. `attempts`: replicas tried so far.
  virtual void append(std::string& out, std::string_view text, v1::FinishReason finish, int attempts) = 0;
  // Appends what follows the first text once it is written (its stamps are complete then), if anything.
  virtual void append_after_first_text(std::string& out, const FirstTokenStamps& stamps) {}
  // Whether the response head went out: from then on a failure can no longer be an HTTP error status.
  bool head_sent() const { return head_sent_; }

 protected:
  bool head_sent_ = false;
};

namespace {

// SSE: one OpenAI chunk event per chunk with text, the finish reason in the last one.
class SseWriter final : public ChunkWriter {
 public:
  SseWriter(CompletionFormatter& formatter, const StreamHead& head, bool timing)
      : formatter_(formatter), head_(head), timing_(timing) {}

  void append(std::string& out, std::string_view text, v1::FinishReason finish, int attempts) override {
    const bool finishing = finish != v1::FINISH_REASON_NONE;
    if (text.empty() && !finishing) return;
    if (!std::exchange(head_sent_, true)) head_.append(out, attempts);
    ChunkFrame frame(out, head_.chunked);
    formatter_.append_event(out, text, finishing ? openai_finish_reason(finish) : "");
    finish_sent_ = finishing;
    frame.close();
  }

  void append_after_first_text(std::string& out, const FirstTokenStamps& stamps) override {
    if (!timing_) return;
    ChunkFrame frame(out, head_.chunked);
    out += ": tokenbus-timing ";
    out += timing_json(stamps);
    out += "\n\n";
    frame.close();
  }

  // The event carrying finish_reason went out.
  bool finish_sent() const { return finish_sent_; }

 private:
  CompletionFormatter& formatter_;
  const StreamHead& head_;
  const bool timing_;
  bool finish_sent_ = false;
};

// Plain text: each chunk's text as it is.
class PlainWriter final : public ChunkWriter {
 public:
  explicit PlainWriter(const StreamHead& head) : head_(head) {}

  void append(std::string& out, std::string_view text, v1::FinishReason finish, int attempts) override {
    if (text.empty() && finish == v1::FINISH_REASON_NONE) return;
    if (!std::exchange(head_sent_, true)) head_.append(out, attempts);
    ChunkFrame frame(out, head_.chunked);
    out.append(text);
    frame.close();
  }

 private:
  const StreamHead& head_;
};

// A non-streamed JSON body: the text is held to the end.
class JsonWriter final : public ChunkWriter {
 public:
  void append(std::string&, std::string_view text, v1::FinishReason, int) override { text_.append(text); }
  const std::string& text() const { return text_; }

 private:
  std::string text_;
};

}  // namespace

enum class Output { kPlain, kSse, kJson };

struct Handlers::GenerateJob {
  Endpoint endpoint;
  Output output;
  ApiFlavor flavor;
  bool include_usage;
  std::string model;  // the deployment
  v1::GenerateRequest request;
  Clock::time_point start;
  std::uint64_t received_ns;  // wall clock, taken with `start`: the first stamp of the first token's hops
  bool timing;                // the client asked for the first token's stamps (kTimingHeader)
};

struct Handlers::QueueWait {
  Clock::duration waited{};
  std::string_view refusal;  // "queue_full" or "queue_timeout" when the queue refused the request
};

net::awaitable<bool> Handlers::handle(Connection& c, Request& req) {
  const Clock::time_point start = Clock::now();
  const std::uint64_t received_ns = wall_clock_ns();
  const bool timing = req[kTimingHeader] == "1";
  const std::string_view target(req.target().data(), req.target().size());
  const std::string_view path = path_of(target);
  const bool post = req.method() == http::verb::post;
  const bool get = req.method() == http::verb::get;

  // Every /v1/ route (and /metrics with --metrics-auth) needs a key, checked before anything else is looked at.
  if (access_.keys != nullptr && (path.starts_with("/v1/") || (access_.metrics && path == "/metrics"))) {
    const auto header = req[http::field::authorization];
    const std::string_view presented = bearer_token(std::string_view(header.data(), header.size()));
    const std::shared_ptr<const std::string> name = access_.keys->match(presented);
    if (!name) {
      std::uint64_t held_back = 0;
      const auto now_ns = std::chrono::duration_cast<std::chrono::nanoseconds>(start.time_since_epoch()).count();
      if (unauthorized_log_.allow(now_ns, held_back)) {
        log(LogLevel::kWarn, "proxy", "401 to %s on %s: %s (%llu more 401s since the last such line)", c.peer.c_str(),
            std::string(path).c_str(), presented.empty() ? "no API key" : "unknown API key",
            static_cast<unsigned long long>(held_back));
      }
      co_return co_await write_error(c, req, metrics_, endpoint_of(path), 401,
                                     presented.empty() ? "no API key given: send 'Authorization: Bearer KEY'"
                                                       : "incorrect API key provided",
                                     {}, {.challenge = true, .rejection = "unauthorized"});
    }
    metrics_.count_request_by_key(*name);
  }

  if (path == "/v1/chat/completions" || path == "/v1/completions") {
    const bool chat = path == "/v1/chat/completions";
    const Endpoint endpoint = chat ? Endpoint::kChatCompletions : Endpoint::kCompletions;
    if (!post) {
      co_return co_await write_error(c, req, metrics_, endpoint, 405, "use POST", {},
                                     {.allow = "POST", .rejection = "method_not_allowed"});
    }
    OpenAiRequest parsed;
    const ApiFlavor flavor = chat ? ApiFlavor::kChat : ApiFlavor::kCompletion;
    if (auto error = parse_openai_request(req.body(), flavor, parsed)) {
      log(LogLevel::kWarn, "proxy", "400 to %s on %s: %s", c.peer.c_str(), std::string(path).c_str(),
          error->message.c_str());
      co_return co_await write_error(
          c, req, metrics_, endpoint, 400, error->message, error->param,
          {.deployment = deployment_label(router_, parsed.model), .rejection = "bad_request"});
    }
    GenerateJob job{endpoint,
                    parsed.stream ? Output::kSse : Output::kJson,
                    flavor,
                    parsed.include_usage,
                    std::move(parsed.model),
                    std::move(parsed.generate),
                    start,
                    received_ns,
                    timing};
    co_return co_await generate(c, req, std::move(job));
  }

  constexpr std::string_view kPlainPrefix = "/v1/chat/";
  if (path.starts_with(kPlainPrefix)) {
    const std::string_view deployment = path.substr(kPlainPrefix.size());
    if (deployment.empty() || deployment.find('/') != std::string_view::npos) {
      co_return co_await write_error(c, req, metrics_, Endpoint::kOther, 404, "no such endpoint", {},
                                     {.rejection = "not_found"});
    }
    const std::string_view label = deployment_label(router_, deployment);
    if (!post) {
      co_return co_await write_error(c, req, metrics_, Endpoint::kChatPlain, 405, "use POST", {},
                                     {.allow = "POST", .deployment = label, .rejection = "method_not_allowed"});
    }
    GenerateJob job{Endpoint::kChatPlain, Output::kPlain, ApiFlavor::kCompletion, false, std::string(deployment), {},
                    start, received_ns, timing};
    v1::SamplingParams& params = *job.request.mutable_params();
    set_default_params(params);
    params.set_max_tokens(kPlainDefaultMaxTokens);
    if (const auto value = query_param(target, "max_tokens")) {
      std::uint32_t max_tokens = 0;
      const auto [end, ec] = std::from_chars(value->data(), value->data() + value->size(), max_tokens);
      if (ec != std::errc() || end != value->data() + value->size()) {
        log(LogLevel::kWarn, "proxy", "400 to %s: bad max_tokens", c.peer.c_str());
        co_return co_await write_error(c, req, metrics_, Endpoint::kChatPlain, 400,
                                       "max_tokens must be a non-negative integer", "max_tokens",
                                       {.deployment = label, .rejection = "bad_request"});
      }
      params.set_max_tokens(max_tokens);
    }
    if (!simdjson::validate_utf8(req.body())) {
      log(LogLevel::kWarn, "proxy", "400 to %s: prompt is not UTF-8", c.peer.c_str());
      co_return co_await write_error(c, req, metrics_, Endpoint::kChatPlain, 400, "the prompt must be UTF-8 text", {},
                                     {.deployment = label, .rejection = "bad_request"});
    }
    job.request.set_prompt(std::move(req.body()));
    co_return co_await generate(c, req, std::move(job));
  }

  struct Simple {
    std::string_view path;
    Endpoint endpoint;
  };
  static constexpr Simple kSimple[] = {{"/v1/models", Endpoint::kModels},
                                       {"/healthz", Endpoint::kHealthz},
                                       {"/readyz", Endpoint::kReadyz},
                                       {"/metrics", Endpoint::kMetrics}};
  for (const Simple& s : kSimple) {
    if (path != s.path) continue;
    if (!get) {
      co_return co_await write_error(c, req, metrics_, s.endpoint, 405, "use GET", {},
                                     {.allow = "GET", .rejection = "method_not_allowed"});
    }
    switch (s.endpoint) {
      case Endpoint::kModels: {
        co_return co_await write_response(c, req, metrics_, s.endpoint, 200, models_json(router_.snapshot().get()),
                                          "application/json");
      }
      case Endpoint::kHealthz: co_return co_await write_response(c, req, metrics_, s.endpoint, 200, "ok\n", "text/plain");
      case Endpoint::kReadyz: {
        const bool ready = router_.ready() && !draining_;
        co_return co_await write_response(c, req, metrics_, s.endpoint, ready ? 200 : 503,
                                          ready      ? "ready\n"
                                          : draining_ ? "draining\n"
                                                      : "no routing snapshot with a routable replica\n",
                                          "text/plain");
      }
      default: {
        co_return co_await write_response(c, req, metrics_, s.endpoint, 200, metrics_.render(router_),
                                          "text/plain; version=0.0.4");
      }
    }
  }
  co_return co_await write_error(c, req, metrics_, Endpoint::kOther, 404, "no such endpoint", {},
                                 {.rejection = "not_found"});
}

net::awaitable<void> Handlers::reject(Connection& c, int status, std::string_view reason, std::string_view message) {
  Request req;  // what could be read of the request is unusable; answer as HTTP/1.1 and close
  req.keep_alive(false);
  co_await write_error(c, req, metrics_, Endpoint::kOther, status, message, {}, {.rejection = reason});
}

net::awaitable<RouteResult> Handlers::route(const GenerateJob& job, std::span<const ReplicaHandle* const> tried,
                                            net::any_io_executor executor, QueueWait& wait) {
  const Clock::time_point start = Clock::now();
  const Clock::time_point deadline = start + limits_.queue_timeout;
  for (;;) {
    RouteResult route = router_.route(job.model, tried);
    // Every replica is at max_concurrency, or no snapshot has arrived yet (a proxy just started): wait, bounded in
    // count and time, instead of refusing.
    const bool waits = route.outcome == RouteOutcome::kOverloaded || route.outcome == RouteOutcome::kNoSnapshot;
    if (!waits || !route.queue) co_return route;
    const Clock::time_point now = Clock::now();
    if (now >= deadline) {
      wait.refusal = "queue_timeout";
      co_return route;
    }
    // Woken by a freed slot or a new snapshot; re-checked every slice too, so that a wake-up that came between
    // the route above and joining the queue costs a slice, not the whole timeout.
    const SlotQueue::Wait result = co_await route.queue->wait(executor, std::min(deadline, now + kQueueRecheck));
    wait.waited = Clock::now() - start;
    if (result == SlotQueue::Wait::kFull) {
      wait.refusal = "queue_full";
      co_return route;
    }
  }
}

// The state of one generate request across its attempts: what the attempt loop leaves for the output format's end.
struct Handlers::Stream {
  const GenerateJob& job;
  std::string_view deployment;  // its label
  DeploymentMetrics& series;
  RouteResult route;
  DeploymentLimits limits;
  std::string request_id;
  FirstTokenStamps stamps{};
  int attempts = 1;
  bool client_gone = false;
  v1::FinishReason finish_reason = v1::FINISH_REASON_NONE;
  Usage usage;
  // A failure: the engine's final chunk said so, the call ended without a final chunk, or a timeout.
  std::optional<std::pair<int, std::string>> failure;

  std::string timing() const;  // the X-Tokenbus-Timing value: the first token's stamps as JSON, or ""
};

net::awaitable<bool> Handlers::generate(Connection& c, const Request& req, GenerateJob job) {
  RetryBudget::Active active(retry_budget_);
  QueueWait wait;
  RouteResult route = co_await this->route(job, {}, c.stream.get_executor(), wait);
  // After routing: a request that waited for the first snapshot is counted under the deployment it found.
  const std::string_view deployment = deployment_label(router_, job.model);
  DeploymentMetrics& series = metrics_.deployment(deployment);
  // A model that does not exist never reached a queue.
  if (route.outcome != RouteOutcome::kUnknownDeployment) {
    series.observe_queue_wait(std::chrono::duration<double>(wait.waited).count());
  }
  switch (route.outcome) {
    case RouteOutcome::kRouted: break;
    case RouteOutcome::kNoSnapshot:
      co_return co_await write_error(c, req, metrics_, job.endpoint, 503, "no routing snapshot yet", {},
                                     {.retry_after = kNoReplicaRetryAfter, .rejection = "no_snapshot"});
    case RouteOutcome::kUnknownDeployment:
      co_return co_await write_error(c, req, metrics_, job.endpoint, 404,
                                     "the model '" + job.model + "' does not exist", "model",
                                     {.rejection = "unknown_model"});
    case RouteOutcome::kNoReplica:
      co_return co_await write_error(c, req, metrics_, job.endpoint, 503,
                                     "the model '" + job.model + "' has no ready replica", {},
                                     {.retry_after = route.retry_after, .deployment = deployment,
                                      .rejection = "no_replica"});
    case RouteOutcome::kOverloaded:
      co_return co_await write_error(c, req, metrics_, job.endpoint, 429,
                                     "the model '" + job.model + "' is at capacity; retry later", {},
                                     {.retry_after = route.retry_after, .deployment = deployment,
                                      .rejection = wait.refusal.empty() ? "queue_full" : wait.refusal});
  }
  const DeploymentLimits limits = route.limits;
  const std::uint32_t max_tokens = job.request.params().max_tokens();
  if (limits.max_model_len > 0 && max_tokens > limits.max_model_len) {
    log(LogLevel::kWarn, "proxy", "400 to %s: max_tokens %u over the context length %lld of %s", c.peer.c_str(),
        max_tokens, static_cast<long long>(limits.max_model_len), job.model.c_str());
    co_return co_await write_error(c, req, metrics_, job.endpoint, 400,
                                   "max_tokens (" + std::to_string(max_tokens) + ") exceeds the context length (" +
                                       std::to_string(limits.max_model_len) + ") of the model '" + job.model + "'",
                                   "max_tokens", {.deployment = deployment, .rejection = "context_length"});
  }

  Stream s{job, deployment, series, std::move(route), limits, next_request_id()};
  s.stamps[kProxyReceived] = job.received_ns;
  s.stamps[kRouted] = wall_clock_ns();
  job.request.set_request_id(s.request_id);
  if (job.output == Output::kPlain) co_return co_await stream_plain(c, req, s);
  const char* prefix = job.flavor == ApiFlavor::kChat ? "chatcmpl-" : "cmpl-";
  const std::int64_t created =
      std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch()).count();
  CompletionFormatter formatter(job.flavor, prefix + s.request_id, job.model, created);
  if (job.output == Output::kSse) co_return co_await stream_sse(c, req, s, formatter);
  co_return co_await answer_json(c, req, s, formatter);
}

net::awaitable<void> Handlers::attempts(Connection& c, Stream& s, ChunkWriter& writer) {
  const GenerateJob& job = s.job;
  const auto seconds = [](double v) {
    return std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(v));
  };
  std::vector<const ReplicaHandle*> tried;
  metrics_.stream_started();
  error_code ec;
  c.stream.socket().non_blocking(true, ec);  // for write_now; asynchronous operations are not affected
  ClientWatch watch(c);
  bool text_seen = false;  // some text came from a replica: from here on, no retry
  std::optional<Clock::time_point> last_text_write;  // of a streamed response: the base of the next inter-token gap
  InterTokenGaps gaps;
  RetryBudget::Retry retry;  // the budget slot of the retry running, if any

  for (;;) {  // one pass per attempt
    bool final_seen = false;
    bool timed_out = false;
    std::uint32_t engine_error = 0;
    std::string engine_message;
    s.finish_reason = v1::FINISH_REASON_NONE;
    ReplicaHandle& replica = *s.route.lease.replica();
    tried.push_back(&replica);
    ReplicaCall call(replica, job.request, c.stream.get_executor(), limits_.max_stream_duration);
    watch.attach(&call);
    Clock::time_point last_event = Clock::now();

    for (;;) {
      // Before the first text the deployment's time to first token applies, after it the idle time.
      const double limit_s = text_seen ? s.limits.idle_timeout_s : s.limits.first_token_timeout_s;
      const Clock::time_point deadline = limit_s > 0 ? last_event + seconds(limit_s) : Clock::time_point::max();
      const ReplicaCall::Event event = co_await call.next(deadline);
      if (event == ReplicaCall::Event::kWoken) {
        if (!watch.gone()) continue;
        s.client_gone = true;
        break;
      }
      if (event == ReplicaCall::Event::kTimeout) {
        timed_out = true;
        metrics_.count_stream_timeout(text_seen ? "idle" : "first_token");
        s.failure.emplace(504, text_seen
                                   ? "no token from the replica for " + std::to_string(limit_s) + " s"
                                   : "no first token from the replica within " + std::to_string(limit_s) + " s");
        break;
      }
      if (event == ReplicaCall::Event::kEnd) break;
      last_event = Clock::now();

      const v1::GenerateChunk& chunk = call.chunk();
      s.series.count_tokens(chunk.tokens());
      replica.count_tokens(chunk.tokens());
      const bool has_text = !chunk.text().empty();
      const bool first_text = has_text && !text_seen;
      if (first_text) {
        text_seen = true;
        const v1::FirstTokenTimes& times = chunk.first_token_times();
        s.stamps[kReplicaReceived] = times.replica_received_ns();
        s.stamps[kRingWritten] = times.ring_written_ns();
        s.stamps[kEngineProduced] = times.engine_produced_ns();
        s.stamps[kRingRead] = times.ring_read_ns();
      }
      if (chunk.finish_reason() != v1::FINISH_REASON_NONE) {
        final_seen = true;
        s.finish_reason = chunk.finish_reason();
        s.usage = Usage{chunk.prompt_tokens(), chunk.completion_tokens()};
        engine_error = chunk.error_code();
        engine_message = chunk.error_message();
      }
      // "abort" was not asked for (a client that left is handled above): the engine gave up on it.
      const bool failed = final_seen && (s.finish_reason == v1::FINISH_REASON_ERROR ||
                                         s.finish_reason == v1::FINISH_REASON_ABORT);
      c.out.clear();
      writer.append(c.out, chunk.text(), final_seen && !failed ? s.finish_reason : v1::FINISH_REASON_NONE,
                    s.attempts);
      call.read_next();  // the replica sends the next message while this one is written
      if (!c.out.empty()) {
        // The next chunk is taken only once this one is written: one chunk in flight, so a slow client holds
        // its own stream only. What the socket does not take at once waits for room within the I/O timeout.
        const std::size_t written = write_now(c, c.out, ec);
        if (!ec && written < c.out.size()) {
          c.stream.expires_after(kIoTimeout);
          co_await net::async_write(c.stream, net::buffer(c.out.data() + written, c.out.size() - written),
                                    net::redirect_error(net::use_awaitable, ec));
        }
        if (ec) {
          s.client_gone = true;
          break;
        }
        if (has_text) {
          const Clock::time_point now = Clock::now();
          if (last_text_write) {
            gaps.observe(std::chrono::duration<double>(now - *last_text_write).count());
          }
          last_text_write = now;
        }
      }
      if (first_text) {
        // Written (a JSON body holds it to the end: there, when the proxy had it).
        s.stamps[kProxySent] = wall_clock_ns();
        s.series.observe_first_token(s.stamps);
        c.out.clear();
        writer.append_after_first_text(c.out, s.stamps);
        if (!c.out.empty()) {
          c.stream.expires_after(kIoTimeout);
          co_await net::async_write(c.stream, net::buffer(c.out), net::redirect_error(net::use_awaitable, ec));
          if (ec) {
            s.client_gone = true;
            break;
          }
        }
      }
    }

    const CallStatus status = co_await call.finish();
    watch.attach(nullptr);
    if (s.client_gone) break;  // the call was cancelled by finish(); nothing more can be said to the client

    RetryKind kind;
    if (timed_out) {  // `failure` already says which timeout
      router_.report_failure(job.model, replica, "timed out");
      if (text_seen) break;
      kind = {"first_token_timeout", true};
    } else {
      AttemptEnd end = classify_end(status, final_seen, s.finish_reason, engine_error, engine_message);
      if (end.replica_failed) {
        router_.report_failure(job.model, replica,
                               final_seen ? "finish_reason " + v1::FinishReason_Name(s.finish_reason)
                                          : "gRPC status " + std::to_string(status.code));
      } else if (status.ok() || final_seen) {
        router_.report_success(replica);
      }
      s.failure = std::move(end.failure);
      kind = end.retry;
    }
    if (!s.failure || text_seen) break;

    // No text reached the client: another replica may serve it, within the per-request cap and the budget.
    const std::string_view reason = kind.reason;
    if (reason.empty()) break;
    if (s.attempts > retry_budget_.policy().max_retries) {
      metrics_.count_retry_refused("max_retries");
      break;
    }
    retry = RetryBudget::Retry();  // the last retry's slot, if any, is free again before asking for one
    QueueWait retry_wait;  // the queue wait histogram has the first routing's; a retry's shows in the hops
    RouteResult next = co_await this->route(job, tried, c.stream.get_executor(), retry_wait);
    if (next.outcome != RouteOutcome::kRouted) {
      metrics_.count_retry_refused("no_replica");
      break;
    }
    // The budget bounds retries that could feed an overload: a retry after a sign of load, onto a replica whose
    // engine has requests waiting.
    if (kind.budgeted && next.queued > 0 && !(retry = retry_budget_.try_retry())) {
      metrics_.count_retry_refused("budget");
      log(LogLevel::kWarn, "proxy", "%s: not retried (%.*s): retry budget spent", s.request_id.c_str(),
          static_cast<int>(reason.size()), reason.data());
      break;
    }
    log(LogLevel::kInfo, "proxy", "%s: retrying on %s after %.*s from %s: %s", s.request_id.c_str(),
        next.lease.replica()->address().c_str(), static_cast<int>(reason.size()), reason.data(),
        replica.address().c_str(), s.failure->second.c_str());
    metrics_.count_retry(reason);
    s.route = std::move(next);  // releases the failed replica's lease
    s.stamps[kRouted] = wall_clock_ns();
    ++s.attempts;
  }

  co_await watch.stop();
  s.series.observe_inter_token(gaps);
  metrics_.stream_ended();
}

net::awaitable<std::optional<bool>> Handlers::end_unless_done(Connection& c, const Request& req, const Stream& s,
                                                              bool head_sent) {
  if (s.client_gone) {
    metrics_.count_request(s.job.endpoint, head_sent ? 200 : 499, s.deployment);
    co_return false;
  }
  if (s.failure && !head_sent) {
    log(LogLevel::kWarn, "proxy", "%s: %d after %d attempt(s): %s", s.request_id.c_str(), s.failure->first,
        s.attempts, s.failure->second.c_str());
    const std::chrono::seconds retry_after = s.failure->first == 503 ? kNoReplicaRetryAfter : std::chrono::seconds(0);
    co_return co_await write_error(c, req, metrics_, s.job.endpoint, s.failure->first, s.failure->second, {},
                                   {.retry_after = retry_after, .attempts = s.attempts, .deployment = s.deployment});
  }
  s.series.observe_e2e(seconds_since(s.job.start));
  if (s.failure) {
    log(LogLevel::kWarn, "proxy", "%s: failed mid-stream: %s", s.request_id.c_str(), s.failure->second.c_str());
  }
  co_return std::nullopt;
}

net::awaitable<bool> Handlers::write_end(Connection& c, const Stream& s, bool keep_alive) {
  error_code ec;
  c.stream.expires_after(kIoTimeout);
  co_await net::async_write(c.stream, net::buffer(c.out), net::redirect_error(net::use_awaitable, ec));
  metrics_.count_request(s.job.endpoint, 200, s.deployment);
  co_return !ec && keep_alive;
}

// Only a request that asked, and whose first token went out, carries its stamps.
std::string Handlers::Stream::timing() const {
  return job.timing && stamps[kProxySent] != 0 ? timing_json(stamps) : std::string();
}

net::awaitable<bool> Handlers::stream_sse(Connection& c, const Request& req, Stream& s,
                                          CompletionFormatter& formatter) {
  const bool chunked = req.version() >= 11;
  const StreamHead head{"Content-Type: text/event-stream\r\nCache-Control: no-cache\r\n", s.request_id, chunked,
                        req.keep_alive() && chunked};
  SseWriter writer(formatter, head, s.job.timing);
  co_await attempts(c, s, writer);
  if (const auto done = co_await end_unless_done(c, req, s, writer.head_sent())) co_return *done;
  c.out.clear();
  if (!writer.head_sent()) head.append(c.out, s.attempts);
  ChunkFrame frame(c.out, chunked);
  if (s.failure) {
    CompletionFormatter::append_error_event(c.out, s.failure->first, s.failure->second);
  } else {
    if (!writer.finish_sent()) formatter.append_event(c.out, "", openai_finish_reason(s.finish_reason));
    if (s.job.include_usage) formatter.append_usage_event(c.out, s.usage);
  }
  CompletionFormatter::append_done(c.out);
  frame.close();
  append_last_chunk(c.out, chunked);
  co_return co_await write_end(c, s, head.keep_alive);
}

net::awaitable<bool> Handlers::stream_plain(Connection& c, const Request& req, Stream& s) {
  const bool chunked = req.version() >= 11;
  // The first token's stamps go in a trailer, which only a chunked body has.
  const StreamHead head{"Content-Type: text/plain; charset=utf-8\r\n", s.request_id, chunked,
                        req.keep_alive() && chunked, s.job.timing && chunked};
  PlainWriter writer(head);
  co_await attempts(c, s, writer);
  if (const auto done = co_await end_unless_done(c, req, s, writer.head_sent())) co_return *done;
  if (s.failure) {
    // Plain text has no way to say "failed": the body ends without its last chunk, and the client sees a
    // truncated response.
    metrics_.count_request(s.job.endpoint, 200, s.deployment);
    co_return false;
  }
  c.out.clear();
  if (!writer.head_sent()) head.append(c.out, s.attempts);
  append_last_chunk(c.out, chunked, head.trailer ? s.timing() : std::string());
  co_return co_await write_end(c, s, head.keep_alive);
}

net::awaitable<bool> Handlers::answer_json(Connection& c, const Request& req, Stream& s,
                                           const CompletionFormatter& formatter) {
  JsonWriter writer;
  co_await attempts(c, s, writer);
  if (const auto done = co_await end_unless_done(c, req, s, false)) co_return *done;
  co_return co_await write_response(c, req, metrics_, s.job.endpoint, 200,
                                    formatter.body(writer.text(), openai_finish_reason(s.finish_reason), s.usage),
                                    "application/json",
                                    {.attempts = s.attempts, .deployment = s.deployment, .timing = s.timing()});
}

}  // namespace tokenbus::proxy
