// The seeded draws: the same seed gives the same workload, every draw is in range, and the distributions
// have the shape their spec says.
#include "loadgen/distribution.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

namespace tokenbus::loadgen {
namespace {

constexpr int kMax = 1000;
constexpr int kDraws = 20000;

LengthDist dist(const std::string& spec, int max = kMax) {
  std::string wants;
  const std::optional<LengthDist> d = LengthDist::parse(spec, max, wants);
  EXPECT_TRUE(d) << spec << ": " << wants;
  return d.value_or(LengthDist::fixed(1, max));
}

std::vector<int> draws(const LengthDist& d, std::uint64_t seed, int n = kDraws) {
  Rng rng = seeded_rng(seed, kMaxTokensStream);
  std::vector<int> out;
  for (int i = 0; i < n; ++i) out.push_back(d.draw(rng));
  return out;
}

double mean(const std::vector<int>& v) {
  double sum = 0;
  for (const int x : v) sum += x;
  return sum / static_cast<double>(v.size());
}

double median(std::vector<int> v) {
  std::nth_element(v.begin(), v.begin() + v.size() / 2, v.end());
  return v[v.size() / 2];
}

TEST(LengthDist, TheSameSeedGivesTheSameDrawsAndAnotherSeedOthers) {
  for (const std::string spec : {"uniform:1:1000", "normal:100:30", "lognormal:50:1"}) {
    const LengthDist d = dist(spec);
    EXPECT_EQ(draws(d, 7), draws(d, 7)) << spec;
    EXPECT_NE(draws(d, 7), draws(d, 8)) << spec;
  }
}

TEST(LengthDist, TheStreamsOfOneSeedDiffer) {
  Rng a = seeded_rng(7, kMaxTokensStream);
  Rng b = seeded_rng(7, kPromptStream);
  EXPECT_NE(a(), b());
}

TEST(LengthDist, SeedZeroGivesTheSameDrawsEverywhere) {
  // std::mt19937_64's output is fixed by the standard and the transforms are ours: these values hold on any
  // standard library. A change here changes every seeded workload (say so in the commit).
  EXPECT_EQ(draws(dist("uniform:1:1000"), 0, 5), (std::vector<int>{700, 913, 402, 396, 410}));
  EXPECT_EQ(draws(dist("normal:100:30"), 0, 5), (std::vector<int>{140, 76, 123, 85, 85}));
  EXPECT_EQ(draws(dist("lognormal:50:1"), 0, 5), (std::vector<int>{187, 22, 109, 30, 31}));
  Rng rng = seeded_rng(0, kArrivalStream);
  EXPECT_NEAR(exponential_gap_s(rng, 10.0), 0.020731963856940545, 1e-15);
  EXPECT_NEAR(exponential_gap_s(rng, 10.0), 0.27108027895574438, 1e-15);
}

TEST(LengthDist, Fixed) {
  for (const int x : draws(dist("fixed:32"), 1, 100)) EXPECT_EQ(x, 32);
}

TEST(LengthDist, UniformCoversItsRangeInclusiveAndNothingElse) {
  const std::vector<int> v = draws(dist("uniform:10:20"), 3);
  EXPECT_EQ(*std::min_element(v.begin(), v.end()), 10);
  EXPECT_EQ(*std::max_element(v.begin(), v.end()), 20);
  EXPECT_NEAR(mean(v), 15.0, 0.15);  // sd of the mean: 3.16 / sqrt(20000) = 0.022
  for (const int x : draws(dist("uniform:5:5"), 3, 100)) EXPECT_EQ(x, 5);
}

TEST(LengthDist, NormalMeanAndSpread) {
  const std::vector<int> v = draws(dist("normal:200:20"), 4);
  EXPECT_NEAR(mean(v), 200.0, 1.0);  // sd of the mean: 0.14
  double var = 0;
  for (const int x : v) var += (x - mean(v)) * (x - mean(v));
  EXPECT_NEAR(std::sqrt(var / v.size()), 20.0, 1.0);
}

TEST(LengthDist, NormalIsClampedToOneAndTheMaximum) {
  const std::vector<int> v = draws(dist("normal:2:30", 40), 5);
  EXPECT_EQ(*std::min_element(v.begin(), v.end()), 1);
  EXPECT_EQ(*std::max_element(v.begin(), v.end()), 40);
}

TEST(LengthDist, LognormalMedianAndSkew) {
  const std::vector<int> v = draws(dist("lognormal:100:0.5"), 6);
  EXPECT_NEAR(median(v), 100.0, 3.0);
  // Mean of a lognormal: median * exp(sigma^2 / 2) = 113.3.
  EXPECT_NEAR(mean(v), 100.0 * std::exp(0.125), 2.0);
  EXPECT_GE(*std::min_element(v.begin(), v.end()), 1);
  EXPECT_LE(*std::max_element(v.begin(), v.end()), kMax);
}

TEST(LengthDist, ExponentialGapsHaveMeanOneOverTheRate) {
  Rng rng = seeded_rng(9, kArrivalStream);
  double sum = 0;
  for (int i = 0; i < kDraws; ++i) {
    const double gap = exponential_gap_s(rng, 50.0);
    ASSERT_GE(gap, 0.0);
    sum += gap;
  }
  EXPECT_NEAR(sum / kDraws, 0.02, 0.0006);  // sd of the mean: 0.02 / sqrt(20000) = 0.00014
}

TEST(LengthDist, BadSpecsSayWhatIsWanted) {
  const std::vector<std::pair<std::string, std::string>> bad = {
      {"", "fixed:N, uniform:A:B"},      {"poisson:3", "fixed:N, uniform:A:B"},
      {"fixed", "fixed:N with N"},       {"fixed:0", "fixed:N with N"},
      {"fixed:1.5", "fixed:N with N"},   {"fixed:1001", "fixed:N with N"},
      {"fixed:3:4", "fixed:N with N"},   {"uniform:5:4", "uniform:A:B with A <= B"},
      {"uniform:1", "uniform:A:B"},      {"uniform:0:4", "uniform:A:B"},
      {"normal:10:-1", "normal:MEAN:SD"}, {"normal:nan:1", "normal:MEAN:SD"},
      {"normal:10:x", "normal:MEAN:SD"}, {"lognormal:0:1", "lognormal:MEDIAN:SIGMA"},
      {"lognormal:10:11", "lognormal:MEDIAN:SIGMA"}, {"normal:10:1:2", "normal:MEAN:SD"},
  };
  for (const auto& [spec, wanted] : bad) {
    std::string wants;
    EXPECT_FALSE(LengthDist::parse(spec, kMax, wants)) << spec;
    EXPECT_EQ(wants.rfind(wanted, 0), 0u) << spec << ": " << wants;
  }
}

}  // namespace
}  // namespace tokenbus::loadgen
