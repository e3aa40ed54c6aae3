// Replica choice: least loaded, DRAINING and unhealthy skipped, max_concurrency as a hard bound.
#include <gtest/gtest.h>

#include <set>
#include <thread>

#include "proxy/retry_budget.hpp"
#include "proxy/router.hpp"

namespace tokenbus::proxy {
namespace {

SnapshotReplica replica(std::string id, std::int64_t running, std::int64_t waiting, std::int64_t max_concurrency = 8,
                        ReplicaState state = ReplicaState::kReady, bool healthy = true) {
  SnapshotReplica r;
  r.id = id;
  r.node = "node-a";
  r.addr = "10.0.0.1:" + std::to_string(40000 + std::stoi(id.substr(1)));
  r.state = state;
  r.max_concurrency = max_concurrency;
  r.load = ReplicaLoad{running, waiting, 0.0};
  r.healthy = healthy;
  return r;
}

std::shared_ptr<const Snapshot> snapshot(std::uint64_t version, std::vector<SnapshotReplica> replicas) {
  auto s = std::make_shared<Snapshot>();
  s->epoch = 1;
  s->version = (1ull << 32) | version;
  s->deployments.push_back(Deployment{.name = "demo", .replicas = std::move(replicas)});
  s->deployments.push_back(Deployment{.name = "empty", .replicas = {}});
  return s;
}

std::string routed_address(Router& router) {
  RouteResult r = router.route("demo");
  EXPECT_EQ(r.outcome, RouteOutcome::kRouted);
  return r.outcome == RouteOutcome::kRouted ? r.lease.replica()->address() : "";
}

TEST(Router, AnswersNoSnapshotUntilOneIsApplied) {
  Router router;
  EXPECT_EQ(router.route("demo").outcome, RouteOutcome::kNoSnapshot);
  EXPECT_FALSE(router.ready());
  EXPECT_LT(router.staleness_seconds(), 0);
  router.apply(snapshot(1, {replica("r1", 0, 0)}));
  router.mark_received();
  EXPECT_TRUE(router.ready());
  EXPECT_GE(router.staleness_seconds(), 0);
  EXPECT_EQ(router.route("demo").outcome, RouteOutcome::kRouted);
}

TEST(Router, UnknownAndEmptyDeployments) {
  Router router;
  router.apply(snapshot(1, {replica("r1", 0, 0)}));
  EXPECT_EQ(router.route("nope").outcome, RouteOutcome::kUnknownDeployment);
  EXPECT_EQ(router.route("empty").outcome, RouteOutcome::kNoReplica);
}

TEST(Router, PicksTheLeastLoadedReplica) {
  Router router;
  // scores (running + waiting, nothing in flight): r1 7, r2 2, r3 3
  router.apply(snapshot(1, {replica("r1", 5, 2), replica("r2", 1, 1), replica("r3", 3, 0)}));
  for (int i = 0; i < 6; ++i) EXPECT_EQ(routed_address(router), "10.0.0.1:40002");
}

TEST(Router, CountsItsOwnInFlightRequests) {
  Router router;
  router.apply(snapshot(1, {replica("r1", 0, 0), replica("r2", 2, 0)}));
  // r1 scores 0, r2 2: the first two go to r1 (scores 0 then 1 < 2), the third ties (2 and 2).
  RouteResult first = router.route("demo");
  RouteResult second = router.route("demo");
  EXPECT_EQ(first.lease.replica()->address(), "10.0.0.1:40001");
  EXPECT_EQ(second.lease.replica()->address(), "10.0.0.1:40001");
  EXPECT_EQ(first.lease.replica()->in_flight(), 2);
  second = RouteResult{};  // released
  EXPECT_EQ(first.lease.replica()->in_flight(), 1);
}

TEST(Router, ViewsShowEachReplicasScoreAndRoutedCount) {
  Router router;
  EXPECT_TRUE(router.replica_views().empty());
  router.apply(snapshot(1, {replica("r1", 3, 1), replica("r2", 0, 0, 8, ReplicaState::kDraining)}));
  RouteResult held = router.route("demo");
  { RouteResult done = router.route("demo"); }
  const std::vector<ReplicaRouteView> views = router.replica_views();
  ASSERT_EQ(views.size(), 2u);
  EXPECT_EQ(views[0].id, "r1");
  EXPECT_TRUE(views[0].routable);
  EXPECT_EQ(views[0].routed, 2u);
  EXPECT_EQ(views[0].in_flight, 1);
  EXPECT_EQ(views[0].score, 1 + 3 + 1);
  EXPECT_EQ(views[1].id, "r2");
  EXPECT_FALSE(views[1].routable);
  EXPECT_EQ(views[1].routed, 0u);
}

TEST(Router, BreaksTiesRoundRobin) {
  Router router;
  router.apply(snapshot(1, {replica("r1", 1, 0), replica("r2", 1, 0), replica("r3", 1, 0)}));
  std::set<std::string> seen;
  for (int i = 0; i < 3; ++i) seen.insert(routed_address(router));  // each lease released at once
  EXPECT_EQ(seen.size(), 3u);
}

TEST(Router, SkipsDrainingAndUnhealthyReplicas) {
  Router router;
  router.apply(snapshot(1, {replica("r1", 0, 0, 8, ReplicaState::kDraining),
                            replica("r2", 0, 0, 8, ReplicaState::kReady, /*healthy=*/false), replica("r3", 50, 50)}));
  for (int i = 0; i < 5; ++i) EXPECT_EQ(routed_address(router), "10.0.0.1:40003");
  router.apply(snapshot(2, {replica("r1", 0, 0, 8, ReplicaState::kDraining),
                            replica("r2", 0, 0, 8, ReplicaState::kReady, false)}));
  EXPECT_EQ(router.route("demo").outcome, RouteOutcome::kNoReplica);
  EXPECT_FALSE(router.ready());
}

TEST(Router, OverloadsAtMaxConcurrencyAndRecovers) {
  Router router;
  router.apply(snapshot(1, {replica("r1", 0, 0, /*max_concurrency=*/2), replica("r2", 0, 0, 1)}));
  std::vector<RouteResult> held;
  for (int i = 0; i < 3; ++i) {
    held.push_back(router.route("demo"));
    ASSERT_EQ(held.back().outcome, RouteOutcome::kRouted) << i;
  }
  EXPECT_EQ(router.route("demo").outcome, RouteOutcome::kOverloaded);
  held.pop_back();
  EXPECT_EQ(router.route("demo").outcome, RouteOutcome::kRouted);
}

TEST(Router, KeepsInFlightCountsAcrossSnapshots) {
  Router router;
  router.apply(snapshot(1, {replica("r1", 0, 0, 1)}));
  RouteResult held = router.route("demo");
  ASSERT_EQ(held.outcome, RouteOutcome::kRouted);
  router.apply(snapshot(2, {replica("r1", 0, 0, 1)}));  // same address: same handle, same count
  EXPECT_EQ(router.route("demo").outcome, RouteOutcome::kOverloaded);
  router.apply(snapshot(3, {}));  // the replica left: a request still in flight keeps its handle alive
  EXPECT_EQ(held.lease.replica()->in_flight(), 1);
  EXPECT_EQ(router.route("demo").outcome, RouteOutcome::kNoReplica);
}

TEST(Router, EjectsAfterConsecutiveFailuresForAGrowingTime) {
  OutlierPolicy policy;
  policy.base_ejection = std::chrono::seconds(2);  // long beside the few lines that check it is still on
  Router router(policy);
  router.apply(snapshot(1, {replica("r1", 0, 0), replica("r2", 0, 0)}));
  RouteResult held = router.route("demo");
  ReplicaHandle& bad = *held.lease.replica();
  router.report_failure("demo", bad, "test");
  router.report_failure("demo", bad, "test");
  const auto now = [] { return std::chrono::steady_clock::now().time_since_epoch().count(); };
  EXPECT_FALSE(bad.ejected(now()));
  router.report_failure("demo", bad, "test");
  EXPECT_TRUE(bad.ejected(now()));
  EXPECT_EQ(bad.ejections(), 1u);
  // while ejected, every request goes to the other replica, and a refused one is told when to come back
  for (int i = 0; i < 4; ++i) EXPECT_NE(routed_address(router), bad.address());
  const ReplicaHandle* other[] = {router.route("demo").lease.replica()};
  const RouteResult none = router.route("demo", other);
  EXPECT_EQ(none.outcome, RouteOutcome::kNoReplica);
  EXPECT_GE(none.retry_after, std::chrono::seconds(1));  // the rest of the 2 s ejection, rounded up
  EXPECT_LE(none.retry_after, std::chrono::seconds(2));
  // it comes back by itself once the ejection is over
  const auto back = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (bad.ejected(now()) && std::chrono::steady_clock::now() < back) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));  // polling the clock, not synchronising
  }
  EXPECT_FALSE(bad.ejected(now()));
  // the next ejection in a row lasts twice as long
  for (int i = 0; i < 3; ++i) router.report_failure("demo", bad, "test");
  const std::int64_t second = bad.ejected(now()) ? 1 : 0;
  EXPECT_EQ(second, 1);
  EXPECT_EQ(bad.ejections(), 2u);
}

TEST(Router, NeverEjectsMoreThanHalfOfADeployment) {
  Router router;
  router.apply(snapshot(1, {replica("r1", 0, 0), replica("r2", 0, 0), replica("r3", 0, 0)}));
  std::vector<RouteResult> held;
  for (int i = 0; i < 3; ++i) held.push_back(router.route("demo"));
  for (RouteResult& r : held) {
    for (int i = 0; i < 5; ++i) router.report_failure("demo", *r.lease.replica(), "test");
  }
  int ejected = 0;
  for (const ReplicaRouteView& v : router.replica_views()) ejected += v.ejected ? 1 : 0;
  EXPECT_EQ(ejected, 1);  // floor(3 * 0.5)
  EXPECT_TRUE(router.ready());
}

TEST(Router, AReplicaThatJustFailedNeverLooksLeastLoaded) {
  Router router;
  // r1 is idle but just failed; r2 is busy
  router.apply(snapshot(1, {replica("r1", 0, 0), replica("r2", 6, 1)}));
  ReplicaHandle* r1 = nullptr;
  for (int i = 0; i < 2 && r1 == nullptr; ++i) {
    RouteResult r = router.route("demo");
    if (r.lease.replica()->address().ends_with("40001")) r1 = r.lease.replica();
  }
  ASSERT_NE(r1, nullptr);
  router.report_failure("demo", *r1, "test");
  for (int i = 0; i < 5; ++i) EXPECT_TRUE(routed_address(router).ends_with("40002"));
  router.report_success(*r1);  // a success clears it
  EXPECT_TRUE(routed_address(router).ends_with("40001"));
}

TEST(Router, RetriesSkipTheReplicasAlreadyTried) {
  Router router;
  router.apply(snapshot(1, {replica("r1", 0, 0), replica("r2", 0, 0)}));
  RouteResult first = router.route("demo");
  const ReplicaHandle* tried[] = {first.lease.replica()};
  RouteResult second = router.route("demo", tried);
  ASSERT_EQ(second.outcome, RouteOutcome::kRouted);
  EXPECT_NE(second.lease.replica(), first.lease.replica());
  const ReplicaHandle* both[] = {first.lease.replica(), second.lease.replica()};
  EXPECT_EQ(router.route("demo", both).outcome, RouteOutcome::kNoReplica);
}

TEST(Router, CarriesTheDeploymentsLimits) {
  Router router;
  auto s = std::make_shared<Snapshot>();
  s->version = (1ull << 32) | 1;
  s->deployments.push_back({.name = "demo", .max_model_len = 2048, .first_token_timeout_s = 9.5,
                            .idle_timeout_s = 2.5, .replicas = {replica("r1", 0, 0)}});
  router.apply(s);
  const RouteResult r = router.route("demo");
  EXPECT_EQ(r.limits.max_model_len, 2048);
  EXPECT_DOUBLE_EQ(r.limits.first_token_timeout_s, 9.5);
  EXPECT_DOUBLE_EQ(r.limits.idle_timeout_s, 2.5);
}

TEST(RetryBudget, AllowsAShareOfTheActiveRequestsAndAtLeastAFew) {
  RetryBudget budget(RetryPolicy{});
  std::vector<std::unique_ptr<RetryBudget::Active>> active;
  for (int i = 0; i < 30; ++i) active.push_back(std::make_unique<RetryBudget::Active>(budget));
  std::vector<RetryBudget::Retry> held;
  for (int i = 0; i < 6; ++i) {
    RetryBudget::Retry r = budget.try_retry();
    EXPECT_TRUE(r) << i;  // 20% of 30
    held.push_back(std::move(r));
  }
  EXPECT_FALSE(budget.try_retry());
  held.pop_back();  // a retry that ends gives its slot back
  EXPECT_TRUE(budget.try_retry());
  active.clear();
  held.clear();
  std::vector<RetryBudget::Retry> few;
  for (int i = 0; i < 3; ++i) few.push_back(budget.try_retry());  // with nothing active, the floor of 3
  for (const auto& r : few) EXPECT_TRUE(r);
  EXPECT_FALSE(budget.try_retry());
}

}  // namespace
}  // namespace tokenbus::proxy
