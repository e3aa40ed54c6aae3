#pragma once
// At most one log line per interval for an event a client can repeat at will (a 401 for each request): the
// first is logged, the ones within the interval after it are only counted, and the next line logged says how
// many were held back. Lock-free: any I/O thread may ask.
#include <atomic>
#include <chrono>
#include <cstdint>
#include <limits>

namespace tokenbus::proxy {

class LogThrottle {
 public:
  explicit LogThrottle(std::chrono::nanoseconds interval) : interval_ns_(interval.count()) {}

  // Whether the event at `now_ns` (steady clock) is to be logged; if so, `held_back` is the number of events
  // not logged since the last line.
  bool allow(std::int64_t now_ns, std::uint64_t& held_back) {
    std::int64_t last = last_ns_.load(std::memory_order_relaxed);
    // Of several threads past the interval at once, the one whose exchange wins logs; the others count.
    if ((last != kNever && now_ns - last < interval_ns_) ||
        !last_ns_.compare_exchange_strong(last, now_ns, std::memory_order_relaxed)) {
      held_back_.fetch_add(1, std::memory_order_relaxed);
      return false;
    }
    held_back = held_back_.exchange(0, std::memory_order_relaxed);
    return true;
  }

 private:
  static constexpr std::int64_t kNever = std::numeric_limits<std::int64_t>::min();
  const std::int64_t interval_ns_;
  std::atomic<std::int64_t> last_ns_{kNever};
  std::atomic<std::uint64_t> held_back_{0};
};

}  // namespace tokenbus::proxy
