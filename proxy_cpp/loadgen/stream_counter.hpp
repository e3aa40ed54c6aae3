#pragma once
// Token counting over a streamed response body, fed in whatever pieces the network delivers. No I/O here:
// the load client feeds the bytes it read, these classes say how many tokens they held and whether the
// stream ended well. They count the way tools/bench/python_client.py does, so both bench clients report the
// same.
#include <cstddef>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

#include "loadgen/timing.hpp"

namespace tokenbus::loadgen {

// Splits a byte stream into lines ("\n"-terminated; a "\r" before it is dropped), across any piece
// boundaries, keeping only the unfinished tail. A line longer than max_line is an error, not a growing buffer.
class LineSplitter {
 public:
  explicit LineSplitter(std::size_t max_line) : max_line_(max_line) {}

  // Calls on_line(std::string_view) for each line completed by `bytes`; returns false (and stops) when a
  // line exceeds the limit or on_line returns false.
  template <typename OnLine>
  bool feed(std::string_view bytes, OnLine&& on_line);

  void reset() { pending_.clear(); }

 private:
  static std::string_view trim_cr(std::string_view line) {
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    return line;
  }

  std::size_t max_line_;
  std::string pending_;  // the unfinished last line of what was fed so far
};

template <typename OnLine>
bool LineSplitter::feed(std::string_view bytes, OnLine&& on_line) {
  while (!bytes.empty()) {
    const std::size_t newline = bytes.find('\n');
    if (newline == std::string_view::npos) {
      if (pending_.size() + bytes.size() > max_line_) return false;
      pending_.append(bytes);
      return true;
    }
    std::string_view line = bytes.substr(0, newline);
    bytes.remove_prefix(newline + 1);
    if (pending_.size() + line.size() > max_line_) return false;
    if (!pending_.empty()) {
      pending_.append(line);
      const bool go_on = on_line(trim_cr(pending_));
      pending_.clear();
      if (!go_on) return false;
    } else if (!on_line(trim_cr(line))) {
      return false;
    }
  }
  return true;
}

// An OpenAI chat/completions SSE body: counts the chunks with non-empty content (`chunk_content` in
// python_client.py), takes `usage.completion_tokens` when the server sends it, ends at `data: [DONE]`, and reads
// the proxy's `: tokenbus-timing` comment (timing.hpp) when there is one.
class ChatStreamCounter {
 public:
  explicit ChatStreamCounter(std::size_t max_line);
  ~ChatStreamCounter();
  ChatStreamCounter(const ChatStreamCounter&) = delete;
  ChatStreamCounter& operator=(const ChatStreamCounter&) = delete;

  // Feeds body bytes; returns how many content tokens they completed. Bytes after [DONE] or after an
  // error are ignored.
  std::size_t feed(std::string_view bytes);

  bool done() const { return done_; }                     // saw `data: [DONE]`
  const std::string& error() const { return error_; }     // non-empty: the stream failed (and why)
  std::size_t content_chunks() const { return chunks_; }  // chunks with content so far
  // The request's token count: usage.completion_tokens when sent, else the content chunks.
  std::size_t tokens() const { return usage_tokens_ >= 0 ? static_cast<std::size_t>(usage_tokens_) : chunks_; }
  // The hops of the timing comment; nullopt when none came or it was malformed (then timing_malformed()).
  const std::optional<FirstTokenHops>& timing() const { return timing_; }
  bool timing_malformed() const { return timing_malformed_; }

  void reset();  // for the next request on the same client

 private:
  bool on_line(std::string_view line);

  struct Json;  // the simdjson parser and its padded input buffer, kept out of this header
  std::unique_ptr<Json> json_;
  TimingParser timing_parser_;
  LineSplitter lines_;
  std::size_t max_line_;
  std::size_t chunks_ = 0;
  long long usage_tokens_ = -1;  // -1: no usage seen
  std::size_t fed_tokens_ = 0;   // tokens found during the current feed() call
  bool done_ = false;
  std::string error_;
  std::optional<FirstTokenHops> timing_;
  bool timing_malformed_ = false;
};

// The plain-text endpoint's body: its whitespace-separated words are the tokens (one word per sim token,
// `len(text.split())` in python_client.py), counted across piece boundaries without keeping the text.
class PlainStreamCounter {
 public:
  // Returns the words that started in `bytes`.
  std::size_t feed(std::string_view bytes);
  std::size_t tokens() const { return words_; }
  void reset() {
    words_ = 0;
    in_word_ = false;
  }

 private:
  std::size_t words_ = 0;
  bool in_word_ = false;  // the last byte fed was part of a word
};

}  // namespace tokenbus::loadgen
