// Replica choice: least loaded, DRAINING and unhealthy skipped, max_concurrency as a hard bound.
#include <gtest/gtest.h>

#include <set>

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

}  // namespace
}  // namespace tokenbus::proxy
