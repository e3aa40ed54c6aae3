#include "proxy/openai_response.hpp"

#include <simdjson.h>

#include <nlohmann/json.hpp>

namespace tokenbus::proxy {
namespace {

using nlohmann::json;
using ordered = nlohmann::ordered_json;  // response fields in OpenAI's order

const char* error_type(int status) {
  switch (status) {
    case 400:
    case 401:
    case 404:
    case 405:
    case 413:
    case 431: return "invalid_request_error";
    case 429: return "rate_limit_exceeded";
    case 503: return "service_unavailable";
    default: return "server_error";
  }
}

ordered usage_json(Usage usage) {
  return {{"prompt_tokens", usage.prompt_tokens},
          {"completion_tokens", usage.completion_tokens},
          {"total_tokens", usage.prompt_tokens + usage.completion_tokens}};
}

}  // namespace

// JSON string escaping straight into the output buffer: no copy, no JSON value, no allocation per token once
// the buffer has grown. Escapes as nlohmann's serializer does (so every body the proxy writes reads the same);
// text that is not valid UTF-8 (a replica's bug) goes through that serializer, which makes it U+FFFD rather
// than an exception.
class CompletionFormatter::Escaper {
 public:
  Escaper()
      : value_(std::string()),
        serializer_(nlohmann::detail::output_adapter<char, std::string>(escaped_), ' ',
                    nlohmann::detail::error_handler_t::replace) {}

  // Appends `text` as a quoted JSON string.
  void append(std::string& out, std::string_view text) {
    if (!simdjson::validate_utf8(text.data(), text.size())) {
      value_.get_ref<std::string&>().assign(text);
      escaped_.clear();
      serializer_.dump(value_, false, false, 0);
      out.append(escaped_);
      return;
    }
    out += '"';
    std::size_t plain = 0;  // start of the run of bytes copied as they are
    for (std::size_t i = 0; i < text.size(); ++i) {
      const auto c = static_cast<unsigned char>(text[i]);
      if (c >= 0x20 && c != '"' && c != '\\') continue;
      out.append(text.data() + plain, i - plain);
      plain = i + 1;
      switch (c) {
        case '"': out += "\\\""; break;
        case '\\': out += "\\\\"; break;
        case '\b': out += "\\b"; break;
        case '\f': out += "\\f"; break;
        case '\n': out += "\\n"; break;
        case '\r': out += "\\r"; break;
        case '\t': out += "\\t"; break;
        default: {
          static constexpr char kHex[] = "0123456789abcdef";
          const char escape[] = {'\\', 'u', '0', '0', kHex[c >> 4], kHex[c & 0xF]};
          out.append(escape, sizeof(escape));
        }
      }
    }
    out.append(text.data() + plain, text.size() - plain);
    out += '"';
  }

 private:
  json value_;
  std::string escaped_;
  nlohmann::detail::serializer<json> serializer_;
};

std::string error_json(int status, std::string_view message, std::string_view param) {
  ordered error = {{"message", message},
                   {"type", error_type(status)},
                   {"param", param.empty() ? ordered(nullptr) : ordered(param)},
                   // the only 401 is a missing or wrong key, which OpenAI's clients know by this code
                   {"code", status == 401 ? ordered("invalid_api_key") : ordered(status)}};
  return ordered{{"error", std::move(error)}}.dump(-1, ' ', false, json::error_handler_t::replace);
}

std::string models_json(const Snapshot* snapshot) {
  ordered data = ordered::array();
  if (snapshot != nullptr) {
    for (const Deployment& d : snapshot->deployments) {
      data.push_back({{"id", d.name}, {"object", "model"}, {"created", 0}, {"owned_by", "tokenbus"}});
    }
  }
  return ordered{{"object", "list"}, {"data", std::move(data)}}.dump(-1, ' ', false, json::error_handler_t::replace);
}

std::string_view openai_finish_reason(v1::FinishReason engine_reason) {
  return engine_reason == v1::FINISH_REASON_LENGTH ? "length" : "stop";
}

CompletionFormatter::CompletionFormatter(ApiFlavor flavor, std::string_view id, std::string_view model,
                                         std::int64_t created)
    : flavor_(flavor), id_(id), model_(model), created_(created), escaper_(std::make_unique<Escaper>()) {
  const char* object = flavor == ApiFlavor::kChat ? "chat.completion.chunk" : "text_completion";
  prefix_ = "data: {\"id\":";
  escaper_->append(prefix_, id_);
  prefix_ += ",\"object\":\"";
  prefix_ += object;
  prefix_ += "\",\"created\":";
  prefix_ += std::to_string(created_);
  prefix_ += ",\"model\":";
  escaper_->append(prefix_, model_);
  prefix_ += ",\"choices\":[";
}

CompletionFormatter::~CompletionFormatter() = default;

void CompletionFormatter::append_event(std::string& out, std::string_view text, std::string_view finish_reason) {
  out += prefix_;
  out += "{\"index\":0,";
  if (flavor_ == ApiFlavor::kChat) {
    out += role_sent_ ? "\"delta\":{\"content\":" : "\"delta\":{\"role\":\"assistant\",\"content\":";
    role_sent_ = true;
    escaper_->append(out, text);
    out += "},";
  } else {
    out += "\"text\":";
    escaper_->append(out, text);
    out += ",";
  }
  out += "\"logprobs\":null,\"finish_reason\":";
  if (finish_reason.empty()) {
    out += "null";
  } else {
    escaper_->append(out, finish_reason);
  }
  out += "}]}\n\n";
}

void CompletionFormatter::append_usage_event(std::string& out, Usage usage) const {
  out += prefix_;
  out += "],\"usage\":";
  out += usage_json(usage).dump();
  out += "}\n\n";
}

void CompletionFormatter::append_error_event(std::string& out, int status, std::string_view message) {
  out += "data: ";
  out += error_json(status, message);
  out += "\n\n";
}

void CompletionFormatter::append_done(std::string& out) { out += "data: [DONE]\n\n"; }

std::string CompletionFormatter::body(std::string_view text, std::string_view finish_reason, Usage usage) const {
  ordered choice = {{"index", 0}};
  if (flavor_ == ApiFlavor::kChat) {
    choice["message"] = {{"role", "assistant"}, {"content", text}};
  } else {
    choice["text"] = text;
  }
  choice["logprobs"] = nullptr;
  choice["finish_reason"] = finish_reason;
  const ordered body = {{"id", id_},
                     {"object", flavor_ == ApiFlavor::kChat ? "chat.completion" : "text_completion"},
                     {"created", created_},
                     {"model", model_},
                     {"choices", ordered::array({std::move(choice)})},
                     {"usage", usage_json(usage)}};
  return body.dump(-1, ' ', false, json::error_handler_t::replace);
}

}  // namespace tokenbus::proxy
