#pragma once
// Parsing of OpenAI-compatible request bodies (/v1/chat/completions, /v1/completions) into a
// GenerateRequest. Network-facing: every field is type-checked and bounded (schemas/request_limits.json, through
// the generated proxy/request_limits.hpp), and bad input becomes a 400 with a message naming the field.
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "tokenbus.pb.h"

namespace tokenbus::proxy {

enum class ApiFlavor { kChat, kCompletion };

struct OpenAiRequest {
  std::string model;  // names the deployment
  bool stream = false;
  bool include_usage = false;  // stream_options.include_usage
  v1::GenerateRequest generate;
};

struct RequestError {
  std::string message;
  std::string param;  // the offending field, empty when the body as a whole is wrong
};

// The sampling defaults of every endpoint (schemas/request_limits.json), and max_tokens 0: the engine's.
void set_default_params(v1::SamplingParams& params);

std::optional<RequestError> parse_openai_request(std::string_view body, ApiFlavor flavor, OpenAiRequest& out);

}  // namespace tokenbus::proxy
