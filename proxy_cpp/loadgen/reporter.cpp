#include "loadgen/reporter.hpp"

#include <nlohmann/json.hpp>

namespace tokenbus::loadgen {
namespace {

using Json = nlohmann::json;

// Error texts may quote a server's body, which need not be valid UTF-8: replaced, never thrown on.
std::string dump(const Json& j) { return j.dump(-1, ' ', false, Json::error_handler_t::replace) + "\n"; }

Json or_null(bool known, const Json& value) { return known ? value : Json(nullptr); }

}  // namespace

void Reporter::start(const Stage& first) {
  pending_ += dump({{"event", "start"}, {"concurrency", or_null(first.rate == 0, first.concurrency)}});
  flush();
}

void Reporter::stage(int index, const Stage& stage, double start_s) {
  stage_ = index;
  const bool open_loop = stage.rate > 0;
  pending_ += dump({{"event", "stage"},
                    {"index", index},
                    {"concurrency", or_null(!open_loop, stage.concurrency)},
                    {"rate", or_null(open_loop, stage.rate)},
                    {"start_s", start_s}});
  flush();
}

void Reporter::request(const RequestOutcome& outcome) {
  ++requests_;
  failures_ += !outcome.ok;
  Json line = {{"event", "request"},
               {"ok", outcome.ok},
               {"ttft_us", or_null(outcome.ttft_us >= 0, outcome.ttft_us)},
               {"e2e_us", outcome.e2e_us},
               {"tokens", outcome.tokens},
               {"error", outcome.error},
               {"start_s", outcome.start_s},
               {"stage", outcome.stage},
               {"itl_max_us", outcome.itl_max_us},
               {"itl_sum_us", outcome.itl_sum_us},
               {"chunks", outcome.chunks}};
  if (timing_) {
    Json hops = nullptr;
    if (outcome.hops) {
      hops = Json::object();
      for (std::size_t i = 0; i < kHops; ++i) {
        const std::int64_t us = outcome.hops->hop_us[i];
        hops[std::string(kHopNames[i])] = or_null(us != FirstTokenHops::kUnknown, us);
      }
    }
    line["hops_us"] = std::move(hops);
    line["proxy_ttft_us"] = or_null(outcome.hops.has_value(), outcome.hops ? outcome.hops->proxy_ttft_us : 0);
  }
  pending_ += dump(line);
}

void Reporter::progress(double elapsed_s, std::size_t in_flight) {
  pending_ += dump({{"event", "progress"},
                    {"elapsed_s", elapsed_s},
                    {"requests", requests_},
                    {"failures", failures_},
                    {"tokens", tokens_},
                    {"in_flight", in_flight},
                    {"stage", stage_},
                    {"lag_us", lags_us_}});
  lags_us_.clear();
  flush();
}

void Reporter::end(double duration_s, double cpu_s) {
  progress(duration_s, 0);  // the last requests and lag samples first
  pending_ += dump({{"event", "end"},
                    {"duration_s", duration_s},
                    {"requests", requests_},
                    {"failures", failures_},
                    {"cpu_s", cpu_s}});
  flush();
}

void Reporter::flush() {
  // A blocking write: the reader drains the pipe continuously, and a batch is a few kB.
  std::fwrite(pending_.data(), 1, pending_.size(), out_);
  std::fflush(out_);
  pending_.clear();
}

}  // namespace tokenbus::loadgen
