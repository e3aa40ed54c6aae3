#include "loadgen/timing.hpp"

#include <simdjson.h>

#include <string>

namespace tokenbus::loadgen {

std::optional<FirstTokenHops> hops_from_stamps(const std::array<std::int64_t, kHops + 1>& stamps_ns) {
  if (stamps_ns.front() == 0 || stamps_ns.back() == 0) return std::nullopt;
  FirstTokenHops hops;
  for (std::size_t i = 0; i < kHops; ++i) {
    const bool known = stamps_ns[i] != 0 && stamps_ns[i + 1] != 0;
    hops.hop_us[i] = known ? (stamps_ns[i + 1] - stamps_ns[i]) / 1000 : FirstTokenHops::kUnknown;
  }
  hops.proxy_ttft_us = (stamps_ns.back() - stamps_ns.front()) / 1000;
  return hops;
}

struct TimingParser::Json {
  simdjson::dom::parser parser;
  std::string input;  // with SIMDJSON_PADDING spare capacity: parsed without another copy
};

TimingParser::TimingParser() : json_(std::make_unique<Json>()) {}
TimingParser::~TimingParser() = default;

std::optional<FirstTokenHops> TimingParser::parse(std::string_view json) {
  Json& j = *json_;
  if (j.input.capacity() < json.size() + simdjson::SIMDJSON_PADDING) {
    j.input.reserve(json.size() + simdjson::SIMDJSON_PADDING);
  }
  j.input.assign(json);
  simdjson::dom::object object;
  if (j.parser.parse(j.input).get(object) != simdjson::SUCCESS) return std::nullopt;
  std::array<std::int64_t, kHops + 1> stamps{};
  for (std::size_t i = 0; i < stamps.size(); ++i) {
    if (object[kStampNames[i]].get(stamps[i]) != simdjson::SUCCESS || stamps[i] < 0) return std::nullopt;
  }
  return hops_from_stamps(stamps);
}

}  // namespace tokenbus::loadgen
