#include "proxy/snapshot_tracker.hpp"

namespace tokenbus::proxy {

SnapshotTracker::Decision SnapshotTracker::on_snapshot(const Snapshot& snapshot, Clock::time_point now) {
  Decision d;
  if (version_ == 0) {
    d.apply = true;
    d.note = "first snapshot";
  } else if (snapshot.head_id == head_id_) {
    last_from_head_ = now;
    if (snapshot.version <= version_) return d;  // a re-publication or an old answer
    d.apply = true;
    // Every snapshot is complete, so a newer one is applied at once; a gap still asks the head for its
    // latest, as the contract says, in case what arrived was itself delayed.
    if (version_epoch(snapshot.version) == version_epoch(version_) && snapshot.version != version_ + 1) {
      d.request = "version gap";
    }
  } else if (snapshot.version > version_) {
    d.apply = true;  // a restarted head on the same database: its epoch, so its versions, are higher
    d.note = "a new head with newer versions";
  } else if (now - last_from_head_ >= head_silence_) {
    // A head on a new or lost database counts from epoch 1 again; its versions are lower than those held,
    // but the head they came from is gone. Following it is the only way not to route from a dead table.
    d.apply = true;
    d.note = "a new head with older versions, the old head silent";
  } else {
    if (ignored_head_ != snapshot.head_id) {
      ignored_head_ = snapshot.head_id;
      d.note = "ignored: another head with older versions while the followed head is alive";
    }
    return d;
  }
  version_ = snapshot.version;
  head_id_ = snapshot.head_id;
  last_from_head_ = now;
  return d;
}

const char* SnapshotTracker::due_request(Clock::time_point now) const {
  if (version_ == 0) return now - last_request_ >= kRequestRetry ? "no snapshot yet" : nullptr;
  if (now - last_from_head_ >= kSilenceRetry && now - last_request_ >= kSilenceRetry) return "head silent";
  return nullptr;
}

}  // namespace tokenbus::proxy
