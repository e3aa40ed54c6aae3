#include "loadgen/reporter.hpp"

#include <nlohmann/json.hpp>

namespace tokenbus::loadgen {
namespace {

using Json = nlohmann::json;

// Error texts may quote a server's body, which need not be valid UTF-8: replaced, never thrown on.
std::string dump(const Json& j) { return j.dump(-1, ' ', false, Json::error_handler_t::replace) + "\n"; }

}  // namespace

void Reporter::start(int concurrency) {
  pending_ += dump({{"event", "start"}, {"concurrency", concurrency}});
  flush();
}

void Reporter::request(const RequestOutcome& outcome) {
  ++requests_;
  failures_ += !outcome.ok;
  pending_ += dump({{"event", "request"},
                    {"ok", outcome.ok},
                    {"ttft_us", outcome.ttft_us >= 0 ? Json(outcome.ttft_us) : Json(nullptr)},
                    {"e2e_us", outcome.e2e_us},
                    {"tokens", outcome.tokens},
                    {"error", outcome.error}});
}

void Reporter::progress(double elapsed_s) {
  pending_ += dump({{"event", "progress"},
                    {"elapsed_s", elapsed_s},
                    {"requests", requests_},
                    {"failures", failures_},
                    {"tokens", tokens_},
                    {"lag_us", lags_us_}});
  lags_us_.clear();
  flush();
}

void Reporter::end(double duration_s, double cpu_s) {
  progress(duration_s);  // the last requests and lag samples first
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
