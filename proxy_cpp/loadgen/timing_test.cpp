// The proxy's `: tokenbus-timing` comment: parsed into hops that add up to the proxy's TTFT, whole or split
// anywhere; a malformed one is reported as such and does not fail the stream; without one nothing changes.
#include "loadgen/timing.hpp"

#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "loadgen/stream_counter.hpp"

namespace tokenbus::loadgen {
namespace {

constexpr std::size_t kMaxLine = 1 << 20;

// Stamps 1 ms, 2 ms, ... 6 ms apart (plus odd nanoseconds, truncated per hop).
const std::string kTimingJson =
    R"({"proxy_received_ns":1700000000000000000,"routed_ns":1700000000001000400,)"
    R"("replica_received_ns":1700000000003000400,"ring_written_ns":1700000000006000400,)"
    R"("engine_produced_ns":1700000000010000400,"ring_read_ns":1700000000015000400,)"
    R"("proxy_sent_ns":1700000000021000999})";

std::string event(const std::string& json) { return "data: " + json + "\n\n"; }

std::string chat_body(const std::string& timing_line) {
  std::string body = event(R"({"choices":[{"index":0,"delta":{"content":" alpha"}}]})");
  body += timing_line;
  body += event(R"({"choices":[{"index":0,"delta":{"content":" beta"}}]})");
  body += "data: [DONE]\n\n";
  return body;
}

TEST(TimingParser, GoodStampsGiveTheSixHopsAndTheProxyTtft) {
  TimingParser parser;
  const std::optional<FirstTokenHops> hops = parser.parse(kTimingJson);
  ASSERT_TRUE(hops);
  EXPECT_EQ(hops->hop_us, (std::array<std::int64_t, kHops>{1000, 2000, 3000, 4000, 5000, 6000}));
  EXPECT_EQ(hops->proxy_ttft_us, 21000);
  std::int64_t sum = 0;
  for (const std::int64_t us : hops->hop_us) sum += us;
  EXPECT_LE(hops->proxy_ttft_us - sum, static_cast<std::int64_t>(kHops));  // truncation, per hop
}

TEST(TimingParser, ExtraKeysAndAnyOrderAreFine) {
  TimingParser parser;
  const auto hops = parser.parse(
      R"({"proxy_sent_ns":9000,"v":1,"ring_read_ns":8000,"engine_produced_ns":7000,"ring_written_ns":5000,)"
      R"("replica_received_ns":4000,"routed_ns":2000,"proxy_received_ns":1000})");
  ASSERT_TRUE(hops);
  EXPECT_EQ(hops->hop_us, (std::array<std::int64_t, kHops>{1, 2, 1, 2, 1, 1}));
  EXPECT_EQ(hops->proxy_ttft_us, 8);
}

TEST(TimingParser, AStampNotTakenMakesItsTwoHopsUnknown) {
  TimingParser parser;
  // engine_produced_ns 0: a worker that does not stamp; the proxy's TTFT is still known.
  const auto hops = parser.parse(
      R"({"proxy_received_ns":1000,"routed_ns":2000,"replica_received_ns":4000,"ring_written_ns":5000,)"
      R"("engine_produced_ns":0,"ring_read_ns":8000,"proxy_sent_ns":9000})");
  ASSERT_TRUE(hops);
  EXPECT_EQ(hops->hop_us[3], FirstTokenHops::kUnknown);
  EXPECT_EQ(hops->hop_us[4], FirstTokenHops::kUnknown);
  EXPECT_EQ(hops->hop_us[2], 1);
  EXPECT_EQ(hops->proxy_ttft_us, 8);
}

TEST(TimingParser, ClockSkewGivesANegativeHop) {
  const auto hops = hops_from_stamps({1000000, 2000000, 1500000, 2500000, 3000000, 3500000, 4000000});
  ASSERT_TRUE(hops);
  EXPECT_EQ(hops->hop_us[1], -500);
}

TEST(TimingParser, MalformedIsNullopt) {
  TimingParser parser;
  for (const std::string bad : {
           "",
           "{",
           "[1,2]",
           R"({"proxy_received_ns":1})",                                      // stamps missing
           R"({"proxy_received_ns":"1","routed_ns":2,"replica_received_ns":3,"ring_written_ns":4,)"
           R"("engine_produced_ns":5,"ring_read_ns":6,"proxy_sent_ns":7})",  // a string
           R"({"proxy_received_ns":1.5,"routed_ns":2,"replica_received_ns":3,"ring_written_ns":4,)"
           R"("engine_produced_ns":5,"ring_read_ns":6,"proxy_sent_ns":7})",  // not an integer
           R"({"proxy_received_ns":0,"routed_ns":2,"replica_received_ns":3,"ring_written_ns":4,)"
           R"("engine_produced_ns":5,"ring_read_ns":6,"proxy_sent_ns":7})",  // the proxy's own stamp not taken
           R"({"proxy_received_ns":-1,"routed_ns":2,"replica_received_ns":3,"ring_written_ns":4,)"
           R"("engine_produced_ns":5,"ring_read_ns":6,"proxy_sent_ns":7})",
       }) {
    EXPECT_FALSE(parser.parse(bad)) << bad;
  }
  EXPECT_TRUE(parser.parse(kTimingJson));  // the parser is still good after failures
}

TEST(ChatStreamCounterTiming, TheCommentIsReadAtEverySplitPoint) {
  const std::string body = chat_body(": tokenbus-timing " + kTimingJson + "\n\n");
  for (std::size_t cut = 0; cut <= body.size(); ++cut) {
    ChatStreamCounter counter(kMaxLine);
    const std::size_t tokens = counter.feed(body.substr(0, cut)) + counter.feed(body.substr(cut));
    ASSERT_EQ(tokens, 2u) << "cut at " << cut;
    ASSERT_TRUE(counter.done());
    ASSERT_TRUE(counter.timing()) << "cut at " << cut;
    ASSERT_EQ(counter.timing()->proxy_ttft_us, 21000);
    ASSERT_FALSE(counter.timing_malformed());
  }
}

TEST(ChatStreamCounterTiming, AMalformedCommentIsFlaggedAndTheStreamGoesOn) {
  ChatStreamCounter counter(kMaxLine);
  EXPECT_EQ(counter.feed(chat_body(": tokenbus-timing {\"proxy_received_ns\":\n\n")), 2u);
  EXPECT_TRUE(counter.done());
  EXPECT_EQ(counter.error(), "");
  EXPECT_FALSE(counter.timing());
  EXPECT_TRUE(counter.timing_malformed());
  counter.reset();  // the next request on the connection starts without it
  EXPECT_FALSE(counter.timing_malformed());
}

TEST(ChatStreamCounterTiming, AbsentOrOtherCommentsLeaveItUnset) {
  for (const std::string& line : {std::string(), std::string(": keep-alive\n\n"),
                                 std::string(": tokenbus-timingX {}\n\n")}) {
    ChatStreamCounter counter(kMaxLine);
    EXPECT_EQ(counter.feed(chat_body(line)), 2u);
    EXPECT_TRUE(counter.done());
    EXPECT_FALSE(counter.timing()) << line;
    EXPECT_FALSE(counter.timing_malformed()) << line;
  }
}

}  // namespace
}  // namespace tokenbus::loadgen
