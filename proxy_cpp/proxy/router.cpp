#include "proxy/router.hpp"

#include <algorithm>
#include <limits>
#include <set>

#include "common/log.hpp"
#include "proxy/slot_queue.hpp"

namespace tokenbus::proxy {

// A snapshot plus, for each replica in it, the handle that carries what this proxy knows of it. Immutable
// once built, except for the round-robin cursors.
struct Router::Table {
  struct Entry {
    const SnapshotReplica* replica;
    std::shared_ptr<ReplicaHandle> handle;
  };
  struct Route {
    std::vector<Entry> entries;
    DeploymentLimits limits;
    std::shared_ptr<SlotQueue> queue;
    std::int64_t capacity = 0;  // the routable replicas' max_concurrency, summed (for Retry-After)
    mutable std::atomic<std::uint64_t> cursor{0};  // where the tie-breaking scan starts
  };
  std::shared_ptr<const Snapshot> snapshot;
  std::map<std::string, Route, std::less<>> routes;
};

namespace {

std::int64_t now_ns() { return std::chrono::steady_clock::now().time_since_epoch().count(); }

// A replica's routing score: this proxy's own in-flight requests there, the load its engine last reported
// (running + waiting, which also counts other proxies' requests), and a penalty per failure in a row while
// the last one is recent. The penalty fades, so that a replica that failed once gets traffic again and can
// clear its count with a success.
std::int64_t route_score(const SnapshotReplica& r, const ReplicaHandle& h, const OutlierPolicy& outlier,
                         std::int64_t now) {
  const std::int64_t load = h.in_flight() + r.load.running + r.load.waiting;
  const int failures = h.consecutive_failures();
  if (failures == 0 || now - h.last_failure_ns() > std::chrono::nanoseconds(outlier.base_ejection).count()) {
    return load;
  }
  return load + failures * outlier.failure_penalty;
}

}  // namespace

ReplicaHandle::ReplicaHandle(std::string address) : address_(std::move(address)) {}

Lease& Lease::operator=(Lease&& other) noexcept {
  if (this != &other) {
    release();
    replica_ = std::move(other.replica_);
    queue_ = std::move(other.queue_);
    start_ = other.start_;
  }
  return *this;
}

void Lease::release() {
  if (!replica_) return;
  replica_->in_flight_.fetch_sub(1, std::memory_order_relaxed);
  replica_.reset();
  if (queue_) {
    queue_->observe_hold(std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count());
    if (queue_->has_waiters()) queue_->notify_one();
    queue_.reset();
  }
}

Router::Router(OutlierPolicy outlier, std::size_t queue_depth)
    : outlier_(outlier), queue_depth_(queue_depth), awaiting_snapshot_(std::make_shared<SlotQueue>(queue_depth)) {}
Router::~Router() = default;

void Router::apply(std::shared_ptr<const Snapshot> snapshot) {
  std::lock_guard lock(apply_mutex_);
  auto table = std::make_shared<Table>();
  table->snapshot = snapshot;
  std::map<std::string, std::shared_ptr<ReplicaHandle>> handles;
  std::map<std::string, std::shared_ptr<SlotQueue>, std::less<>> queues;
  std::set<std::string> up;  // "deployment/id@addr" of every routable replica, to log changes
  for (const Deployment& d : snapshot->deployments) {
    Table::Route& route = table->routes[d.name];
    route.limits = DeploymentLimits{d.max_model_len, d.first_token_timeout_s, d.idle_timeout_s};
    std::shared_ptr<SlotQueue>& queue = queues[d.name];
    auto kept_queue = queues_.find(d.name);
    queue = kept_queue != queues_.end() ? kept_queue->second : std::make_shared<SlotQueue>(queue_depth_);
    route.queue = queue;
    route.entries.reserve(d.replicas.size());
    for (const SnapshotReplica& r : d.replicas) {
      std::shared_ptr<ReplicaHandle>& handle = handles[r.addr];
      if (!handle) {
        auto kept = handles_.find(r.addr);
        handle = kept != handles_.end() ? kept->second : std::make_shared<ReplicaHandle>(r.addr);
      }
      handle->queue_ = queue;
      route.entries.push_back({&r, handle});
      if (r.routable()) {
        route.capacity += r.max_concurrency > 0 ? r.max_concurrency : 0;
        up.insert(d.name + "/" + r.id + "@" + r.addr);
      }
    }
  }
  std::set<std::string> was_up;
  if (auto old = table_.load()) {
    for (const auto& [name, route] : old->routes) {
      for (const Table::Entry& e : route.entries) {
        if (e.replica->routable()) was_up.insert(name + "/" + e.replica->id + "@" + e.replica->addr);
      }
    }
  } else {
    log(LogLevel::kInfo, "proxy", "first routing snapshot: version %llu (epoch %llu, head %s), %zu deployments",
        static_cast<unsigned long long>(snapshot->version), static_cast<unsigned long long>(snapshot->epoch),
        snapshot->head_id.c_str(), snapshot->deployments.size());
  }
  for (const std::string& r : up) {
    if (!was_up.count(r)) log(LogLevel::kInfo, "proxy", "replica up: %s", r.c_str());
  }
  for (const std::string& r : was_up) {
    if (!up.count(r)) log(LogLevel::kInfo, "proxy", "replica down: %s", r.c_str());
  }
  // Handles (and their channels) of addresses that left the snapshot go here; requests still holding a
  // lease on one keep it alive until they end.
  handles_ = std::move(handles);
  // A deployment that left the snapshot takes its queue along: its waiters are woken and answered 404.
  for (auto& [name, queue] : queues_) {
    if (!queues.count(name)) queue->notify_all();
  }
  queues_ = std::move(queues);
  table_.store(std::move(table));
  if (awaiting_snapshot_->has_waiters()) awaiting_snapshot_->notify_all();
  // Capacity may have grown (a replica came up or reported less load): waiting requests route again.
  for (auto& [name, queue] : queues_) {
    if (queue->has_waiters()) queue->notify_all();
  }
}

void Router::mark_received() { last_received_ns_.store(now_ns(), std::memory_order_relaxed); }

double Router::staleness_seconds() const {
  const std::int64_t last = last_received_ns_.load(std::memory_order_relaxed);
  if (last < 0) return -1.0;
  return std::chrono::duration<double>(std::chrono::steady_clock::duration(now_ns() - last)).count();
}

RouteResult Router::route(std::string_view deployment, std::span<const ReplicaHandle* const> exclude) {
  const std::shared_ptr<const Table> table = table_.load();
  if (!table) return {RouteOutcome::kNoSnapshot, {}, {}, awaiting_snapshot_};
  const auto it = table->routes.find(deployment);
  if (it == table->routes.end()) return {RouteOutcome::kUnknownDeployment};
  const Table::Route& route = it->second;
  RouteResult result{RouteOutcome::kNoReplica, {}, route.limits, route.queue};
  const std::size_t n = route.entries.size();
  const std::int64_t now = now_ns();

  // A claim can race with other threads picking the same replica; re-pick a few times, then report the
  // deployment overloaded rather than exceed max_concurrency.
  for (int attempt = 0; attempt < 4 && n > 0; ++attempt) {
    const std::size_t start = route.cursor.fetch_add(1, std::memory_order_relaxed) % n;
    const Table::Entry* best = nullptr;
    std::int64_t best_score = std::numeric_limits<std::int64_t>::max();
    bool any_candidate = false;
    for (std::size_t i = 0; i < n; ++i) {
      const Table::Entry& e = route.entries[(start + i) % n];
      if (!e.replica->routable() || e.handle->ejected(now)) continue;
      if (std::find(exclude.begin(), exclude.end(), e.handle.get()) != exclude.end()) continue;
      any_candidate = true;
      if (e.replica->max_concurrency > 0 && e.handle->in_flight() >= e.replica->max_concurrency) continue;
      const std::int64_t score = route_score(*e.replica, *e.handle, outlier_, now);
      if (score < best_score) {  // strict: the first of equal scores after the cursor wins
        best = &e;
        best_score = score;
      }
    }
    if (!any_candidate) break;
    if (best == nullptr) {
      result.outcome = RouteOutcome::kOverloaded;
      result.retry_after = route.queue->estimated_wait(route.capacity);
      return result;
    }
    const std::int64_t before = best->handle->in_flight_.fetch_add(1, std::memory_order_relaxed);
    if (best->replica->max_concurrency <= 0 || before < best->replica->max_concurrency) {
      best->handle->routed_.fetch_add(1, std::memory_order_relaxed);
      result.outcome = RouteOutcome::kRouted;
      result.lease = Lease(best->handle, route.queue);
      result.queued = best->replica->load.waiting;
      return result;
    }
    best->handle->in_flight_.fetch_sub(1, std::memory_order_relaxed);
    result.outcome = RouteOutcome::kOverloaded;
  }
  if (result.outcome == RouteOutcome::kOverloaded) {
    result.retry_after = route.queue->estimated_wait(route.capacity);
  } else {
    result.retry_after = no_replica_retry_after(*table, deployment, now);
  }
  return result;
}

std::chrono::seconds Router::no_replica_retry_after(const Table& table, std::string_view deployment,
                                                    std::int64_t now) const {
  // The soonest an ejected replica comes back, when one is ejected; else the time a replacement takes.
  std::int64_t soonest = std::numeric_limits<std::int64_t>::max();
  const auto it = table.routes.find(deployment);
  if (it != table.routes.end()) {
    for (const Table::Entry& e : it->second.entries) {
      if (e.replica->routable() && e.handle->ejected(now)) {
        soonest = std::min(soonest, e.handle->ejected_until_ns_.load(std::memory_order_relaxed) - now);
      }
    }
  }
  if (soonest == std::numeric_limits<std::int64_t>::max()) return kNoReplicaRetryAfter;
  const auto wait = std::chrono::ceil<std::chrono::seconds>(std::chrono::nanoseconds(soonest));
  return std::clamp(wait, std::chrono::seconds(1), kMaxRetryAfter);
}

void Router::report_success(ReplicaHandle& replica) {
  // Written only when set, so the common path stays a read of a shared cache line.
  if (replica.consecutive_failures_.load(std::memory_order_relaxed) != 0) {
    replica.consecutive_failures_.store(0, std::memory_order_relaxed);
  }
  // A replica that has served well for as long as its last ejection lasted starts its next one from the base.
  const int streak = replica.ejection_streak_.load(std::memory_order_relaxed);
  if (streak > 0) {
    const std::int64_t until = replica.ejected_until_ns_.load(std::memory_order_relaxed);
    const std::int64_t calm = std::chrono::nanoseconds(outlier_.base_ejection * streak).count();
    if (now_ns() - until > calm) replica.ejection_streak_.store(0, std::memory_order_relaxed);
  }
}

void Router::report_failure(std::string_view deployment, ReplicaHandle& replica, std::string_view why) {
  const std::int64_t now = now_ns();
  replica.last_failure_ns_.store(now, std::memory_order_relaxed);
  const int failures = replica.consecutive_failures_.fetch_add(1, std::memory_order_relaxed) + 1;
  if (failures < outlier_.consecutive_failures) return;
  std::lock_guard lock(eject_mutex_);
  if (replica.ejected(now)) return;
  const std::shared_ptr<const Table> table = table_.load();
  std::size_t total = 0;
  std::size_t ejected = 0;
  std::string id = "?";
  if (table) {
    if (const auto it = table->routes.find(deployment); it != table->routes.end()) {
      for (const Table::Entry& e : it->second.entries) {
        ++total;
        if (e.handle->ejected(now)) ++ejected;
        if (e.handle.get() == &replica) id = e.replica->id;
      }
    }
  }
  const auto cap = static_cast<std::size_t>(static_cast<double>(total) * outlier_.max_ejected_fraction);
  if (ejected + 1 > cap) {
    log(LogLevel::kWarn, "proxy", "replica %.*s/%s@%s failed %d times in a row (%.*s); not ejected: %zu of %zu "
        "replicas already are (cap %zu)", static_cast<int>(deployment.size()), deployment.data(), id.c_str(),
        replica.address().c_str(), failures, static_cast<int>(why.size()), why.data(), ejected, total, cap);
    return;
  }
  const int streak = replica.ejection_streak_.fetch_add(1, std::memory_order_relaxed) + 1;
  const auto duration = std::min<std::chrono::milliseconds>(outlier_.base_ejection * streak, outlier_.max_ejection);
  replica.ejected_until_ns_.store(now + std::chrono::nanoseconds(duration).count(), std::memory_order_relaxed);
  replica.ejections_total_.fetch_add(1, std::memory_order_relaxed);
  // It comes back with a clean count: the next ejection needs as many new failures.
  replica.consecutive_failures_.store(0, std::memory_order_relaxed);
  log(LogLevel::kWarn, "proxy", "replica %.*s/%s@%s ejected for %.1f s after %d failures in a row (last: %.*s); "
      "ejection %d in a row", static_cast<int>(deployment.size()), deployment.data(), id.c_str(),
      replica.address().c_str(), std::chrono::duration<double>(duration).count(), failures,
      static_cast<int>(why.size()), why.data(), streak);
}

std::vector<ReplicaRouteView> Router::replica_views() const {
  std::vector<ReplicaRouteView> views;
  const std::shared_ptr<const Table> table = table_.load();
  if (!table) return views;
  const std::int64_t now = now_ns();
  for (const auto& [name, route] : table->routes) {
    for (const Table::Entry& e : route.entries) {
      const ReplicaHandle& h = *e.handle;
      views.push_back({name, e.replica->id, e.replica->addr, e.replica->routable(), h.ejected(now), h.in_flight(),
                       h.routed(), h.tokens(), h.ejections(), h.consecutive_failures(), route_score(*e.replica, h, outlier_, now)});
    }
  }
  return views;
}

std::shared_ptr<const Snapshot> Router::snapshot() const {
  const std::shared_ptr<const Table> table = table_.load();
  return table ? table->snapshot : nullptr;
}

bool Router::ready() const {
  const std::shared_ptr<const Table> table = table_.load();
  if (!table) return false;
  const std::int64_t now = now_ns();
  for (const auto& [name, route] : table->routes) {
    for (const Table::Entry& e : route.entries) {
      if (e.replica->routable() && !e.handle->ejected(now)) return true;
    }
  }
  return false;
}

}  // namespace tokenbus::proxy
