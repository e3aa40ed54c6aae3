#include "replica/ring_records.hpp"

#include <cstring>
#include <msgpack.hpp>

#include "tokenbus.pb.h"

namespace tokenbus::replica {
namespace {

// msgpack::packer's buffer: appends to a std::string the caller reuses.
struct StringSink {
  std::string& out;
  void write(const char* data, std::size_t size) { out.append(data, size); }
};

// Always a float64, as the contract (and Python's msgpack) has it: msgpack-cxx's pack_double packs an integral
// value (a temperature of 0) as an integer. The packer writes through to `out` at once, so this may interleave.
void pack_float64(std::string& out, double value) {
  std::uint64_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  out.push_back(static_cast<char>(0xcb));
  for (int shift = 56; shift >= 0; shift -= 8) out.push_back(static_cast<char>(bits >> shift));
}

void pack_str(msgpack::packer<StringSink>& pk, std::string_view text) {
  pk.pack_str(static_cast<std::uint32_t>(text.size()));
  pk.pack_str_body(text.data(), static_cast<std::uint32_t>(text.size()));
}

// A cursor over one MessagePack value tree that reports malformed input by returning false.
class Reader {
 public:
  explicit Reader(std::span<const std::byte> bytes)
      : at_(reinterpret_cast<const std::uint8_t*>(bytes.data())), end_(at_ + bytes.size()) {}

  bool at_end() const { return at_ == end_; }
  const std::uint8_t* position() const { return at_; }

  bool array(std::uint32_t& size) { return header(size, 0x90, 0xdc, 0xdd); }
  bool map(std::uint32_t& size) { return header(size, 0x80, 0xde, 0xdf); }

  bool uint(std::uint64_t& value) {
    std::uint8_t tag;
    if (!byte(tag)) return false;
    if (tag <= 0x7f) {
      value = tag;
      return true;
    }
    switch (tag) {
      case 0xcc: return be(value, 1);
      case 0xcd: return be(value, 2);
      case 0xce: return be(value, 4);
      case 0xcf: return be(value, 8);
      // signed encodings of non-negative values (other encoders may use them)
      case 0xd0: return be(value, 1) && value < 0x80;
      case 0xd1: return be(value, 2) && value < 0x8000;
      case 0xd2: return be(value, 4) && value < 0x80000000u;
      case 0xd3: return be(value, 8) && value < (std::uint64_t{1} << 63);
      default: return false;
    }
  }

  bool uint32(std::uint32_t& value) {
    std::uint64_t wide;
    if (!uint(wide) || wide > UINT32_MAX) return false;
    value = static_cast<std::uint32_t>(wide);
    return true;
  }

  bool number(double& value) {
    if (at_ == end_) return false;
    if (*at_ == 0xca || *at_ == 0xcb) {
      const bool single = *at_++ == 0xca;
      std::uint64_t bits;
      if (!be(bits, single ? 4 : 8)) return false;
      if (single) {
        float f;
        const auto narrow = static_cast<std::uint32_t>(bits);
        std::memcpy(&f, &narrow, sizeof(f));
        value = f;
      } else {
        std::memcpy(&value, &bits, sizeof(value));
      }
      return true;
    }
    std::uint64_t integer;
    if (!uint(integer)) return false;
    value = static_cast<double>(integer);
    return true;
  }

  bool str(std::string_view& text) {
    std::uint8_t tag;
    if (!byte(tag)) return false;
    std::uint64_t size;
    if ((tag & 0xe0) == 0xa0) {
      size = tag & 0x1f;
    } else if (tag == 0xd9 || tag == 0xda || tag == 0xdb) {
      if (!be(size, std::size_t{1} << (tag - 0xd9))) return false;
    } else {
      return false;
    }
    if (size > static_cast<std::uint64_t>(end_ - at_)) return false;
    text = std::string_view(reinterpret_cast<const char*>(at_), size);
    at_ += size;
    return true;
  }

  bool str_or_nil(std::string_view& text) {
    if (nil()) {
      text = {};
      return true;
    }
    return str(text);
  }

  // True (and consumed) when the next value is nil.
  bool nil() {
    if (at_ == end_ || *at_ != 0xc0) return false;
    ++at_;
    return true;
  }

  bool boolean(bool& value) {
    if (at_ == end_ || (*at_ != 0xc2 && *at_ != 0xc3)) return false;
    value = *at_++ == 0xc3;
    return true;
  }

  // Skips one value of any type, nesting at most `depth` containers.
  bool skip(int depth = 8) {
    if (at_ == end_) return false;
    const std::uint8_t tag = *at_;
    std::uint32_t count;
    if ((tag & 0xf0) == 0x90 || tag == 0xdc || tag == 0xdd || (tag & 0xf0) == 0x80 || tag == 0xde || tag == 0xdf) {
      const bool is_map = (tag & 0xf0) == 0x80 || tag == 0xde || tag == 0xdf;
      if (depth == 0 || !(is_map ? map(count) : array(count))) return false;
      for (std::uint64_t i = 0; i < (is_map ? 2ull : 1ull) * count; ++i) {
        if (!skip(depth - 1)) return false;
      }
      return true;
    }
    ++at_;
    if (tag <= 0x7f || tag >= 0xe0 || tag == 0xc0 || tag == 0xc2 || tag == 0xc3) return true;
    if ((tag & 0xe0) == 0xa0) return advance(tag & 0x1f);
    std::uint64_t size;
    switch (tag) {
      case 0xcc: case 0xd0: return advance(1);
      case 0xcd: case 0xd1: return advance(2);
      case 0xce: case 0xd2: case 0xca: return advance(4);
      case 0xcf: case 0xd3: case 0xcb: return advance(8);
      case 0xd9: case 0xc4: return be(size, 1) && advance(size);
      case 0xda: case 0xc5: return be(size, 2) && advance(size);
      case 0xdb: case 0xc6: return be(size, 4) && advance(size);
      case 0xd4: return advance(2);
      case 0xd5: return advance(3);
      case 0xd6: return advance(5);
      case 0xd7: return advance(9);
      case 0xd8: return advance(17);
      case 0xc7: return be(size, 1) && advance(size + 1);
      case 0xc8: return be(size, 2) && advance(size + 1);
      case 0xc9: return be(size, 4) && advance(size + 1);
      default: return false;  // 0xc1 is never used
    }
  }

 private:
  bool byte(std::uint8_t& value) {
    if (at_ == end_) return false;
    value = *at_++;
    return true;
  }

  bool advance(std::uint64_t size) {
    if (size > static_cast<std::uint64_t>(end_ - at_)) return false;
    at_ += size;
    return true;
  }

  // A big-endian unsigned integer of `size` bytes.
  bool be(std::uint64_t& value, std::size_t size) {
    if (size > static_cast<std::size_t>(end_ - at_)) return false;
    value = 0;
    for (std::size_t i = 0; i < size; ++i) value = value << 8 | *at_++;
    return true;
  }

  bool header(std::uint32_t& size, std::uint8_t fix, std::uint8_t tag16, std::uint8_t tag32) {
    std::uint8_t tag;
    if (!byte(tag)) return false;
    std::uint64_t wide;
    if ((tag & 0xf0) == fix) {
      wide = tag & 0x0f;
    } else if (tag == tag16 || tag == tag32) {
      if (!be(wide, tag == tag16 ? 2 : 4)) return false;
    } else {
      return false;
    }
    // Each element takes at least one byte: a larger count cannot be real.
    if (wide > static_cast<std::uint64_t>(end_ - at_)) return false;
    size = static_cast<std::uint32_t>(wide);
    return true;
  }

  const std::uint8_t* at_;
  const std::uint8_t* end_;
};

// One TOKENS group: id, text, n_tokens, produced_ns.
bool read_tokens_group(Reader& r, TokensGroup& group) {
  return r.uint(group.id) && r.str(group.text) && r.uint32(group.tokens) && r.uint(group.produced_ns);
}

// SUBMIT's params map into `params`; unknown keys are skipped (a newer replica's extra field).
bool read_params(Reader& r, tokenbus::v1::SamplingParams& params) {
  std::uint32_t fields;
  if (!r.map(fields)) return false;
  for (std::uint32_t i = 0; i < fields; ++i) {
    std::string_view key;
    if (!r.str(key)) return false;
    double number = 0;
    bool ok = true;
    if (key == "max_tokens") {
      std::uint32_t max_tokens = 0;
      ok = r.uint32(max_tokens);
      params.set_max_tokens(max_tokens);
    } else if (key == "temperature" || key == "top_p" || key == "presence_penalty" || key == "frequency_penalty") {
      ok = r.number(number);
      const auto value = static_cast<float>(number);  // float in the proto
      if (key == "temperature") params.set_temperature(value);
      if (key == "top_p") params.set_top_p(value);
      if (key == "presence_penalty") params.set_presence_penalty(value);
      if (key == "frequency_penalty") params.set_frequency_penalty(value);
    } else if (key == "seed") {
      std::uint64_t seed = 0;
      if (!r.nil()) {
        ok = r.uint(seed);
        params.set_seed(seed);
      }
    } else if (key == "stop") {
      std::uint32_t count;
      ok = r.array(count);
      for (std::uint32_t s = 0; ok && s < count; ++s) {
        std::string_view stop;
        ok = r.str(stop);
        params.add_stop(std::string(stop));
      }
    } else if (key == "ignore_eos") {
      bool ignore_eos = false;
      ok = r.boolean(ignore_eos);
      params.set_ignore_eos(ignore_eos);
    } else {
      ok = r.skip();
    }
    if (!ok) return false;
  }
  return true;
}

ResponseRecord decode_ready(Reader& r) {
  ReadyRecord ready{};
  std::uint32_t fields;
  if (!r.map(fields)) return DecodeError{"READY: the second element must be a map"};
  for (std::uint32_t i = 0; i < fields; ++i) {
    std::string_view key;
    if (!r.str(key)) return DecodeError{"READY: map keys must be strings"};
    bool ok;
    if (key == "engine") {
      ok = r.str(ready.engine);
    } else if (key == "model") {
      ok = r.str(ready.model);
    } else if (key == "max_model_len") {
      ok = r.uint32(ready.max_model_len);
    } else {
      ok = r.skip();  // a newer worker's extra field
    }
    if (!ok) return DecodeError{"READY: bad value for '" + std::string(key) + "'"};
  }
  return ready;
}

}  // namespace

tokenbus::v1::FinishReason finish_reason_from_ring(std::string_view reason) {
  if (reason == "stop") return tokenbus::v1::FINISH_REASON_STOP;
  if (reason == "length") return tokenbus::v1::FINISH_REASON_LENGTH;
  if (reason == "abort") return tokenbus::v1::FINISH_REASON_ABORT;
  return tokenbus::v1::FINISH_REASON_ERROR;
}

std::string_view finish_reason_to_ring(tokenbus::v1::FinishReason reason) {
  switch (reason) {
    case tokenbus::v1::FINISH_REASON_STOP: return "stop";
    case tokenbus::v1::FINISH_REASON_LENGTH: return "length";
    case tokenbus::v1::FINISH_REASON_ABORT: return "abort";
    default: return "error";
  }
}

void encode_submit(std::string& out, std::uint64_t id, const tokenbus::v1::GenerateRequest& request) {
  StringSink sink{out};
  msgpack::packer<StringSink> pk(sink);
  pk.pack_array(5);
  pk.pack_uint8(kSubmit);
  pk.pack_uint64(id);
  pack_str(pk, request.prompt());
  if (request.messages_size() == 0) {
    pk.pack_nil();
  } else {
    pk.pack_array(static_cast<std::uint32_t>(request.messages_size()));
    for (const auto& message : request.messages()) {
      pk.pack_array(2);
      pack_str(pk, message.role());
      pack_str(pk, message.content());
    }
  }
  const auto& params = request.params();
  pk.pack_map(8);
  pack_str(pk, "max_tokens");
  pk.pack_uint32(params.max_tokens());
  pack_str(pk, "temperature");
  pack_float64(out, params.temperature());
  pack_str(pk, "top_p");
  // proto3 cannot tell an unset top_p from 0, and 0 would leave nucleus sampling nothing: read it as "off"
  pack_float64(out, params.top_p() > 0 ? params.top_p() : 1.0);
  pack_str(pk, "seed");
  if (params.has_seed()) {
    pk.pack_uint64(params.seed());
  } else {
    pk.pack_nil();
  }
  pack_str(pk, "stop");
  pk.pack_array(static_cast<std::uint32_t>(params.stop_size()));
  for (const auto& stop : params.stop()) pack_str(pk, stop);
  pack_str(pk, "presence_penalty");
  pack_float64(out, params.presence_penalty());
  pack_str(pk, "frequency_penalty");
  pack_float64(out, params.frequency_penalty());
  pack_str(pk, "ignore_eos");
  if (params.ignore_eos()) {
    pk.pack_true();
  } else {
    pk.pack_false();
  }
}

std::size_t TokensRecord::read_group(std::size_t offset, TokensGroup& group) const {
  const auto rest = groups_.subspan(offset);
  Reader r(rest);
  read_tokens_group(r, group);  // validated by decode_response
  return offset + static_cast<std::size_t>(r.position() - reinterpret_cast<const std::uint8_t*>(rest.data()));
}

void encode_tokens(std::string& out, std::span<const TokensGroup> groups) {
  StringSink sink{out};
  msgpack::packer<StringSink> pk(sink);
  pk.pack_array(static_cast<std::uint32_t>(1 + 4 * groups.size()));
  pk.pack_uint8(kTokens);
  for (const auto& group : groups) {
    pk.pack_uint64(group.id);
    pack_str(pk, group.text);
    pk.pack_uint32(group.tokens);
    pk.pack_uint64(group.produced_ns);
  }
}

void encode_finish(std::string& out, const FinishRecord& finish) {
  StringSink sink{out};
  msgpack::packer<StringSink> pk(sink);
  pk.pack_array(7);
  pk.pack_uint8(kFinish);
  pk.pack_uint64(finish.id);
  pack_str(pk, finish_reason_to_ring(finish.finish_reason));
  pk.pack_uint32(finish.prompt_tokens);
  pk.pack_uint32(finish.completion_tokens);
  pk.pack_uint32(finish.error_code);
  pack_str(pk, finish.error_message);
}

void encode_stats(std::string& out, const StatsRecord& stats) {
  StringSink sink{out};
  msgpack::packer<StringSink> pk(sink);
  pk.pack_array(4);
  pk.pack_uint8(kStats);
  pk.pack_uint32(stats.running);
  pk.pack_uint32(stats.waiting);
  pack_float64(out, stats.kv_usage);
}

void encode_ready(std::string& out, const ReadyRecord& ready) {
  StringSink sink{out};
  msgpack::packer<StringSink> pk(sink);
  pk.pack_array(2);
  pk.pack_uint8(kReady);
  pk.pack_map(3);
  pack_str(pk, "engine");
  pack_str(pk, ready.engine);
  pack_str(pk, "model");
  pack_str(pk, ready.model);
  pack_str(pk, "max_model_len");
  pk.pack_uint32(ready.max_model_len);
}

void encode_cancel(std::string& out, std::uint64_t id) {
  StringSink sink{out};
  msgpack::packer<StringSink> pk(sink);
  pk.pack_array(2);
  pk.pack_uint8(kCancel);
  pk.pack_uint64(id);
}

ResponseRecord decode_response(std::span<const std::byte> payload) {
  Reader r(payload);
  std::uint32_t size;
  std::uint64_t kind;
  if (!r.array(size) || size == 0 || !r.uint(kind)) return DecodeError{"not an array starting with a record kind"};
  ResponseRecord record;
  switch (kind) {
    case kTokens: {
      const auto* groups_start = r.position();
      const std::uint32_t count = (size - 1) / 4;
      TokensGroup group;
      bool ok = size > 1 && (size - 1) % 4 == 0;
      for (std::uint32_t i = 0; ok && i < count; ++i) ok = read_tokens_group(r, group);
      if (!ok) return DecodeError{"TOKENS must be [1, id, text, n_tokens, produced_ns, ...] (groups of four)"};
      const auto offset = groups_start - reinterpret_cast<const std::uint8_t*>(payload.data());
      record = TokensRecord(payload.subspan(static_cast<std::size_t>(offset),
                                            static_cast<std::size_t>(r.position() - groups_start)),
                            count);
      break;
    }
    case kFinish: {
      FinishRecord finish{};
      std::string_view reason;
      if (size != 7 || !r.uint(finish.id) || !r.str(reason) || !r.uint32(finish.prompt_tokens) ||
          !r.uint32(finish.completion_tokens) || !r.uint32(finish.error_code) || !r.str_or_nil(finish.error_message)) {
        return DecodeError{
            "FINISH must be [2, id, reason, prompt_tokens, completion_tokens, error_code, error_message]"};
      }
      finish.finish_reason = finish_reason_from_ring(reason);
      record = finish;
      break;
    }
    case kStats: {
      StatsRecord stats{};
      if (size != 4 || !r.uint32(stats.running) || !r.uint32(stats.waiting) || !r.number(stats.kv_usage)) {
        return DecodeError{"STATS must be [3, running, waiting, kv_usage]"};
      }
      record = stats;
      break;
    }
    case kReady:
      if (size != 2) return DecodeError{"READY must be [4, {engine, model, max_model_len}]"};
      record = decode_ready(r);
      if (std::holds_alternative<DecodeError>(record)) return record;
      break;
    default:
      return DecodeError{"unknown record kind " + std::to_string(kind)};
  }
  if (!r.at_end()) return DecodeError{"trailing bytes after the record"};
  return record;
}

RequestRecord decode_request(std::span<const std::byte> payload) {
  Reader r(payload);
  std::uint32_t size;
  std::uint64_t kind;
  if (!r.array(size) || size == 0 || !r.uint(kind)) return DecodeError{"not an array starting with a record kind"};
  RequestRecord record;
  switch (kind) {
    case kSubmit: {
      SubmitRecord submit{};
      std::string_view prompt;
      std::uint32_t messages = 0;
      bool ok = size == 5 && r.uint(submit.id) && r.str(prompt) && (r.nil() || r.array(messages));
      submit.request.set_prompt(std::string(prompt));
      for (std::uint32_t i = 0; ok && i < messages; ++i) {
        std::uint32_t pair;
        std::string_view role;
        std::string_view content;
        ok = r.array(pair) && pair == 2 && r.str(role) && r.str(content);
        auto* message = submit.request.add_messages();
        message->set_role(std::string(role));
        message->set_content(std::string(content));
      }
      if (!ok || !read_params(r, *submit.request.mutable_params())) {
        return DecodeError{"SUBMIT must be [1, id, prompt, messages | nil, params]"};
      }
      record = std::move(submit);
      break;
    }
    case kCancel: {
      CancelRecord cancel{};
      if (size != 2 || !r.uint(cancel.id)) return DecodeError{"CANCEL must be [2, id]"};
      record = cancel;
      break;
    }
    default:
      return DecodeError{"unknown record kind " + std::to_string(kind)};
  }
  if (!r.at_end()) return DecodeError{"trailing bytes after the record"};
  return record;
}

}  // namespace tokenbus::replica
