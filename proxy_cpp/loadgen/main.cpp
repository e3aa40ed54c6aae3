// tokenbus-loadgen: streaming load (closed-loop stages, or open-loop arrivals at a rate) against a tokenbus
// proxy (or any OpenAI-compatible server), run by `tokenbus bench`. Command line: see kUsage in options.hpp.
// Results go to stdout in the line protocol described in reporter.hpp; logs go to stderr.
// Exit codes: 0 the run completed (its failed requests are in the output), 1 it could not start, 2 bad usage.
#include <cstdio>
#include <optional>
#include <string>

#include "loadgen/load_run.hpp"
#include "loadgen/options.hpp"
#include "loadgen/reporter.hpp"

int main(int argc, char** argv) {
  using namespace tokenbus::loadgen;
  std::string error;
  bool help = false;
  const std::optional<Options> opts = parse_options(argc, argv, error, help);
  if (help) {
    std::fputs(kUsage, stdout);
    return 0;
  }
  if (!opts) {
    std::fprintf(stderr, "tokenbus-loadgen: %s\n%s", error.c_str(), kUsage);
    return 2;
  }
  Reporter reporter(stdout, opts->timing);
  return run_load(*opts, reporter);
}
