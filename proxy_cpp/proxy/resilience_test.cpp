// The proxy under replica faults, in-process: the real HTTP server on port 0, real gRPC replicas
// (FakeReplica, some forced to fail), real sockets as clients. What each client sees: completed (maybe on
// another replica: X-Tokenbus-Attempts), or an error it can tell from success.
#include <utility>  // before Asio: Boost 1.74's awaitable.hpp needs it under g++ 12

#include <gtest/gtest.h>

#include <boost/asio/read_until.hpp>
#include <boost/asio/streambuf.hpp>
#include <future>
#include <nlohmann/json.hpp>
#include <thread>

#include "proxy/fake_replica.hpp"
#include "proxy/http_server.hpp"
#include "proxy/metrics.hpp"
#include "proxy/router.hpp"
#include "proxy/test_client.hpp"

namespace tokenbus::proxy {
namespace {

using namespace std::chrono_literals;
using nlohmann::json;
using testing::Client;
using testing::FakeReplica;
using testing::Reply;
using testing::sse_data;
namespace net = boost::asio;
namespace http = boost::beast::http;
using tcp = net::ip::tcp;

SnapshotReplica ready(std::string id, std::string addr, std::int64_t max_concurrency = 64) {
  return SnapshotReplica{std::move(id), "node-a", std::move(addr), ReplicaState::kReady, max_concurrency, {}, true};
}

// A port nothing listens on: bound, then closed.
std::string dead_address() {
  net::io_context io;
  tcp::acceptor acceptor(io, tcp::endpoint(net::ip::make_address("127.0.0.1"), 0));
  const auto port = acceptor.local_endpoint().port();
  acceptor.close();
  return "127.0.0.1:" + std::to_string(port);
}

// The value of an unlabelled or labelled series in a /metrics text, or -1 when absent.
double metric(const std::string& text, const std::string& series) {
  const std::size_t at = text.find("\n" + series + " ");
  if (at == std::string::npos) return -1;
  return std::stod(text.substr(at + series.size() + 2));
}

class ResilienceTest : public ::testing::Test {
 protected:
  void start(ProxyLimits limits = test_limits()) {
    limits_ = limits;
    router_ = std::make_unique<Router>(limits.outlier, limits.queue_depth);
    server_ = std::make_unique<HttpServer>(*router_, metrics_, 2, limits);
    std::string error;
    port_ = server_->listen("127.0.0.1", 0, error);
    ASSERT_NE(port_, 0) << error;
    server_->start();
  }

  void TearDown() override {
    if (server_) {
      EXPECT_TRUE(server_->stop(5s));
    }
  }

  // A queue wait far longer than any test needs: a request that must be served from the queue is, even on a
  // busy machine under a sanitizer.
  static ProxyLimits test_limits() {
    ProxyLimits limits;
    limits.queue_timeout = 30s;
    return limits;
  }

  void apply(std::vector<SnapshotReplica> replicas, double first_token_s = 0, double idle_s = 0,
             std::int64_t max_model_len = 0) {
    auto s = std::make_shared<Snapshot>();
    s->head_id = "h";
    s->epoch = 1;
    s->version = (1ull << 32) | ++version_;
    s->deployments.push_back(
        {.name = "demo", .max_model_len = max_model_len, .first_token_timeout_s = first_token_s,
         .idle_timeout_s = idle_s, .replicas = std::move(replicas)});
    router_->apply(s);
    router_->mark_received();
  }

  std::string metrics_text() { return Client(port_).get("/metrics").body; }

  // A connection whose stream holds a slot of `demo` (its replica "hangs" after a first chunk) until closed.
  tcp::socket hold_slot(net::io_context& io) {
    tcp::socket holder(io);
    holder.connect(tcp::endpoint(net::ip::make_address("127.0.0.1"), port_));
    const std::string hang = "POST /v1/chat/demo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nhang";
    net::write(holder, net::buffer(hang));
    net::streambuf got;
    net::read_until(holder, got, "first ");
    return holder;
  }

  static std::string stream_body(const std::string& content, int max_tokens = 4) {
    return R"({"model": "demo", "stream": true, "max_tokens": )" + std::to_string(max_tokens) +
           R"(, "messages": [{"role": "user", "content": ")" + content + "\"}]}";
  }

  ProxyLimits limits_;
  std::unique_ptr<Router> router_;
  Metrics metrics_;
  std::unique_ptr<HttpServer> server_;
  std::uint16_t port_ = 0;
  std::uint64_t version_ = 0;
};

TEST_F(ResilienceTest, ADeadReplicaCostsNoRequest) {
  start();
  FakeReplica good;
  apply({ready("dead", dead_address()), ready("good", good.address())});
  Client client(port_);
  int retried = 0;
  for (int i = 0; i < 20; ++i) {
    const Reply r = client.send(http::verb::post, "/v1/chat/demo?max_tokens=3", "hi", "text/plain");
    ASSERT_EQ(r.status, 200) << r.body;
    EXPECT_EQ(r.body, "tok0 tok1 tok2 ");
    if (r.headers["X-Tokenbus-Attempts"] == "2") ++retried;
  }
  EXPECT_EQ(good.calls(), 20);
  // The dead one was tried once: after its failure it loses every comparison with a healthy replica.
  EXPECT_EQ(retried, 1);
  const std::string text = metrics_text();
  EXPECT_EQ(metric(text, "tokenbus_proxy_retries_total{reason=\"unavailable\"}"), 1) << text;
}

TEST_F(ResilienceTest, AFailingReplicaIsEjectedAndNeverLooksLeastLoaded) {
  start();
  FakeReplica broken("unavailable");
  FakeReplica good;
  apply({ready("broken", broken.address()), ready("good", good.address())});
  Client client(port_);
  for (int i = 0; i < 10; ++i) {
    const Reply r = client.post("/v1/chat/completions", stream_body("hi"));
    ASSERT_EQ(r.status, 200) << r.body;
    EXPECT_EQ(sse_data(r.body).back(), "[DONE]");
  }
  // One failure makes it lose every tie, so it got one call, then lost to the healthy replica.
  EXPECT_EQ(broken.calls(), 1);
  EXPECT_EQ(good.calls(), 10);
  const auto views = router_->replica_views();
  ASSERT_EQ(views.size(), 2u);
  EXPECT_EQ(views[0].consecutive_failures, 1);
  EXPECT_GT(views[0].score, views[1].score);
}

TEST_F(ResilienceTest, AtMostHalfOfTheReplicasAreEjected) {
  start();
  FakeReplica a("unavailable");
  FakeReplica b("unavailable");
  apply({ready("a", a.address()), ready("b", b.address())});
  Client client(port_);
  for (int i = 0; i < 12; ++i) {
    const Reply r = client.send(http::verb::post, "/v1/chat/demo", "hi", "text/plain");
    EXPECT_EQ(r.status, 503) << r.body;  // every replica fails: an explicit error, after a retry while one is left
    EXPECT_FALSE(r.headers["X-Tokenbus-Attempts"].empty());
    EXPECT_FALSE(r.headers[http::field::retry_after].empty());
  }
  int ejected = 0;
  for (const ReplicaRouteView& v : router_->replica_views()) ejected += v.ejected ? 1 : 0;
  EXPECT_EQ(ejected, 1);
}

TEST_F(ResilienceTest, AnEngineAbortIsAnErrorNotStop) {
  start();
  FakeReplica replica;
  apply({ready("r", replica.address())});
  Client client(port_);
  // before any text: retried, and with no other replica, an error status
  const Reply early = client.post("/v1/chat/completions", stream_body("abort"));
  EXPECT_EQ(early.status, 503) << early.body;
  EXPECT_NE(early.body.find("aborted"), std::string::npos) << early.body;
  // after text: the SSE stream ends with an error event, never a finish_reason "stop"
  const Reply mid = client.post("/v1/chat/completions", stream_body("abort-mid"));
  ASSERT_EQ(mid.status, 200);
  const std::vector<std::string> data = sse_data(mid.body);
  ASSERT_GE(data.size(), 3u) << mid.body;
  EXPECT_EQ(data.back(), "[DONE]");
  const json last = json::parse(data[data.size() - 2]);
  EXPECT_TRUE(last.contains("error")) << mid.body;
  EXPECT_EQ(mid.body.find("\"finish_reason\":\"stop\""), std::string::npos) << mid.body;
  // plain text: the body is cut without its last chunk, which every HTTP client reports
  Client plain(port_);
  const Reply cut = plain.send(http::verb::post, "/v1/chat/demo", "abort-mid", "text/plain");
  EXPECT_EQ(cut.status, 200);
  EXPECT_EQ(cut.body, "one ");
  EXPECT_FALSE(cut.error.empty());
}

TEST_F(ResilienceTest, NoFirstTokenInTimeIsA504AndCancelsTheCall) {
  start();
  FakeReplica replica;
  apply({ready("r", replica.address())}, /*first_token_s=*/0.3);
  Client client(port_);
  const Reply r = client.post("/v1/chat/completions", stream_body("silent"));
  EXPECT_EQ(r.status, 504) << r.body;
  EXPECT_TRUE(replica.wait_for_cancellations(1, 10s));
  EXPECT_EQ(metric(metrics_text(), "tokenbus_proxy_stream_timeouts_total{kind=\"first_token\"}"), 1);
}

TEST_F(ResilienceTest, AStalledStreamEndsWithAnErrorAfterTheIdleTime) {
  start();
  FakeReplica replica;
  apply({ready("r", replica.address())}, /*first_token_s=*/0, /*idle_s=*/0.3);
  Client client(port_);
  const Reply sse = client.post("/v1/chat/completions", stream_body("hang"));
  ASSERT_EQ(sse.status, 200);
  const std::vector<std::string> data = sse_data(sse.body);
  ASSERT_GE(data.size(), 3u) << sse.body;
  EXPECT_TRUE(json::parse(data[data.size() - 2]).contains("error")) << sse.body;
  Client plain(port_);
  const Reply cut = plain.send(http::verb::post, "/v1/chat/demo", "hang", "text/plain");
  EXPECT_EQ(cut.body, "first ");
  EXPECT_FALSE(cut.error.empty());
  EXPECT_TRUE(replica.wait_for_cancellations(2, 10s));
}

TEST_F(ResilienceTest, NoFirstTokenInTimeIsRetriedOnAnotherReplica) {
  start();
  FakeReplica silent("silent");
  FakeReplica good;
  // the silent one first: the first request's scan starts there. The limit leaves the good replica ample time
  // (a new channel's connect included) under a sanitizer on a busy machine.
  apply({ready("silent", silent.address()), ready("good", good.address())}, /*first_token_s=*/3.0);
  Client client(port_);
  const Reply r = client.post("/v1/chat/completions", stream_body("hi"));
  EXPECT_EQ(r.status, 200) << r.body;
  EXPECT_EQ(r.headers["X-Tokenbus-Attempts"], "2");
  EXPECT_TRUE(silent.wait_for_cancellations(1, 10s));
  EXPECT_EQ(metric(metrics_text(), "tokenbus_proxy_retries_total{reason=\"first_token_timeout\"}"), 1);
}

TEST_F(ResilienceTest, ARequestBeforeTheFirstSnapshotWaitsForIt) {
  start();
  FakeReplica replica;
  auto waiting = std::async(std::launch::async, [this] {
    return Client(port_).send(http::verb::post, "/v1/chat/demo?max_tokens=2", "hi", "text/plain");
  });
  EXPECT_EQ(waiting.wait_for(200ms), std::future_status::timeout);
  apply({ready("r", replica.address())});
  const Reply r = waiting.get();
  EXPECT_EQ(r.status, 200) << r.body;
  EXPECT_EQ(r.body, "tok0 tok1 ");
}

TEST_F(ResilienceTest, MaxTokensOverTheContextLengthIs400BeforeRouting) {
  start();
  FakeReplica replica;
  apply({ready("r", replica.address())}, 0, 0, /*max_model_len=*/128);
  Client client(port_);
  const Reply r = client.post("/v1/chat/completions", stream_body("hi", 129));
  EXPECT_EQ(r.status, 400);
  EXPECT_EQ(json::parse(r.body)["error"]["param"], "max_tokens");
  EXPECT_EQ(replica.calls(), 0);
  EXPECT_EQ(client.post("/v1/chat/completions", stream_body("hi", 128)).status, 200);
}

TEST_F(ResilienceTest, ABusyDeploymentQueuesInsteadOfRefusing) {
  start();
  FakeReplica replica;
  apply({ready("r", replica.address(), /*max_concurrency=*/1)});
  // A holds the only slot: it reads its first chunk, then hangs up.
  net::io_context io;
  tcp::socket holder = hold_slot(io);
  // B waits in the queue for that slot...
  auto waiting = std::async(std::launch::async, [this] {
    return Client(port_).send(http::verb::post, "/v1/chat/demo?max_tokens=2", "hi", "text/plain");
  });
  EXPECT_EQ(waiting.wait_for(200ms), std::future_status::timeout);
  holder.close();  // ...which frees when A leaves
  const Reply b = waiting.get();
  EXPECT_EQ(b.status, 200) << b.body;
  EXPECT_EQ(b.body, "tok0 tok1 ");
}

TEST_F(ResilienceTest, AFullQueueAnswers429WithRetryAfter) {
  ProxyLimits limits = test_limits();
  limits.queue_depth = 0;
  start(limits);
  FakeReplica replica;
  apply({ready("r", replica.address(), 1)});
  net::io_context io;
  tcp::socket holder = hold_slot(io);
  const Reply r = Client(port_).send(http::verb::post, "/v1/chat/demo", "hi", "text/plain");
  EXPECT_EQ(r.status, 429);
  EXPECT_GE(std::stoi(std::string(r.headers[http::field::retry_after])), 1);
  EXPECT_EQ(metric(metrics_text(), "tokenbus_proxy_rejections_total{deployment=\"demo\",reason=\"queue_full\"}"), 1);
}

TEST_F(ResilienceTest, HeaderLimits) {
  start();
  auto raw = [this](const std::string& request) {
    net::io_context io;
    tcp::socket s(io);
    s.connect(tcp::endpoint(net::ip::make_address("127.0.0.1"), port_));
    net::write(s, net::buffer(request));
    net::streambuf got;
    boost::system::error_code ec;
    net::read_until(s, got, "\r\n", ec);
    std::string line(net::buffers_begin(got.data()), net::buffers_begin(got.data()) + got.size());
    return line.substr(0, line.find("\r\n"));
  };
  std::string many = "GET /healthz HTTP/1.1\r\nHost: x\r\n";
  for (int i = 0; i < 101; ++i) many += "X-F" + std::to_string(i) + ": v\r\n";
  EXPECT_EQ(raw(many + "\r\n"), "HTTP/1.1 431 Request Header Fields Too Large");
  EXPECT_EQ(raw("GET /healthz HTTP/1.1\r\nHost: x\r\nX-Long: " + std::string(9000, 'a') + "\r\n\r\n"),
            "HTTP/1.1 431 Request Header Fields Too Large");
  EXPECT_EQ(raw("GET /" + std::string(9000, 'a') + " HTTP/1.1\r\nHost: x\r\n\r\n"), "HTTP/1.1 414 URI Too Long");
  const std::string text = metrics_text();
  EXPECT_EQ(metric(text, "tokenbus_proxy_rejections_total{deployment=\"\",reason=\"header_too_large\"}"), 2) << text;
  EXPECT_EQ(metric(text, "tokenbus_proxy_rejections_total{deployment=\"\",reason=\"uri_too_long\"}"), 1);
  std::string fine = "GET /healthz HTTP/1.1\r\nHost: x\r\n";
  for (int i = 0; i < 98; ++i) fine += "X-F" + std::to_string(i) + ": v\r\n";
  EXPECT_EQ(raw(fine + "X-Long: " + std::string(8000, 'a') + "\r\n\r\n"), "HTTP/1.1 200 OK");
}

TEST_F(ResilienceTest, ConnectionsOverTheCapAreRefused) {
  ProxyLimits limits = test_limits();
  limits.max_connections = 2;
  start(limits);
  Client first(port_);
  Client second(port_);
  EXPECT_EQ(first.get("/healthz").status, 200);
  EXPECT_EQ(second.get("/healthz").status, 200);
  const Reply third = Client(port_).get("/healthz");
  EXPECT_EQ(third.status, 503) << third.error;
  EXPECT_EQ(metric(first.get("/metrics").body,
                   "tokenbus_proxy_rejections_total{deployment=\"\",reason=\"connection_limit\"}"),
            1);
}

}  // namespace
}  // namespace tokenbus::proxy
