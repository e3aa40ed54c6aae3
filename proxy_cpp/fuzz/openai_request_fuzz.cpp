// libFuzzer target: the OpenAI request body parser (proxy/openai_request.cpp parse_openai_request), both
// flavours, on any bytes a client may send as a body. A body it accepts must yield a request the replica
// can take: the model named, and a prompt (completions) or messages (chat).
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string_view>

#include "proxy/openai_request.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view body(reinterpret_cast<const char*>(data), size);
  for (const auto flavor : {tokenbus::proxy::ApiFlavor::kChat, tokenbus::proxy::ApiFlavor::kCompletion}) {
    tokenbus::proxy::OpenAiRequest request;
    const auto error = tokenbus::proxy::parse_openai_request(body, flavor, request);
    if (error) continue;
    if (request.model.empty()) std::abort();
    if (flavor == tokenbus::proxy::ApiFlavor::kChat && request.generate.messages_size() == 0) std::abort();
  }
  return 0;
}
