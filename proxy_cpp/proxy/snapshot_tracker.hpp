#pragma once
// Which routing snapshots the proxy applies, and when it asks the head for one (zguide clone pattern plus
// head incarnations): the decisions of the snapshot subscriber, free of sockets so that every scenario
// (stale and out-of-order versions, a gap, a restarted head, a head on a new database, silence) is tested
// directly. Owned by the subscriber's thread.
#include <chrono>
#include <cstdint>
#include <string>

#include "common/snapshot.hpp"

namespace tokenbus::proxy {

class SnapshotTracker {
 public:
  using Clock = std::chrono::steady_clock;

  // How long until the first snapshot is asked for again, and how long the held head may be silent before
  // it is asked again.
  static constexpr std::chrono::seconds kRequestRetry{1};
  static constexpr std::chrono::seconds kSilenceRetry{5};

  // `head_silence`: how long the held head must have been silent before a different head whose versions are
  // lower (a head on a new or lost database) is followed: the head's liveness period.
  explicit SnapshotTracker(std::chrono::milliseconds head_silence) : head_silence_(head_silence) {}

  struct Decision {
    bool apply = false;          // route from this snapshot now
    const char* request = nullptr;  // ask the head for its full snapshot, for this reason
    const char* note = nullptr;  // worth a log line: why it was applied or ignored
  };
  Decision on_snapshot(const Snapshot& snapshot, Clock::time_point now);
  // Whether to ask the head for its snapshot now (a reason), or not (nullptr).
  const char* due_request(Clock::time_point now) const;
  void requested(Clock::time_point now) { last_request_ = now; }

  std::uint64_t version() const { return version_; }
  const std::string& head_id() const { return head_id_; }

 private:
  const std::chrono::milliseconds head_silence_;
  std::uint64_t version_ = 0;  // 0: none yet
  std::string head_id_;        // the head whose snapshots are followed
  Clock::time_point last_from_head_{};  // the followed head's last message
  Clock::time_point last_request_{};
  std::string ignored_head_;  // the other head last ignored (logged once per head)
};

}  // namespace tokenbus::proxy
