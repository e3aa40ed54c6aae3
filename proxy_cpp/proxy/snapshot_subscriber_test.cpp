// The snapshot subscriber against a fake head over real ZeroMQ sockets: request at start, answer on the
// DEALER, newer versions applied from PUB, older ones and bad payloads ignored, a gap re-requested.
#include <gtest/gtest.h>

#include <fstream>
#include <iterator>
#include <thread>

#include "proxy/fake_head.hpp"
#include "proxy/router.hpp"
#include "proxy/snapshot_subscriber.hpp"

namespace tokenbus::proxy {
namespace {

using testing::FakeHead;
using namespace std::chrono_literals;

Snapshot golden_snapshot() {
  std::ifstream in(std::string(TOKENBUS_GOLDEN_DIR) + "/snapshot.msgpack", std::ios::binary);
  std::string error;
  std::optional<Snapshot> s = decode_snapshot(std::string(std::istreambuf_iterator<char>(in), {}), error);
  EXPECT_TRUE(s) << error;
  return s.value_or(Snapshot{});
}

std::string with_version(Snapshot s, std::uint64_t seq) {
  s.version = (s.epoch << 32) | seq;
  return encode_snapshot(s);
}

std::uint64_t held_version(const Router& router) {
  const auto s = router.snapshot();
  return s ? s->version : 0;
}

// Repeats `action` until `done` holds or the deadline passes (PUB drops messages sent before the
// subscriber's connection is up, so publishing is retried rather than timed).
template <typename Action, typename Done>
bool retry_until(Action action, Done done, std::chrono::milliseconds deadline = 10s) {
  const auto end = std::chrono::steady_clock::now() + deadline;
  while (std::chrono::steady_clock::now() < end) {
    action();
    if (done()) return true;
    std::this_thread::sleep_for(20ms);  // poll interval, not synchronisation: `done` is checked each round
  }
  return done();
}

TEST(SnapshotSubscriber, FollowsTheHead) {
  FakeHead head;
  Router router;
  SnapshotSubscriber subscriber(router, head.pub_endpoint(), head.router_endpoint());
  subscriber.start();
  const Snapshot base = golden_snapshot();

  // start: a SNAPSHOT_REQUEST holding nothing, answered on the DEALER
  std::optional<FakeHead::Request> request = head.receive(10s);
  ASSERT_TRUE(request);
  EXPECT_EQ(request->kind, kKindSnapshotRequest);
  EXPECT_EQ(request->payload, encode_snapshot_request(0));
  head.reply(request->identity, with_version(base, 17));
  ASSERT_TRUE(retry_until([] {}, [&] { return held_version(router) == ((3ull << 32) | 17); }));
  EXPECT_TRUE(router.ready());
  EXPECT_GE(router.staleness_seconds(), 0.0);

  // the next version on PUB is applied; an older one, garbage and other kinds are not
  ASSERT_TRUE(retry_until([&] { head.publish(with_version(base, 18)); },
                          [&] { return held_version(router) == ((3ull << 32) | 18); }));
  head.publish(with_version(base, 5));
  head.publish("\xc1 not msgpack");
  head.publish(with_version(base, 40), 0x03);  // not a snapshot kind: filtered by the subscription
  // a gap (19 skipped) is applied, being complete, and re-requested with the version now held
  ASSERT_TRUE(retry_until([&] { head.publish(with_version(base, 20)); },
                          [&] { return held_version(router) == ((3ull << 32) | 20); }));
  std::optional<FakeHead::Request> gap;
  while ((gap = head.receive(10s)) && gap->payload != encode_snapshot_request((3ull << 32) | 20)) {
  }
  ASSERT_TRUE(gap) << "no SNAPSHOT_REQUEST after the gap";
  EXPECT_EQ(held_version(router), (3ull << 32) | 20);  // the older version 5 never replaced it

  subscriber.stop();
}

}  // namespace
}  // namespace tokenbus::proxy
