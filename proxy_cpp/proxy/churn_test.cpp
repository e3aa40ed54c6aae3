// Replica churn with streams in flight: the real HTTP server in-process, real gRPC replicas (FakeReplica),
// and a thread applying snapshots that remove and re-add the replicas many times over while clients
// stream. A removed replica's handle (and its gRPC channel) then lives only as long as the requests still
// on it, so its channel is closed while calls end: the path of the proxy's "double free detected" crash
// (issue 6). Clients mix complete streams, streams the replica fails midway, and streams they abandon; one
// replica is killed and replaced now and then. Every request must end, completed or with an explicit error,
// and every call must end at its replica; the sanitizer builds run this test to catch memory errors and
// races on that path.
#include <utility>  // before Asio: Boost 1.74's awaitable.hpp needs it under g++ 12

#include <gtest/gtest.h>

#include <atomic>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/core/tcp_stream.hpp>
#include <boost/beast/http/read.hpp>
#include <boost/beast/http/string_body.hpp>
#include <boost/beast/http/write.hpp>
#include <chrono>
#include <map>
#include <mutex>
#include <thread>
#include <vector>

#include "proxy/fake_replica.hpp"
#include "proxy/http_server.hpp"
#include "proxy/metrics.hpp"
#include "proxy/router.hpp"

namespace tokenbus::proxy {
namespace {

namespace net = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = net::ip::tcp;
using namespace std::chrono_literals;

constexpr int kClients = 8;
constexpr int kReplaceEvery = 30;         // rounds between two kills (and replacements) of replica c
constexpr int kRounds = 150;              // snapshot changes; each removes or re-adds replicas
constexpr int kStartsPerRound = 2;        // requests the clients must start between two snapshot changes
constexpr std::uint32_t kMaxTokens = 24;  // long enough that removals land mid-stream
// Generous: a sanitized build on a busy 2-core machine is 10-50x slower than a plain one.
constexpr auto kRequestTimeout = 60s;
constexpr auto kProgressTimeout = 60s;

std::string expected_text() {
  std::string s;
  for (std::uint32_t i = 0; i < kMaxTokens; ++i) s += "tok" + std::to_string(i) + " ";
  return s;
}

// What one request ended as, from the client's side.
enum class Outcome {
  kCompleted,      // 200 and the whole stream
  kExplicitError,  // an error status with an OpenAI error body, an SSE error event, or a plain body cut short
  kAbandoned,      // the client went away mid-stream, as it meant to
  kOther,          // anything else (a hang, a reset, a wrong body): the test fails
};

// What a client asks for; FakeReplica's behaviour follows the prompt.
enum class Kind { kPlain, kSse, kSseFailingMidway, kPlainAbandoned };

// A port nothing listens on: the address of a replica that is gone.
std::string dead_address() {
  net::io_context io;
  tcp::acceptor acceptor(io, tcp::endpoint(net::ip::make_address("127.0.0.1"), 0));
  return "127.0.0.1:" + std::to_string(acceptor.local_endpoint().port());
}

SnapshotReplica replica(std::string id, std::string addr) {
  SnapshotReplica r;
  r.id = std::move(id);
  r.node = "node-a";
  r.addr = std::move(addr);
  r.state = ReplicaState::kReady;
  r.max_concurrency = 64;
  r.healthy = true;
  return r;
}

class ChurnTest : public ::testing::Test {
 protected:
  void SetUp() override {
    server_ = std::make_unique<HttpServer>(router_, metrics_, 2);
    std::string error;
    port_ = server_->listen("127.0.0.1", 0, error);
    ASSERT_NE(port_, 0) << error;
    server_->start();
  }

  // Snapshot `version` of deployment demo with these replicas (possibly none).
  void apply(std::uint64_t version, std::vector<SnapshotReplica> replicas) {
    auto s = std::make_shared<Snapshot>();
    s->epoch = 1;
    s->version = (1ull << 32) | version;
    Deployment demo;
    demo.name = "demo";
    demo.replicas = std::move(replicas);
    s->deployments.push_back(std::move(demo));
    router_.apply(std::move(s));
    router_.mark_received();
  }

  // One client: requests one after another on a keep-alive connection (a new one after an error).
  void run_client(int index) {
    net::io_context io;
    std::optional<beast::tcp_stream> stream;
    beast::flat_buffer buffer;
    for (int n = 0; !stop_clients_.load(); ++n) {
      const auto kind = static_cast<Kind>((index + n) % 4);
      if (!stream) {
        stream.emplace(io);
        beast::error_code ec;
        stream->expires_after(kRequestTimeout);
        stream->connect(tcp::endpoint(net::ip::make_address("127.0.0.1"), port_), ec);
        if (ec) {
          record(Outcome::kOther, "connect: " + ec.message());
          stream.reset();
          continue;
        }
        buffer.clear();
      }
      started_.fetch_add(1);
      Outcome outcome = Outcome::kOther;
      switch (kind) {
        case Kind::kPlain: outcome = request_plain(*stream, buffer, "churn", false); break;
        case Kind::kSse: outcome = request_sse(*stream, buffer, "churn"); break;
        case Kind::kSseFailingMidway: outcome = request_sse(*stream, buffer, "fail-mid"); break;
        case Kind::kPlainAbandoned: outcome = request_plain(*stream, buffer, "hang", true); break;
      }
      if (outcome != Outcome::kCompleted) stream.reset();  // an error answer may close the connection
    }
  }

  // `abandon`: close the connection as soon as the first bytes of the body arrive.
  Outcome request_plain(beast::tcp_stream& stream, beast::flat_buffer& buffer, const std::string& prompt,
                        bool abandon) {
    http::request<http::string_body> req(http::verb::post, "/v1/chat/demo?max_tokens=" + std::to_string(kMaxTokens),
                                         11);
    req.set(http::field::host, "127.0.0.1");
    req.set(http::field::content_type, "text/plain");
    req.body() = prompt;
    req.prepare_payload();
    return exchange(stream, buffer, req, abandon, [](const http::response<http::string_body>& res) {
      return res.body() == expected_text();
    });
  }

  Outcome request_sse(beast::tcp_stream& stream, beast::flat_buffer& buffer, const std::string& prompt) {
    http::request<http::string_body> req(http::verb::post, "/v1/chat/completions", 11);
    req.set(http::field::host, "127.0.0.1");
    req.set(http::field::content_type, "application/json");
    req.body() = R"({"model": "demo", "stream": true, "max_tokens": )" + std::to_string(kMaxTokens) +
                 R"(, "messages": [{"role": "user", "content": ")" + prompt + R"("}]})";
    req.prepare_payload();
    return exchange(stream, buffer, req, false, [](const http::response<http::string_body>& res) {
      return res.body().ends_with("data: [DONE]\n\n") &&
             res.body().find("\"finish_reason\":\"length\"") != std::string::npos;
    });
  }

  template <class Complete>
  Outcome exchange(beast::tcp_stream& stream, beast::flat_buffer& buffer, const http::request<http::string_body>& req,
                   bool abandon, Complete complete) {
    beast::error_code ec;
    stream.expires_after(kRequestTimeout);
    http::write(stream, req, ec);
    if (ec) return record(Outcome::kOther, "write: " + ec.message());
    http::response_parser<http::string_body> parser;
    parser.body_limit(1024 * 1024);
    if (abandon) {
      http::read_header(stream, buffer, parser, ec);
      while (!ec && parser.get().result_int() == 200 && parser.get().body().empty() && !parser.is_done()) {
        http::read_some(stream, buffer, parser, ec);
      }
      if (!ec && parser.get().result_int() == 200) return record(Outcome::kAbandoned, "abandoned");
    }
    if (!ec && !parser.is_done()) http::read(stream, buffer, parser, ec);
    const http::response<http::string_body>& res = parser.get();
    // Plain text has no way to say "failed" but ending the body without its last chunk.
    if (ec == http::error::partial_message && res.result_int() == 200) {
      return record(Outcome::kExplicitError, "plain body cut short");
    }
    if (ec) return record(Outcome::kOther, "read: " + ec.message());
    if (res.result_int() == 200) {
      if (complete(res)) return record(Outcome::kCompleted, "200");
      if (res.body().find("data: {\"error\"") != std::string::npos) return record(Outcome::kExplicitError, "SSE error");
      return record(Outcome::kOther, "incomplete 200: " + res.body().substr(0, 200));
    }
    // An error answer is explicit when it says so in OpenAI's shape.
    if (res.result_int() >= 400 && res.body().starts_with("{\"error\"")) {
      return record(Outcome::kExplicitError, std::to_string(res.result_int()));
    }
    return record(Outcome::kOther, std::to_string(res.result_int()) + ": " + res.body().substr(0, 200));
  }

  Outcome record(Outcome outcome, const std::string& what) {
    std::lock_guard lock(mutex_);
    ++outcomes_[outcome];
    ++details_[what];
    return outcome;
  }

  // Waits until the clients have started `count` more requests; false at the deadline.
  bool wait_for_starts(int count) {
    const int target = started_.load() + count;
    const auto deadline = std::chrono::steady_clock::now() + kProgressTimeout;
    while (started_.load() < target) {
      if (std::chrono::steady_clock::now() > deadline) return false;
      std::this_thread::yield();
    }
    return true;
  }

  std::string summary() {
    std::lock_guard lock(mutex_);
    std::string s;
    for (const auto& [what, n] : details_) s += "  " + what + ": " + std::to_string(n) + "\n";
    return s;
  }

  testing::FakeReplica replica_a_;
  testing::FakeReplica replica_b_;
  std::unique_ptr<testing::FakeReplica> replica_c_ = std::make_unique<testing::FakeReplica>();
  Router router_;
  Metrics metrics_;
  std::unique_ptr<HttpServer> server_;
  std::uint16_t port_ = 0;
  std::atomic<bool> stop_clients_{false};
  std::atomic<int> started_{0};
  std::mutex mutex_;
  std::map<Outcome, int> outcomes_;
  std::map<std::string, int> details_;
};

TEST_F(ChurnTest, RemovingAndReAddingReplicasWithStreamsInFlightEndsEveryRequest) {
  const std::string dead = dead_address();
  std::uint64_t version = 0;
  apply(++version, {replica("a", replica_a_.address()), replica("b", replica_b_.address())});
  std::vector<std::thread> clients;
  for (int i = 0; i < kClients; ++i) clients.emplace_back([this, i] { run_client(i); });

  // Each round takes the deployment to another set: all replicas, none, one, a gone one. An address that
  // leaves and comes back gets a new handle and channel while the old channel still carries streams.
  // Replica c is killed now and then with streams on it (while still in the snapshot), then replaced by a
  // new one on a new address.
  auto set_of = [&](int round) -> std::vector<SnapshotReplica> {
    switch (round % 6) {
      case 0: return {};
      case 1: return {replica("a", replica_a_.address())};
      case 2: return {replica("b", replica_b_.address()), replica("gone", dead)};
      case 3: return {replica("c", replica_c_->address())};
      case 4: return {replica("a", replica_a_.address()), replica("b", replica_b_.address())};
      default: return {replica("b", replica_b_.address()), replica("c", replica_c_->address())};
    }
  };
  bool progressed = true;
  for (int round = 0; round < kRounds && progressed; ++round) {
    apply(++version, set_of(round));
    if (round % kReplaceEvery == kReplaceEvery - 1) replica_c_ = std::make_unique<testing::FakeReplica>();
    progressed = wait_for_starts(kStartsPerRound);
  }
  apply(++version, {replica("a", replica_a_.address()), replica("b", replica_b_.address())});
  stop_clients_ = true;
  for (std::thread& t : clients) t.join();
  EXPECT_TRUE(progressed) << "the clients stopped making progress:\n" << summary();

  {
    std::lock_guard lock(mutex_);
    EXPECT_EQ(outcomes_[Outcome::kOther], 0) << summary();
    EXPECT_GT(outcomes_[Outcome::kCompleted], kRounds / 2) << summary();
    EXPECT_GT(outcomes_[Outcome::kAbandoned], 0) << summary();
    EXPECT_GT(outcomes_[Outcome::kExplicitError], 0) << summary();
  }
  // Every call ends at its replica and returns its lease (the server side may finish a moment after the
  // client read the last byte): no stream open, nothing in flight on any replica.
  const auto deadline = std::chrono::steady_clock::now() + kProgressTimeout;
  auto settled = [&] {
    for (const ReplicaRouteView& view : router_.replica_views()) {
      if (view.in_flight != 0) return false;
    }
    return metrics_.render(router_).find("tokenbus_proxy_in_flight_streams 0\n") != std::string::npos;
  };
  while (!settled() && std::chrono::steady_clock::now() < deadline) std::this_thread::yield();
  EXPECT_TRUE(settled()) << metrics_.render(router_);
  // The old channels are released with the last request on them: the server drains and stops cleanly.
  apply(++version, {});
  EXPECT_TRUE(server_->stop(10s));
}

}  // namespace
}  // namespace tokenbus::proxy
