// The requests on the wire: valid HTTP/1.1 with the right length, the body of tools/bench/python_client.py,
// lengths drawn from the seeded distributions, the timing header only when asked.
#include "loadgen/workload.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

namespace tokenbus::loadgen {
namespace {

struct Wire {
  std::string request_line;
  std::vector<std::string> fields;
  std::string body;
};

Wire split(const std::string& wire) {
  Wire w;
  const std::size_t end = wire.find("\r\n\r\n");
  EXPECT_NE(end, std::string::npos);
  std::istringstream head(wire.substr(0, end + 2));  // every line with its "\r\n"
  std::getline(head, w.request_line);
  w.request_line.pop_back();  // '\r'
  for (std::string line; std::getline(head, line);) w.fields.push_back(line.substr(0, line.size() - 1));
  w.body = wire.substr(end + 4);
  const std::string length = "Content-Length: " + std::to_string(w.body.size());
  EXPECT_NE(std::find(w.fields.begin(), w.fields.end(), length), w.fields.end()) << wire;
  return w;
}

Options options() {
  Options o;
  o.port = 8011;
  return o;
}

TEST(Workload, TheChatRequestOfBenchClient) {
  Options o = options();
  o.prompt = "say \"hi\"\nnow";
  Workload workload(o);
  std::string wire;
  workload.next(wire);
  const Wire w = split(wire);
  EXPECT_EQ(w.request_line, "POST /v1/chat/completions HTTP/1.1");
  EXPECT_EQ(w.fields, (std::vector<std::string>{"Host: 127.0.0.1:8011", "User-Agent: tokenbus-loadgen",
                                                "Content-Type: application/json", "Content-Length: " +
                                                std::to_string(w.body.size())}));
  const auto body = nlohmann::json::parse(w.body);
  EXPECT_EQ(body, (nlohmann::json{{"model", "demo"},
                                  {"messages", {{{"role", "user"}, {"content", "say \"hi\"\nnow"}}}},
                                  {"stream", true},
                                  {"stream_options", {{"include_usage", true}}},
                                  {"max_tokens", 32},
                                  {"ignore_eos", true}}));
}

TEST(Workload, ThePlainRequestAndTheTimingHeader) {
  Options o = options();
  o.endpoint = Endpoint::kPlain;
  o.model = "m/x";
  o.timing = true;
  o.host = "::1";
  Workload workload(o);
  std::string wire;
  workload.next(wire);
  const Wire w = split(wire);
  EXPECT_EQ(w.request_line, "POST /v1/chat/m%2Fx?max_tokens=32 HTTP/1.1");
  EXPECT_EQ(w.fields[0], "Host: [::1]:8011");
  EXPECT_NE(std::find(w.fields.begin(), w.fields.end(), "X-Tokenbus-Timing: 1"), w.fields.end());
  EXPECT_EQ(w.body, o.prompt);
}

std::vector<std::pair<int, std::string>> lengths_and_prompts(const Options& o, int n) {
  Workload workload(o);
  std::string wire;
  std::vector<std::pair<int, std::string>> out;
  for (int i = 0; i < n; ++i) {
    workload.next(wire);
    const auto body = nlohmann::json::parse(split(wire).body);
    out.emplace_back(body["max_tokens"].get<int>(), body["messages"][0]["content"].get<std::string>());
  }
  return out;
}

TEST(Workload, DrawnLengthsAreSeededAndInRange) {
  Options o = options();
  std::string wants;
  o.max_tokens = *LengthDist::parse("uniform:4:64", kMaxTokens, wants);
  o.prompt_words = *LengthDist::parse("uniform:1:30", kMaxPromptWords, wants);
  o.seed = 42;
  const auto requests = lengths_and_prompts(o, 300);
  EXPECT_EQ(requests, lengths_and_prompts(o, 300));  // the same seed, the same requests
  std::vector<int> max_tokens, words;
  for (const auto& [n, prompt] : requests) {
    max_tokens.push_back(n);
    words.push_back(static_cast<int>(std::count(prompt.begin(), prompt.end(), ' ')) + 1);
    std::istringstream in(prompt);
    for (std::string word; in >> word;) {
      ASSERT_NE(std::find(std::begin(kPromptWords), std::end(kPromptWords), word), std::end(kPromptWords)) << word;
    }
  }
  EXPECT_EQ(*std::min_element(max_tokens.begin(), max_tokens.end()), 4);
  EXPECT_EQ(*std::max_element(max_tokens.begin(), max_tokens.end()), 64);
  EXPECT_EQ(*std::min_element(words.begin(), words.end()), 1);
  EXPECT_EQ(*std::max_element(words.begin(), words.end()), 30);

  Options other = o;
  other.seed = 43;
  EXPECT_NE(lengths_and_prompts(other, 300), requests);
  // The prompt draws do not move the max_tokens draws: each has its own stream.
  Options fixed_prompt = o;
  fixed_prompt.prompt_words.reset();
  const auto fixed = lengths_and_prompts(fixed_prompt, 300);
  for (std::size_t i = 0; i < fixed.size(); ++i) ASSERT_EQ(fixed[i].first, requests[i].first);
}

}  // namespace
}  // namespace tokenbus::loadgen
