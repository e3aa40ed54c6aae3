#pragma once
// OpenAI-compatible response bodies: SSE chunks (chat.completion.chunk / text_completion), whole
// non-streaming bodies, errors and the model list. All JSON goes through nlohmann's serializer; the hot
// path (one SSE event per token) only escapes the token text into prebuilt constant parts.
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "common/snapshot.hpp"
#include "proxy/openai_request.hpp"

namespace tokenbus::proxy {

struct Usage {
  std::uint32_t prompt_tokens = 0;
  std::uint32_t completion_tokens = 0;
};

// `{"error": {"message", "type", "param", "code"}}`, the type derived from the HTTP status; the code is the
// status, or "invalid_api_key" for a 401.
std::string error_json(int status, std::string_view message, std::string_view param = {});

// GET /v1/models: the deployments of the snapshot.
std::string models_json(const Snapshot* snapshot);

// OpenAI's finish_reason for the engine's: "stop" and "length" as they are; any other ends like "stop".
std::string_view openai_finish_reason(v1::FinishReason engine_reason);

// Formats the responses of one request. Not thread-safe; one per request.
class CompletionFormatter {
 public:
  CompletionFormatter(ApiFlavor flavor, std::string_view id, std::string_view model, std::int64_t created);
  ~CompletionFormatter();
  CompletionFormatter(const CompletionFormatter&) = delete;
  CompletionFormatter& operator=(const CompletionFormatter&) = delete;

  // Appends one SSE event carrying `text`; the first one also carries the assistant role. A non-empty
  // `finish_reason` (OpenAI's) ends the choice.
  void append_event(std::string& out, std::string_view text, std::string_view finish_reason);
  // Appends the usage event (empty choices), sent when stream_options.include_usage is set.
  void append_usage_event(std::string& out, Usage usage) const;
  // Appends an error event for a failure after the stream began.
  static void append_error_event(std::string& out, int status, std::string_view message);
  static void append_done(std::string& out);

  // The whole non-streaming body.
  std::string body(std::string_view text, std::string_view finish_reason, Usage usage) const;

 private:
  class Escaper;
  ApiFlavor flavor_;
  std::string id_;
  std::string model_;
  std::int64_t created_;
  std::string prefix_;  // `data: {"id":...,"choices":[{"index":0,` shared by every event
  std::unique_ptr<Escaper> escaper_;
  bool role_sent_ = false;
};

}  // namespace tokenbus::proxy
