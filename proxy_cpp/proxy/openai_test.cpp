// OpenAI request parsing (fields, defaults, bad input) and response formatting (valid JSON, escaping).
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include <cmath>
#include <cstdio>
#include <limits>

#include "proxy/openai_request.hpp"
#include "proxy/openai_response.hpp"
#include "proxy/request_limits.hpp"

namespace tokenbus::proxy {
namespace {

using nlohmann::json;

TEST(OpenAiRequest, ParsesAChatRequestWithEveryField) {
  OpenAiRequest r;
  const auto error = parse_openai_request(R"({
      "model": "demo", "messages": [{"role": "system", "content": "be brief"},
                                    {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]}],
      "max_completion_tokens": 12, "temperature": 0.5, "top_p": 0.9, "stop": ["\n", "END"], "seed": 7,
      "presence_penalty": 0.1, "frequency_penalty": -0.2, "ignore_eos": true, "stream": true,
      "stream_options": {"include_usage": true}, "user": "ignored", "n": 1})",
                                          ApiFlavor::kChat, r);
  ASSERT_FALSE(error) << error->message;
  EXPECT_EQ(r.model, "demo");
  EXPECT_TRUE(r.stream);
  EXPECT_TRUE(r.include_usage);
  const v1::GenerateRequest& g = r.generate;
  EXPECT_EQ(g.prompt(), "");
  ASSERT_EQ(g.messages_size(), 2);
  EXPECT_EQ(g.messages(0).role(), "system");
  EXPECT_EQ(g.messages(0).content(), "be brief");
  EXPECT_EQ(g.messages(1).content(), "hi there");
  EXPECT_EQ(g.params().max_tokens(), 12u);
  EXPECT_FLOAT_EQ(g.params().temperature(), 0.5f);
  EXPECT_FLOAT_EQ(g.params().top_p(), 0.9f);
  ASSERT_EQ(g.params().stop_size(), 2);
  EXPECT_EQ(g.params().stop(0), "\n");
  EXPECT_TRUE(g.params().has_seed());
  EXPECT_EQ(g.params().seed(), 7u);
  EXPECT_FLOAT_EQ(g.params().presence_penalty(), 0.1f);
  EXPECT_FLOAT_EQ(g.params().frequency_penalty(), -0.2f);
  EXPECT_TRUE(g.params().ignore_eos());
}

TEST(OpenAiRequest, CompletionDefaults) {
  OpenAiRequest r;
  ASSERT_FALSE(parse_openai_request(R"({"model": "demo", "prompt": "Once", "stop": "."})", ApiFlavor::kCompletion, r));
  EXPECT_EQ(r.generate.prompt(), "Once");
  EXPECT_EQ(r.generate.messages_size(), 0);
  EXPECT_FALSE(r.stream);
  EXPECT_EQ(r.generate.params().max_tokens(), 0u);  // the engine's default
  EXPECT_FLOAT_EQ(r.generate.params().temperature(), 1.0f);
  EXPECT_FLOAT_EQ(r.generate.params().top_p(), 1.0f);
  EXPECT_FALSE(r.generate.params().has_seed());
  ASSERT_EQ(r.generate.params().stop_size(), 1);
  EXPECT_EQ(r.generate.params().stop(0), ".");
}

TEST(OpenAiRequest, NullMeansDefault) {
  OpenAiRequest r;
  ASSERT_FALSE(parse_openai_request(R"({"model": "demo", "prompt": ["x"], "max_tokens": null, "temperature": null,
                                        "stop": null, "stream_options": null})",
                                    ApiFlavor::kCompletion, r));
  EXPECT_EQ(r.generate.prompt(), "x");
  EXPECT_FLOAT_EQ(r.generate.params().temperature(), 1.0f);
}

TEST(OpenAiRequest, RejectsBadInputNamingTheField) {
  struct Case {
    ApiFlavor flavor;
    const char* body;
    const char* param;  // "" when the body as a whole is wrong
  };
  const Case cases[] = {
      {ApiFlavor::kChat, R"({"model": "demo", "messages": [)", ""},
      {ApiFlavor::kChat, R"([1, 2])", ""},
      {ApiFlavor::kChat, "{\"model\": \"demo\", \"messages\": [], \"x\": \"\xff\"}", ""},
      {ApiFlavor::kChat, R"({"messages": [{"role": "user", "content": "hi"}]})", "model"},
      {ApiFlavor::kChat, R"({"model": 7, "messages": [{"role": "user", "content": "hi"}]})", "model"},
      {ApiFlavor::kChat, R"({"model": "demo"})", "messages"},
      {ApiFlavor::kChat, R"({"model": "demo", "messages": []})", "messages"},
      {ApiFlavor::kChat, R"({"model": "demo", "messages": "hi"})", "messages"},
      {ApiFlavor::kChat, R"({"model": "demo", "messages": [{"content": "hi"}]})", "messages"},
      {ApiFlavor::kChat, R"({"model": "demo", "messages": [{"role": "user", "content": 5}]})", "content"},
      {ApiFlavor::kChat, R"({"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -1})",
       "max_tokens"},
      {ApiFlavor::kChat, R"({"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1.5})",
       "max_tokens"},
      {ApiFlavor::kChat, R"({"model": "demo", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"})",
       "temperature"},
      {ApiFlavor::kChat, R"({"model": "demo", "messages": [{"role": "user", "content": "hi"}], "top_p": 3})",
       "top_p"},
      {ApiFlavor::kChat, R"({"model": "demo", "messages": [{"role": "user", "content": "hi"}], "stream": "yes"})",
       "stream"},
      {ApiFlavor::kChat, R"({"model": "demo", "messages": [{"role": "user", "content": "hi"}], "stop": [1]})", "stop"},
      {ApiFlavor::kChat, R"({"model": "demo", "messages": [{"role": "user", "content": "hi"}], "n": 2})", "n"},
      {ApiFlavor::kChat, R"({"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0})",
       "max_tokens"},
      {ApiFlavor::kChat,
       R"({"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0})",
       "max_completion_tokens"},
      {ApiFlavor::kChat, R"({"model": "demo", "messages": [{"role": "user", "content": "hi"}], "n": 1.5})", "n"},
      {ApiFlavor::kChat, R"({"model": "demo", "messages": [{"role": "user", "content": "hi"}], "logprobs": true})",
       "logprobs"},
      {ApiFlavor::kChat, R"({"model": "demo", "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2})",
       "top_logprobs"},
      {ApiFlavor::kCompletion, R"({"model": "demo", "prompt": "a", "logprobs": 3})", "logprobs"},
      {ApiFlavor::kCompletion, R"({"model": "demo", "prompt": "a", "echo": true})", "echo"},
      {ApiFlavor::kCompletion, R"({"model": "demo", "prompt": "a", "best_of": 2})", "best_of"},
      {ApiFlavor::kCompletion, R"({"model": "demo"})", "prompt"},
      {ApiFlavor::kCompletion, R"({"model": "demo", "prompt": ["a", "b"]})", "prompt"},
      {ApiFlavor::kCompletion, R"({"model": "demo", "prompt": "a", "seed": "x"})", "seed"},
  };
  for (const Case& c : cases) {
    OpenAiRequest r;
    const auto error = parse_openai_request(c.body, c.flavor, r);
    ASSERT_TRUE(error) << c.body;
    EXPECT_EQ(error->param, c.param) << c.body << ": " << error->message;
    EXPECT_FALSE(error->message.empty());
  }
}

TEST(OpenAiRequest, AcceptsUnsupportedFeaturesAtTheirNeutralValues) {
  OpenAiRequest chat;
  EXPECT_FALSE(parse_openai_request(R"({"model": "demo", "messages": [{"role": "user", "content": "hi"}], "n": 1,
                                        "logprobs": false, "top_logprobs": 0, "max_tokens": 1})",
                                    ApiFlavor::kChat, chat));
  EXPECT_EQ(chat.generate.params().max_tokens(), 1u);
  OpenAiRequest completion;
  EXPECT_FALSE(parse_openai_request(
      R"({"model": "demo", "prompt": "a", "best_of": 1, "logprobs": 0, "echo": false, "top_logprobs": null})",
      ApiFlavor::kCompletion, completion));
}

// Every limit of schemas/request_limits.json, through the generated header: the value on the limit passes, the
// first one past it is refused naming the field.
struct LimitCase {
  std::string field;
  std::string fields;  // what the body adds after the model and messages, starting with ','
};

std::optional<RequestError> parse_chat(const std::string& fields) {
  OpenAiRequest r;
  return parse_openai_request(R"({"model": "demo", "messages": [{"role": "user", "content": "hi"}])" + fields + "}",
                              ApiFlavor::kChat, r);
}

std::string number(float value) {
  char text[32];
  std::snprintf(text, sizeof(text), "%.9g", static_cast<double>(value));  // round-trips a float
  return text;
}

TEST(OpenAiRequest, EveryLimitHoldsJustInsideAndIsRefusedJustOutside) {
  namespace limits = request_limits;
  constexpr float kInf = std::numeric_limits<float>::infinity();
  std::vector<LimitCase> inside;
  std::vector<LimitCase> outside;
  const std::pair<const char*, limits::NumberLimit> numbers[] = {{"temperature", limits::kTemperature},
                                                                 {"top_p", limits::kTopP},
                                                                 {"presence_penalty", limits::kPresencePenalty},
                                                                 {"frequency_penalty", limits::kFrequencyPenalty}};
  for (const auto& [field, limit] : numbers) {
    const auto set = [&](float value) {
      return LimitCase{field, ", \"" + std::string(field) + "\": " + number(value)};
    };
    const float min = static_cast<float>(limit.min);
    const float max = static_cast<float>(limit.max);
    inside.push_back(set(limit.min_exclusive ? std::nextafter(min, kInf) : min));
    inside.push_back(set(max));
    outside.push_back(set(limit.min_exclusive ? min : std::nextafter(min, -kInf)));
    outside.push_back(set(std::nextafter(max, kInf)));
  }
  const auto stops = [](std::size_t count, const std::string& each) {
    std::string list;
    for (std::size_t i = 0; i < count; ++i) list += (i ? ",\"" : "\"") + each + "\"";
    return LimitCase{"stop", ", \"stop\": [" + list + "]"};
  };
  inside.push_back(stops(limits::kMaxStopStrings, "s"));
  outside.push_back(stops(limits::kMaxStopStrings + 1, "s"));
  std::string longest;  // counted in characters, not bytes: each is two bytes of UTF-8
  for (std::size_t i = 0; i < limits::kMaxStopChars; ++i) longest += "\xc3\xa9";
  inside.push_back(stops(1, longest));
  outside.push_back(stops(1, longest + "x"));
  outside.push_back(stops(1, ""));
  outside.push_back({"stop", R"(, "stop": "")"});
  const auto messages = [](std::size_t count) {
    std::string list;
    for (std::size_t i = 0; i < count; ++i) list += std::string(i ? "," : "") + R"({"role": "user", "content": "m"})";
    return LimitCase{"messages", ", \"messages\": [" + list + "]"};
  };
  inside.push_back(messages(limits::kMaxMessages));
  outside.push_back(messages(limits::kMaxMessages + 1));

  for (const LimitCase& c : inside) {
    const auto error = parse_chat(c.fields);
    EXPECT_FALSE(error) << c.fields.substr(0, 200) << ": " << error->message;
  }
  for (const LimitCase& c : outside) {
    const auto error = parse_chat(c.fields);
    ASSERT_TRUE(error) << c.fields.substr(0, 200);
    EXPECT_EQ(error->param, c.field) << error->message;
  }
}

TEST(OpenAiRequest, AKeyGivenTwiceHoldsItsLastValueSoTheLimitsStillHold) {
  std::string stops;
  for (std::size_t i = 0; i < request_limits::kMaxStopStrings; ++i) {
    stops += (i ? ",\"s" : "\"s") + std::to_string(i) + "\"";
  }
  std::string messages;
  for (std::size_t i = 0; i < request_limits::kMaxMessages; ++i) {
    messages += std::string(i ? "," : "") + R"({"role": "user", "content": "m"})";
  }
  // found by the fuzzer: every occurrence used to add its entries, past the limits checked per occurrence
  const std::string body = R"({"model": "demo", "stop": [)" + stops + R"(], "messages": [)" + messages +
                           R"(], "stop": [)" + stops + R"(], "messages": [)" + messages + "]}";
  OpenAiRequest r;
  const auto error = parse_openai_request(body, ApiFlavor::kChat, r);
  ASSERT_FALSE(error) << error->message;
  EXPECT_EQ(static_cast<std::size_t>(r.generate.params().stop_size()), request_limits::kMaxStopStrings);
  EXPECT_EQ(static_cast<std::size_t>(r.generate.messages_size()), request_limits::kMaxMessages);
}

TEST(OpenAiRequest, DefaultsAreTheSchemas) {
  OpenAiRequest r;
  ASSERT_FALSE(parse_openai_request(R"({"model": "demo", "prompt": "a"})", ApiFlavor::kCompletion, r));
  const v1::SamplingParams& p = r.generate.params();
  EXPECT_EQ(p.temperature(), static_cast<float>(request_limits::kTemperature.default_value));
  EXPECT_EQ(p.top_p(), static_cast<float>(request_limits::kTopP.default_value));
  EXPECT_EQ(p.presence_penalty(), static_cast<float>(request_limits::kPresencePenalty.default_value));
  EXPECT_EQ(p.frequency_penalty(), static_cast<float>(request_limits::kFrequencyPenalty.default_value));
}

// Splits "data: {...}\n\n" events into their JSON.
std::vector<json> events(const std::string& sse) {
  std::vector<json> out;
  std::size_t at = 0;
  while (at < sse.size()) {
    const std::size_t end = sse.find("\n\n", at);
    EXPECT_NE(end, std::string::npos);
    EXPECT_EQ(sse.compare(at, 6, "data: "), 0);
    const std::string data = sse.substr(at + 6, end - at - 6);
    out.push_back(data == "[DONE]" ? json("[DONE]") : json::parse(data));
    at = end + 2;
  }
  return out;
}

TEST(CompletionFormatter, ChatEventsAreOpenAiChunks) {
  CompletionFormatter f(ApiFlavor::kChat, "chatcmpl-1", "de\"mo", 1700000000);
  std::string out;
  const std::string tricky = "say \"hi\"\n\t\\ \x01 \xc3\xa9 \xe2\x82\xac";
  f.append_event(out, tricky, "");
  f.append_event(out, "more", "");
  f.append_event(out, "", "length");
  f.append_usage_event(out, Usage{3, 4});
  CompletionFormatter::append_done(out);
  const std::vector<json> e = events(out);
  ASSERT_EQ(e.size(), 5u);
  EXPECT_EQ(e[0]["id"], "chatcmpl-1");
  EXPECT_EQ(e[0]["object"], "chat.completion.chunk");
  EXPECT_EQ(e[0]["created"], 1700000000);
  EXPECT_EQ(e[0]["model"], "de\"mo");
  EXPECT_EQ(e[0]["choices"][0]["index"], 0);
  EXPECT_EQ(e[0]["choices"][0]["delta"]["role"], "assistant");
  EXPECT_EQ(e[0]["choices"][0]["delta"]["content"], tricky);
  EXPECT_TRUE(e[0]["choices"][0]["finish_reason"].is_null());
  EXPECT_FALSE(e[1]["choices"][0]["delta"].contains("role"));
  EXPECT_EQ(e[1]["choices"][0]["delta"]["content"], "more");
  EXPECT_EQ(e[2]["choices"][0]["finish_reason"], "length");
  EXPECT_TRUE(e[3]["choices"].empty());
  EXPECT_EQ(e[3]["usage"], json({{"prompt_tokens", 3}, {"completion_tokens", 4}, {"total_tokens", 7}}));
  EXPECT_EQ(e[4], "[DONE]");
}

TEST(CompletionFormatter, EscapesTextAsTheJsonSerializerDoes) {
  std::vector<std::string> texts;
  for (int c = 0; c < 0x80; ++c) texts.push_back("a" + std::string(1, static_cast<char>(c)) + "b");
  texts.push_back("say \"hi\"\n\t\\ \x01\x1f\x7f \xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80 end");
  texts.push_back("");
  for (const std::string& text : texts) {
    CompletionFormatter f(ApiFlavor::kCompletion, "cmpl-1", "demo", 1);
    std::string out;
    f.append_event(out, text, "");
    EXPECT_NE(out.find("\"text\":" + json(text).dump() + ","), std::string::npos) << out;
  }
}

TEST(CompletionFormatter, InvalidUtf8IsReplacedNotFatal) {
  CompletionFormatter f(ApiFlavor::kCompletion, "cmpl-1", "demo", 1);
  std::string out;
  f.append_event(out, "bad \xff byte", "stop");
  const std::vector<json> e = events(out);
  ASSERT_EQ(e.size(), 1u);
  EXPECT_EQ(e[0]["object"], "text_completion");
  EXPECT_EQ(e[0]["choices"][0]["text"], "bad \xef\xbf\xbd byte");
  EXPECT_EQ(e[0]["choices"][0]["finish_reason"], "stop");
}

TEST(CompletionFormatter, NonStreamingBodies) {
  const json chat = json::parse(CompletionFormatter(ApiFlavor::kChat, "chatcmpl-2", "demo", 5).body("a\"b", "stop", {2, 1}));
  EXPECT_EQ(chat["object"], "chat.completion");
  EXPECT_EQ(chat["choices"][0]["message"], json({{"role", "assistant"}, {"content", "a\"b"}}));
  EXPECT_EQ(chat["choices"][0]["finish_reason"], "stop");
  EXPECT_EQ(chat["usage"]["total_tokens"], 3);
  const json text = json::parse(CompletionFormatter(ApiFlavor::kCompletion, "cmpl-2", "demo", 5).body("xy", "length", {}));
  EXPECT_EQ(text["object"], "text_completion");
  EXPECT_EQ(text["choices"][0]["text"], "xy");
}

TEST(OpenAiErrors, HaveOpenAisShape) {
  const json e = json::parse(error_json(400, "'max_tokens' must be non-negative", "max_tokens"));
  EXPECT_EQ(e["error"]["message"], "'max_tokens' must be non-negative");
  EXPECT_EQ(e["error"]["type"], "invalid_request_error");
  EXPECT_EQ(e["error"]["param"], "max_tokens");
  EXPECT_EQ(e["error"]["code"], 400);
  EXPECT_TRUE(json::parse(error_json(503, "down"))["error"]["param"].is_null());
}

}  // namespace
}  // namespace tokenbus::proxy
