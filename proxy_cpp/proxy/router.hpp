#pragma once
// The proxy's routing state: the snapshot it serves from, the per-replica in-flight counts and channels,
// and the choice of a replica for each request. Applied from the snapshot subscriber's thread, read
// lock-free (one atomic shared_ptr load) by every I/O thread.
#include <atomic>
#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

#include "common/snapshot.hpp"

namespace tokenbus::proxy {

struct ReplicaChannel;  // the gRPC channel and stub of one replica; defined by replica_stream.cpp

// What the proxy keeps about one replica address across snapshots: its in-flight count and its channel.
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

  // The replica's channel, created on first use and reused by every later request (replica_stream.cpp).
  ReplicaChannel& channel();

 private:
  friend class Router;
  friend class Lease;
  const std::string address_;
  std::atomic<std::int64_t> in_flight_{0};
  std::atomic<std::uint64_t> routed_{0};
  std::once_flag channel_once_;
  std::shared_ptr<ReplicaChannel> channel_;  // shared_ptr: ReplicaChannel is incomplete here
};

// One request's claim on a replica: holds one unit of its in-flight count until destroyed.
class Lease {
 public:
  Lease() = default;
  explicit Lease(std::shared_ptr<ReplicaHandle> replica) : replica_(std::move(replica)) {}
  Lease(Lease&&) noexcept = default;
  Lease& operator=(Lease&& other) noexcept;
  ~Lease() { release(); }

  ReplicaHandle* replica() const { return replica_.get(); }

 private:
  void release();
  std::shared_ptr<ReplicaHandle> replica_;
};

enum class RouteOutcome {
  kRouted,
  kNoSnapshot,          // nothing applied yet: 503
  kUnknownDeployment,   // 404
  kNoReplica,           // the deployment has no routable (READY and healthy) replica: 503
  kOverloaded,          // every routable replica is at max_concurrency: 429
};

// One replica as the router sees it now: for /metrics, so that a skewed spread can be explained.
struct ReplicaRouteView {
  std::string deployment;
  std::string id;
  std::string address;
  bool routable = false;
  std::int64_t in_flight = 0;
  std::uint64_t routed = 0;
  std::int64_t score = 0;  // what route() compares: lower wins
};

struct RouteResult {
  RouteOutcome outcome = RouteOutcome::kNoSnapshot;
  Lease lease;  // set when routed
};

class Router {
 public:
  Router();
  ~Router();

  // Makes `snapshot` the one requests are routed from (any thread; the caller orders versions). Logs
  // replicas coming up and going down.
  void apply(std::shared_ptr<const Snapshot> snapshot);

  // Notes that a valid snapshot message arrived (applied or not): the base of the staleness metric.
  void mark_received();
  // Seconds since the last valid snapshot message; negative when none has arrived yet.
  double staleness_seconds() const;

  // Picks the routable replica with the lowest load score (own in-flight + reported running + waiting),
  // ties broken round-robin, and claims one unit of its in-flight count.
  RouteResult route(std::string_view deployment);

  std::shared_ptr<const Snapshot> snapshot() const;
  // Every replica of the snapshot held, with its routing score and counts at this moment.
  std::vector<ReplicaRouteView> replica_views() const;
  // A snapshot is held and at least one replica in it is routable.
  bool ready() const;

 private:
  struct Table;
  std::atomic<std::shared_ptr<const Table>> table_;
  std::mutex apply_mutex_;  // serialises apply(); never taken on the request path
  std::map<std::string, std::shared_ptr<ReplicaHandle>> handles_;  // by address; guarded by apply_mutex_
  std::atomic<std::int64_t> last_received_ns_{-1};
};

}  // namespace tokenbus::proxy
