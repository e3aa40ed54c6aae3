// Stream parsing over odd piece boundaries: every split of a real-looking body counts the same.
#include "loadgen/stream_counter.hpp"

#include <gtest/gtest.h>

#include <string>
#include <vector>

namespace tokenbus::loadgen {
namespace {

constexpr std::size_t kMaxLine = 1 << 20;

std::string event(const std::string& json) { return "data: " + json + "\n\n"; }

// What the proxy streams for a 3-token chat completion with include_usage, CRLF line ends on one event.
std::string chat_body(bool with_usage) {
  std::string body = ": keep-alive\n\n";
  body += event(R"({"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]})");
  body += event(R"({"choices":[{"index":0,"delta":{"content":" alpha"}}]})");
  body += "data:{\"choices\":[{\"index\":0,\"delta\":{\"content\":\" beta\"}}]}\r\n\r\n";
  body += "event: message\n" + event(R"({"choices":[{"index":0,"delta":{"content":" gamma é"}}]})");
  body += event(R"({"choices":[{"index":0,"delta":{},"finish_reason":"length"}]})");
  if (with_usage) body += event(R"({"choices":[],"usage":{"prompt_tokens":2,"completion_tokens":7}})");
  body += "data: [DONE]\n\n";
  return body;
}

struct Counted {
  std::size_t fed_tokens = 0;  // the sum of what feed() returned
  std::size_t tokens = 0;
  bool done = false;
  std::string error;
};

Counted count_chat(const std::vector<std::string>& pieces) {
  ChatStreamCounter counter(kMaxLine);
  Counted c;
  for (const auto& piece : pieces) c.fed_tokens += counter.feed(piece);
  c.tokens = counter.tokens();
  c.done = counter.done();
  c.error = counter.error();
  return c;
}

TEST(LineSplitter, JoinsLinesAcrossPiecesAndDropsCr) {
  LineSplitter splitter(64);
  std::vector<std::string> lines;
  const auto collect = [&](std::string_view line) {
    lines.emplace_back(line);
    return true;
  };
  EXPECT_TRUE(splitter.feed("ab", collect));
  EXPECT_TRUE(splitter.feed("c\r", collect));
  EXPECT_TRUE(splitter.feed("\nd\n\ne", collect));
  EXPECT_EQ(lines, (std::vector<std::string>{"abc", "d", ""}));  // "e" waits for its newline
}

TEST(LineSplitter, RefusesALineOverTheLimitEvenWithoutANewline) {
  LineSplitter splitter(8);
  const auto ignore = [](std::string_view) { return true; };
  EXPECT_TRUE(splitter.feed("12345678\n", ignore));  // exactly at the limit
  EXPECT_TRUE(splitter.feed("12345", ignore));
  EXPECT_FALSE(splitter.feed("6789", ignore));  // 9 bytes pending, no newline yet
}

TEST(ChatStreamCounter, EverySplitPointCountsTheSame) {
  for (const bool with_usage : {true, false}) {
    const std::string body = chat_body(with_usage);
    const std::size_t expected = with_usage ? 7 : 3;
    for (std::size_t cut = 0; cut <= body.size(); ++cut) {
      const Counted c = count_chat({body.substr(0, cut), body.substr(cut)});
      ASSERT_TRUE(c.done) << "cut at " << cut;
      ASSERT_EQ(c.error, "") << "cut at " << cut;
      ASSERT_EQ(c.fed_tokens, 3u) << "cut at " << cut;  // content chunks, as they arrive
      ASSERT_EQ(c.tokens, expected) << "cut at " << cut;
    }
  }
}

TEST(ChatStreamCounter, ByteByByte) {
  const std::string body = chat_body(true);
  std::vector<std::string> bytes;
  for (const char ch : body) bytes.emplace_back(1, ch);
  const Counted c = count_chat(bytes);
  EXPECT_TRUE(c.done);
  EXPECT_EQ(c.fed_tokens, 3u);
  EXPECT_EQ(c.tokens, 7u);
}

TEST(ChatStreamCounter, CountsCompletionsTextAndIgnoresBytesAfterDone) {
  std::string body = event(R"({"choices":[{"index":0,"text":" one"}]})");
  body += event(R"({"choices":[{"index":0,"delta":null,"text":" two"}]})");
  body += event(R"({"choices":[{"index":0,"text":""}]})");
  body += "data: [DONE]\n\n" + event(R"({"choices":[{"index":0,"text":" late"}]})");
  const Counted c = count_chat({body});
  EXPECT_TRUE(c.done);
  EXPECT_EQ(c.tokens, 2u);
}

TEST(ChatStreamCounter, AnErrorEventFailsTheStream) {
  ChatStreamCounter counter(kMaxLine);
  EXPECT_EQ(counter.feed(event(R"({"choices":[{"delta":{"content":"x"}}]})")), 1u);
  counter.feed(event(R"({"error":{"message":"replica lost","type":"server_error"}})"));
  EXPECT_FALSE(counter.done());
  EXPECT_EQ(counter.error(), R"(error event: {"message":"replica lost","type":"server_error"})");
  EXPECT_EQ(counter.content_chunks(), 1u);
  EXPECT_EQ(counter.feed("data: [DONE]\n"), 0u);  // nothing more is taken after an error
  EXPECT_FALSE(counter.done());
}

TEST(ChatStreamCounter, MalformedJsonAndNonObjectsFail) {
  for (const std::string bad : {"data: {not json\n", "data: [1,2]\n", "data: \n"}) {
    ChatStreamCounter counter(kMaxLine);
    counter.feed(bad);
    EXPECT_NE(counter.error().find("not a JSON object"), std::string::npos) << bad;
  }
}

TEST(ChatStreamCounter, AnEndlessLineFailsInsteadOfGrowing) {
  ChatStreamCounter counter(1024);
  counter.feed("data: ");
  counter.feed(std::string(2000, 'x'));
  EXPECT_EQ(counter.error(), "an SSE line longer than 1024 bytes");
}

TEST(ChatStreamCounter, ResetStartsTheNextRequestClean) {
  ChatStreamCounter counter(kMaxLine);
  counter.feed(chat_body(true).substr(0, 40));  // a request cut mid-line
  counter.reset();
  counter.feed(chat_body(false));
  EXPECT_TRUE(counter.done());
  EXPECT_EQ(counter.tokens(), 3u);
}

TEST(ChatStreamCounter, UsageWithoutCompletionTokensFallsBackToChunks) {
  std::string body = event(R"({"choices":[{"delta":{"content":"x"}}]})");
  body += event(R"({"choices":[],"usage":{"completion_tokens":9}})");
  body += event(R"({"choices":[],"usage":{"prompt_tokens":1}})");  // as python_client.py: usage_tokens = None
  body += "data: [DONE]\n";
  EXPECT_EQ(count_chat({body}).tokens, 1u);
}

TEST(PlainStreamCounter, CountsWordsAcrossPieces) {
  const std::string text = " alpha beta\tgamma\n delta  epsilon ";
  for (std::size_t cut = 0; cut <= text.size(); ++cut) {
    PlainStreamCounter counter;
    const std::size_t started = counter.feed(text.substr(0, cut)) + counter.feed(text.substr(cut));
    ASSERT_EQ(counter.tokens(), 5u) << "cut at " << cut;
    ASSERT_EQ(started, 5u);
  }
  PlainStreamCounter counter;
  counter.feed("al");
  counter.feed("pha");
  EXPECT_EQ(counter.tokens(), 1u);  // one word split across two pieces
  counter.reset();
  EXPECT_EQ(counter.tokens(), 0u);
}

}  // namespace
}  // namespace tokenbus::loadgen
