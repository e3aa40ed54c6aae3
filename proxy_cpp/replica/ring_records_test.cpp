// The ring records' C++ codec (replica/ring_records.hpp): the batched TOKENS record (K1) decoded as a view.
#include "replica/ring_records.hpp"

#include <gtest/gtest.h>

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

TEST(RingRecordsTest, ATokensRecordOfManyGroupsIteratesThemInOrder) {
  const std::vector<TokensGroup> sent = {{7, "Hello", 1, 1'700'000'000'123'456'789},
                                         {1ull << 40, "", 0, 0},
                                         {7, " wörld", 2, 0},
                                         {3, std::string(300, 'x'), 70000, 5}};
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
