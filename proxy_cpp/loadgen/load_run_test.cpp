// The whole load loop against a tiny SSE server on loopback: closed-loop stages one after the other (the
// clients going on across a border), the open loop's seeded arrivals and its in-flight cap, and the timing
// comment turned into hops.
#include "loadgen/load_run.hpp"

#include <gtest/gtest.h>

#include <utility>  // before Asio: Boost 1.74's awaitable.hpp needs it under g++ 12

#include <algorithm>
#include <atomic>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/read.hpp>
#include <boost/asio/read_until.hpp>
#include <boost/asio/redirect_error.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/write.hpp>
#include <cstdio>
#include <cstdlib>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "loadgen/distribution.hpp"

namespace tokenbus::loadgen {
namespace {

namespace net = boost::asio;
using tcp = net::ip::tcp;
using boost::system::error_code;

constexpr const char* kStreamHead =
    "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n";
constexpr const char* kPlainHead =
    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\nTrailer: X-Tokenbus-Timing\r\n\r\n";
constexpr const char* kTimingJson =
    R"({"proxy_received_ns":1700000000000000000,"routed_ns":1700000000001000400,)"
    R"("replica_received_ns":1700000000003000400,"ring_written_ns":1700000000006000400,)"
    R"("engine_produced_ns":1700000000010000400,"ring_read_ns":1700000000015000400,)"
    R"("proxy_sent_ns":1700000000021000999})";

// A tokenbus proxy's streaming on its own thread: every request gets `tokens` content events `gap` apart,
// the timing comment after the first when asked for it, then [DONE]; or, for the plain-text endpoint, as
// many text chunks and the timing trailer. Keep-alive. Counts the requests open at once.
class FakeServer {
 public:
  FakeServer(int tokens, std::chrono::milliseconds gap)
      : tokens_(tokens),
        gap_(gap),
        acceptor_(io_, tcp::endpoint(net::ip::make_address("127.0.0.1"), 0)),
        port_(acceptor_.local_endpoint().port()) {
    net::co_spawn(io_, accept(), net::detached);
    thread_ = std::thread([this] { io_.run(); });
  }
  ~FakeServer() {
    io_.stop();
    thread_.join();
  }

  std::uint16_t port() const { return port_; }
  int max_open() const { return max_open_; }
  int connections() const { return connections_; }

 private:
  net::awaitable<void> accept() {
    for (;;) {
      error_code ec;
      tcp::socket socket = co_await acceptor_.async_accept(net::redirect_error(net::use_awaitable, ec));
      if (ec) co_return;
      ++connections_;
      socket.set_option(tcp::no_delay(true), ec);  // each event leaves at once, as the proxy's do
      net::co_spawn(io_, serve(std::move(socket)), net::detached);
    }
  }

  net::awaitable<void> serve(tcp::socket socket) {
    std::string buffer;
    net::steady_timer timer(io_);
    error_code ec;
    for (;;) {
      const std::size_t head_end = co_await net::async_read_until(
          socket, net::dynamic_buffer(buffer), "\r\n\r\n", net::redirect_error(net::use_awaitable, ec));
      if (ec) co_return;
      const std::string head = buffer.substr(0, head_end);
      const std::size_t length_at = head.find("Content-Length: ");
      const std::size_t length = std::stoul(head.substr(length_at + 16));
      if (buffer.size() < head_end + length) {
        co_await net::async_read(socket, net::dynamic_buffer(buffer),
                                 net::transfer_exactly(head_end + length - buffer.size()),
                                 net::redirect_error(net::use_awaitable, ec));
        if (ec) co_return;
      }
      buffer.erase(0, head_end + length);
      const bool timing = head.find("X-Tokenbus-Timing: 1\r\n") != std::string::npos;
      const bool plain = !head.starts_with("POST /v1/chat/completions ");

      max_open_ = std::max(max_open_.load(), ++open_);
      // Every piece is built before its co_await: g++ 12 destroys the temporaries of a ?: inside a co_await
      // expression twice.
      const std::string event = plain ? " w" : "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\" w\"}}]}\n\n";
      const std::string comment = timing && !plain ? std::string(": tokenbus-timing ") + kTimingJson + "\n\n" : "";
      const std::string trailer = timing && plain ? std::string("X-Tokenbus-Timing: ") + kTimingJson + "\r\n" : "";
      const std::string last = (plain ? "" : chunk("data: [DONE]\n\n")) + "0\r\n" + trailer + "\r\n";
      const std::string first = chunk(event + comment);
      const std::string next = chunk(event);
      co_await write(socket, plain ? kPlainHead : kStreamHead, ec);
      for (int i = 0; i < tokens_ && !ec; ++i) {
        timer.expires_after(gap_);
        co_await timer.async_wait(net::redirect_error(net::use_awaitable, ec));
        if (!ec) co_await write(socket, i == 0 ? first : next, ec);
      }
      if (!ec) co_await write(socket, last, ec);
      --open_;
      if (ec) co_return;
    }
  }

  static std::string chunk(const std::string& data) {
    std::ostringstream out;
    out << std::hex << data.size() << "\r\n" << data << "\r\n";
    return out.str();
  }

  static net::awaitable<void> write(tcp::socket& socket, std::string_view bytes, error_code& ec) {
    co_await net::async_write(socket, net::buffer(bytes), net::redirect_error(net::use_awaitable, ec));
  }

  int tokens_;
  std::chrono::milliseconds gap_;
  net::io_context io_{1};
  tcp::acceptor acceptor_;
  const std::uint16_t port_;
  std::thread thread_;
  int open_ = 0;                   // only on the server's thread
  std::atomic<int> max_open_ = 0;  // read by the test's thread
  std::atomic<int> connections_ = 0;
};

struct Lines {
  std::vector<nlohmann::json> all;
  std::vector<nlohmann::json> of(const std::string& event) const {
    std::vector<nlohmann::json> out;
    std::copy_if(all.begin(), all.end(), std::back_inserter(out), [&](const auto& l) { return l["event"] == event; });
    return out;
  }
};

// The hops of kTimingJson.
nlohmann::json expected_hops() {
  return {{"queue_and_route", 1000}, {"proxy_to_replica", 2000}, {"replica_to_ring", 3000},
          {"engine", 4000},          {"ring_to_replica", 5000},  {"replica_to_client", 6000}};
}

Lines run(const Options& opts) {
  char* data = nullptr;
  std::size_t size = 0;
  std::FILE* out = open_memstream(&data, &size);
  Reporter reporter(out, opts.timing);
  EXPECT_EQ(run_load(opts, reporter), 0);
  std::fclose(out);
  Lines lines;
  std::istringstream in(std::string(data, size));
  std::free(data);
  for (std::string line; std::getline(in, line);) lines.all.push_back(nlohmann::json::parse(line));
  return lines;
}

TEST(LoadRun, ClosedLoopStagesOneAfterTheOther) {
  FakeServer server(3, std::chrono::milliseconds(10));
  Options opts;
  opts.port = server.port();
  opts.stages = {{2, 0, 0.5}, {4, 0, 0.5}};
  opts.timing = true;
  const Lines lines = run(opts);

  const auto stages = lines.of("stage");
  ASSERT_EQ(stages.size(), 2u);
  EXPECT_EQ(stages[0]["index"], 0);
  EXPECT_EQ(stages[0]["concurrency"], 2);
  EXPECT_TRUE(stages[0]["rate"].is_null());
  EXPECT_EQ(stages[1]["index"], 1);
  EXPECT_EQ(stages[1]["concurrency"], 4);
  const double border_s = stages[1]["start_s"].get<double>();
  EXPECT_GE(border_s, 0.5);  // never before its time

  const auto requests = lines.of("request");
  std::size_t in_stage[2] = {0, 0};
  std::int64_t itl_sum_us = 0;
  for (const auto& r : requests) {
    ASSERT_EQ(r["ok"], true) << r;
    const int stage = r["stage"].get<int>();
    ++in_stage[stage];
    // A request counts in the stage it started in: before the border for stage 0, after it for stage 1.
    if (stage == 0) {
      EXPECT_LT(r["start_s"].get<double>(), 0.5) << r;
    } else {
      EXPECT_GE(r["start_s"].get<double>(), border_s) << r;
    }
    EXPECT_EQ(r["tokens"], 3);
    EXPECT_EQ(r["chunks"], 3);
    const auto itl_sum = r["itl_sum_us"].get<std::int64_t>();
    const auto itl_max = r["itl_max_us"].get<std::int64_t>();
    EXPECT_LE(itl_max, itl_sum) << r;
    // The longer of the two gaps is at least their mean (within 1 us: each is truncated to whole us).
    EXPECT_GE(2 * itl_max + 1, itl_sum) << r;
    EXPECT_LE(r["ttft_us"].get<std::int64_t>() + itl_sum, r["e2e_us"].get<std::int64_t>()) << r;
    itl_sum_us += itl_sum;
    EXPECT_EQ(r["hops_us"], expected_hops());
    EXPECT_EQ(r["proxy_ttft_us"], 21000);
  }
  // The server sends three events 10 ms apart: 20 ms from the first to the last, which a busy client can
  // see shorter (a late first read) but not, on average, by half.
  EXPECT_GE(itl_sum_us / static_cast<std::int64_t>(requests.size()), 10000);
  EXPECT_GE(in_stage[0], 2u);  // every client of a stage starts at least one request
  EXPECT_GE(in_stage[1], 4u);
  // Stage 0's two clients go on into stage 1 beside two new ones: four streams at most, not 2 + 4, each
  // client on its own keep-alive connection throughout.
  EXPECT_EQ(server.max_open(), 4);
  EXPECT_EQ(server.connections(), 4);

  const auto progress = lines.of("progress");
  ASSERT_FALSE(progress.empty());
  EXPECT_EQ(progress.back()["stage"], 1);
  EXPECT_EQ(progress.back()["in_flight"], 0);
  const auto end = lines.of("end");
  ASSERT_EQ(end.size(), 1u);
  EXPECT_EQ(end[0]["requests"], requests.size());
  EXPECT_EQ(end[0]["failures"], 0);
}

TEST(LoadRun, AShrinkingStageEndsTheSurplusClientsAfterTheirRequest) {
  FakeServer server(4, std::chrono::milliseconds(20));  // 80 ms a request
  Options opts;
  opts.port = server.port();
  opts.stages = {{4, 0, 0.3}, {1, 0, 0.3}};
  const Lines lines = run(opts);

  const auto stages = lines.of("stage");
  ASSERT_EQ(stages.size(), 2u);
  const double border_s = stages[1]["start_s"].get<double>();
  std::vector<std::pair<double, double>> kept;  // stage 1's requests: start and end, in seconds
  for (const auto& r : lines.of("request")) {
    ASSERT_EQ(r["ok"], true) << r;
    const double start_s = r["start_s"].get<double>();
    if (r["stage"] == 0) {
      EXPECT_LT(start_s, border_s) << r;
    } else {
      kept.emplace_back(start_s, start_s + r["e2e_us"].get<double>() / 1e6);
    }
  }
  // Only client 0 goes on: stage 1's requests follow each other (e2e_us is truncated: 1 us of room), none
  // beside them from the three clients that stopped, and no new client beside stage 0's still finishing.
  ASSERT_GE(kept.size(), 2u);
  std::sort(kept.begin(), kept.end());
  for (std::size_t i = 1; i < kept.size(); ++i) EXPECT_LE(kept[i - 1].second, kept[i].first + 1e-6) << i;
  EXPECT_EQ(server.max_open(), 4);
  EXPECT_EQ(server.connections(), 4);
  EXPECT_EQ(lines.of("progress").back()["in_flight"], 0);
}

TEST(LoadRun, PlainTextTimingComesFromTheTrailer) {
  FakeServer server(3, std::chrono::milliseconds(5));
  Options opts;
  opts.port = server.port();
  opts.stages = {{1, 0, 0.2}};
  opts.endpoint = Endpoint::kPlain;
  opts.timing = true;
  const auto requests = run(opts).of("request");
  ASSERT_FALSE(requests.empty());
  for (const auto& r : requests) {
    ASSERT_EQ(r["ok"], true) << r;
    EXPECT_EQ(r["tokens"], 3);
    EXPECT_EQ(r["chunks"], 3);
    EXPECT_EQ(r["hops_us"], expected_hops());
    EXPECT_EQ(r["proxy_ttft_us"], 21000);
  }
}

TEST(LoadRun, AConnectionIdleForLongIsReopened) {
  FakeServer server(1, std::chrono::milliseconds(1));
  Options opts;
  opts.port = server.port();
  // One client, a pause (an open-loop stage whose first seeded arrival is minutes away), one client again.
  opts.stages = {{1, 0, 0.05}, {0, 0.001, 2.2}, {1, 0, 0.05}};
  const auto requests = run(opts).of("request");
  ASSERT_FALSE(requests.empty());
  for (const auto& r : requests) {
    ASSERT_EQ(r["ok"], true) << r;  // none of them went into a connection the server might be closing
    ASSERT_NE(r["stage"], 1);
  }
  EXPECT_EQ(server.connections(), 2);  // one per busy stage: kept alive within it, reopened after the pause
}

TEST(LoadRun, OpenLoopArrivalsAreSeededAndOverTheCapFailAtOnce) {
  FakeServer server(3, std::chrono::milliseconds(50));  // 150 ms a request: far more arrive than finish
  Options opts;
  opts.port = server.port();
  opts.stages = {{0, 100.0, 0.5}};
  opts.max_in_flight = 2;
  opts.seed = 11;
  const Lines lines = run(opts);

  // The arrivals are those of the seeded Poisson process, however the run went.
  Rng rng = seeded_rng(opts.seed, kArrivalStream);
  std::size_t expected = 0;
  for (double t = exponential_gap_s(rng, 100.0); t < 0.5; t += exponential_gap_s(rng, 100.0)) ++expected;
  ASSERT_GT(expected, 20u);
  const auto requests = lines.of("request");
  EXPECT_EQ(requests.size(), expected);

  const auto stages = lines.of("stage");
  ASSERT_EQ(stages.size(), 1u);
  EXPECT_TRUE(stages[0]["concurrency"].is_null());
  EXPECT_EQ(stages[0]["rate"], 100.0);
  std::size_t ok = 0, refused = 0;
  for (const auto& r : requests) {
    EXPECT_EQ(r["stage"], 0);
    EXPECT_TRUE(r.find("hops_us") == r.end());  // no --timing
    if (r["ok"] == true) {
      ++ok;
    } else {
      ++refused;
      EXPECT_EQ(r["error"], "over max-in-flight");
      EXPECT_EQ(r["e2e_us"], 0);
      EXPECT_EQ(r["tokens"], 0);
    }
  }
  EXPECT_GE(ok, 2u);
  EXPECT_GT(refused, 0u);
  EXPECT_LE(server.max_open(), 2);
  EXPECT_EQ(lines.of("end")[0]["failures"], refused);
}

}  // namespace
}  // namespace tokenbus::loadgen
