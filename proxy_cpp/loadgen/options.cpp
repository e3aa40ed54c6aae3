#include "loadgen/options.hpp"

#include <charconv>
#include <cmath>
#include <string_view>
#include <type_traits>

namespace tokenbus::loadgen {
namespace {

constexpr int kMaxConcurrency = 100000;
constexpr int kMaxTokens = 1000000;
constexpr double kMaxSeconds = 7 * 24 * 3600.0;
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

}  // namespace

std::optional<Options> parse_options(int argc, const char* const* argv, std::string& error, bool& help) {
  Options o;
  help = false;
  for (int i = 1; i < argc; ++i) {
    const std::string_view flag = argv[i];
    if (flag == "--help" || flag == "-h") {
      help = true;
      return std::nullopt;
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
      ok = parse_number(value, 1, kMaxConcurrency, o.concurrency);
      wants = "an integer from 1 to " + std::to_string(kMaxConcurrency);
    } else if (flag == "--duration-s") {
      ok = parse_number(value, 0.0, kMaxSeconds, o.duration_s) && o.duration_s > 0;
      wants = "seconds, more than 0";
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
      ok = parse_number(value, 1, kMaxTokens, o.max_tokens);
      wants = "an integer from 1 to " + std::to_string(kMaxTokens);
    } else if (flag == "--prompt") {
      ok = value.size() <= kMaxPrompt;
      wants = "at most " + std::to_string(kMaxPrompt) + " bytes";
      o.prompt = value;
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
  return o;
}

}  // namespace tokenbus::loadgen
