#pragma once
// Seeded random draws for the workload: request lengths (--max-tokens-dist, --prompt-len-dist) and open-loop
// arrival gaps (--rate). Only std::mt19937_64's output is used, whose sequence the C++ standard fixes; the
// transforms to uniform, normal and exponential are ours (the std:: distributions differ between standard
// libraries), so one seed gives the same workload wherever the loadgen is built.
#include <cstdint>
#include <optional>
#include <random>
#include <string>
#include <string_view>

namespace tokenbus::loadgen {

using Rng = std::mt19937_64;

// An independent generator for one kind of draw (`stream`), so that changing how one thing is drawn does not
// change the others of the same seed.
Rng seeded_rng(std::uint64_t seed, std::uint32_t stream);
inline constexpr std::uint32_t kMaxTokensStream = 1;
inline constexpr std::uint32_t kPromptStream = 2;
inline constexpr std::uint32_t kArrivalStream = 3;

// A uniform double in [0, 1).
double uniform01(Rng& rng);

// The gap to the next arrival of a Poisson process of `rate` events per second, in seconds.
double exponential_gap_s(Rng& rng, double rate);

// A distribution of positive integer lengths, each draw rounded and clamped to [1, max]:
// fixed:N, uniform:A:B (inclusive), normal:MEAN:SD, lognormal:MEDIAN:SIGMA (exp of a normal of mean
// ln MEDIAN and deviation SIGMA).
class LengthDist {
 public:
  enum class Kind { kFixed, kUniform, kNormal, kLognormal };

  static LengthDist fixed(int n, int max) { return LengthDist(Kind::kFixed, n, 0, max); }
  // The distribution `spec` names, or nullopt with `wants` saying what a good spec is.
  static std::optional<LengthDist> parse(std::string_view spec, int max, std::string& wants);

  int draw(Rng& rng) const;

  Kind kind() const { return kind_; }

 private:
  LengthDist(Kind kind, double a, double b, int max) : kind_(kind), a_(a), b_(b), max_(max) {}

  int clamp(double value) const;

  Kind kind_;
  double a_;  // N, A, MEAN or MEDIAN
  double b_;  // B, SD or SIGMA (unused by fixed)
  int max_;
};

}  // namespace tokenbus::loadgen
