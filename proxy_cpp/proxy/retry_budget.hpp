#pragma once
// Envoy's retry budget: retries open at once may be at most a share of the requests open (but at least a
// few), so that retries cannot multiply an overload. Lock-free; one instance per proxy.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <utility>

#include "proxy/limits.hpp"

namespace tokenbus::proxy {

class RetryBudget {
 public:
  explicit RetryBudget(RetryPolicy policy) : policy_(policy) {}

  // Held by every generate request while it runs.
  class Active {
   public:
    explicit Active(RetryBudget& budget) : budget_(budget) { budget_.active_.fetch_add(1, std::memory_order_relaxed); }
    ~Active() { budget_.active_.fetch_sub(1, std::memory_order_relaxed); }
    Active(const Active&) = delete;
    Active& operator=(const Active&) = delete;

   private:
    RetryBudget& budget_;
  };

  // Held by a request while its retry runs; empty when the budget refused it.
  class Retry {
   public:
    Retry() = default;
    explicit Retry(RetryBudget* budget) : budget_(budget) {}
    Retry(Retry&& other) noexcept : budget_(std::exchange(other.budget_, nullptr)) {}
    Retry& operator=(Retry&& other) noexcept {
      std::swap(budget_, other.budget_);
      return *this;
    }
    ~Retry() {
      if (budget_) budget_->retries_.fetch_sub(1, std::memory_order_relaxed);
    }
    explicit operator bool() const { return budget_ != nullptr; }

   private:
    RetryBudget* budget_ = nullptr;
  };

  // A retry slot if the budget has one now.
  Retry try_retry() {
    const auto active = active_.load(std::memory_order_relaxed);
    const auto allowed = std::max<std::int64_t>(policy_.min_concurrent_retries,
                                                static_cast<std::int64_t>(static_cast<double>(active) * policy_.budget_fraction));
    if (retries_.fetch_add(1, std::memory_order_relaxed) < allowed) return Retry(this);
    retries_.fetch_sub(1, std::memory_order_relaxed);
    return Retry();
  }

  const RetryPolicy& policy() const { return policy_; }

 private:
  const RetryPolicy policy_;
  std::atomic<std::int64_t> active_{0};
  std::atomic<std::int64_t> retries_{0};
};

}  // namespace tokenbus::proxy
