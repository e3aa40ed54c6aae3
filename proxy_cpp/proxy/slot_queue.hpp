#pragma once
// A deployment's queue of requests waiting for a slot while every replica is at max_concurrency: bounded in
// length, each wait bounded in time, woken one at a time as leases end (FIFO), all at once when a new
// snapshot may have added capacity. It also keeps how long requests hold a slot, to tell a refused client
// when to come back (Retry-After).
#include <utility>  // before Asio: Boost 1.74's awaitable.hpp needs it under g++ 12

#include <atomic>
#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/awaitable.hpp>
#include <chrono>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>

namespace tokenbus::proxy {

class SlotQueue {
 public:
  using Clock = std::chrono::steady_clock;
  enum class Wait { kWoken, kTimedOut, kFull };

  explicit SlotQueue(std::size_t depth) : depth_(depth) {}

  // Waits on `executor` until a slot may be free (kWoken: route again), `deadline` passes, or at once when
  // the queue already holds `depth` requests.
  boost::asio::awaitable<Wait> wait(boost::asio::any_io_executor executor, Clock::time_point deadline);
  // A slot was freed: wakes the longest waiting request. Any thread.
  void notify_one();
  // Capacity may have grown: wakes every waiting request. Any thread.
  void notify_all();
  bool has_waiters() const { return waiting_.load(std::memory_order_relaxed) > 0; }
  std::size_t waiting() const { return waiting_.load(std::memory_order_relaxed); }

  // A request held a slot this long (an exponentially weighted mean is kept).
  void observe_hold(double seconds);
  // When a refused request may find a slot: the queue ahead of it, drained by `capacity` slots at the mean
  // hold time; at least 1 s.
  std::chrono::seconds estimated_wait(std::int64_t capacity) const;

 private:
  struct Waiter;
  const std::size_t depth_;
  std::mutex mutex_;
  std::deque<std::shared_ptr<Waiter>> waiters_;  // guarded by mutex_
  std::atomic<std::size_t> waiting_{0};
  std::atomic<double> mean_hold_s_{1.0};
};

}  // namespace tokenbus::proxy
