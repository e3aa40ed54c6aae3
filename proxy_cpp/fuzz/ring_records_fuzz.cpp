// libFuzzer target: the response-ring record reader (replica/ring_records.cpp decode_response), which reads
// records the model worker (another process) wrote. Any input is one record's payload.
#include <cstddef>
#include <cstdint>
#include <span>

#include "replica/ring_records.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const auto record = tokenbus::replica::decode_response(std::as_bytes(std::span(data, size)));
  // The views of a decoded record point into the payload: touch them so ASan checks their bounds.
  std::size_t touched = 0;
  if (const auto* tokens = std::get_if<tokenbus::replica::TokensRecord>(&record)) {
    tokens->for_each([&](const tokenbus::replica::TokensGroup& group) {
      for (const char c : group.text) touched += static_cast<unsigned char>(c);
    });
  } else if (const auto* finish = std::get_if<tokenbus::replica::FinishRecord>(&record)) {
    touched += static_cast<std::size_t>(finish->finish_reason);
    for (const char c : finish->error_message) touched += static_cast<unsigned char>(c);
  } else if (const auto* ready = std::get_if<tokenbus::replica::ReadyRecord>(&record)) {
    for (const char c : ready->engine) touched += static_cast<unsigned char>(c);
    for (const char c : ready->model) touched += static_cast<unsigned char>(c);
  }
  return touched == static_cast<std::size_t>(-1);  // never: keeps the loop from being optimised away
}
