// The output protocol as tools/bench/loadgen.py reads it: one JSON object per line, request lines batched.
#include "loadgen/reporter.hpp"

#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

namespace tokenbus::loadgen {
namespace {

// A memory stream standing in for stdout.
class Captured {
 public:
  Captured() : file_(open_memstream(&data_, &size_)) {}
  ~Captured() {
    std::fclose(file_);
    std::free(data_);
  }
  std::FILE* file() { return file_; }
  std::vector<nlohmann::json> lines() {
    std::fflush(file_);
    std::vector<nlohmann::json> out;
    std::istringstream in(std::string(data_, size_));
    for (std::string line; std::getline(in, line);) out.push_back(nlohmann::json::parse(line));
    return out;
  }

 private:
  char* data_ = nullptr;
  std::size_t size_ = 0;
  std::FILE* file_;
};

TEST(Reporter, WritesTheProtocolLines) {
  Captured out;
  Reporter reporter(out.file());
  reporter.start(Stage{2, 0, 1.0});
  ASSERT_EQ(out.lines().size(), 1u);  // start is written at once: the reader starts its CPU meters on it

  reporter.add_tokens(32);
  reporter.request({true, 1500, 9000, 32, ""});
  reporter.request({false, -1, 300, 0, "HTTP 500: bad \xff byte"});
  EXPECT_EQ(out.lines().size(), 1u);  // requests wait for the next progress line
  reporter.lag(std::chrono::microseconds(120));
  reporter.progress(0.25, 1);
  reporter.end(1.5, 0.02);

  const auto lines = out.lines();
  ASSERT_EQ(lines.size(), 6u);
  EXPECT_EQ(lines[0], (nlohmann::json{{"event", "start"}, {"concurrency", 2}}));
  EXPECT_EQ(lines[1]["event"], "request");
  EXPECT_EQ(lines[1]["ok"], true);
  EXPECT_EQ(lines[1]["ttft_us"], 1500);
  EXPECT_EQ(lines[1]["tokens"], 32);
  EXPECT_TRUE(lines[2]["ttft_us"].is_null());
  EXPECT_EQ(lines[2]["error"], "HTTP 500: bad \xef\xbf\xbd byte");  // replaced, not thrown on
  EXPECT_EQ(lines[3]["event"], "progress");
  EXPECT_EQ(lines[3]["requests"], 2);
  EXPECT_EQ(lines[3]["failures"], 1);
  EXPECT_EQ(lines[3]["tokens"], 32);
  EXPECT_EQ(lines[3]["lag_us"], nlohmann::json::array({120}));
  EXPECT_EQ(lines[3]["in_flight"], 1);
  EXPECT_EQ(lines[3]["stage"], 0);
  EXPECT_EQ(lines[4]["event"], "progress");  // the final one, before end
  EXPECT_EQ(lines[4]["lag_us"], nlohmann::json::array());
  EXPECT_EQ(lines[4]["in_flight"], 0);
  EXPECT_EQ(lines[5]["event"], "end");
  EXPECT_EQ(lines[5]["requests"], 2);
  EXPECT_EQ(lines[5]["failures"], 1);
  EXPECT_DOUBLE_EQ(lines[5]["duration_s"].get<double>(), 1.5);
}

TEST(Reporter, StagesAndTheNewRequestFields) {
  Captured out;
  Reporter reporter(out.file());
  reporter.start(Stage{0, 50.0, 1.0});
  reporter.stage(0, Stage{4, 0, 1.0}, 0.001);
  reporter.stage(1, Stage{0, 50.0, 2.0}, 1.0);
  EXPECT_EQ(out.lines().size(), 3u);  // stage lines are written at once
  RequestOutcome outcome{true, 1500, 9000, 32, ""};
  outcome.start_s = 1.25;
  outcome.stage = 1;
  outcome.itl_max_us = 700;
  outcome.itl_sum_us = 6000;
  outcome.chunks = 31;
  outcome.hops = FirstTokenHops{};  // not reported without --timing
  reporter.request(outcome);
  reporter.progress(1.5, 3);

  const auto lines = out.lines();
  ASSERT_EQ(lines.size(), 5u);
  EXPECT_TRUE(lines[0]["concurrency"].is_null());
  EXPECT_EQ(lines[1], (nlohmann::json{{"event", "stage"}, {"index", 0}, {"concurrency", 4}, {"rate", nullptr},
                                      {"start_s", 0.001}}));
  EXPECT_EQ(lines[2], (nlohmann::json{{"event", "stage"}, {"index", 1}, {"concurrency", nullptr}, {"rate", 50.0},
                                      {"start_s", 1.0}}));
  const auto& request = lines[3];
  EXPECT_DOUBLE_EQ(request["start_s"].get<double>(), 1.25);
  EXPECT_EQ(request["stage"], 1);
  EXPECT_EQ(request["itl_max_us"], 700);
  EXPECT_EQ(request["itl_sum_us"], 6000);
  EXPECT_EQ(request["chunks"], 31);
  EXPECT_FALSE(request.contains("hops_us"));
  EXPECT_FALSE(request.contains("proxy_ttft_us"));
  EXPECT_EQ(lines[4]["stage"], 1);  // the last stage started
  EXPECT_EQ(lines[4]["in_flight"], 3);
}

TEST(Reporter, HopsWithTiming) {
  Captured out;
  Reporter reporter(out.file(), true);
  RequestOutcome timed{true, 1500, 9000, 32, ""};
  timed.hops = FirstTokenHops{{10, 20, 30, FirstTokenHops::kUnknown, FirstTokenHops::kUnknown, -5}, 1400};
  reporter.request(timed);
  reporter.request({false, -1, 300, 0, "HTTP 503: no replica"});  // no comment: both null
  reporter.progress(0.25, 0);

  const auto lines = out.lines();
  ASSERT_EQ(lines.size(), 3u);
  EXPECT_EQ(lines[0]["hops_us"], (nlohmann::json{{"queue_and_route", 10},
                                                 {"proxy_to_replica", 20},
                                                 {"replica_to_ring", 30},
                                                 {"engine", nullptr},
                                                 {"ring_to_replica", nullptr},
                                                 {"replica_to_client", -5}}));
  EXPECT_EQ(lines[0]["proxy_ttft_us"], 1400);
  EXPECT_TRUE(lines[1]["hops_us"].is_null());
  EXPECT_TRUE(lines[1]["proxy_ttft_us"].is_null());
}

}  // namespace
}  // namespace tokenbus::loadgen
