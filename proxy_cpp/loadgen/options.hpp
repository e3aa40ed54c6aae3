#pragma once
// tokenbus-loadgen's command line: plain `--flag value` pairs (and the one bare flag --timing), every value
// validated.
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "loadgen/distribution.hpp"

namespace tokenbus::loadgen {

enum class Endpoint { kChat, kPlain };

// One stage of the run: closed loop (`concurrency` clients, each one request at a time) or open loop
// (Poisson arrivals at `rate` requests per second), for `duration_s`.
struct Stage {
  int concurrency = 0;  // 0 in an open-loop stage
  double rate = 0;      // 0 in a closed-loop stage
  double duration_s = 0;
};

inline constexpr int kMaxTokens = 1000000;
inline constexpr int kMaxPromptWords = 50000;  // drawn prompts: ~300 kB at most, under the proxy's 1 MiB

struct Options {
  std::string host = "127.0.0.1";
  std::uint16_t port = 8000;
  // Back to back; from --stages, or the one stage of --concurrency (or --rate) and --duration-s. Requests are
  // started during each stage; at its end the running ones finish and count in the stage they started in.
  std::vector<Stage> stages = {{16, 0, 10.0}};
  double grace_s = 30.0;     // requests still open this long after the last stage are cut ("hard deadline")
  int max_in_flight = 10000;  // open loop: arrivals while this many requests are open fail at once
  Endpoint endpoint = Endpoint::kChat;
  std::string model = "demo";
  LengthDist max_tokens = LengthDist::fixed(32, kMaxTokens);
  std::optional<LengthDist> prompt_words;  // nullopt: every request sends `prompt`
  std::string prompt = "What is machine learning?";
  std::uint64_t seed = 0;  // of every random draw: lengths, prompt words, arrivals
  bool timing = false;     // ask for the proxy's per-hop first-token stamps (X-Tokenbus-Timing: 1)
};

inline constexpr const char* kUsage =
    "usage: tokenbus-loadgen [--host HOST] [--port N] [--concurrency C] [--duration-s D] [--grace-s G]\n"
    "                        [--stages C:DURs,C:DURs,...] [--rate R] [--max-in-flight N]\n"
    "                        [--endpoint chat|plain] [--model NAME] [--max-tokens T | --max-tokens-dist SPEC]\n"
    "                        [--prompt TEXT | --prompt-len-dist SPEC] [--seed N] [--timing]\n"
    "  --stages       closed-loop stages back to back (instead of --concurrency and --duration-s), e.g.\n"
    "                 64:20s,256:30s\n"
    "  --rate         open loop: Poisson arrivals at R requests/s for --duration-s; arrivals while\n"
    "                 --max-in-flight requests are open (default 10000) fail with \"over max-in-flight\"\n"
    "  SPEC           fixed:N, uniform:A:B, normal:MEAN:SD or lognormal:MEDIAN:SIGMA; each draw rounded,\n"
    "                 at least 1; prompt lengths are in words of a fixed list, drawn with --seed (default 0)\n"
    "  --timing       send X-Tokenbus-Timing: 1 and report the proxy's per-hop first-token times\n";

// The options, or nullopt with `error` set (a message naming the flag). `help` is set for --help.
std::optional<Options> parse_options(int argc, const char* const* argv, std::string& error, bool& help);

}  // namespace tokenbus::loadgen
