// Replica churn with streams in flight: the real HTTP server in-process, real gRPC replicas (FakeReplica),
// and a thread applying snapshots that remove and re-add the replicas many times over while clients
// stream. A removed replica's handle (and its gRPC channel) then lives only as long as the requests still
// on it, so its channel is closed while calls end: the path of the proxy's "double free detected" crash
// (issue 6). Every request must end, completed or with an explicit error; the sanitizer builds run this
// test to catch memory errors and races on that path.
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

constexpr int kClients = 6;
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
  kExplicitError,  // an error status with an OpenAI error body, or an SSE error event
  kOther,          // anything else (a hang, a reset, a wrong body): the test fails
};

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
      const bool sse = (index + n) % 2 == 0;
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
      const Outcome outcome = sse ? request_sse(*stream, buffer) : request_plain(*stream, buffer);
      if (outcome != Outcome::kCompleted) stream.reset();  // an error answer may close the connection
    }
  }

  Outcome request_plain(beast::tcp_stream& stream, beast::flat_buffer& buffer) {
    http::request<http::string_body> req(http::verb::post, "/v1/chat/demo?max_tokens=" + std::to_string(kMaxTokens),
                                         11);
    req.set(http::field::host, "127.0.0.1");
    req.set(http::field::content_type, "text/plain");
    req.body() = "churn";
    req.prepare_payload();
    return exchange(stream, buffer, req, [](const http::response<http::string_body>& res) {
      return res.body() == expected_text();
    });
  }

  Outcome request_sse(beast::tcp_stream& stream, beast::flat_buffer& buffer) {
    http::request<http::string_body> req(http::verb::post, "/v1/chat/completions", 11);
    req.set(http::field::host, "127.0.0.1");
    req.set(http::field::content_type, "application/json");
    req.body() = R"({"model": "demo", "stream": true, "max_tokens": )" + std::to_string(kMaxTokens) +
                 R"(, "messages": [{"role": "user", "content": "churn"}]})";
    req.prepare_payload();
    return exchange(stream, buffer, req, [](const http::response<http::string_body>& res) {
      return res.body().ends_with("data: [DONE]\n\n") && res.body().find("\"finish_reason\":\"length\"") != std::string::npos;
    });
  }

  template <class Complete>
  Outcome exchange(beast::tcp_stream& stream, beast::flat_buffer& buffer, const http::request<http::string_body>& req,
                   Complete complete) {
    beast::error_code ec;
    stream.expires_after(kRequestTimeout);
    http::write(stream, req, ec);
    if (ec) return record(Outcome::kOther, "write: " + ec.message());
    http::response_parser<http::string_body> parser;
    parser.body_limit(1024 * 1024);
    http::read(stream, buffer, parser, ec);
    if (ec) return record(Outcome::kOther, "read: " + ec.message());
    const http::response<http::string_body>& res = parser.get();
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

  // Each round takes the deployment to another set: both replicas, none, one, a gone one. An address that
  // leaves and comes back gets a new handle and channel while the old channel still carries streams.
  const std::vector<std::vector<SnapshotReplica>> sets = {
      {},
      {replica("a", replica_a_.address())},
      {replica("b", replica_b_.address()), replica("gone", dead)},
      {},
      {replica("a", replica_a_.address()), replica("b", replica_b_.address())},
      {replica("b", replica_b_.address())},
  };
  bool progressed = true;
  for (int round = 0; round < kRounds && progressed; ++round) {
    apply(++version, sets[static_cast<std::size_t>(round) % sets.size()]);
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
  }
  // Every lease was returned: nothing is counted in flight on any replica, and no stream is open.
  for (const ReplicaRouteView& view : router_.replica_views()) EXPECT_EQ(view.in_flight, 0) << view.address;
  EXPECT_NE(metrics_.render(router_).find("tokenbus_proxy_in_flight_streams 0"), std::string::npos);
  // The old channels are released with the last request on them: the server drains and stops cleanly.
  apply(++version, {});
  EXPECT_TRUE(server_->stop(10s));
}

}  // namespace
}  // namespace tokenbus::proxy
