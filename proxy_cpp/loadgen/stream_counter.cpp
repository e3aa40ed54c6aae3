#include "loadgen/stream_counter.hpp"

#include <simdjson.h>

namespace tokenbus::loadgen {
namespace {

namespace dom = simdjson::dom;

constexpr std::string_view kDataPrefix = "data:";
constexpr std::size_t kMaxErrorText = 200;

std::string_view trim(std::string_view s) {
  const auto is_space = [](char c) { return c == ' ' || c == '\t' || c == '\r' || c == '\n'; };
  while (!s.empty() && is_space(s.front())) s.remove_prefix(1);
  while (!s.empty() && is_space(s.back())) s.remove_suffix(1);
  return s;
}

bool non_empty_string(dom::element value) {
  std::string_view s;
  return value.get(s) == simdjson::SUCCESS && !s.empty();
}

// Whether a chunk carries new text: choices[0].delta.content (chat) or choices[0].text (completions).
bool has_content(dom::object event) {
  dom::array choices;
  if (event["choices"].get(choices) != simdjson::SUCCESS) return false;
  dom::object choice;
  if (choices.at(0).get(choice) != simdjson::SUCCESS) return false;  // empty: a usage-only chunk
  dom::element delta;
  if (choice["delta"].get(delta) == simdjson::SUCCESS && !delta.is_null()) {
    dom::element content;
    return delta["content"].get(content) == simdjson::SUCCESS && non_empty_string(content);
  }
  dom::element text;
  return choice["text"].get(text) == simdjson::SUCCESS && non_empty_string(text);
}

}  // namespace

struct ChatStreamCounter::Json {
  dom::parser parser;
  std::string input;  // the payload copied here with SIMDJSON_PADDING spare capacity: parsed without a copy
};

ChatStreamCounter::ChatStreamCounter(std::size_t max_line)
    : json_(std::make_unique<Json>()), lines_(max_line), max_line_(max_line) {
  json_->input.reserve(256 + simdjson::SIMDJSON_PADDING);
}

ChatStreamCounter::~ChatStreamCounter() = default;

void ChatStreamCounter::reset() {
  lines_.reset();
  chunks_ = 0;
  usage_tokens_ = -1;
  done_ = false;
  error_.clear();
  timing_.reset();
  timing_malformed_ = false;
}

std::size_t ChatStreamCounter::feed(std::string_view bytes) {
  if (done_ || !error_.empty()) return 0;
  fed_tokens_ = 0;
  const bool ok = lines_.feed(bytes, [this](std::string_view line) { return on_line(line); });
  // false without [DONE] or an error from on_line: the splitter refused a line
  if (!ok && !done_ && error_.empty()) error_ = "an SSE line longer than " + std::to_string(max_line_) + " bytes";
  return fed_tokens_;
}

bool ChatStreamCounter::on_line(std::string_view line) {
  if (line.starts_with(kTimingCommentPrefix)) {
    timing_ = timing_parser_.parse(line.substr(kTimingCommentPrefix.size()));
    timing_malformed_ = !timing_;
    return true;
  }
  if (!line.starts_with(kDataPrefix)) return true;  // other comments, blank lines, event: and id: fields
  const std::string_view payload = trim(line.substr(kDataPrefix.size()));
  if (payload == "[DONE]") {
    done_ = true;
    return false;
  }
  Json& json = *json_;
  if (json.input.capacity() < payload.size() + simdjson::SIMDJSON_PADDING) {
    json.input.reserve(payload.size() + simdjson::SIMDJSON_PADDING);
  }
  json.input.assign(payload);
  dom::object event;
  // parse(std::string) reuses the string's spare capacity as padding, so this does not copy again.
  if (const auto err = json.parser.parse(json.input).get(event); err != simdjson::SUCCESS) {
    error_ = std::string("data line is not a JSON object: ") + simdjson::error_message(err);
    return false;
  }
  dom::element error;
  if (event["error"].get(error) == simdjson::SUCCESS) {
    error_ = "error event: " + simdjson::minify(error).substr(0, kMaxErrorText);
    return false;
  }
  if (has_content(event)) {
    ++chunks_;
    ++fed_tokens_;
  }
  dom::object usage;
  if (event["usage"].get(usage) == simdjson::SUCCESS && usage.size() > 0) {
    std::int64_t completion = -1;
    usage_tokens_ = usage["completion_tokens"].get(completion) == simdjson::SUCCESS ? completion : -1;
  }
  return true;
}

std::size_t PlainStreamCounter::feed(std::string_view bytes) {
  std::size_t started = 0;
  for (const char c : bytes) {
    // ASCII whitespace, as Python's str.split() sees it (it also splits on Unicode spaces, which the
    // sim engine's vocabulary never holds)
    const bool space = c == ' ' || (c >= '\t' && c <= '\r') || (c >= '\x1c' && c <= '\x1f');
    if (!space && !in_word_) ++started;
    in_word_ = !space;
  }
  words_ += started;
  return started;
}

}  // namespace tokenbus::loadgen
