// The routing snapshot codec against the golden vectors the Python side writes (schemas/golden).
#include <gtest/gtest.h>

#include <fstream>
#include <iterator>
#include <sstream>

#include "common/snapshot.hpp"

namespace tokenbus {
namespace {

std::string golden(const std::string& name) {
  std::ifstream in(std::string(TOKENBUS_GOLDEN_DIR) + "/" + name, std::ios::binary);
  EXPECT_TRUE(in.good()) << "missing golden vector " << name;
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// A byte string from a literal that may hold NULs.
template <std::size_t N>
std::string bytes(const char (&literal)[N]) {
  return std::string(literal, N - 1);
}

// Replaces the first occurrence of `from` in `payload`, which the test expects to be there.
std::string patched(std::string payload, const std::string& from, const std::string& to) {
  const std::size_t at = payload.find(from);
  EXPECT_NE(at, std::string::npos) << "pattern not in the golden vector";
  return at == std::string::npos ? payload : payload.replace(at, from.size(), to);
}

std::optional<Snapshot> decode(const std::string& payload, std::string* error_out = nullptr) {
  std::string error;
  std::optional<Snapshot> s = decode_snapshot(payload, error);
  EXPECT_EQ(s.has_value(), error.empty()) << error;
  if (error_out != nullptr) *error_out = error;
  return s;
}

TEST(SnapshotGolden, DecodesEveryField) {
  const std::optional<Snapshot> s = decode(golden("snapshot.msgpack"));
  ASSERT_TRUE(s);
  EXPECT_EQ(s->epoch, 3u);
  EXPECT_EQ(s->version, (3ull << 32) | 17);
  ASSERT_EQ(s->deployments.size(), 2u);
  const Deployment& demo = s->deployments[0];
  EXPECT_EQ(demo.name, "demo");
  ASSERT_EQ(demo.replicas.size(), 2u);
  const SnapshotReplica& r1 = demo.replicas[0];
  EXPECT_EQ(r1.id, "demo-r1");
  EXPECT_EQ(r1.node, "node-a");
  EXPECT_EQ(r1.addr, "127.0.0.1:40001");
  EXPECT_EQ(r1.state, ReplicaState::kReady);
  EXPECT_EQ(r1.max_concurrency, 256);
  EXPECT_EQ(r1.load.running, 5);
  EXPECT_EQ(r1.load.waiting, 2);
  EXPECT_DOUBLE_EQ(r1.load.kv_usage, 0.25);
  EXPECT_TRUE(r1.healthy);
  EXPECT_TRUE(r1.routable());
  const SnapshotReplica& r2 = demo.replicas[1];
  EXPECT_EQ(r2.id, "demo-r2");
  EXPECT_EQ(r2.node, "node-b");
  EXPECT_EQ(r2.addr, "127.0.0.1:40002");
  EXPECT_EQ(r2.state, ReplicaState::kDraining);
  EXPECT_EQ(r2.max_concurrency, 64);
  EXPECT_EQ(r2.load.running, 0);
  EXPECT_EQ(r2.load.waiting, 0);
  EXPECT_DOUBLE_EQ(r2.load.kv_usage, 0.0);
  EXPECT_FALSE(r2.healthy);
  EXPECT_FALSE(r2.routable());
  EXPECT_EQ(s->deployments[1].name, "empty");
  EXPECT_TRUE(s->deployments[1].replicas.empty());
  EXPECT_EQ(s->find("empty"), &s->deployments[1]);
  EXPECT_EQ(s->find("nope"), nullptr);
}

TEST(SnapshotGolden, DecodesTheEmptySnapshot) {
  const std::optional<Snapshot> s = decode(golden("snapshot_empty.msgpack"));
  ASSERT_TRUE(s);
  EXPECT_EQ(s->epoch, 1u);
  EXPECT_EQ(s->version, 1ull << 32);
  EXPECT_TRUE(s->deployments.empty());
}

TEST(SnapshotGolden, ReEncodesByteIdentically) {
  for (const char* name : {"snapshot.msgpack", "snapshot_empty.msgpack"}) {
    const std::string payload = golden(name);
    const std::optional<Snapshot> s = decode(payload);
    ASSERT_TRUE(s) << name;
    EXPECT_EQ(encode_snapshot(*s), payload) << name;
  }
}

TEST(SnapshotDecode, RejectsEveryTruncation) {
  const std::string payload = golden("snapshot.msgpack");
  for (std::size_t n = 0; n < payload.size(); ++n) {
    EXPECT_FALSE(decode(payload.substr(0, n))) << "accepted a payload cut at " << n;
  }
}

TEST(SnapshotDecode, RejectsWrongTypesAndValues) {
  const std::string payload = golden("snapshot.msgpack");
  struct Case {
    const char* what;
    std::string payload;
    const char* error_mentions;
  };
  const Case cases[] = {
      {"healthy as an int", patched(payload, bytes("\xa7healthy\xc3"), bytes("\xa7healthy\x01")), "healthy"},
      {"max_concurrency as a string",
       patched(payload, bytes("\xafmax_concurrency\xcd\x01\x00"), bytes("\xafmax_concurrency\xa3" "abc")),
       "max_concurrency"},
      {"running as a bool", patched(payload, "\xa7running\x05", "\xa7running\xc3"), "running"},
      {"a state other than READY/DRAINING", patched(payload, "\xa5READY", "\xa5READX"), "state"},
      {"wire version 2", patched(payload, "\xa1v\x01", "\xa1v\x02"), "version"},
      {"a missing field (id renamed)", patched(payload, "\xa2id", "\xa2iX"), "id"},
      {"trailing bytes", payload + std::string(1, '\xc0'), "trailing"},
      {"a never-used byte", bytes("\xc1"), "MessagePack"},
      {"an array at the root", bytes("\x91\x01"), "map"},
  };
  for (const Case& c : cases) {
    std::string error;
    EXPECT_FALSE(decode(c.payload, &error)) << c.what;
    EXPECT_NE(error.find(c.error_mentions), std::string::npos) << c.what << ": " << error;
  }
}

TEST(SnapshotDecode, RejectsDeepNestingWithoutRecursingIntoIt) {
  const std::string deep = std::string(100000, '\x91') + std::string(1, '\x01');
  EXPECT_FALSE(decode(deep));
}

TEST(SnapshotRequest, EncodesTheContract) {
  // {"v": 1, "have_version": 4294967313} as Python's msgpack writes it
  const std::string expected = bytes("\x82\xa1v\x01\xachave_version\xcf\x00\x00\x00\x01\x00\x00\x00\x11");
  EXPECT_EQ(encode_snapshot_request((1ull << 32) | 17), expected);
}

}  // namespace
}  // namespace tokenbus
