#include "proxy/slot_queue.hpp"

#include <boost/asio/post.hpp>
#include <boost/asio/redirect_error.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <algorithm>
#include <cmath>

#include "proxy/limits.hpp"

namespace tokenbus::proxy {

namespace net = boost::asio;

struct SlotQueue::Waiter {
  explicit Waiter(net::any_io_executor executor) : timer(std::move(executor)) {}
  net::steady_timer timer;  // used on its executor's thread only; woken by a posted cancel
  bool notified = false;    // guarded by the queue's mutex
};

net::awaitable<SlotQueue::Wait> SlotQueue::wait(net::any_io_executor executor, Clock::time_point deadline) {
  auto waiter = std::make_shared<Waiter>(std::move(executor));
  {
    std::lock_guard lock(mutex_);
    if (waiters_.size() >= depth_) co_return Wait::kFull;
    waiters_.push_back(waiter);
    waiting_.store(waiters_.size(), std::memory_order_relaxed);
  }
  waiter->timer.expires_at(deadline);
  boost::system::error_code ec;  // operation_aborted is the wake-up
  co_await waiter->timer.async_wait(net::redirect_error(net::use_awaitable, ec));
  bool notified = false;
  {
    std::lock_guard lock(mutex_);
    notified = waiter->notified;
    if (!notified) {
      waiters_.erase(std::remove(waiters_.begin(), waiters_.end(), waiter), waiters_.end());
      waiting_.store(waiters_.size(), std::memory_order_relaxed);
    }
  }
  // A waiter notified as its deadline passed still takes the slot it was handed, so no wake-up is lost.
  co_return notified || ec == net::error::operation_aborted ? Wait::kWoken : Wait::kTimedOut;
}

void SlotQueue::notify_one() {
  std::shared_ptr<Waiter> waiter;
  {
    std::lock_guard lock(mutex_);
    if (waiters_.empty()) return;
    waiter = std::move(waiters_.front());
    waiters_.pop_front();
    waiting_.store(waiters_.size(), std::memory_order_relaxed);
    waiter->notified = true;
  }
  net::post(waiter->timer.get_executor(), [waiter] { waiter->timer.cancel(); });
}

void SlotQueue::notify_all() {
  std::deque<std::shared_ptr<Waiter>> all;
  {
    std::lock_guard lock(mutex_);
    all.swap(waiters_);
    waiting_.store(0, std::memory_order_relaxed);
    for (auto& w : all) w->notified = true;
  }
  for (auto& w : all) net::post(w->timer.get_executor(), [w] { w->timer.cancel(); });
}

void SlotQueue::observe_hold(double seconds) {
  // Racy read-modify-write across threads: a lost update only slows the mean's movement.
  const double mean = mean_hold_s_.load(std::memory_order_relaxed);
  mean_hold_s_.store(mean + 0.1 * (seconds - mean), std::memory_order_relaxed);
}

std::chrono::seconds SlotQueue::estimated_wait(std::int64_t capacity) const {
  const double ahead = static_cast<double>(waiting() + 1);
  const double wait = mean_hold_s_.load(std::memory_order_relaxed) * ahead / static_cast<double>(std::max<std::int64_t>(capacity, 1));
  const auto seconds = static_cast<std::int64_t>(std::ceil(wait));
  return std::chrono::seconds(std::clamp<std::int64_t>(seconds, 1, kMaxRetryAfter.count()));
}

}  // namespace tokenbus::proxy
