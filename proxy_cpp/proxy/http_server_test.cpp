// The proxy end to end, in-process: the real HTTP server on port 0, a real gRPC replica (FakeReplica),
// a snapshot injected into the router, and real sockets as clients.
#include <utility>  // before Asio: Boost 1.74's awaitable.hpp needs it under g++ 12

#include <gtest/gtest.h>

#include <boost/asio/connect.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/read.hpp>
#include <boost/asio/write.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/core/tcp_stream.hpp>
#include <boost/beast/http/read.hpp>
#include <boost/beast/http/string_body.hpp>
#include <boost/beast/http/write.hpp>
#include <nlohmann/json.hpp>

#include "proxy/fake_replica.hpp"
#include "proxy/test_client.hpp"
#include "proxy/http_server.hpp"
#include "proxy/metrics.hpp"
#include "proxy/router.hpp"

namespace tokenbus::proxy {
namespace {

namespace net = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = net::ip::tcp;
using nlohmann::json;
using testing::FakeReplica;
using testing::Client;
using testing::Reply;
using testing::sse_data;

std::string expected_tokens(int n) {
  std::string s;
  for (int i = 0; i < n; ++i) s += "tok" + std::to_string(i) + " ";
  return s;
}

class ProxyTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ProxyLimits limits;
    limits.queue_timeout = std::chrono::seconds(1);  // the 429 and no-snapshot answers come after this wait
    server_ = std::make_unique<HttpServer>(router_, metrics_, 2, limits);
    std::string error;
    port_ = server_->listen("127.0.0.1", 0, error);
    ASSERT_NE(port_, 0) << error;
    server_->start();
  }

  void TearDown() override { EXPECT_TRUE(server_->stop(std::chrono::seconds(5))); }

  // demo: the fake replica; tiny: the same replica under another address, at most one request at a time;
  // drained: only a DRAINING replica.
  void inject_snapshot() {
    auto s = std::make_shared<Snapshot>();
    s->epoch = 1;
    s->version = (1ull << 32) | 1;
    auto replica = [](std::string id, std::string addr, std::int64_t max, ReplicaState state) {
      return SnapshotReplica{std::move(id), "node-a", std::move(addr), state, max, {}, true};
    };
    s->deployments.push_back({.name = "demo", .replicas = {replica("demo-r1", replica_.address(), 64, ReplicaState::kReady)}});
    s->deployments.push_back(
        {.name = "tiny", .replicas = {replica("tiny-r1", "localhost:" + std::to_string(replica_.port()), 1, ReplicaState::kReady)}});
    s->deployments.push_back({.name = "drained", .replicas = {replica("drained-r1", replica_.address(), 64, ReplicaState::kDraining)}});
    router_.apply(s);
    router_.mark_received();
  }

  static std::string chat_body(const std::string& content, const std::string& extra = "") {
    return R"({"model": "demo", "messages": [{"role": "user", "content": ")" + content + "\"}]" + extra + "}";
  }

  FakeReplica replica_;
  Router router_;
  Metrics metrics_;
  std::unique_ptr<HttpServer> server_;
  std::uint16_t port_ = 0;
};

TEST_F(ProxyTest, HealthAndReadiness) {
  Client client(port_);
  EXPECT_EQ(client.get("/healthz").status, 200);
  const Reply not_ready = client.get("/readyz");
  EXPECT_EQ(not_ready.status, 503);
  EXPECT_EQ(client.post("/v1/chat/demo", "hi").status, 503);  // no snapshot yet
  inject_snapshot();
  EXPECT_EQ(client.get("/readyz").status, 200);
  EXPECT_EQ(client.get("/healthz").status, 200);
}

TEST_F(ProxyTest, PlainChatStreamsTheTokensInOrder) {
  inject_snapshot();
  Client client(port_);
  const Reply r = client.send(http::verb::post, "/v1/chat/demo?max_tokens=5", "What is machine learning?",
                              "text/plain");
  EXPECT_EQ(r.status, 200);
  EXPECT_EQ(r.headers[http::field::transfer_encoding], "chunked");
  EXPECT_EQ(r.headers[http::field::content_type], "text/plain; charset=utf-8");
  EXPECT_EQ(r.body, expected_tokens(5));
  const v1::GenerateRequest seen = replica_.last_request();
  EXPECT_EQ(seen.prompt(), "What is machine learning?");
  EXPECT_EQ(seen.params().max_tokens(), 5u);
  EXPECT_FALSE(seen.request_id().empty());
  // the same connection carries the next request; the default max_tokens is 64
  const Reply again = client.send(http::verb::post, "/v1/chat/demo", "again", "text/plain");
  EXPECT_EQ(again.status, 200);
  EXPECT_EQ(again.body, expected_tokens(64));
}

// A client that does not read a long stream: the proxy's socket buffer and its own fill, the rest of its chunks
// wait for room (the write path's asynchronous side), and meanwhile streams of other clients, on each I/O thread,
// complete. Once it reads, it gets the whole stream, in order.
TEST_F(ProxyTest, AClientThatDoesNotReadHoldsOnlyItsOwnStream) {
  inject_snapshot();
  constexpr std::size_t kChunks = 200;  // 12.5 MiB: more than both sockets' buffers hold
  net::io_context io;
  tcp::socket slow(io);
  slow.open(tcp::v4());
  slow.set_option(net::socket_base::receive_buffer_size(4096));
  slow.connect(tcp::endpoint(net::ip::make_address("127.0.0.1"), port_));
  const std::string request = "POST /v1/chat/demo?max_tokens=" + std::to_string(kChunks) +
                              " HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/plain\r\n"
                              "Content-Length: 3\r\n\r\nbig";
  net::write(slow, net::buffer(request));

  for (int i = 0; i < 2; ++i) {  // connections go to the I/O threads in turn: one of these shares the slow one's
    Client fast(port_);
    const Reply r = fast.send(http::verb::post, "/v1/chat/demo?max_tokens=3", "hi", "text/plain");
    EXPECT_EQ(r.status, 200) << r.error;
    EXPECT_EQ(r.body, expected_tokens(3));
  }

  beast::flat_buffer buffer;
  http::response_parser<http::string_body> parser;
  parser.body_limit(kChunks * testing::kFakeBigChunkBytes + 1);
  boost::system::error_code ec;
  http::read(slow, buffer, parser, ec);
  ASSERT_FALSE(ec) << ec.message();
  const std::string& body = parser.get().body();
  ASSERT_EQ(body.size(), kChunks * testing::kFakeBigChunkBytes);
  for (std::size_t i = 0; i < kChunks; ++i) {
    const std::string_view chunk = std::string_view(body).substr(i * testing::kFakeBigChunkBytes,
                                                                 testing::kFakeBigChunkBytes);
    ASSERT_EQ(chunk.find_first_not_of(static_cast<char>('a' + i % 26)), std::string_view::npos) << "chunk " << i;
  }
}

TEST_F(ProxyTest, ChatCompletionStreamsSse) {
  inject_snapshot();
  Client client(port_);
  const Reply r = client.post("/v1/chat/completions",
                              chat_body("hello", R"(, "max_tokens": 4, "temperature": 0.2, "stop": ["x"], "seed": 9,
                                                     "ignore_eos": true, "stream": true,
                                                     "stream_options": {"include_usage": true})"));
  ASSERT_EQ(r.status, 200) << r.body;
  EXPECT_EQ(r.headers[http::field::content_type], "text/event-stream");
  const std::vector<std::string> data = sse_data(r.body);
  ASSERT_GE(data.size(), 3u) << r.body;
  EXPECT_EQ(data.back(), "[DONE]");
  std::string content;
  std::string finish_reason;
  for (std::size_t i = 0; i + 2 < data.size(); ++i) {
    const json chunk = json::parse(data[i]);
    EXPECT_EQ(chunk["object"], "chat.completion.chunk");
    EXPECT_EQ(chunk["model"], "demo");
    EXPECT_EQ(chunk["choices"][0]["index"], 0);
    if (i == 0) {
      EXPECT_EQ(chunk["choices"][0]["delta"]["role"], "assistant");
    }
    content += chunk["choices"][0]["delta"]["content"].get<std::string>();
    if (!chunk["choices"][0]["finish_reason"].is_null()) finish_reason = chunk["choices"][0]["finish_reason"];
  }
  EXPECT_EQ(content, expected_tokens(4));
  EXPECT_EQ(finish_reason, "length");
  const json usage = json::parse(data[data.size() - 2]);
  EXPECT_TRUE(usage["choices"].empty());
  EXPECT_EQ(usage["usage"], json({{"prompt_tokens", 3}, {"completion_tokens", 4}, {"total_tokens", 7}}));

  const v1::GenerateRequest seen = replica_.last_request();
  ASSERT_EQ(seen.messages_size(), 1);
  EXPECT_EQ(seen.messages(0).role(), "user");
  EXPECT_EQ(seen.messages(0).content(), "hello");
  EXPECT_EQ(seen.params().max_tokens(), 4u);
  EXPECT_FLOAT_EQ(seen.params().temperature(), 0.2f);
  EXPECT_FLOAT_EQ(seen.params().top_p(), 1.0f);
  EXPECT_TRUE(seen.params().has_seed());
  EXPECT_EQ(seen.params().seed(), 9u);
  EXPECT_TRUE(seen.params().ignore_eos());
  ASSERT_EQ(seen.params().stop_size(), 1);
}

TEST_F(ProxyTest, CompletionStreamEscapesText) {
  inject_snapshot();
  Client client(port_);
  const Reply r = client.post("/v1/completions", R"({"model": "demo", "prompt": "quote", "stream": true})");
  ASSERT_EQ(r.status, 200) << r.body;
  const std::vector<std::string> data = sse_data(r.body);
  ASSERT_EQ(data.size(), 3u) << r.body;  // the text, the finish, [DONE] (no usage unless asked)
  const json first = json::parse(data[0]);
  EXPECT_EQ(first["object"], "text_completion");
  EXPECT_EQ(first["choices"][0]["text"], testing::kFakeQuoteText);
  EXPECT_EQ(json::parse(data[1])["choices"][0]["finish_reason"], "stop");
  EXPECT_EQ(data[2], "[DONE]");
}

TEST_F(ProxyTest, NonStreamingBodiesCarryTextAndUsage) {
  inject_snapshot();
  Client client(port_);
  const Reply chat = client.post("/v1/chat/completions", chat_body("hello", R"(, "max_tokens": 3)"));
  ASSERT_EQ(chat.status, 200) << chat.body;
  EXPECT_EQ(chat.headers[http::field::content_type], "application/json");
  const json body = json::parse(chat.body);
  EXPECT_EQ(body["object"], "chat.completion");
  EXPECT_EQ(body["model"], "demo");
  EXPECT_EQ(body["choices"][0]["message"]["role"], "assistant");
  EXPECT_EQ(body["choices"][0]["message"]["content"], expected_tokens(3));
  EXPECT_EQ(body["choices"][0]["finish_reason"], "length");
  EXPECT_EQ(body["usage"], json({{"prompt_tokens", 3}, {"completion_tokens", 3}, {"total_tokens", 6}}));

  const Reply text = client.post("/v1/completions", R"({"model": "demo", "prompt": "p", "max_tokens": 2})");
  ASSERT_EQ(text.status, 200) << text.body;
  EXPECT_EQ(json::parse(text.body)["choices"][0]["text"], expected_tokens(2));
}

TEST_F(ProxyTest, BadRequestsGetOpenAiErrors) {
  inject_snapshot();
  Client client(port_);
  const Reply malformed = client.post("/v1/chat/completions", R"({"model": "demo", "messages": [)");
  EXPECT_EQ(malformed.status, 400);
  EXPECT_EQ(json::parse(malformed.body)["error"]["type"], "invalid_request_error");
  const Reply negative = client.post("/v1/chat/completions", chat_body("hi", R"(, "max_tokens": -1)"));
  EXPECT_EQ(negative.status, 400);
  EXPECT_EQ(json::parse(negative.body)["error"]["param"], "max_tokens");
  EXPECT_EQ(client.post("/v1/completions", R"({"model": "demo"})").status, 400);
  EXPECT_EQ(client.send(http::verb::post, "/v1/chat/demo?max_tokens=-3", "hi", "text/plain").status, 400);

  const Reply unknown = client.post("/v1/chat/completions", R"({"model": "nope", "messages": [{"role": "user", "content": "hi"}]})");
  EXPECT_EQ(unknown.status, 404);
  EXPECT_EQ(json::parse(unknown.body)["error"]["code"], 404);
  EXPECT_EQ(client.send(http::verb::post, "/v1/chat/nope", "hi", "text/plain").status, 404);
  EXPECT_EQ(client.get("/no/such/path").status, 404);

  const Reply wrong_method = client.get("/v1/chat/completions");
  EXPECT_EQ(wrong_method.status, 405);
  EXPECT_EQ(wrong_method.headers[http::field::allow], "POST");
  EXPECT_EQ(client.post("/healthz", "").status, 405);

  const Reply drained = client.send(http::verb::post, "/v1/chat/drained", "hi", "text/plain");
  EXPECT_EQ(drained.status, 503);
  EXPECT_EQ(drained.headers[http::field::retry_after], std::to_string(kNoReplicaRetryAfter.count()));
  // the connection survived every error above
  EXPECT_EQ(client.get("/healthz").status, 200);
}

TEST_F(ProxyTest, TooLargeBodyIs413) {
  inject_snapshot();
  Client client(port_);
  const Reply r = client.post("/v1/chat/completions", std::string(2 * 1024 * 1024, ' '));
  EXPECT_EQ(r.status, 413);
  EXPECT_EQ(json::parse(r.body)["error"]["code"], 413);
}

TEST_F(ProxyTest, EngineErrorBeforeAnyTokenBecomesTheStatus) {
  inject_snapshot();
  Client client(port_);
  const Reply r = client.post("/v1/chat/completions", chat_body("error400", R"(, "stream": true)"));
  EXPECT_EQ(r.status, 400);
  EXPECT_EQ(json::parse(r.body)["error"]["message"], "prompt too long");
}

TEST_F(ProxyTest, ReplicaFailureMidStreamEndsTheSseStreamCleanly) {
  inject_snapshot();
  Client client(port_);
  const Reply r = client.post("/v1/chat/completions", chat_body("fail-mid", R"(, "stream": true)"));
  EXPECT_EQ(r.status, 200);
  const std::vector<std::string> data = sse_data(r.body);
  ASSERT_EQ(data.size(), 4u) << r.body;  // one, two, the error, [DONE]
  EXPECT_EQ(json::parse(data[1])["choices"][0]["delta"]["content"], "two ");
  EXPECT_EQ(json::parse(data[2])["error"]["code"], 503);
  EXPECT_EQ(data[3], "[DONE]");
}

TEST_F(ProxyTest, ModelsAndMetrics) {
  inject_snapshot();
  Client client(port_);
  const json models = json::parse(client.get("/v1/models").body);
  EXPECT_EQ(models["object"], "list");
  ASSERT_EQ(models["data"].size(), 3u);
  EXPECT_EQ(models["data"][0]["id"], "demo");
  client.send(http::verb::post, "/v1/chat/demo?max_tokens=2", "hi", "text/plain");
  const Reply metrics = client.get("/metrics");
  EXPECT_EQ(metrics.status, 200);
  EXPECT_NE(metrics.body.find(
                "tokenbus_proxy_requests_total{deployment=\"demo\",endpoint=\"chat_plain\",status=\"200\"} 1"),
            std::string::npos)
      << metrics.body;
  EXPECT_NE(metrics.body.find("tokenbus_proxy_snapshot_version 4294967297"), std::string::npos);
  EXPECT_NE(metrics.body.find("tokenbus_proxy_snapshot_staleness_seconds"), std::string::npos);
  EXPECT_NE(metrics.body.find("tokenbus_proxy_ttft_seconds_count{deployment=\"demo\"} 1"), std::string::npos);
  const std::string demo_r1 = "{address=\"" + replica_.address() + "\",deployment=\"demo\",replica=\"demo-r1\"}";
  EXPECT_NE(metrics.body.find("tokenbus_proxy_replica_routed_total" + demo_r1 + " 1"), std::string::npos)
      << metrics.body;
  EXPECT_NE(metrics.body.find("tokenbus_proxy_replica_in_flight" + demo_r1 + " 0"), std::string::npos);
  EXPECT_NE(metrics.body.find("tokenbus_proxy_replica_routable" + demo_r1 + " 1"), std::string::npos);
}

// Opens a raw connection, starts a plain stream of "hang" on `deployment`, and returns once the first
// chunk has arrived.
std::unique_ptr<tcp::socket> open_hanging_stream(net::io_context& io, std::uint16_t port, const std::string& deployment) {
  auto socket = std::make_unique<tcp::socket>(io);
  socket->connect(tcp::endpoint(net::ip::make_address("127.0.0.1"), port));
  const std::string request = "POST /v1/chat/" + deployment +
                              " HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\nContent-Length: 4\r\n\r\nhang";
  net::write(*socket, net::buffer(request));
  std::string received;
  char buf[4096];
  while (received.find("first ") == std::string::npos) {
    boost::system::error_code ec;
    const std::size_t n = socket->read_some(net::buffer(buf), ec);
    if (ec) break;
    received.append(buf, n);
  }
  EXPECT_NE(received.find("first "), std::string::npos) << received;
  return socket;
}

TEST_F(ProxyTest, ClientDisconnectCancelsTheReplicaCall) {
  inject_snapshot();
  net::io_context io;
  std::unique_ptr<tcp::socket> socket = open_hanging_stream(io, port_, "demo");
  socket->close();
  EXPECT_TRUE(replica_.wait_for_cancellations(1, std::chrono::seconds(10)));
}

TEST_F(ProxyTest, OverloadAnswers429WithRetryAfter) {
  inject_snapshot();
  net::io_context io;
  std::unique_ptr<tcp::socket> busy = open_hanging_stream(io, port_, "tiny");  // tiny's only slot
  Client client(port_);
  const Reply r = client.send(http::verb::post, "/v1/chat/tiny", "hi", "text/plain");
  EXPECT_EQ(r.status, 429);
  EXPECT_EQ(r.headers[http::field::retry_after], "1");
  busy->close();
  ASSERT_TRUE(replica_.wait_for_cancellations(1, std::chrono::seconds(10)));
}

TEST_F(ProxyTest, StopCancelsOpenStreams) {
  inject_snapshot();
  net::io_context io;
  std::unique_ptr<tcp::socket> socket = open_hanging_stream(io, port_, "demo");
  EXPECT_TRUE(server_->stop(std::chrono::seconds(5)));
  EXPECT_TRUE(replica_.wait_for_cancellations(1, std::chrono::seconds(10)));
}

}  // namespace
}  // namespace tokenbus::proxy
