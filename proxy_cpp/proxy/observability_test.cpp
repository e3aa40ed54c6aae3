// What the proxy tells an operator (schemas/README.md, "Where each millisecond goes"; README "Metrics"): the
// first token's hops and their timing comment, the per-deployment series, inter-token gaps, rejections by
// reason, tokens per replica, the PROXY_REPORT it sends the head, and the throttle of its 401 log lines.
#include <utility>  // before Asio: Boost 1.74's awaitable.hpp needs it under g++ 12

#include <gtest/gtest.h>

#include <fstream>
#include <iterator>
#include <nlohmann/json.hpp>

#include "proxy/fake_head.hpp"
#include "proxy/fake_replica.hpp"
#include "proxy/http_server.hpp"
#include "proxy/log_throttle.hpp"
#include "proxy/metrics.hpp"
#include "proxy/proxy_report.hpp"
#include "proxy/router.hpp"
#include "proxy/snapshot_subscriber.hpp"
#include "proxy/test_client.hpp"

namespace tokenbus::proxy {
namespace {

using namespace std::chrono_literals;
namespace http = boost::beast::http;
using json = nlohmann::ordered_json;  // the stamps' order is part of what is checked
using testing::Client;
using testing::FakeReplica;
using testing::Reply;

// The value of one series (`name{labels}` exactly as exposed), or -1 when it is not there.
double metric(const std::string& text, const std::string& series) {
  const std::size_t at = text.find("\n" + series + " ");
  if (at == std::string::npos) return -1;
  return std::stod(text.substr(at + series.size() + 2));
}

std::string hop_series(std::string_view suffix, std::string_view hop) {
  return "tokenbus_proxy_first_token_hop_seconds_" + std::string(suffix) + "{deployment=\"demo\",hop=\"" +
         std::string(hop) + "\"}";
}

// The blocks of an SSE body (each ends with a blank line).
std::vector<std::string> sse_blocks(const std::string& body) {
  std::vector<std::string> out;
  for (std::size_t at = 0, end; (end = body.find("\n\n", at)) != std::string::npos; at = end + 2) {
    out.push_back(body.substr(at, end - at));
  }
  return out;
}

constexpr std::string_view kTimingPrefix = ": tokenbus-timing ";

std::string stream_body(const std::string& model, int max_tokens) {
  return R"({"model": ")" + model + R"(", "messages": [{"role": "user", "content": "hi"}], "stream": true,
             "max_tokens": )" + std::to_string(max_tokens) + "}";
}

class ObservabilityTest : public ::testing::Test {
 protected:
  void SetUp() override {
    server_ = std::make_unique<HttpServer>(router_, metrics_, 2);
    std::string error;
    port_ = server_->listen("127.0.0.1", 0, error);
    ASSERT_NE(port_, 0) << error;
    server_->start();
    auto s = std::make_shared<Snapshot>();
    s->epoch = 1;
    s->version = (1ull << 32) | 1;
    s->deployments.push_back(
        {.name = "demo", .replicas = {{"demo-r1", "node-a", replica_.address(), ReplicaState::kReady, 64, {}, true}}});
    s->deployments.push_back({.name = "drained",
                              .replicas = {{"drained-r1", "node-a", replica_.address(), ReplicaState::kDraining, 64,
                                            {}, true}}});
    router_.apply(s);
    router_.mark_received();
  }

  void TearDown() override { EXPECT_TRUE(server_->stop(5s)); }

  FakeReplica replica_;
  Router router_;
  Metrics metrics_;
  std::unique_ptr<HttpServer> server_;
  std::uint16_t port_ = 0;
};

TEST_F(ObservabilityTest, TheTimingCommentFollowsTheFirstEventAndTheHopsAddUpToTtft) {
  replica_.stamp_first_token(true);
  Client client(port_);
  client.set_header("X-Tokenbus-Timing", "1");
  const Reply r = client.post("/v1/chat/completions", stream_body("demo", 3));
  ASSERT_EQ(r.status, 200) << r.body;
  const std::vector<std::string> blocks = sse_blocks(r.body);
  ASSERT_GE(blocks.size(), 3u) << r.body;
  EXPECT_TRUE(blocks[0].starts_with("data: ")) << r.body;
  ASSERT_TRUE(blocks[1].starts_with(kTimingPrefix)) << r.body;  // right after the first content event
  for (std::size_t i = 2; i < blocks.size(); ++i) EXPECT_TRUE(blocks[i].starts_with("data: ")) << blocks[i];
  EXPECT_EQ(blocks.back(), "data: [DONE]");

  const json timing = json::parse(blocks[1].substr(kTimingPrefix.size()));
  ASSERT_EQ(timing.size(), kStampNames.size()) << timing;
  std::vector<std::uint64_t> stamps;
  for (const auto& [name, value] : timing.items()) {
    EXPECT_EQ(name, kStampNames[stamps.size()]);  // in hop order
    stamps.push_back(value.get<std::uint64_t>());
    EXPECT_GT(stamps.back(), 0u) << name;
    if (stamps.size() > 1) {
      EXPECT_GE(stamps.back(), stamps[stamps.size() - 2]) << name << " went back in time";
    }
  }

  const std::string text = client.get("/metrics").body;
  const double ttft = metric(text, "tokenbus_proxy_ttft_seconds_sum{deployment=\"demo\"}");
  EXPECT_NEAR(ttft, static_cast<double>(stamps.back() - stamps.front()) / 1e9, 1e-9) << text;
  double hops = 0;
  for (std::size_t h = 0; h < kHopNames.size(); ++h) {
    EXPECT_EQ(metric(text, hop_series("count", kHopNames[h])), 1) << kHopNames[h];
    const double hop = metric(text, hop_series("sum", kHopNames[h]));
    EXPECT_NEAR(hop, static_cast<double>(stamps[h + 1] - stamps[h]) / 1e9, 1e-9) << kHopNames[h];
    hops += hop;
    EXPECT_EQ(metric(text, "tokenbus_proxy_hop_clock_skew_total{hop=\"" + std::string(kHopNames[h]) + "\"}"), 0);
  }
  EXPECT_NEAR(hops, ttft, 1e-8);
}

TEST_F(ObservabilityTest, WithoutTheHeaderThereIsNoComment) {
  replica_.stamp_first_token(true);
  Client client(port_);
  const Reply r = client.post("/v1/chat/completions", stream_body("demo", 3));
  ASSERT_EQ(r.status, 200) << r.body;
  EXPECT_EQ(r.body.find("tokenbus-timing"), std::string::npos) << r.body;
  for (const std::string& block : sse_blocks(r.body)) EXPECT_TRUE(block.starts_with("data: ")) << block;
  // the hops are measured all the same
  EXPECT_EQ(metric(client.get("/metrics").body, hop_series("count", "engine")), 1);
}

TEST_F(ObservabilityTest, AReplicaWithoutStampsGivesOnlyTheProxysHop) {
  Client client(port_);
  client.set_header("X-Tokenbus-Timing", "1");
  const Reply r = client.post("/v1/chat/completions", stream_body("demo", 2));
  ASSERT_EQ(r.status, 200) << r.body;
  const std::vector<std::string> blocks = sse_blocks(r.body);
  ASSERT_GE(blocks.size(), 2u);
  ASSERT_TRUE(blocks[1].starts_with(kTimingPrefix)) << r.body;
  const json timing = json::parse(blocks[1].substr(kTimingPrefix.size()));
  EXPECT_EQ(timing["replica_received_ns"], 0);
  EXPECT_EQ(timing["ring_read_ns"], 0);
  const std::string text = client.get("/metrics").body;
  EXPECT_EQ(metric(text, hop_series("count", "queue_and_route")), 1) << text;
  for (std::size_t h = 1; h < kHopNames.size(); ++h) EXPECT_EQ(metric(text, hop_series("count", kHopNames[h])), 0);
  EXPECT_EQ(metric(text, "tokenbus_proxy_ttft_seconds_count{deployment=\"demo\"}"), 1);
}

TEST_F(ObservabilityTest, PlainTextAndJsonCarryTheStampsInATrailerAndAHeader) {
  replica_.stamp_first_token(true);
  Client client(port_);
  client.set_header("X-Tokenbus-Timing", "1");
  const Reply plain = client.send(http::verb::post, "/v1/chat/demo?max_tokens=2", "hi", "text/plain");
  ASSERT_EQ(plain.status, 200) << plain.body;
  EXPECT_EQ(plain.body, "tok0 tok1 ");
  EXPECT_EQ(plain.headers["Trailer"], "X-Tokenbus-Timing");
  const json trailer = json::parse(std::string(plain.headers["X-Tokenbus-Timing"]));
  EXPECT_EQ(trailer.size(), kStampNames.size()) << trailer;
  EXPECT_GT(trailer["proxy_sent_ns"].get<std::uint64_t>(), 0u);

  const Reply whole = client.post("/v1/completions", R"({"model": "demo", "prompt": "hi", "max_tokens": 2})");
  ASSERT_EQ(whole.status, 200) << whole.body;
  const json header = json::parse(std::string(whole.headers["X-Tokenbus-Timing"]));
  EXPECT_EQ(header.size(), kStampNames.size()) << header;
  EXPECT_GE(header["proxy_sent_ns"].get<std::uint64_t>(), header["ring_read_ns"].get<std::uint64_t>());
}

TEST_F(ObservabilityTest, InterTokenGapsAreBetweenWrittenChunks) {
  Client client(port_);
  ASSERT_EQ(client.post("/v1/chat/completions", stream_body("demo", 5)).status, 200);
  ASSERT_EQ(client.send(http::verb::post, "/v1/chat/demo?max_tokens=3", "hi", "text/plain").status, 200);
  // a JSON body is written once: no gap to measure
  ASSERT_EQ(client.post("/v1/completions", R"({"model": "demo", "prompt": "hi", "max_tokens": 4})").status, 200);
  const std::string text = client.get("/metrics").body;
  EXPECT_EQ(metric(text, "tokenbus_proxy_inter_token_seconds_count{deployment=\"demo\"}"), 4 + 2) << text;
  EXPECT_EQ(metric(text, "tokenbus_proxy_tokens_total{deployment=\"demo\"}"), 5 + 3 + 4);
  const std::string labels = "{address=\"" + replica_.address() + "\",deployment=\"demo\",replica=\"demo-r1\"}";
  EXPECT_EQ(metric(text, "tokenbus_proxy_replica_tokens_total" + labels), 5 + 3 + 4);
  EXPECT_EQ(metric(text, "tokenbus_proxy_queue_wait_seconds_count{deployment=\"demo\"}"), 3);
  EXPECT_EQ(metric(text, "tokenbus_proxy_queue_wait_seconds_sum{deployment=\"demo\"}"), 0);  // nothing waited
  EXPECT_EQ(metric(text, "tokenbus_proxy_request_duration_seconds_count{deployment=\"demo\"}"), 3);
}

TEST_F(ObservabilityTest, DeploymentLabelsAreOnlyThoseOfTheSnapshot) {
  Client client(port_);
  ASSERT_EQ(client.post("/v1/chat/completions", stream_body("demo", 1)).status, 200);
  EXPECT_EQ(client.post("/v1/chat/completions", stream_body("made-up", 1)).status, 404);
  EXPECT_EQ(client.send(http::verb::post, "/v1/chat/another-made-up", "hi", "text/plain").status, 404);
  const std::string text = client.get("/metrics").body;
  const auto requests = [&](std::string_view deployment, std::string_view endpoint, int status) {
    return metric(text, "tokenbus_proxy_requests_total{deployment=\"" + std::string(deployment) + "\",endpoint=\"" +
                            std::string(endpoint) + "\",status=\"" + std::to_string(status) + "\"}");
  };
  EXPECT_EQ(requests("demo", "chat_completions", 200), 1) << text;
  EXPECT_EQ(requests("", "chat_completions", 404), 1);
  EXPECT_EQ(requests("", "chat_plain", 404), 1);
  EXPECT_EQ(text.find("made-up"), std::string::npos) << text;
  EXPECT_EQ(metric(text, "tokenbus_proxy_rejections_total{deployment=\"\",reason=\"unknown_model\"}"), 2);
  EXPECT_EQ(metric(text, "tokenbus_proxy_queue_wait_seconds_count{deployment=\"\"}"), 0);  // no queue was reached
}

TEST(HopMetricsTest, ANegativeHopIsObservedAsZeroAndCountedAsSkew) {
  Router router;
  Metrics metrics;
  // The replica's node is 50 ns behind the proxy's: it received the call "before" it was routed.
  metrics.deployment("demo").observe_first_token({1000, 1100, 1050, 1060, 1500, 1510, 1600});
  const std::string text = metrics.render(router);
  EXPECT_NEAR(metric(text, "tokenbus_proxy_ttft_seconds_sum{deployment=\"demo\"}"), 600e-9, 1e-15) << text;
  EXPECT_EQ(metric(text, hop_series("sum", "proxy_to_replica")), 0);
  EXPECT_EQ(metric(text, hop_series("count", "proxy_to_replica")), 1);
  EXPECT_EQ(metric(text, "tokenbus_proxy_hop_clock_skew_total{hop=\"proxy_to_replica\"}"), 1);
  EXPECT_EQ(metric(text, "tokenbus_proxy_hop_clock_skew_total{hop=\"engine\"}"), 0);
  EXPECT_NEAR(metric(text, hop_series("sum", "engine")), 440e-9, 1e-15);
}

TEST_F(ObservabilityTest, EveryRefusalIsCountedByReason) {
  Client client(port_);
  EXPECT_EQ(client.get("/v1/chat/completions").status, 405);
  EXPECT_EQ(client.post("/v1/chat/completions", "{not json").status, 400);
  EXPECT_EQ(client.post("/v1/chat/completions", stream_body("drained", 1)).status, 503);
  EXPECT_EQ(client.get("/nowhere").status, 404);
  EXPECT_EQ(client.send(http::verb::post, "/v1/chat/demo?max_tokens=x", "hi", "text/plain").status, 400);
  EXPECT_EQ(Client(port_).post("/v1/completions", std::string(2 * 1024 * 1024, 'a')).status, 413);
  const std::string text = client.get("/metrics").body;
  const auto rejected = [&](std::string_view deployment, std::string_view reason) {
    return metric(text, "tokenbus_proxy_rejections_total{deployment=\"" + std::string(deployment) + "\",reason=\"" +
                            std::string(reason) + "\"}");
  };
  EXPECT_EQ(rejected("", "method_not_allowed"), 1) << text;
  EXPECT_EQ(rejected("", "bad_request"), 1);
  EXPECT_EQ(rejected("drained", "no_replica"), 1);
  EXPECT_EQ(rejected("", "not_found"), 1);
  EXPECT_EQ(rejected("demo", "bad_request"), 1);
  EXPECT_EQ(rejected("", "too_large"), 1);
}

TEST(ProxyReportTest, EncodesAsTheGoldenVector) {
  const std::string path = std::string(TOKENBUS_GOLDEN_DIR) + "/proxy_report.msgpack";
  std::ifstream in(path, std::ios::binary);
  if (!in) GTEST_SKIP() << path << " is missing (schemas/golden/make_golden.py writes it)";
  const std::string golden(std::istreambuf_iterator<char>(in), {});
  EXPECT_EQ(encode_proxy_report({"proxy-a", "127.0.0.1:8000", 42, 7}), golden);
}

TEST(ProxyReportTest, TheSubscriberReportsAtStartAndEverySecondWithTheSnapshotHeld) {
  testing::FakeHead head;
  Router router;
  Metrics metrics;
  SnapshotSubscriber subscriber(router, head.pub_endpoint(), head.router_endpoint(), 3s, &metrics, std::nullopt,
                                ProxyIdentity{"proxy-a", "127.0.0.1:8000"});
  subscriber.start();
  std::ifstream in(std::string(TOKENBUS_GOLDEN_DIR) + "/snapshot.msgpack", std::ios::binary);
  const std::string snapshot(std::istreambuf_iterator<char>(in), {});
  std::string error;
  const std::optional<Snapshot> decoded = decode_snapshot(snapshot, error);
  ASSERT_TRUE(decoded) << error;
  bool first_report = false;
  bool later_report = false;
  for (auto end = std::chrono::steady_clock::now() + 20s; std::chrono::steady_clock::now() < end && !later_report;) {
    const std::optional<testing::FakeHead::Request> message = head.receive(1s);
    if (!message) continue;
    if (message->kind == kKindSnapshotRequest) {
      head.reply(message->identity, snapshot);
    } else if (message->kind == kKindProxyReport) {
      if (message->payload == encode_proxy_report({"proxy-a", "127.0.0.1:8000", 0, 0})) first_report = true;
      later_report = message->payload == encode_proxy_report({"proxy-a", "127.0.0.1:8000", decoded->version, 0});
    }
  }
  EXPECT_TRUE(first_report) << "no report before the first snapshot";
  EXPECT_TRUE(later_report) << "no report with the snapshot's version " << decoded->version;
  subscriber.stop();
}

TEST(LogThrottleTest, OneLinePerIntervalSayingHowManyWereHeldBack) {
  LogThrottle throttle(1s);
  std::uint64_t held_back = 99;
  EXPECT_TRUE(throttle.allow(0, held_back));
  EXPECT_EQ(held_back, 0u);
  for (int i = 1; i <= 3; ++i) EXPECT_FALSE(throttle.allow(i * 200'000'000LL, held_back));
  EXPECT_TRUE(throttle.allow(1'000'000'000LL, held_back));
  EXPECT_EQ(held_back, 3u);
  EXPECT_FALSE(throttle.allow(1'500'000'000LL, held_back));
  EXPECT_TRUE(throttle.allow(5'000'000'000LL, held_back));
  EXPECT_EQ(held_back, 1u);
}

}  // namespace
}  // namespace tokenbus::proxy
