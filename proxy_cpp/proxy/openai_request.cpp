#include "proxy/openai_request.hpp"

#include <simdjson.h>

#include <cstdio>
#include <limits>

#include "proxy/request_limits.hpp"  // generated from schemas/request_limits.json

namespace tokenbus::proxy {
namespace {

namespace dom = simdjson::dom;

RequestError field_error(std::string_view field, std::string_view what) {
  return RequestError{"'" + std::string(field) + "' " + std::string(what), std::string(field)};
}

std::optional<RequestError> read_string(dom::element value, std::string_view field, std::string& out) {
  std::string_view s;
  if (value.get_string().get(s)) return field_error(field, "must be a string");
  out.assign(s);
  return std::nullopt;
}

std::optional<RequestError> read_bool(dom::element value, std::string_view field, bool& out) {
  if (value.get_bool().get(out)) return field_error(field, "must be a boolean");
  return std::nullopt;
}

std::optional<RequestError> read_number(dom::element value, std::string_view field,
                                        const request_limits::NumberLimit& limit, v1::SamplingParams& params,
                                        void (v1::SamplingParams::*set)(float)) {
  double d = 0;
  if (value.get_double().get(d)) return field_error(field, "must be a number");
  // The value checked is the one sent: a double just above an exclusive minimum can round to it as a float.
  const float f = static_cast<float>(d);
  const bool above_min = limit.min_exclusive ? f > limit.min : f >= limit.min;
  if (!above_min || !(f <= limit.max)) {
    char range[80];
    std::snprintf(range, sizeof(range),
                  limit.min_exclusive ? "must be over %g and at most %g" : "must be between %g and %g", limit.min,
                  limit.max);
    return field_error(field, range);
  }
  (params.*set)(f);
  return std::nullopt;
}

// Unicode code points of valid UTF-8 (simdjson has checked it): every byte but the continuation bytes.
std::size_t code_points(std::string_view utf8) {
  std::size_t n = 0;
  for (const char c : utf8) n += (static_cast<unsigned char>(c) & 0xC0) != 0x80;
  return n;
}

std::optional<RequestError> read_max_tokens(dom::element value, std::string_view field, std::uint32_t& out) {
  std::int64_t n = 0;
  if (value.get_int64().get(n)) return field_error(field, "must be an integer");
  // OpenAI's minimum: 0 would otherwise reach the engine as "its default", a longer answer than asked for.
  if (n < 1) return field_error(field, "must be at least 1");
  if (n > std::numeric_limits<std::uint32_t>::max()) return field_error(field, "is too large");
  out = static_cast<std::uint32_t>(n);
  return std::nullopt;
}

// A message's content: a string, or an array of {"type": "text", "text": ...} parts, concatenated.
std::optional<RequestError> read_content(dom::element value, std::string& out) {
  if (value.is_string()) return read_string(value, "content", out);
  dom::array parts;
  if (value.get_array().get(parts)) return field_error("content", "must be a string or an array of text parts");
  out.clear();
  for (dom::element part : parts) {
    std::string_view type;
    std::string_view text;
    if (part["type"].get_string().get(type) || type != "text" || part["text"].get_string().get(text)) {
      return field_error("content", "parts must be {\"type\": \"text\", \"text\": string}");
    }
    out.append(text);
  }
  return std::nullopt;
}

std::optional<RequestError> read_messages(dom::element value, v1::GenerateRequest& out) {
  dom::array messages;
  if (value.get_array().get(messages)) return field_error("messages", "must be an array");
  if (messages.size() == 0) return field_error("messages", "must not be empty");
  if (messages.size() > request_limits::kMaxMessages) {
    return field_error("messages", "has more than " + std::to_string(request_limits::kMaxMessages) + " entries");
  }
  out.clear_messages();  // a key given twice: the last one holds (as in Python's json), never both
  for (dom::element m : messages) {
    dom::object obj;
    if (m.get_object().get(obj)) return field_error("messages", "entries must be objects");
    v1::ChatMessage* msg = out.add_messages();
    dom::element role;
    dom::element content;
    if (obj["role"].get(role)) return field_error("messages", "entries need a 'role'");
    if (auto err = read_string(role, "role", *msg->mutable_role())) return err;
    if (obj["content"].get(content)) return field_error("messages", "entries need a 'content'");
    if (!content.is_null()) {  // null content (e.g. an assistant turn with tool calls) is empty text
      if (auto err = read_content(content, *msg->mutable_content())) return err;
    }
  }
  return std::nullopt;
}

// "prompt": a string, or an array holding exactly one string (the OpenAI client's list form).
std::optional<RequestError> read_prompt(dom::element value, std::string& out) {
  dom::array list;
  if (!value.get_array().get(list)) {
    if (list.size() != 1) return field_error("prompt", "must be a string (batches are not supported)");
    return read_string(list.at(0).value_unsafe(), "prompt", out);
  }
  return read_string(value, "prompt", out);
}

// Fields asking for output the engines do not give (several choices, log-probabilities, the prompt echoed)
// are accepted only with the value that asks for nothing: a 400 beats an answer silently missing them.
bool is_int(dom::element value, std::int64_t expected) {
  std::int64_t n = 0;
  return !value.get_int64().get(n) && n == expected;
}

bool is_false(dom::element value) {
  bool b = true;
  return !value.get_bool().get(b) && !b;
}

std::optional<RequestError> read_stop_string(dom::element value, v1::SamplingParams& params) {
  std::string& stop = *params.add_stop();
  if (auto err = read_string(value, "stop", stop)) return err;
  const std::size_t chars = code_points(stop);
  if (chars == 0 || chars > request_limits::kMaxStopChars) {
    return field_error("stop", "strings must hold 1 to " + std::to_string(request_limits::kMaxStopChars) +
                                   " characters");
  }
  return std::nullopt;
}

std::optional<RequestError> read_stop(dom::element value, v1::SamplingParams& params) {
  params.clear_stop();  // a key given twice: the last one holds, so the count limit holds too
  if (value.is_string()) return read_stop_string(value, params);
  dom::array list;
  if (value.get_array().get(list)) return field_error("stop", "must be a string or an array of strings");
  if (list.size() > request_limits::kMaxStopStrings) {
    return field_error("stop", "has more than " + std::to_string(request_limits::kMaxStopStrings) + " entries");
  }
  for (dom::element s : list) {
    if (auto err = read_stop_string(s, params)) return err;
  }
  return std::nullopt;
}

std::optional<RequestError> read_stream_options(dom::element value, OpenAiRequest& out) {
  dom::object options;
  if (value.get_object().get(options)) return field_error("stream_options", "must be an object");
  dom::element include_usage;
  if (!options["include_usage"].get(include_usage) && !include_usage.is_null()) {
    return read_bool(include_usage, "stream_options.include_usage", out.include_usage);
  }
  return std::nullopt;
}

std::optional<RequestError> read_field(std::string_view key, dom::element value, ApiFlavor flavor,
                                       OpenAiRequest& out) {
  v1::SamplingParams& params = *out.generate.mutable_params();
  if (key == "model") return read_string(value, key, out.model);
  if (key == "messages" && flavor == ApiFlavor::kChat) return read_messages(value, out.generate);
  if (key == "prompt" && flavor == ApiFlavor::kCompletion) return read_prompt(value, *out.generate.mutable_prompt());
  if (value.is_null()) return std::nullopt;  // every optional field may be null: its default holds
  if (key == "max_tokens" || key == "max_completion_tokens") {
    std::uint32_t n = 0;
    if (auto err = read_max_tokens(value, key, n)) return err;
    params.set_max_tokens(n);
    return std::nullopt;
  }
  using P = v1::SamplingParams;
  namespace limits = request_limits;
  if (key == "temperature") return read_number(value, key, limits::kTemperature, params, &P::set_temperature);
  if (key == "top_p") return read_number(value, key, limits::kTopP, params, &P::set_top_p);
  if (key == "presence_penalty") {
    return read_number(value, key, limits::kPresencePenalty, params, &P::set_presence_penalty);
  }
  if (key == "frequency_penalty") {
    return read_number(value, key, limits::kFrequencyPenalty, params, &P::set_frequency_penalty);
  }
  if (key == "seed") {
    std::int64_t seed = 0;
    if (value.get_int64().get(seed)) return field_error(key, "must be an integer");
    params.set_seed(static_cast<std::uint64_t>(seed));
    return std::nullopt;
  }
  if (key == "stop") return read_stop(value, params);
  if (key == "ignore_eos") {
    bool b = false;
    if (auto err = read_bool(value, key, b)) return err;
    params.set_ignore_eos(b);
    return std::nullopt;
  }
  if (key == "stream") return read_bool(value, key, out.stream);
  if (key == "stream_options") return read_stream_options(value, out);
  if (key == "n" || key == "best_of") {
    if (!is_int(value, 1)) return field_error(key, "must be 1 (several choices are not supported)");
    return std::nullopt;
  }
  if (key == "logprobs" || key == "top_logprobs" || key == "echo") {
    if (!is_false(value) && !is_int(value, 0)) return field_error(key, "is not supported");
    return std::nullopt;
  }
  return std::nullopt;  // other OpenAI fields (user, tools, ...) are accepted and ignored
}

}  // namespace

void set_default_params(v1::SamplingParams& params) {
  params.set_max_tokens(0);
  params.set_temperature(static_cast<float>(request_limits::kTemperature.default_value));
  params.set_top_p(static_cast<float>(request_limits::kTopP.default_value));
  params.set_presence_penalty(static_cast<float>(request_limits::kPresencePenalty.default_value));
  params.set_frequency_penalty(static_cast<float>(request_limits::kFrequencyPenalty.default_value));
}

std::optional<RequestError> parse_openai_request(std::string_view body, ApiFlavor flavor, OpenAiRequest& out) {
  // One parser per I/O thread: its buffers are reused across requests.
  thread_local dom::parser parser;
  dom::element root;
  if (auto error = parser.parse(body.data(), body.size()).get(root)) {
    return RequestError{std::string("malformed JSON: ") + simdjson::error_message(error), ""};
  }
  dom::object object;
  if (root.get_object().get(object)) return RequestError{"the body must be a JSON object", ""};
  set_default_params(*out.generate.mutable_params());
  for (const dom::key_value_pair field : object) {
    if (auto err = read_field(field.key, field.value, flavor, out)) return err;
  }
  if (out.model.empty()) return field_error("model", "is required");
  if (flavor == ApiFlavor::kChat && out.generate.messages_size() == 0) return field_error("messages", "is required");
  if (flavor == ApiFlavor::kCompletion && object["prompt"].error()) return field_error("prompt", "is required");
  return std::nullopt;
}

}  // namespace tokenbus::proxy
