#pragma once
// The ring records the replica writes (request ring) and reads (response ring): schemas/README.md section 3.
// Encoding uses msgpack-cxx; decoding is a small non-throwing reader, because the response ring is the hot
// path and its input comes from another process: a malformed record is an error value, never an exception.
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <variant>

namespace tokenbus::v1 {
class GenerateRequest;
}

namespace tokenbus::replica {

// Request ring kinds.
inline constexpr std::uint8_t kSubmit = 1;
inline constexpr std::uint8_t kCancel = 2;
// Response ring kinds.
inline constexpr std::uint8_t kTokens = 1;
inline constexpr std::uint8_t kFinish = 2;
inline constexpr std::uint8_t kStats = 3;
inline constexpr std::uint8_t kReady = 4;

// Both append to `out`.
// [1, id, prompt, messages | nil, params]
void encode_submit(std::string& out, std::uint64_t id, const tokenbus::v1::GenerateRequest& request);
// [2, id]
void encode_cancel(std::string& out, std::uint64_t id);

// Decoded response records; string_views point into the ring record and live until it is released.
struct TokensRecord {
  std::uint64_t id;
  std::string_view text;
  std::uint32_t tokens;
};
struct FinishRecord {
  std::uint64_t id;
  std::string_view finish_reason;
  std::uint32_t prompt_tokens;
  std::uint32_t completion_tokens;
  std::uint32_t error_code;
  std::string_view error_message;
};
struct StatsRecord {
  std::uint32_t running;
  std::uint32_t waiting;
  float kv_usage;
};
struct ReadyRecord {
  std::string_view engine;
  std::string_view model;
  std::uint32_t max_model_len;
};
struct DecodeError {
  std::string message;
};
using ResponseRecord = std::variant<TokensRecord, FinishRecord, StatsRecord, ReadyRecord, DecodeError>;

ResponseRecord decode_response(std::span<const std::byte> payload);

}  // namespace tokenbus::replica
