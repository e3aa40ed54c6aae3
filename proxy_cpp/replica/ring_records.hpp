#pragma once
// The ring records (schemas/README.md section 3), mirroring their one declaration in schemas/ring.py: an encoder
// and a decoder for every kind. The replica writes the request ring (SUBMIT, CANCEL) and reads the response ring
// (TOKENS, FINISH, STATS, READY); the other directions serve the tests (which re-encode the golden vectors
// schemas/golden/ring_*.msgpack byte-identically) and the fuzz targets. Integers are packed in their smallest form
// and floats as float64, as Python's msgpack does.
// Encoding uses msgpack-cxx; decoding is a small non-throwing reader, because the response ring is the hot
// path and its input comes from another process: a malformed record is an error value, never an exception.
#include <chrono>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <variant>

#include "tokenbus.pb.h"

namespace tokenbus::replica {

// Request ring kinds.
inline constexpr std::uint8_t kSubmit = 1;
inline constexpr std::uint8_t kCancel = 2;
// Response ring kinds.
inline constexpr std::uint8_t kTokens = 1;
inline constexpr std::uint8_t kFinish = 2;
inline constexpr std::uint8_t kStats = 3;
inline constexpr std::uint8_t kReady = 4;

// The clock of the first-token stamps (tokenbus.proto FirstTokenTimes, and the produced_ns the worker puts in
// its first TOKENS record): wall-clock nanoseconds since the Unix epoch, comparable across the processes of
// one node.
inline std::uint64_t wall_clock_ns() {
  return static_cast<std::uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::system_clock::now().time_since_epoch())
          .count());
}

// Both append to `out`.
// [1, id, prompt, messages | nil, params]
void encode_submit(std::string& out, std::uint64_t id, const tokenbus::v1::GenerateRequest& request);
// [2, id]
void encode_cancel(std::string& out, std::uint64_t id);

// Decoded response records; string_views point into the ring record and live until it is released.

// One group of a TOKENS record: new text of one request.
struct TokensGroup {
  std::uint64_t id;
  std::string_view text;
  std::uint32_t tokens;
  // The first group of a request carries when its engine produced the first token (wall clock ns since the
  // epoch); 0 in its later groups.
  std::uint64_t produced_ns;
};

// A TOKENS record `[1, id, text, n_tokens, produced_ns, id, ...]`: the tokens of one worker event-loop iteration,
// for every request that had some. A view over the record's groups, validated whole by decode_response (so a
// malformed record dispatches nothing) and decoded again as it is iterated: nothing is allocated per group.
class TokensRecord {
 public:
  TokensRecord() = default;
  TokensRecord(std::span<const std::byte> groups, std::uint32_t count) : groups_(groups), count_(count) {}

  std::uint32_t size() const { return count_; }

  // Calls fn(const TokensGroup&) for each group, in the record's order.
  template <class Fn>
  void for_each(Fn&& fn) const {
    TokensGroup group{};
    std::size_t offset = 0;
    for (std::uint32_t i = 0; i < count_; ++i) {
      offset = read_group(offset, group);
      fn(group);
    }
  }

 private:
  // Decodes the (validated) group at `offset` of groups_; returns the offset of the next one.
  std::size_t read_group(std::size_t offset, TokensGroup& group) const;

  std::span<const std::byte> groups_;
  std::uint32_t count_ = 0;
};
// The ring carries the finish reason as a string ("stop", "length", "abort", "error"); these two are the one
// place it meets the proto's enum. A string this replica does not know reads as FINISH_REASON_ERROR.
tokenbus::v1::FinishReason finish_reason_from_ring(std::string_view reason);
std::string_view finish_reason_to_ring(tokenbus::v1::FinishReason reason);

struct FinishRecord {
  std::uint64_t id;
  tokenbus::v1::FinishReason finish_reason;
  std::uint32_t prompt_tokens;
  std::uint32_t completion_tokens;
  std::uint32_t error_code;
  std::string_view error_message;
};
struct StatsRecord {
  std::uint32_t running;
  std::uint32_t waiting;
  double kv_usage;  // a float64 on the ring
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

// Request-ring records as the worker reads them (tests and fuzzing: the replica only writes them).
struct SubmitRecord {
  std::uint64_t id;
  tokenbus::v1::GenerateRequest request;  // prompt, messages and params, as encode_submit takes them
};
struct CancelRecord {
  std::uint64_t id;
};
using RequestRecord = std::variant<SubmitRecord, CancelRecord, DecodeError>;

RequestRecord decode_request(std::span<const std::byte> payload);

// Response-ring encoders (the worker's side: tests). Each appends to `out`.
// [2, id, finish_reason, prompt_tokens, completion_tokens, error_code, error_message]
void encode_finish(std::string& out, const FinishRecord& finish);
// [3, running, waiting, kv_usage]
void encode_stats(std::string& out, const StatsRecord& stats);
// [4, {"engine": ..., "model": ..., "max_model_len": ...}]
void encode_ready(std::string& out, const ReadyRecord& ready);

// [1, id, text, n_tokens, produced_ns, ...]: the groups in order (at least one). Appends to `out`.
void encode_tokens(std::string& out, std::span<const TokensGroup> groups);

}  // namespace tokenbus::replica
