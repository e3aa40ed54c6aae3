// The output protocol as tools/bench_loadgen.py reads it: one JSON object per line, request lines batched.
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
  reporter.start(2);
  ASSERT_EQ(out.lines().size(), 1u);  // start is written at once: the reader starts its CPU meters on it

  reporter.add_tokens(32);
  reporter.request({true, 1500, 9000, 32, ""});
  reporter.request({false, -1, 300, 0, "HTTP 500: bad \xff byte"});
  EXPECT_EQ(out.lines().size(), 1u);  // requests wait for the next progress line
  reporter.lag(std::chrono::microseconds(120));
  reporter.progress(0.25);
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
  EXPECT_EQ(lines[4]["event"], "progress");  // the final one, before end
  EXPECT_EQ(lines[4]["lag_us"], nlohmann::json::array());
  EXPECT_EQ(lines[5]["event"], "end");
  EXPECT_EQ(lines[5]["requests"], 2);
  EXPECT_EQ(lines[5]["failures"], 1);
  EXPECT_DOUBLE_EQ(lines[5]["duration_s"].get<double>(), 1.5);
}

}  // namespace
}  // namespace tokenbus::loadgen
