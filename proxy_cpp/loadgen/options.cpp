#include "loadgen/options.hpp"

#include <charconv>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string_view>
#include <type_traits>
#include <vector>

namespace tokenbus::loadgen {
namespace {

constexpr int kMaxConcurrency = 100000;
constexpr double kMaxSeconds = 7 * 24 * 3600.0;
constexpr double kMinRate = 1e-3;  // its longest gaps (~10 h) still fit the clock's nanoseconds many times over
constexpr double kMaxRate = 1e6;
constexpr std::size_t kMaxStages = 1000;
constexpr std::size_t kMaxModelName = 256;
constexpr std::size_t kMaxPrompt = 512 * 1024;  // the proxy refuses bodies over 1 MiB anyway

template <typename T>
bool parse_number(std::string_view s, T lo, T hi, T& out) {
  T value{};
  const auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), value);
  if (ec != std::errc() || end != s.data() + s.size() || s.empty()) return false;
  if constexpr (std::is_floating_point_v<T>) {
    if (!std::isfinite(value)) return false;
  }
  if (value < lo || value > hi) return false;
  out = value;
  return true;
}

// C:DURs,C:DURs,... (the "s" may be left out); false for anything else.
bool parse_stages(std::string_view s, std::vector<Stage>& out) {
  out.clear();
  double total_s = 0;
  for (;;) {
    const std::size_t comma = s.find(',');
    std::string_view stage = s.substr(0, comma);
    const std::size_t colon = stage.find(':');
    if (colon == std::string_view::npos) return false;
    Stage st;
    std::string_view duration = stage.substr(colon + 1);
    if (duration.ends_with('s')) duration.remove_suffix(1);
    if (!parse_number(stage.substr(0, colon), 1, kMaxConcurrency, st.concurrency) ||
        !parse_number(duration, 0.0, kMaxSeconds, st.duration_s) || st.duration_s <= 0) {
      return false;
    }
    total_s += st.duration_s;
    out.push_back(st);
    if (out.size() > kMaxStages || total_s > kMaxSeconds) return false;
    if (comma == std::string_view::npos) return true;
    s.remove_prefix(comma + 1);
  }
}

}  // namespace

std::optional<Options> parse_options(int argc, const char* const* argv, std::string& error, bool& help) {
  Options o;
  help = false;
  // Flags that exclude one another are checked once every flag is read.
  bool given_concurrency = false, given_duration = false, given_rate = false, given_stages = false;
  bool given_max_tokens = false, given_max_tokens_dist = false, given_prompt = false, given_prompt_len = false;
  int concurrency = o.stages[0].concurrency;
  double rate = 0;
  double duration_s = o.stages[0].duration_s;
  for (int i = 1; i < argc; ++i) {
    const std::string_view flag = argv[i];
    if (flag == "--help" || flag == "-h") {
      help = true;
      return std::nullopt;
    }
    if (flag == "--timing") {
      o.timing = true;
      continue;
    }
    if (i + 1 >= argc) {
      error = "missing value for " + std::string(flag);
      return std::nullopt;
    }
    const std::string_view value = argv[++i];
    bool ok = true;
    std::string wants;
    if (flag == "--host") {
      ok = !value.empty();
      wants = "a host name or address";
      o.host = value;
    } else if (flag == "--port") {
      ok = parse_number<std::uint16_t>(value, 1, 65535, o.port);
      wants = "a port from 1 to 65535";
    } else if (flag == "--concurrency") {
      given_concurrency = true;
      ok = parse_number(value, 1, kMaxConcurrency, concurrency);
      wants = "an integer from 1 to " + std::to_string(kMaxConcurrency);
    } else if (flag == "--duration-s") {
      given_duration = true;
      ok = parse_number(value, 0.0, kMaxSeconds, duration_s) && duration_s > 0;
      wants = "seconds, more than 0";
    } else if (flag == "--rate") {
      given_rate = true;
      ok = parse_number(value, kMinRate, kMaxRate, rate);
      wants = "requests per second from 0.001 to 1000000";
    } else if (flag == "--stages") {
      given_stages = true;
      ok = parse_stages(value, o.stages);
      wants = "C:DURs,C:DURs,... (e.g. 64:20s,256:30s): at most " + std::to_string(kMaxStages) +
              " stages, C from 1 to " + std::to_string(kMaxConcurrency) + ", DUR seconds more than 0";
    } else if (flag == "--max-in-flight") {
      ok = parse_number(value, 1, kMaxConcurrency, o.max_in_flight);
      wants = "an integer from 1 to " + std::to_string(kMaxConcurrency);
    } else if (flag == "--grace-s") {
      ok = parse_number(value, 0.0, kMaxSeconds, o.grace_s);
      wants = "seconds, 0 or more";
    } else if (flag == "--endpoint") {
      ok = value == "chat" || value == "plain";
      wants = "chat or plain";
      o.endpoint = value == "plain" ? Endpoint::kPlain : Endpoint::kChat;
    } else if (flag == "--model") {
      ok = !value.empty() && value.size() <= kMaxModelName;
      wants = "a deployment name of 1 to " + std::to_string(kMaxModelName) + " bytes";
      o.model = value;
    } else if (flag == "--max-tokens") {
      given_max_tokens = true;
      int n = 0;
      ok = parse_number(value, 1, kMaxTokens, n);
      wants = "an integer from 1 to " + std::to_string(kMaxTokens);
      o.max_tokens = LengthDist::fixed(n, kMaxTokens);
    } else if (flag == "--max-tokens-dist") {
      given_max_tokens_dist = true;
      const std::optional<LengthDist> dist = LengthDist::parse(value, kMaxTokens, wants);
      ok = dist.has_value();
      if (ok) o.max_tokens = *dist;
    } else if (flag == "--prompt") {
      given_prompt = true;
      ok = value.size() <= kMaxPrompt;
      wants = "at most " + std::to_string(kMaxPrompt) + " bytes";
      o.prompt = value;
    } else if (flag == "--prompt-len-dist") {
      given_prompt_len = true;
      o.prompt_words = LengthDist::parse(value, kMaxPromptWords, wants);
      ok = o.prompt_words.has_value();
    } else if (flag == "--seed") {
      constexpr std::uint64_t kMaxSeed = std::numeric_limits<std::uint64_t>::max();
      ok = parse_number<std::uint64_t>(value, 0, kMaxSeed, o.seed);
      wants = "an integer from 0 to " + std::to_string(kMaxSeed);
    } else {
      error = "unknown flag " + std::string(flag);
      return std::nullopt;
    }
    if (!ok) {
      constexpr std::size_t kShown = 80;  // a bad --prompt is not echoed whole
      error = std::string(flag) + " wants " + wants + ", got '" + std::string(value.substr(0, kShown)) +
              (value.size() > kShown ? "...'" : "'");
      return std::nullopt;
    }
  }
  if (given_stages && (given_concurrency || given_duration || given_rate)) {
    error = "--stages replaces --concurrency, --duration-s and --rate: give either";
  } else if (given_rate && given_concurrency) {
    error = "--rate (open loop) and --concurrency (closed loop) exclude each other: give one of them";
  } else if (given_max_tokens && given_max_tokens_dist) {
    error = "--max-tokens and --max-tokens-dist exclude each other: give one of them";
  } else if (given_prompt && given_prompt_len) {
    error = "--prompt and --prompt-len-dist exclude each other: give one of them";
  }
  if (!error.empty()) return std::nullopt;
  if (!given_stages) o.stages = {{given_rate ? 0 : concurrency, rate, duration_s}};
  return o;
}

}  // namespace tokenbus::loadgen
