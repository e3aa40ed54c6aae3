#pragma once
// Process-wide Abseil settings for the binaries that link gRPC (tokenbus-proxy, tokenbus-replica).
#include <absl/synchronization/mutex.h>

namespace tokenbus {

// Debian builds Abseil without NDEBUG, which turns on absl::Mutex deadlock detection: a lock-order graph update
// on every gRPC mutex, measured at ~5% of the replica's CPU under load. gRPC's locks are not ours to debug in
// production. Call once at the start of main(), before any thread exists.
inline void disable_abseil_deadlock_detection() {
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
}

}  // namespace tokenbus
