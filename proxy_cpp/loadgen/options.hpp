#pragma once
// tokenbus-loadgen's command line: plain `--flag value` pairs, every value validated.
#include <cstdint>
#include <optional>
#include <string>

namespace tokenbus::loadgen {

enum class Endpoint { kChat, kPlain };

struct Options {
  std::string host = "127.0.0.1";
  std::uint16_t port = 8000;
  int concurrency = 16;
  double duration_s = 10.0;  // requests are started for this long, then the running ones are finished
  double grace_s = 30.0;     // requests still open this long after the duration are cut (failed: "hard deadline")
  Endpoint endpoint = Endpoint::kChat;
  std::string model = "demo";
  int max_tokens = 32;
  std::string prompt = "What is machine learning?";
};

inline constexpr const char* kUsage =
    "usage: tokenbus-loadgen [--host HOST] [--port N] [--concurrency C] [--duration-s D] [--grace-s G]\n"
    "                        [--endpoint chat|plain] [--model NAME] [--max-tokens T] [--prompt TEXT]\n";

// The options, or nullopt with `error` set (a message naming the flag). `help` is set for --help.
std::optional<Options> parse_options(int argc, const char* const* argv, std::string& error, bool& help);

}  // namespace tokenbus::loadgen
