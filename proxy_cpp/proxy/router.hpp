#pragma once
// The proxy's routing state: the snapshot it serves from, what it learned itself about each replica (its
// in-flight count, its channel, its recent failures and ejection), per-deployment wait queues, and the
// choice of a replica for each request. Applied from the snapshot subscriber's thread, read lock-free (one
// atomic shared_ptr load) by every I/O thread.
#include <atomic>
#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "common/snapshot.hpp"
#include "proxy/limits.hpp"

namespace tokenbus::proxy {

struct ReplicaChannel;  // the gRPC channel and stub of one replica; defined by replica_call.cpp
class SlotQueue;        // a deployment's waiting requests; defined by slot_queue.hpp

// What the proxy keeps about one replica address across snapshots.
class ReplicaHandle {
 public:
  explicit ReplicaHandle(std::string address);
  ~ReplicaHandle();
  ReplicaHandle(const ReplicaHandle&) = delete;
  ReplicaHandle& operator=(const ReplicaHandle&) = delete;

  const std::string& address() const { return address_; }
  std::int64_t in_flight() const { return in_flight_.load(std::memory_order_relaxed); }
  // Requests routed here since the address first appeared in a snapshot.
  std::uint64_t routed() const { return routed_.load(std::memory_order_relaxed); }
  // Tokens streamed from it since the address first appeared in a snapshot.
  std::uint64_t tokens() const { return tokens_.load(std::memory_order_relaxed); }
  void count_tokens(std::uint64_t n) { tokens_.fetch_add(n, std::memory_order_relaxed); }
  int consecutive_failures() const { return consecutive_failures_.load(std::memory_order_relaxed); }
  std::int64_t last_failure_ns() const { return last_failure_ns_.load(std::memory_order_relaxed); }
  // Times this proxy ejected it, in all.
  std::uint64_t ejections() const { return ejections_total_.load(std::memory_order_relaxed); }
  bool ejected(std::int64_t now_ns) const { return now_ns < ejected_until_ns_.load(std::memory_order_relaxed); }

  // The replica's channel, created on first use and reused by every later request (replica_call.cpp).
  ReplicaChannel& channel();

 private:
  friend class Router;
  friend class Lease;
  const std::string address_;
  std::atomic<std::int64_t> in_flight_{0};
  std::atomic<std::uint64_t> routed_{0};
  std::atomic<std::uint64_t> tokens_{0};
  std::atomic<int> consecutive_failures_{0};
  std::atomic<std::int64_t> ejected_until_ns_{0};  // steady clock; 0: never ejected
  std::atomic<std::int64_t> last_failure_ns_{0};   // steady clock: failures older than base_ejection are forgiven
  std::atomic<int> ejection_streak_{0};            // the next ejection lasts (streak + 1) x base
  std::atomic<std::uint64_t> ejections_total_{0};
  std::shared_ptr<SlotQueue> queue_;  // its deployment's; set by Router::apply under its mutex, read on release
  std::once_flag channel_once_;
  std::shared_ptr<ReplicaChannel> channel_;  // shared_ptr: ReplicaChannel is incomplete here
};

// One request's claim on a replica: holds one unit of its in-flight count until destroyed, and then hands
// the freed slot to a request waiting in the deployment's queue.
class Lease {
 public:
  Lease() = default;
  Lease(std::shared_ptr<ReplicaHandle> replica, std::shared_ptr<SlotQueue> queue)
      : replica_(std::move(replica)), queue_(std::move(queue)), start_(std::chrono::steady_clock::now()) {}
  Lease(Lease&&) noexcept = default;
  Lease& operator=(Lease&& other) noexcept;
  ~Lease() { release(); }

  ReplicaHandle* replica() const { return replica_.get(); }
  const std::shared_ptr<ReplicaHandle>& shared() const { return replica_; }

 private:
  void release();
  std::shared_ptr<ReplicaHandle> replica_;
  std::shared_ptr<SlotQueue> queue_;
  std::chrono::steady_clock::time_point start_;
};

enum class RouteOutcome {
  kRouted,
  kNoSnapshot,          // nothing applied yet: 503
  kUnknownDeployment,   // 404
  kNoReplica,           // the deployment has no routable (READY, healthy, not ejected, not tried) replica: 503
  kOverloaded,          // every routable replica is at max_concurrency: wait in the queue, then 429
};

// A deployment's settings from the snapshot, as a request needs them.
struct DeploymentLimits {
  std::int64_t max_model_len = 0;
  double first_token_timeout_s = 0.0;
  double idle_timeout_s = 0.0;
};

// One replica as the router sees it now: for /metrics, so that a skewed spread can be explained.
struct ReplicaRouteView {
  std::string deployment;
  std::string id;
  std::string address;
  bool routable = false;
  bool ejected = false;
  std::int64_t in_flight = 0;
  std::uint64_t routed = 0;
  std::uint64_t tokens = 0;
  std::uint64_t ejections = 0;
  int consecutive_failures = 0;
  std::int64_t score = 0;  // what route() compares: lower wins
};

struct RouteResult {
  RouteOutcome outcome = RouteOutcome::kNoSnapshot;
  Lease lease;                      // set when routed
  DeploymentLimits limits;          // set unless kNoSnapshot or kUnknownDeployment
  std::shared_ptr<SlotQueue> queue;  // the deployment's wait queue: set unless kNoSnapshot or kUnknownDeployment
  std::chrono::seconds retry_after{0};  // kNoReplica, kOverloaded: what to tell the client
  std::int64_t queued = 0;  // kRouted: the requests the chosen replica's engine last reported waiting
};

class Router {
 public:
  explicit Router(OutlierPolicy outlier = {}, std::size_t queue_depth = ProxyLimits{}.queue_depth);
  ~Router();

  // Makes `snapshot` the one requests are routed from (any thread; the caller orders versions). Logs
  // replicas coming up and going down, and wakes waiting requests (a replica may have come up).
  void apply(std::shared_ptr<const Snapshot> snapshot);

  // Notes that a valid snapshot message arrived (applied or not): the base of the staleness metric.
  void mark_received();
  // Seconds since the last valid snapshot message; negative when none has arrived yet.
  double staleness_seconds() const;

  // Picks the routable replica with the lowest score (own in-flight + reported running + waiting + a
  // penalty per recent failure), skipping ejected ones and those in `exclude` (already tried by this
  // request), ties broken round-robin, and claims one unit of its in-flight count.
  // Before the first snapshot: kNoSnapshot, with `queue` the requests waiting for it.
  RouteResult route(std::string_view deployment, std::span<const ReplicaHandle* const> exclude = {});

  // What a call on `replica` of `deployment` came to: a success clears its failure count; the
  // `consecutive_failures`-th failure in a row ejects it (within the deployment's ejection cap).
  void report_success(ReplicaHandle& replica);
  void report_failure(std::string_view deployment, ReplicaHandle& replica, std::string_view why);

  std::shared_ptr<const Snapshot> snapshot() const;
  // Every replica of the snapshot held, with its routing score and counts at this moment.
  std::vector<ReplicaRouteView> replica_views() const;
  // A snapshot is held and some deployment has a replica a request could be sent to now.
  bool ready() const;

 private:
  struct Table;
  std::chrono::seconds no_replica_retry_after(const Table& table, std::string_view deployment,
                                              std::int64_t now_ns) const;

  const OutlierPolicy outlier_;
  const std::size_t queue_depth_;
  std::atomic<std::shared_ptr<const Table>> table_;
  std::mutex apply_mutex_;  // serialises apply(); never taken on the request path
  std::map<std::string, std::shared_ptr<ReplicaHandle>> handles_;  // by address; guarded by apply_mutex_
  std::map<std::string, std::shared_ptr<SlotQueue>, std::less<>> queues_;  // by deployment; guarded by apply_mutex_
  const std::shared_ptr<SlotQueue> awaiting_snapshot_;  // requests that came before the first snapshot
  std::mutex eject_mutex_;  // serialises ejection decisions (rare: only on a failure)
  std::atomic<std::int64_t> last_received_ns_{-1};
};

}  // namespace tokenbus::proxy
