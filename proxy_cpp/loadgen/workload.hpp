#pragma once
// The requests the loadgen sends: HTTP/1.1 bytes ready to write, each with its max_tokens (and, with
// --prompt-len-dist, its prompt length) drawn from the seeded distributions. The n-th request built is the
// same for a given seed whatever the timing of the run. The body is that of tools/bench/python_client.py.
#include <string>
#include <string_view>

#include "loadgen/distribution.hpp"
#include "loadgen/options.hpp"

namespace tokenbus::loadgen {

// The words drawn prompts are made of: common, one sim token each, plain ASCII (nothing to escape).
inline constexpr std::string_view kPromptWords[] = {
    "the",   "model",  "serves", "tokens", "from",    "many",   "replicas", "behind", "one",    "stream",
    "what",  "is",     "machine", "learning", "how",  "does",   "a",        "proxy",  "route",  "request",
    "to",    "its",    "engine", "and",    "back",    "again",  "while",    "every",  "node",   "keeps",
    "time",  "for",    "each",   "hop",    "along",   "data",   "way",      "fast",   "slow",   "queue",
    "ring",  "memory", "shared", "write",  "read",    "token",  "first",    "last",   "next",   "word",
    "cloud", "server", "client", "load",   "test",    "rate",   "burst",    "wait",   "open",   "close",
    "high",  "low",    "peak",   "calm"};

class Workload {
 public:
  explicit Workload(const Options& opts);

  // Writes the next request into `wire`, reusing its capacity.
  void next(std::string& wire);

 private:
  void append_prompt(std::string& out);  // --prompt escaped for the endpoint, or drawn words

  const Options& opts_;
  Rng max_tokens_rng_;
  Rng prompt_rng_;
  std::string request_line_;    // chat: the whole line; plain: up to the max_tokens value of the target
  std::string fields_;          // the header fields after the request line, up to "Content-Length: "
  std::string body_prefix_;     // chat: the JSON up to the prompt text
  std::string body_middle_;     // chat: from the prompt's end to the max_tokens value
  std::string escaped_prompt_;  // --prompt as it goes into the body (JSON-escaped for chat)
  std::string body_;            // the body being built
};

}  // namespace tokenbus::loadgen
