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
  EXPECT_EQ(p.opts->max_tokens, 32);
}

TEST(Options, EveryFlag) {
  const Parsed p = parse({"--host", "localhost", "--port", "8011", "--concurrency", "256", "--duration-s", "0.5",
                          "--grace-s", "0", "--endpoint", "plain", "--model", "m/x", "--max-tokens", "7",
                          "--prompt", ""});
  ASSERT_TRUE(p.opts) << p.error;
  EXPECT_EQ(p.opts->host, "localhost");
  EXPECT_EQ(p.opts->port, 8011);
  EXPECT_EQ(p.opts->concurrency, 256);
  EXPECT_DOUBLE_EQ(p.opts->duration_s, 0.5);
  EXPECT_DOUBLE_EQ(p.opts->grace_s, 0.0);
  EXPECT_EQ(p.opts->endpoint, Endpoint::kPlain);
  EXPECT_EQ(p.opts->model, "m/x");
  EXPECT_EQ(p.opts->max_tokens, 7);
  EXPECT_EQ(p.opts->prompt, "");
}

TEST(Options, BadValuesNameTheFlag) {
  const std::vector<std::vector<const char*>> bad = {
      {"--port", "0"},          {"--port", "70000"},        {"--port", "8o"},          {"--concurrency", "0"},
      {"--concurrency", "-3"},  {"--duration-s", "0"},      {"--duration-s", "nan"},   {"--duration-s", "inf"},
      {"--grace-s", "-1"},      {"--endpoint", "grpc"},     {"--model", ""},           {"--max-tokens", "1.5"},
      {"--host", ""},
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
