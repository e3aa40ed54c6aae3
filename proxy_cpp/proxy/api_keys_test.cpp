// API keys: the key file's parser and its limits, the constant-time match, and the proxy in-process with keys
// required (401 in OpenAI's shape without or with a wrong key, 200 with one, /healthz and /readyz open,
// /metrics behind a key with --metrics-auth, a reload taking effect and a bad one keeping the keys held).
#include <utility>  // before Asio: Boost 1.74's awaitable.hpp needs it under g++ 12

#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <fstream>
#include <thread>
#include <nlohmann/json.hpp>

#include "proxy/api_keys.hpp"
#include "proxy/fake_replica.hpp"
#include "proxy/http_server.hpp"
#include "proxy/metrics.hpp"
#include "proxy/router.hpp"
#include "proxy/test_client.hpp"

namespace tokenbus::proxy {
namespace {

namespace http = boost::beast::http;
using nlohmann::json;
using testing::Client;
using testing::FakeReplica;
using testing::Reply;

constexpr const char* kAlice = "sk-alice-0123456789abcdef";
constexpr const char* kBob = "sk-bob-0123456789abcdef";
constexpr const char* kCarol = "sk-carol-0123456789abcdef";

std::vector<ApiKeyEntry> parse_ok(const std::string& text) {
  std::vector<ApiKeyEntry> out;
  std::string error;
  EXPECT_TRUE(parse_api_keys(text, out, error)) << error;
  return out;
}

std::string parse_error(const std::string& text) {
  std::vector<ApiKeyEntry> out;
  std::string error;
  EXPECT_FALSE(parse_api_keys(text, out, error)) << text;
  EXPECT_TRUE(out.empty() || !error.empty());
  return error;
}

TEST(ApiKeyFile, KeysNamesCommentsAndBlankLines) {
  const auto keys = parse_ok(std::string("# the team's keys\n\n") + kAlice + " alice\r\n  " + kBob +
                             "\t# no name: named by its line\n" + kCarol + " ops.team_1-x # trailing comment");
  ASSERT_EQ(keys.size(), 3u);
  EXPECT_EQ(keys[0].key, kAlice);
  EXPECT_EQ(keys[0].name, "alice");
  EXPECT_EQ(keys[1].key, kBob);
  EXPECT_EQ(keys[1].name, "key-4");
  EXPECT_EQ(keys[2].key, kCarol);
  EXPECT_EQ(keys[2].name, "ops.team_1-x");
  // two keys may share a name (a key being rotated)
  EXPECT_EQ(parse_ok(std::string(kAlice) + " alice\n" + kBob + " alice\n").size(), 2u);
}

TEST(ApiKeyFile, BadLinesAreNamedAndKeysNeverQuoted) {
  EXPECT_EQ(parse_error(std::string("# x\n") + kAlice + " alice extra\n"), "line 2: want KEY [NAME], found 3 words");
  EXPECT_EQ(parse_error("short-key\n"), "line 1: the key is 9 bytes long, not 16 to 128");
  EXPECT_EQ(parse_error(std::string(129, 'k')), "line 1: the key is 129 bytes long, not 16 to 128");
  EXPECT_EQ(parse_error(std::string("sk-\x01-0123456789abcdef name")), "line 1: the key has a byte that is not visible ASCII");
  EXPECT_EQ(parse_error(std::string(kAlice) + " al/ice"),
            "line 1: the name may hold only letters, digits, '.', '_' and '-'");
  EXPECT_EQ(parse_error(std::string(kAlice) + " " + std::string(65, 'n')), "line 1: the name is longer than 64 bytes");
  EXPECT_EQ(parse_error(std::string(kAlice) + " a\n\n" + kAlice + " b\n"), "line 3: the same key as line 1");
  EXPECT_EQ(parse_error("# nothing but comments\n\n"), "no key in the file");
  EXPECT_EQ(parse_error(""), "no key in the file");
  const std::string error = parse_error(std::string(kAlice) + " \xff");
  EXPECT_EQ(error.find(kAlice), std::string::npos) << error;
}

TEST(ApiKeyFile, Limits) {
  // a line over the limit, even a comment
  EXPECT_EQ(parse_error("#" + std::string(kMaxApiKeyLineBytes, 'x') + "\n"), "line 1: longer than 1024 bytes");
  EXPECT_EQ(parse_ok("#" + std::string(kMaxApiKeyLineBytes - 1, 'x') + "\n" + kAlice).size(), 1u);
  // the key count
  std::string many;
  for (std::size_t i = 0; i <= kMaxApiKeys; ++i) many += "sk-" + std::to_string(1000000000000000 + i) + "\n";
  EXPECT_EQ(parse_error(many), "line 1025: more than 1024 keys");
  many.resize(many.rfind('\n', many.size() - 2) + 1);
  EXPECT_EQ(parse_ok(many).size(), kMaxApiKeys);
}

class TempFile {
 public:
  TempFile() {
    char name[] = "/tmp/tokenbus-api-keys-XXXXXX";
    const int fd = mkstemp(name);
    EXPECT_GE(fd, 0);
    close(fd);
    path_ = name;
  }
  ~TempFile() { std::remove(path_.c_str()); }
  const std::string& path() const { return path_; }
  void write(const std::string& text) const { std::ofstream(path_, std::ios::binary | std::ios::trunc) << text; }

 private:
  std::string path_;
};

TEST(ApiKeys, MatchLoadAndReload) {
  ApiKeys keys;
  EXPECT_EQ(keys.match(kAlice), nullptr);  // nothing held yet
  TempFile file;
  file.write(std::string(kAlice) + " alice\n" + kBob + "\n");
  std::string error;
  ASSERT_TRUE(keys.load(file.path(), error)) << error;
  EXPECT_EQ(keys.size(), 2u);
  ASSERT_NE(keys.match(kAlice), nullptr);
  EXPECT_EQ(*keys.match(kAlice), "alice");
  EXPECT_EQ(*keys.match(kBob), "key-2");
  EXPECT_EQ(keys.match(kCarol), nullptr);
  EXPECT_EQ(keys.match(std::string(kAlice).substr(0, 20)), nullptr);  // a prefix is not the key
  EXPECT_EQ(keys.match(std::string(kAlice) + "x"), nullptr);
  EXPECT_EQ(keys.match(""), nullptr);
  EXPECT_EQ(keys.match(std::string(4096, 'k')), nullptr);

  // a name held across a reload stays valid
  const std::shared_ptr<const std::string> held = keys.match(kAlice);
  file.write(std::string(kCarol) + " carol\n");
  ASSERT_TRUE(keys.load(file.path(), error)) << error;
  EXPECT_EQ(*held, "alice");
  EXPECT_EQ(keys.match(kAlice), nullptr);
  EXPECT_EQ(*keys.match(kCarol), "carol");

  // a bad file: the error names file and line, the keys held stay
  file.write(std::string(kAlice) + " alice\nsk-short\n");
  EXPECT_FALSE(keys.load(file.path(), error));
  EXPECT_EQ(error, file.path() + ": line 2: the key is 8 bytes long, not 16 to 128");
  EXPECT_EQ(*keys.match(kCarol), "carol");
  EXPECT_FALSE(keys.load(file.path() + ".missing", error));
  EXPECT_EQ(error, file.path() + ".missing: No such file or directory");
  file.write(std::string(kMaxApiKeyFileBytes + 1, '#'));
  EXPECT_FALSE(keys.load(file.path(), error));
  EXPECT_NE(error.find("over the limit of 1048576"), std::string::npos) << error;
  EXPECT_FALSE(keys.load("/dev/null", error));
  EXPECT_EQ(error, "/dev/null: not a regular file");
}

TEST(ApiKeys, ReloadsWhileOtherThreadsMatch) {
  // What the proxy does: I/O threads matching while SIGHUP swaps the set (run under TSan in CI).
  ApiKeys keys;
  keys.set({{kAlice, "alice"}});
  std::atomic<bool> done{false};
  std::atomic<int> matched{0};
  std::vector<std::thread> readers;
  for (int t = 0; t < 2; ++t) {
    readers.emplace_back([&] {
      while (!done) {
        const std::shared_ptr<const std::string> name = keys.match(kAlice);
        if (name && (*name == "alice" || *name == "alice-2")) matched.fetch_add(1);
      }
    });
  }
  // at least 2000 swaps, and on until the readers have matched a few times (they may start late)
  for (int i = 0; i < 2000 || matched.load() < 100; ++i) {
    keys.set({{kAlice, i % 2 ? "alice" : "alice-2"}, {kBob, "bob"}});
  }
  done = true;
  for (std::thread& t : readers) t.join();
  EXPECT_EQ(*keys.match(kBob), "bob");
}

TEST(ApiKeys, BearerToken) {
  EXPECT_EQ(bearer_token("Bearer abc"), "abc");
  EXPECT_EQ(bearer_token("bearer   abc  "), "abc");
  EXPECT_EQ(bearer_token("BEARER\tabc"), "abc");
  EXPECT_EQ(bearer_token("Basic abc"), "");
  EXPECT_EQ(bearer_token("Bearerabc"), "");
  EXPECT_EQ(bearer_token("Bearer"), "");
  EXPECT_EQ(bearer_token(""), "");
}

// The proxy in-process with keys required (and /metrics behind one): real HTTP server, real gRPC replica.
class ApiKeyProxyTest : public ::testing::Test {
 protected:
  void SetUp() override {
    file_.write(std::string(kAlice) + " alice\n");
    std::string error;
    ASSERT_TRUE(keys_.load(file_.path(), error)) << error;
    server_ = std::make_unique<HttpServer>(router_, metrics_, 2, ProxyLimits{}, AccessPolicy{&keys_, true});
    port_ = server_->listen("127.0.0.1", 0, error);
    ASSERT_NE(port_, 0) << error;
    server_->start();
    auto s = std::make_shared<Snapshot>();
    s->epoch = 1;
    s->version = (1ull << 32) | 1;
    s->deployments.push_back(
        {.name = "demo",
         .replicas = {SnapshotReplica{"demo-r1", "node-a", replica_.address(), ReplicaState::kReady, 64, {}, true}}});
    router_.apply(s);
    router_.mark_received();
  }

  void TearDown() override { EXPECT_TRUE(server_->stop(std::chrono::seconds(5))); }

  static void expect_401(const Reply& r) {
    EXPECT_EQ(r.status, 401) << r.body;
    EXPECT_EQ(r.headers[http::field::www_authenticate], "Bearer");
    const json error = json::parse(r.body)["error"];
    EXPECT_EQ(error["type"], "invalid_request_error");
    EXPECT_EQ(error["code"], "invalid_api_key");
    EXPECT_TRUE(error["message"].is_string());
  }

  static constexpr const char* kChat = R"({"model": "demo", "messages": [{"role": "user", "content": "hi"}],
                                          "max_tokens": 2})";

  TempFile file_;
  ApiKeys keys_;
  FakeReplica replica_;
  Router router_;
  Metrics metrics_;
  std::unique_ptr<HttpServer> server_;
  std::uint16_t port_ = 0;
};

TEST_F(ApiKeyProxyTest, EveryV1RouteNeedsAKey) {
  Client client(port_);
  expect_401(client.post("/v1/chat/completions", kChat));
  expect_401(client.post("/v1/completions", R"({"model": "demo", "prompt": "hi"})"));
  expect_401(client.get("/v1/models"));
  expect_401(client.send(http::verb::post, "/v1/chat/demo", "hi", "text/plain"));
  expect_401(client.get("/v1/no-such-route"));  // routes are not discovered without a key
  expect_401(client.get("/metrics"));           // --metrics-auth
  EXPECT_EQ(client.get("/healthz").status, 200);
  EXPECT_EQ(client.get("/readyz").status, 200);
  EXPECT_EQ(replica_.calls(), 0);

  client.set_authorization(std::string("Bearer ") + kBob);  // not held
  expect_401(client.post("/v1/chat/completions", kChat));
  client.set_authorization(std::string("Basic ") + kAlice);  // not a bearer token
  expect_401(client.post("/v1/chat/completions", kChat));

  client.set_authorization(std::string("Bearer ") + kAlice);
  const Reply ok = client.post("/v1/chat/completions", kChat);
  EXPECT_EQ(ok.status, 200) << ok.body;
  EXPECT_EQ(json::parse(ok.body)["choices"][0]["message"]["content"], "tok0 tok1 ");
  EXPECT_EQ(client.get("/v1/models").status, 200);
  EXPECT_EQ(replica_.calls(), 1);
  const Reply metrics = client.get("/metrics");
  EXPECT_EQ(metrics.status, 200);
  // the chat, the models list and this scrape
  EXPECT_NE(metrics.body.find("tokenbus_proxy_requests_by_key_total{key=\"alice\"} 3"), std::string::npos)
      << metrics.body;
  EXPECT_NE(metrics.body.find(
                "tokenbus_proxy_requests_total{deployment=\"\",endpoint=\"chat_completions\",status=\"401\"} 3"),
            std::string::npos)
      << metrics.body;
  EXPECT_NE(metrics.body.find("tokenbus_proxy_rejections_total{deployment=\"\",reason=\"unauthorized\"} 8"),
            std::string::npos)
      << metrics.body;
  EXPECT_EQ(metrics.body.find(kAlice), std::string::npos);
}

TEST_F(ApiKeyProxyTest, AReloadTakesEffectAndABadOneKeepsTheKeys) {
  Client client(port_);
  client.set_authorization(std::string("Bearer ") + kBob);
  expect_401(client.get("/v1/models"));
  file_.write(std::string(kAlice) + " alice\n" + kBob + " bob\n");
  std::string error;
  ASSERT_TRUE(keys_.load(file_.path(), error)) << error;
  EXPECT_EQ(client.get("/v1/models").status, 200);

  file_.write(std::string(kBob) + " bob extra\n");
  EXPECT_FALSE(keys_.load(file_.path(), error));
  EXPECT_EQ(client.get("/v1/models").status, 200);  // the keys held before the bad file
  client.set_authorization(std::string("Bearer ") + kAlice);
  EXPECT_EQ(client.get("/v1/models").status, 200);
}

TEST(ApiKeyProxyOpen, WithoutKeysEverythingIsOpen) {
  Router router;
  Metrics metrics;
  HttpServer server(router, metrics, 1);
  std::string error;
  const std::uint16_t port = server.listen("127.0.0.1", 0, error);
  ASSERT_NE(port, 0) << error;
  server.start();
  Client client(port);
  EXPECT_EQ(client.get("/v1/models").status, 200);
  EXPECT_EQ(client.get("/metrics").status, 200);
  EXPECT_TRUE(server.stop(std::chrono::seconds(5)));
}

}  // namespace
}  // namespace tokenbus::proxy
