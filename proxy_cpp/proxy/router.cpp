#include "proxy/router.hpp"

#include <limits>
#include <set>

#include "common/log.hpp"

namespace tokenbus::proxy {

// A snapshot plus, for each replica in it, the handle that carries its in-flight count. Immutable once
// built, except for the round-robin cursors.
struct Router::Table {
  struct Entry {
    const SnapshotReplica* replica;
    std::shared_ptr<ReplicaHandle> handle;
  };
  struct Route {
    std::vector<Entry> entries;
    mutable std::atomic<std::uint64_t> cursor{0};  // where the tie-breaking scan starts
  };
  std::shared_ptr<const Snapshot> snapshot;
  std::map<std::string, Route, std::less<>> routes;
  bool any_routable = false;
};

namespace {

// A replica's routing score: this proxy's own in-flight requests there plus the load its engine last
// reported (running + waiting), which also counts other proxies' requests.
std::int64_t load_score(const ReplicaLoad& load, std::int64_t in_flight) {
  return in_flight + load.running + load.waiting;
}

}  // namespace

ReplicaHandle::ReplicaHandle(std::string address) : address_(std::move(address)) {}

Lease& Lease::operator=(Lease&& other) noexcept {
  if (this != &other) {
    release();
    replica_ = std::move(other.replica_);
  }
  return *this;
}

void Lease::release() {
  if (replica_) {
    replica_->in_flight_.fetch_sub(1, std::memory_order_relaxed);
    replica_.reset();
  }
}

Router::Router() = default;
Router::~Router() = default;

void Router::apply(std::shared_ptr<const Snapshot> snapshot) {
  std::lock_guard lock(apply_mutex_);
  auto table = std::make_shared<Table>();
  table->snapshot = snapshot;
  std::map<std::string, std::shared_ptr<ReplicaHandle>> handles;
  std::set<std::string> up;  // "deployment/id@addr" of every routable replica, to log changes
  for (const Deployment& d : snapshot->deployments) {
    Table::Route& route = table->routes[d.name];
    route.entries.reserve(d.replicas.size());
    for (const SnapshotReplica& r : d.replicas) {
      std::shared_ptr<ReplicaHandle>& handle = handles[r.addr];
      if (!handle) {
        auto kept = handles_.find(r.addr);
        handle = kept != handles_.end() ? kept->second : std::make_shared<ReplicaHandle>(r.addr);
      }
      route.entries.push_back({&r, handle});
      if (r.routable()) {
        table->any_routable = true;
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
    log(LogLevel::kInfo, "proxy", "first routing snapshot: version %llu (epoch %llu), %zu deployments",
        static_cast<unsigned long long>(snapshot->version), static_cast<unsigned long long>(snapshot->epoch),
        snapshot->deployments.size());
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
  table_.store(std::move(table));
}

void Router::mark_received() {
  last_received_ns_.store(std::chrono::steady_clock::now().time_since_epoch().count(), std::memory_order_relaxed);
}

double Router::staleness_seconds() const {
  const std::int64_t last = last_received_ns_.load(std::memory_order_relaxed);
  if (last < 0) return -1.0;
  const std::int64_t now = std::chrono::steady_clock::now().time_since_epoch().count();
  return std::chrono::duration<double>(std::chrono::steady_clock::duration(now - last)).count();
}

RouteResult Router::route(std::string_view deployment) {
  const std::shared_ptr<const Table> table = table_.load();
  if (!table) return {RouteOutcome::kNoSnapshot, {}};
  const auto it = table->routes.find(deployment);
  if (it == table->routes.end()) return {RouteOutcome::kUnknownDeployment, {}};
  const Table::Route& route = it->second;
  const std::size_t n = route.entries.size();
  if (n == 0) return {RouteOutcome::kNoReplica, {}};

  // A claim can race with other threads picking the same replica; re-pick a few times, then give up
  // with 429 rather than exceed max_concurrency.
  for (int attempt = 0; attempt < 4; ++attempt) {
    const std::size_t start = route.cursor.fetch_add(1, std::memory_order_relaxed) % n;
    const Table::Entry* best = nullptr;
    std::int64_t best_score = std::numeric_limits<std::int64_t>::max();
    bool any_routable = false;
    for (std::size_t i = 0; i < n; ++i) {
      const Table::Entry& e = route.entries[(start + i) % n];
      if (!e.replica->routable()) continue;
      any_routable = true;
      const std::int64_t in_flight = e.handle->in_flight();
      if (e.replica->max_concurrency > 0 && in_flight >= e.replica->max_concurrency) continue;
      const std::int64_t score = load_score(e.replica->load, in_flight);
      if (score < best_score) {  // strict: the first of equal scores after the cursor wins
        best = &e;
        best_score = score;
      }
    }
    if (!any_routable) return {RouteOutcome::kNoReplica, {}};
    if (best == nullptr) return {RouteOutcome::kOverloaded, {}};
    const std::int64_t before = best->handle->in_flight_.fetch_add(1, std::memory_order_relaxed);
    if (best->replica->max_concurrency <= 0 || before < best->replica->max_concurrency) {
      best->handle->routed_.fetch_add(1, std::memory_order_relaxed);
      return {RouteOutcome::kRouted, Lease(best->handle)};
    }
    best->handle->in_flight_.fetch_sub(1, std::memory_order_relaxed);
  }
  return {RouteOutcome::kOverloaded, {}};
}

std::vector<ReplicaRouteView> Router::replica_views() const {
  std::vector<ReplicaRouteView> views;
  const std::shared_ptr<const Table> table = table_.load();
  if (!table) return views;
  for (const auto& [name, route] : table->routes) {
    for (const Table::Entry& e : route.entries) {
      const std::int64_t in_flight = e.handle->in_flight();
      views.push_back({name, e.replica->id, e.replica->addr, e.replica->routable(), in_flight, e.handle->routed(),
                       load_score(e.replica->load, in_flight)});
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
  return table && table->any_routable;
}

}  // namespace tokenbus::proxy
