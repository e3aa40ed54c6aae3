// CURVE: the certificate reader (pyzmq's format, its errors and limits), and the snapshot subscriber getting a
// snapshot from a CURVE head with the right server key and nothing with a wrong one.
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <zmq.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <thread>

#include "proxy/curve_keys.hpp"
#include "proxy/fake_head.hpp"
#include "proxy/router.hpp"
#include "proxy/snapshot_subscriber.hpp"

namespace tokenbus::proxy {
namespace {

using namespace std::chrono_literals;
namespace fs = std::filesystem;

struct KeyPair {
  std::string public_key;
  std::string secret_key;
};

KeyPair make_pair() {
  char pub[41] = {};
  char sec[41] = {};
  EXPECT_EQ(zmq_curve_keypair(pub, sec), 0);
  return {pub, sec};
}

// A certificate as pyzmq's zmq.auth.create_certificates writes it.
std::string cert_text(const KeyPair& pair, bool secret) {
  std::string text =
      "#   ****  Generated on 2026-11-30 08:29:49.697395 by pyzmq  ****\n"
      "#   ZeroMQ CURVE **Secret** Certificate\n"
      "#   DO NOT PROVIDE THIS FILE TO OTHER USERS nor change its permissions.\n\n"
      "metadata\ncurve\n    public-key = \"" + pair.public_key + "\"\n";
  if (secret) text += "    secret-key = \"" + pair.secret_key + "\"\n";
  return text;
}

std::string parse_error(const std::string& text) {
  CurveCert cert;
  std::string error;
  EXPECT_FALSE(parse_curve_cert(text, cert, error)) << text;
  return error;
}

TEST(CurveCert, ReadsPyzmqCertificates) {
  const KeyPair pair = make_pair();
  CurveCert cert;
  std::string error;
  ASSERT_TRUE(parse_curve_cert(cert_text(pair, true), cert, error)) << error;
  EXPECT_EQ(cert.public_key, pair.public_key);
  EXPECT_EQ(cert.secret_key, pair.secret_key);
  ASSERT_TRUE(parse_curve_cert(cert_text(pair, false), cert, error)) << error;
  EXPECT_EQ(cert.public_key, pair.public_key);
  EXPECT_TRUE(cert.secret_key.empty());
  // unquoted and single-quoted values, CRLF line ends
  ASSERT_TRUE(parse_curve_cert("public-key = " + pair.public_key + "\r\nsecret-key='" + pair.secret_key + "'\r\n", cert,
                               error))
      << error;
  EXPECT_EQ(cert.secret_key, pair.secret_key);
}

TEST(CurveCert, BadCertificatesAreNamed) {
  const KeyPair pair = make_pair();
  const KeyPair other = make_pair();
  EXPECT_EQ(parse_error("metadata\n"), "no public-key line");
  EXPECT_EQ(parse_error("curve\n  public-key \"" + pair.public_key + "\"\n"),
            "line 2: want `public-key = \"Z85\"`");
  EXPECT_EQ(parse_error("public-key = \"short\"\n"), "line 1: not a CURVE key (40 characters of Z85)");
  EXPECT_EQ(parse_error("public-key = \"" + std::string(40, '~') + "~\"\n"),
            "line 1: not a CURVE key (40 characters of Z85)");
  EXPECT_EQ(parse_error("public-key = \"" + pair.public_key + "\"\npublic-key = \"" + pair.public_key + "\"\n"),
            "line 2: a second public-key (the first on line 1)");
  EXPECT_EQ(parse_error("public-key = \"" + other.public_key + "\"\nsecret-key = \"" + pair.secret_key + "\"\n"),
            "line 1: the public-key is not the secret-key's");
}

// A directory as `tokenbus keys gen` writes it: head.key and proxy.key_secret.
class KeyDir {
 public:
  KeyDir() {
    char name[] = "/tmp/tokenbus-keys-XXXXXX";
    EXPECT_NE(mkdtemp(name), nullptr);
    path_ = name;
  }
  ~KeyDir() { fs::remove_all(path_); }
  const std::string& path() const { return path_; }
  void write(const std::string& file, const std::string& text) const {
    std::ofstream(path_ + "/" + file, std::ios::binary | std::ios::trunc) << text;
  }

 private:
  std::string path_;
};

TEST(CurveCert, LoadsAClientsKeysAndNamesTheBadFile) {
  const KeyPair head = make_pair();
  const KeyPair proxy = make_pair();
  KeyDir dir;
  CurveClientKeys keys;
  std::string error;
  EXPECT_FALSE(load_curve_client_keys(dir.path(), "proxy", keys, error));
  EXPECT_EQ(error, dir.path() + "/head.key: No such file or directory");
  dir.write("head.key", cert_text(head, false));
  EXPECT_FALSE(load_curve_client_keys(dir.path(), "proxy", keys, error));
  EXPECT_EQ(error, dir.path() + "/proxy.key_secret: No such file or directory");
  dir.write("proxy.key_secret", cert_text(proxy, false));
  EXPECT_FALSE(load_curve_client_keys(dir.path(), "proxy", keys, error));
  EXPECT_EQ(error, dir.path() + "/proxy.key_secret: no secret-key (a public certificate where the secret one is wanted)");
  dir.write("proxy.key_secret", "public-key = \"nope\"\n");
  EXPECT_FALSE(load_curve_client_keys(dir.path(), "proxy", keys, error));
  EXPECT_EQ(error, dir.path() + "/proxy.key_secret: line 1: not a CURVE key (40 characters of Z85)");
  dir.write("proxy.key_secret", std::string(kMaxCertFileBytes + 1, '#'));
  EXPECT_FALSE(load_curve_client_keys(dir.path(), "proxy", keys, error));
  EXPECT_NE(error.find("proxy.key_secret: 8193 bytes, over the limit of 8192"), std::string::npos) << error;

  dir.write("proxy.key_secret", cert_text(proxy, true));
  ASSERT_TRUE(load_curve_client_keys(dir.path(), "proxy", keys, error)) << error;
  EXPECT_EQ(keys.server_public, head.public_key);
  EXPECT_EQ(keys.public_key, proxy.public_key);
  EXPECT_EQ(keys.secret_key, proxy.secret_key);
}

std::string golden_snapshot() {
  std::ifstream in(std::string(TOKENBUS_GOLDEN_DIR) + "/snapshot.msgpack", std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

TEST(CurveSubscriber, GetsASnapshotFromACurveHead) {
  const KeyPair head_keys = make_pair();
  const KeyPair proxy_keys = make_pair();
  testing::FakeHead head(head_keys.secret_key);
  Router router;
  SnapshotSubscriber subscriber(router, head.pub_endpoint(), head.router_endpoint(), 3s, nullptr,
                                CurveClientKeys{head_keys.public_key, proxy_keys.public_key, proxy_keys.secret_key});
  subscriber.start();
  const std::optional<testing::FakeHead::Request> request = head.receive(10s);
  ASSERT_TRUE(request) << "no SNAPSHOT_REQUEST over CURVE";
  EXPECT_EQ(request->kind, kKindSnapshotRequest);
  head.reply(request->identity, golden_snapshot());
  const auto end = std::chrono::steady_clock::now() + 10s;
  while (!router.snapshot() && std::chrono::steady_clock::now() < end) {
    std::this_thread::sleep_for(20ms);  // poll interval; the condition is re-checked each round
  }
  EXPECT_TRUE(router.snapshot());
  subscriber.stop();
}

TEST(CurveSubscriber, AWrongServerKeyGetsNothing) {
  const KeyPair head_keys = make_pair();
  const KeyPair impostor = make_pair();  // the key the proxy believes the head has
  const KeyPair proxy_keys = make_pair();
  testing::FakeHead head(head_keys.secret_key);
  Router router;
  SnapshotSubscriber subscriber(router, head.pub_endpoint(), head.router_endpoint(), 3s, nullptr,
                                CurveClientKeys{impostor.public_key, proxy_keys.public_key, proxy_keys.secret_key});
  subscriber.start();
  // The handshake fails, so no request reaches the head; what it publishes meanwhile reaches no one.
  const auto end = std::chrono::steady_clock::now() + 3s;
  while (std::chrono::steady_clock::now() < end) {
    head.publish(golden_snapshot());
    EXPECT_FALSE(head.receive(100ms)) << "a request came through a failed CURVE handshake";
  }
  EXPECT_FALSE(router.snapshot());
  subscriber.stop();
}

TEST(CurveSubscriber, APlainProxyGetsNothingFromACurveHead) {
  const KeyPair head_keys = make_pair();
  testing::FakeHead head(head_keys.secret_key);
  Router router;
  SnapshotSubscriber subscriber(router, head.pub_endpoint(), head.router_endpoint());
  subscriber.start();
  const auto end = std::chrono::steady_clock::now() + 3s;
  while (std::chrono::steady_clock::now() < end) {
    head.publish(golden_snapshot());
    EXPECT_FALSE(head.receive(100ms));
  }
  EXPECT_FALSE(router.snapshot());
  subscriber.stop();
}

}  // namespace
}  // namespace tokenbus::proxy
