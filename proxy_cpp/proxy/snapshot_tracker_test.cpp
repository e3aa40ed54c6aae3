// The subscriber's decisions as scenarios, on a fake clock: which snapshot is applied, which ignored, and
// when the head is asked for its snapshot.
#include <gtest/gtest.h>

#include "proxy/snapshot_tracker.hpp"

namespace tokenbus::proxy {
namespace {

using namespace std::chrono_literals;
using Clock = SnapshotTracker::Clock;

Snapshot snap(std::string head, std::uint64_t epoch, std::uint64_t seq) {
  Snapshot s;
  s.head_id = std::move(head);
  s.epoch = epoch;
  s.version = (epoch << 32) | seq;
  return s;
}

class TrackerTest : public ::testing::Test {
 protected:
  SnapshotTracker::Decision see(const Snapshot& s) { return tracker_.on_snapshot(s, now_); }
  SnapshotTracker tracker_{3s};
  Clock::time_point now_ = Clock::time_point() + 1h;
};

TEST_F(TrackerTest, AsksUntilTheFirstSnapshotThenAppliesIt) {
  EXPECT_STREQ(tracker_.due_request(now_), "no snapshot yet");
  tracker_.requested(now_);
  EXPECT_EQ(tracker_.due_request(now_ + 500ms), nullptr);
  EXPECT_STREQ(tracker_.due_request(now_ + 1s), "no snapshot yet");
  EXPECT_TRUE(see(snap("a", 2, 5)).apply);
  EXPECT_EQ(tracker_.version(), (2ull << 32) | 5);
}

TEST_F(TrackerTest, AppliesNewerVersionsOnlyAndAsksOnAGap) {
  see(snap("a", 2, 5));
  EXPECT_FALSE(see(snap("a", 2, 5)).apply);  // a re-publication
  EXPECT_FALSE(see(snap("a", 2, 4)).apply);  // an old answer, out of order
  const auto next = see(snap("a", 2, 6));
  EXPECT_TRUE(next.apply);
  EXPECT_EQ(next.request, nullptr);
  const auto gap = see(snap("a", 2, 9));
  EXPECT_TRUE(gap.apply);
  EXPECT_STREQ(gap.request, "version gap");
  EXPECT_EQ(tracker_.version(), (2ull << 32) | 9);
}

TEST_F(TrackerTest, ARestartedHeadOnTheSameDatabaseIsFollowedAtOnce) {
  see(snap("a", 2, 50));
  const auto d = see(snap("b", 3, 1));  // a new epoch: higher versions
  EXPECT_TRUE(d.apply);
  EXPECT_EQ(d.request, nullptr);  // a new epoch is no gap
  EXPECT_EQ(tracker_.head_id(), "b");
}

TEST_F(TrackerTest, AHeadOnANewDatabaseIsFollowedOnceTheOldOneIsSilent) {
  see(snap("a", 7, 50));
  now_ += 1s;
  EXPECT_TRUE(see(snap("a", 7, 50)).note == nullptr);  // the old head re-publishes: alive
  const auto early = see(snap("fresh", 1, 1));
  EXPECT_FALSE(early.apply);  // the old head spoke 0 s ago
  EXPECT_NE(early.note, nullptr);
  now_ += 2s;
  EXPECT_FALSE(see(snap("fresh", 1, 2)).apply);  // 2 s of silence: not yet its liveness period
  now_ += 1s;
  const auto late = see(snap("fresh", 1, 3));  // 3 s: the old head is gone
  EXPECT_TRUE(late.apply);
  EXPECT_EQ(tracker_.head_id(), "fresh");
  EXPECT_EQ(tracker_.version(), (1ull << 32) | 3);
  // and from then on the new head's versions are followed as usual, never backwards
  EXPECT_TRUE(see(snap("fresh", 1, 4)).apply);
  EXPECT_FALSE(see(snap("fresh", 1, 2)).apply);
}

TEST_F(TrackerTest, ASilentHeadIsAskedAgain) {
  see(snap("a", 2, 5));
  tracker_.requested(now_);
  EXPECT_EQ(tracker_.due_request(now_ + 4s), nullptr);
  EXPECT_STREQ(tracker_.due_request(now_ + 5s), "head silent");
  tracker_.requested(now_ + 5s);
  EXPECT_EQ(tracker_.due_request(now_ + 6s), nullptr);
}

}  // namespace
}  // namespace tokenbus::proxy
