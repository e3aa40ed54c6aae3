#include "loadgen/distribution.hpp"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <numbers>
#include <vector>

namespace tokenbus::loadgen {
namespace {

constexpr int kMaxSigma = 10;  // beyond it nearly every lognormal draw is clamped to 1 or to the maximum

bool parse_double(std::string_view s, double& out) {
  const auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), out);
  return ec == std::errc() && end == s.data() + s.size() && !s.empty() && std::isfinite(out);
}

std::vector<std::string_view> split(std::string_view s, char sep) {
  std::vector<std::string_view> parts;
  for (std::size_t at = s.find(sep); at != std::string_view::npos; at = s.find(sep)) {
    parts.push_back(s.substr(0, at));
    s.remove_prefix(at + 1);
  }
  parts.push_back(s);
  return parts;
}

// A standard normal draw (Box-Muller; the second value of each pair is not kept: draws stay independent of
// how many were made before, which keeps the code short at the cost of one more uniform per draw).
double standard_normal(Rng& rng) {
  const double u1 = uniform01(rng);
  const double u2 = uniform01(rng);
  return std::sqrt(-2.0 * std::log1p(-u1)) * std::cos(2.0 * std::numbers::pi * u2);
}

}  // namespace

Rng seeded_rng(std::uint64_t seed, std::uint32_t stream) {
  std::seed_seq seq{static_cast<std::uint32_t>(seed), static_cast<std::uint32_t>(seed >> 32), stream};
  return Rng(seq);
}

double uniform01(Rng& rng) { return static_cast<double>(rng() >> 11) * 0x1.0p-53; }

double exponential_gap_s(Rng& rng, double rate) { return -std::log1p(-uniform01(rng)) / rate; }

std::optional<LengthDist> LengthDist::parse(std::string_view spec, int max, std::string& wants) {
  const std::string range = "from 1 to " + std::to_string(max);
  const std::vector<std::string_view> parts = split(spec, ':');
  const std::string_view kind = parts[0];
  std::vector<double> values;
  bool numbers = true;  // every parameter is a finite number
  for (std::size_t i = 1; i < parts.size(); ++i) {
    double v = 0;
    numbers = numbers && parse_double(parts[i], v);
    values.push_back(v);
  }
  const auto number_ok = [&](std::size_t count) { return numbers && values.size() == count; };
  const auto is_length = [&](double v) { return v >= 1 && v <= max; };
  const auto is_integer = [](double v) { return v == std::floor(v); };
  if (kind == "fixed") {
    wants = "fixed:N with N an integer " + range;
    if (number_ok(1) && is_length(values[0]) && is_integer(values[0])) return fixed(static_cast<int>(values[0]), max);
  } else if (kind == "uniform") {
    wants = "uniform:A:B with A <= B, integers " + range;
    if (number_ok(2) && is_length(values[0]) && is_length(values[1]) && is_integer(values[0]) &&
        is_integer(values[1]) && values[0] <= values[1]) {
      return LengthDist(Kind::kUniform, values[0], values[1], max);
    }
  } else if (kind == "normal") {
    wants = "normal:MEAN:SD with MEAN " + range + " and SD from 0 to " + std::to_string(max);
    if (number_ok(2) && is_length(values[0]) && values[1] >= 0 && values[1] <= max) {
      return LengthDist(Kind::kNormal, values[0], values[1], max);
    }
  } else if (kind == "lognormal") {
    wants = "lognormal:MEDIAN:SIGMA with MEDIAN " + range + " and SIGMA from 0 to " + std::to_string(kMaxSigma);
    if (number_ok(2) && is_length(values[0]) && values[1] >= 0 && values[1] <= kMaxSigma) {
      return LengthDist(Kind::kLognormal, values[0], values[1], max);
    }
  } else {
    wants = "fixed:N, uniform:A:B, normal:MEAN:SD or lognormal:MEDIAN:SIGMA";
  }
  return std::nullopt;
}

int LengthDist::clamp(double value) const {
  if (!(value >= 1.0)) return 1;  // NaN too
  if (value >= max_) return max_;
  return static_cast<int>(std::lround(value));
}

int LengthDist::draw(Rng& rng) const {
  switch (kind_) {
    case Kind::kFixed:
      return static_cast<int>(a_);
    case Kind::kUniform: {
      const double span = b_ - a_ + 1;
      return std::min(static_cast<int>(b_), static_cast<int>(a_ + std::floor(uniform01(rng) * span)));
    }
    case Kind::kNormal:
      return clamp(a_ + b_ * standard_normal(rng));
    case Kind::kLognormal:
      return clamp(a_ * std::exp(b_ * standard_normal(rng)));
  }
  return 1;
}

}  // namespace tokenbus::loadgen
