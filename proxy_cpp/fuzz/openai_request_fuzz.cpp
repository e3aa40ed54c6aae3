// libFuzzer target: the OpenAI request body parser (proxy/openai_request.cpp parse_openai_request), both
// flavours, on any bytes a client may send as a body. A body it accepts must yield a request the replica
// can take: the model named, a prompt (completions) or messages (chat), and every limit of
// schemas/request_limits.json held (the worker refuses a request past one).
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string_view>

#include "proxy/openai_request.hpp"
#include "proxy/request_limits.hpp"

namespace {

namespace limits = tokenbus::proxy::request_limits;

bool within(float value, const limits::NumberLimit& limit) {
  return (limit.min_exclusive ? value > limit.min : value >= limit.min) && value <= limit.max;
}

bool within_limits(const tokenbus::v1::GenerateRequest& request) {
  const tokenbus::v1::SamplingParams& p = request.params();
  if (static_cast<std::size_t>(request.messages_size()) > limits::kMaxMessages) return false;
  if (static_cast<std::size_t>(p.stop_size()) > limits::kMaxStopStrings) return false;
  for (const std::string& stop : p.stop()) {
    std::size_t chars = 0;
    for (const char c : stop) chars += (static_cast<unsigned char>(c) & 0xC0) != 0x80;
    if (chars == 0 || chars > limits::kMaxStopChars) return false;
  }
  return within(p.temperature(), limits::kTemperature) && within(p.top_p(), limits::kTopP) &&
         within(p.presence_penalty(), limits::kPresencePenalty) &&
         within(p.frequency_penalty(), limits::kFrequencyPenalty);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view body(reinterpret_cast<const char*>(data), size);
  for (const auto flavor : {tokenbus::proxy::ApiFlavor::kChat, tokenbus::proxy::ApiFlavor::kCompletion}) {
    tokenbus::proxy::OpenAiRequest request;
    const auto error = tokenbus::proxy::parse_openai_request(body, flavor, request);
    if (error) continue;
    if (request.model.empty()) std::abort();
    if (flavor == tokenbus::proxy::ApiFlavor::kChat && request.generate.messages_size() == 0) std::abort();
    if (!within_limits(request.generate)) std::abort();
  }
  return 0;
}
