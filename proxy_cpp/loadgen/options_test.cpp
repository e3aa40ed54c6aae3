#include "loadgen/options.hpp"

#include <gtest/gtest.h>

#include <string>
#include <vector>

namespace tokenbus::loadgen {
namespace {

struct Parsed {
  std::optional<Options> opts;
  std::string error;
  bool help = false;
};

Parsed parse(std::vector<const char*> args) {
  args.insert(args.begin(), "tokenbus-loadgen");
  Parsed p;
  p.opts = parse_options(static_cast<int>(args.size()), args.data(), p.error, p.help);
  return p;
}

TEST(Options, Defaults) {
  const Parsed p = parse({});
  ASSERT_TRUE(p.opts);
  EXPECT_EQ(p.opts->host, "127.0.0.1");
  EXPECT_EQ(p.opts->endpoint, Endpoint::kChat);
  EXPECT_EQ(p.opts->stages.size(), 1u);
  EXPECT_EQ(p.opts->stages[0].concurrency, 16);
  EXPECT_DOUBLE_EQ(p.opts->stages[0].duration_s, 10.0);
  EXPECT_EQ(p.opts->max_tokens.kind(), LengthDist::Kind::kFixed);
  EXPECT_FALSE(p.opts->prompt_words);
  EXPECT_EQ(p.opts->max_in_flight, 10000);
  EXPECT_EQ(p.opts->seed, 0u);
  EXPECT_FALSE(p.opts->timing);
}

TEST(Options, EveryFlag) {
  const Parsed p = parse({"--host", "localhost", "--port", "8011", "--concurrency", "256", "--duration-s", "0.5",
                          "--grace-s", "0", "--endpoint", "plain", "--model", "m/x", "--max-tokens", "7",
                          "--prompt", ""});
  ASSERT_TRUE(p.opts) << p.error;
  EXPECT_EQ(p.opts->host, "localhost");
  EXPECT_EQ(p.opts->port, 8011);
  ASSERT_EQ(p.opts->stages.size(), 1u);
  EXPECT_EQ(p.opts->stages[0].concurrency, 256);
  EXPECT_DOUBLE_EQ(p.opts->stages[0].duration_s, 0.5);
  EXPECT_DOUBLE_EQ(p.opts->grace_s, 0.0);
  EXPECT_EQ(p.opts->endpoint, Endpoint::kPlain);
  EXPECT_EQ(p.opts->model, "m/x");
  Rng rng = seeded_rng(0, kMaxTokensStream);
  EXPECT_EQ(p.opts->max_tokens.draw(rng), 7);
  EXPECT_EQ(p.opts->prompt, "");
}

TEST(Options, Stages) {
  const Parsed p = parse({"--stages", "64:20s,256:30,1:0.5s", "--timing", "--seed", "18446744073709551615"});
  ASSERT_TRUE(p.opts) << p.error;
  ASSERT_EQ(p.opts->stages.size(), 3u);
  EXPECT_EQ(p.opts->stages[0].concurrency, 64);
  EXPECT_DOUBLE_EQ(p.opts->stages[0].duration_s, 20.0);
  EXPECT_EQ(p.opts->stages[1].concurrency, 256);
  EXPECT_DOUBLE_EQ(p.opts->stages[1].duration_s, 30.0);
  EXPECT_DOUBLE_EQ(p.opts->stages[2].duration_s, 0.5);
  EXPECT_DOUBLE_EQ(p.opts->stages[2].rate, 0.0);
  EXPECT_TRUE(p.opts->timing);
  EXPECT_EQ(p.opts->seed, 18446744073709551615u);
}

TEST(Options, RateIsOneOpenLoopStage) {
  const Parsed p = parse({"--rate", "12.5", "--duration-s", "3", "--max-in-flight", "7"});
  ASSERT_TRUE(p.opts) << p.error;
  ASSERT_EQ(p.opts->stages.size(), 1u);
  EXPECT_EQ(p.opts->stages[0].concurrency, 0);
  EXPECT_DOUBLE_EQ(p.opts->stages[0].rate, 12.5);
  EXPECT_DOUBLE_EQ(p.opts->stages[0].duration_s, 3.0);
  EXPECT_EQ(p.opts->max_in_flight, 7);
}

TEST(Options, Distributions) {
  const Parsed p = parse({"--max-tokens-dist", "lognormal:64:0.5", "--prompt-len-dist", "uniform:10:20"});
  ASSERT_TRUE(p.opts) << p.error;
  EXPECT_EQ(p.opts->max_tokens.kind(), LengthDist::Kind::kLognormal);
  ASSERT_TRUE(p.opts->prompt_words);
  EXPECT_EQ(p.opts->prompt_words->kind(), LengthDist::Kind::kUniform);
}

TEST(Options, FlagsThatExcludeEachOther) {
  const std::vector<std::pair<std::vector<const char*>, std::string>> bad = {
      {{"--stages", "4:1s", "--concurrency", "4"}, "--stages replaces"},
      {{"--stages", "4:1s", "--duration-s", "4"}, "--stages replaces"},
      {{"--rate", "5", "--stages", "4:1s"}, "--stages replaces"},
      {{"--rate", "5", "--concurrency", "4"}, "--rate (open loop) and --concurrency"},
      {{"--max-tokens", "5", "--max-tokens-dist", "fixed:4"}, "--max-tokens and --max-tokens-dist"},
      {{"--prompt-len-dist", "fixed:4", "--prompt", "x"}, "--prompt and --prompt-len-dist"},
  };
  for (const auto& [args, error] : bad) {
    const Parsed p = parse(args);
    EXPECT_FALSE(p.opts) << args[0];
    EXPECT_EQ(p.error.rfind(error, 0), 0u) << p.error;
  }
}

TEST(Options, BadValuesNameTheFlag) {
  const std::vector<std::vector<const char*>> bad = {
      {"--port", "0"},          {"--port", "70000"},        {"--port", "8o"},          {"--concurrency", "0"},
      {"--concurrency", "-3"},  {"--duration-s", "0"},      {"--duration-s", "nan"},   {"--duration-s", "inf"},
      {"--grace-s", "-1"},      {"--endpoint", "grpc"},     {"--model", ""},           {"--max-tokens", "1.5"},
      {"--host", ""},           {"--stages", ""},           {"--stages", "4"},         {"--stages", "0:1s"},
      {"--stages", "4:0s"},     {"--stages", "4:1s,"},      {"--stages", "4:1m"},      {"--stages", "4:-1s"},
      {"--stages", "a:1s"},     {"--rate", "0"},            {"--rate", "0.0001"},          {"--rate", "inf"},
      {"--max-in-flight", "0"}, {"--max-tokens-dist", "x"}, {"--prompt-len-dist", "fixed:50001"},
      {"--seed", "-1"},         {"--rate", "-1"},         {"--seed", "18446744073709551616"},
  };
  for (const auto& args : bad) {
    const Parsed p = parse(args);
    EXPECT_FALSE(p.opts) << args[0] << " " << args[1];
    EXPECT_EQ(p.error.rfind(std::string(args[0]) + " wants ", 0), 0u) << p.error;
  }
}

TEST(Options, UnknownFlagMissingValueAndHelp) {
  EXPECT_EQ(parse({"--url", "http://x"}).error, "unknown flag --url");
  EXPECT_EQ(parse({"--port"}).error, "missing value for --port");
  EXPECT_TRUE(parse({"--help"}).help);
}

TEST(Options, ALongBadValueIsNotEchoedWhole) {
  const std::string prompt(600 * 1024, 'x');
  const Parsed p = parse({"--prompt", prompt.c_str()});
  EXPECT_FALSE(p.opts);
  EXPECT_LT(p.error.size(), 200u);
}

}  // namespace
}  // namespace tokenbus::loadgen
