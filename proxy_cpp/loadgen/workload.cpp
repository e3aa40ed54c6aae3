#include "loadgen/workload.hpp"

#include <cctype>
#include <charconv>
#include <iterator>
#include <nlohmann/json.hpp>

namespace tokenbus::loadgen {
namespace {

std::string percent_encode(std::string_view s) {
  static constexpr char kHex[] = "0123456789ABCDEF";
  std::string out;
  for (const unsigned char c : s) {
    if (std::isalnum(c) || c == '-' || c == '.' || c == '_' || c == '~') {
      out += static_cast<char>(c);
    } else {
      out += '%';
      out += kHex[c >> 4];
      out += kHex[c & 15];
    }
  }
  return out;
}

// A JSON string literal for `s`; bytes that are not UTF-8 are replaced (a prompt is never refused here).
std::string json_string(std::string_view s) {
  return nlohmann::json(std::string(s)).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

void append_number(std::string& out, long long n) {
  char digits[24];
  const auto [end, ec] = std::to_chars(std::begin(digits), std::end(digits), n);
  out.append(digits, end);
}

}  // namespace

Workload::Workload(const Options& opts)
    : opts_(opts),
      max_tokens_rng_(seeded_rng(opts.seed, kMaxTokensStream)),
      prompt_rng_(seeded_rng(opts.seed, kPromptStream)) {
  const bool ipv6 = opts.host.find(':') != std::string::npos;
  fields_ = "Host: " + (ipv6 ? "[" + opts.host + "]" : opts.host) + ":" + std::to_string(opts.port) + "\r\n";
  fields_ += "User-Agent: tokenbus-loadgen\r\n";
  if (opts.timing) fields_ += "X-Tokenbus-Timing: 1\r\n";
  if (opts.endpoint == Endpoint::kChat) {
    request_line_ = "POST /v1/chat/completions HTTP/1.1\r\n";
    fields_ += "Content-Type: application/json\r\n";
    body_prefix_ = R"({"model":)" + json_string(opts.model) + R"(,"messages":[{"role":"user","content":")";
    body_middle_ = R"("}],"stream":true,"stream_options":{"include_usage":true},"max_tokens":)";
    const std::string literal = json_string(opts.prompt);
    escaped_prompt_ = literal.substr(1, literal.size() - 2);  // without its quotes
  } else {
    request_line_ = "POST /v1/chat/" + percent_encode(opts.model) + "?max_tokens=";
    fields_ += "Content-Type: text/plain\r\n";
    escaped_prompt_ = opts.prompt;
  }
  fields_ += "Content-Length: ";
}

void Workload::append_prompt(std::string& out) {
  if (!opts_.prompt_words) {
    out += escaped_prompt_;
    return;
  }
  const int words = opts_.prompt_words->draw(prompt_rng_);
  for (int i = 0; i < words; ++i) {
    if (i > 0) out += ' ';
    out += kPromptWords[prompt_rng_() % std::size(kPromptWords)];
  }
}

void Workload::next(std::string& wire) {
  const int max_tokens = opts_.max_tokens.draw(max_tokens_rng_);
  const bool chat = opts_.endpoint == Endpoint::kChat;
  body_.clear();
  if (chat) body_ += body_prefix_;
  append_prompt(body_);
  if (chat) {
    body_ += body_middle_;
    append_number(body_, max_tokens);
    body_ += R"(,"ignore_eos":true})";
  }
  wire.clear();
  wire += request_line_;
  if (!chat) {
    append_number(wire, max_tokens);
    wire += " HTTP/1.1\r\n";
  }
  wire += fields_;
  append_number(wire, static_cast<long long>(body_.size()));
  wire += "\r\n\r\n";
  wire += body_;
}

}  // namespace tokenbus::loadgen
