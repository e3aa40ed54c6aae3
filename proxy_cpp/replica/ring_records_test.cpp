// The ring records' C++ codec (replica/ring_records.hpp): every golden vector of schemas/golden (written by the
// Python side, schemas/ring.py) decoded and re-encoded byte-identically; the batched TOKENS record (K1) as a view.
#include "replica/ring_records.hpp"

#include <gtest/gtest.h>

#include <fstream>
#include <iterator>
#include <sstream>
#include <string>
#include <vector>

#include "tokenbus.pb.h"

namespace tokenbus::replica {
namespace {

std::span<const std::byte> bytes_of(const std::string& record) { return std::as_bytes(std::span(record)); }

std::vector<TokensGroup> groups_of(const TokensRecord& tokens) {
  std::vector<TokensGroup> groups;
  tokens.for_each([&](const TokensGroup& group) { groups.push_back(group); });
  return groups;
}

bool same(const TokensGroup& a, const TokensGroup& b) {
  return a.id == b.id && a.text == b.text && a.tokens == b.tokens && a.produced_ns == b.produced_ns;
}

// golden/README's ring records: file name -> "request" or "response".
std::vector<std::pair<std::string, std::string>> ring_vectors() {
  std::ifstream in(std::string(TOKENBUS_GOLDEN_DIR) + "/README");
  std::vector<std::pair<std::string, std::string>> vectors;
  std::string line;
  std::getline(in, line);  // the heading
  while (std::getline(in, line)) {
    std::istringstream fields(line);
    std::string name, ring, which;
    if (fields >> name >> ring >> which && ring == "ring") vectors.emplace_back(name, which);
  }
  return vectors;
}

std::string golden(const std::string& name) {
  std::ifstream in(std::string(TOKENBUS_GOLDEN_DIR) + "/" + name, std::ios::binary);
  EXPECT_TRUE(in.good()) << "missing golden vector " << name;
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// The record decoded by this codec and encoded again; "" when it did not decode.
std::string reencode_request(const std::string& payload) {
  std::string out;
  const auto record = decode_request(bytes_of(payload));
  if (const auto* submit = std::get_if<SubmitRecord>(&record)) encode_submit(out, submit->id, submit->request);
  if (const auto* cancel = std::get_if<CancelRecord>(&record)) encode_cancel(out, cancel->id);
  return out;
}

std::string reencode_response(const std::string& payload) {
  std::string out;
  const auto record = decode_response(bytes_of(payload));
  if (const auto* tokens = std::get_if<TokensRecord>(&record)) {
    const auto groups = groups_of(*tokens);
    encode_tokens(out, groups);
  }
  if (const auto* finish = std::get_if<FinishRecord>(&record)) encode_finish(out, *finish);
  if (const auto* stats = std::get_if<StatsRecord>(&record)) encode_stats(out, *stats);
  if (const auto* ready = std::get_if<ReadyRecord>(&record)) encode_ready(out, *ready);
  return out;
}

TEST(RingRecordsTest, EveryGoldenRingRecordRoundTripsByteIdentically) {
  const auto vectors = ring_vectors();
  EXPECT_GE(vectors.size(), 9u);  // SUBMIT x2, CANCEL, TOKENS x2, FINISH x2, STATS, READY
  for (const auto& [name, which] : vectors) {
    const std::string payload = golden(name);
    ASSERT_FALSE(payload.empty()) << name;
    EXPECT_EQ(which == "request" ? reencode_request(payload) : reencode_response(payload), payload) << name;
  }
}

TEST(RingRecordsTest, TheGoldenSubmitCarriesEveryParam) {
  const auto record = decode_request(bytes_of(golden("ring_submit_chat_seed.msgpack")));
  const auto* submit = std::get_if<SubmitRecord>(&record);
  ASSERT_NE(submit, nullptr);
  EXPECT_EQ(submit->id, (std::uint64_t{1} << 40) + 1);
  ASSERT_EQ(submit->request.messages_size(), 2);
  EXPECT_EQ(submit->request.messages(1).content(), "héllo ✓");
  const auto& params = submit->request.params();
  EXPECT_TRUE(params.has_seed());
  EXPECT_EQ(params.seed(), (std::uint64_t{1} << 63) + 5);
  EXPECT_EQ(params.max_tokens(), 4096u);
  EXPECT_TRUE(params.ignore_eos());
  const auto plain = decode_request(bytes_of(golden("ring_submit.msgpack")));
  ASSERT_TRUE(std::holds_alternative<SubmitRecord>(plain));
  EXPECT_FALSE(std::get<SubmitRecord>(plain).request.params().has_seed());
  EXPECT_FLOAT_EQ(std::get<SubmitRecord>(plain).request.params().top_p(), 0.875f);
}

TEST(RingRecordsTest, ATokensRecordOfManyGroupsIteratesThemInOrder) {
  const std::string long_text(300, 'x');  // outlives `sent`, whose groups hold views of their texts
  const std::vector<TokensGroup> sent = {{7, "Hello", 1, 1'700'000'000'123'456'789},
                                         {1ull << 40, "", 0, 0},
                                         {7, " wörld", 2, 0},
                                         {3, long_text, 70000, 5}};
  std::string record;
  encode_tokens(record, sent);
  const auto decoded = decode_response(bytes_of(record));
  const auto* tokens = std::get_if<TokensRecord>(&decoded);
  ASSERT_NE(tokens, nullptr);
  ASSERT_EQ(tokens->size(), sent.size());
  const auto got = groups_of(*tokens);
  ASSERT_EQ(got.size(), sent.size());
  for (std::size_t i = 0; i < sent.size(); ++i) EXPECT_TRUE(same(got[i], sent[i])) << i;
  // the views point into the record itself: nothing was copied
  EXPECT_GE(got[0].text.data(), record.data());
  EXPECT_LT(got[0].text.data(), record.data() + record.size());
}

TEST(RingRecordsTest, ATokensRecordThatIsNotWholeGroupsOfFourIsAnErrorAndDispatchesNothing) {
  std::string one;
  const TokensGroup group{1, "a", 1, 0};
  encode_tokens(one, std::span(&group, 1));
  // [1, 1, "a", 1, 0] with the array header claiming 4 elements (the old per-request shape) or 6
  for (const unsigned char header : {0x94, 0x96}) {
    std::string record = one;
    record[0] = static_cast<char>(header);
    if (header == 0x94) record.pop_back();
    EXPECT_TRUE(std::holds_alternative<DecodeError>(decode_response(bytes_of(record)))) << int(header);
  }
  // a second group whose text is not a string: the whole record is refused, not its first group dispatched
  std::string two;
  const std::vector<TokensGroup> groups = {{1, "a", 1, 0}, {2, "b", 1, 0}};
  encode_tokens(two, groups);
  const auto at = two.rfind('b');
  two[at - 1] = static_cast<char>(0x01);  // the fixstr header of "b" becomes a positive fixint
  EXPECT_TRUE(std::holds_alternative<DecodeError>(decode_response(bytes_of(two))));
  EXPECT_TRUE(std::holds_alternative<DecodeError>(decode_response(bytes_of(std::string("\x91\x01", 2)))));
}

}  // namespace
}  // namespace tokenbus::replica
