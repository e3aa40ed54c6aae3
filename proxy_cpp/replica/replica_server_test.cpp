// ReplicaServer in-process against a real gRPC client, with a fake model worker on the other ends of real
// rings (memfd + eventfds). The fake decodes and encodes with msgpack-cxx, independently of the replica's
// own reader. Waits are polls with a deadline, never sleeps.
#include "replica/replica_server.hpp"

#include <grpcpp/grpcpp.h>
#include <arpa/inet.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <filesystem>
#include <future>
#include <map>
#include <memory>
#include <msgpack.hpp>
#include <mutex>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "replica/ring_records.hpp"
#include "tokenbus.grpc.pb.h"

namespace tokenbus::replica {
namespace {

using namespace std::chrono_literals;
using tokenbus::v1::GenerateChunk;
using tokenbus::v1::GenerateRequest;

constexpr auto kDeadline = 10s;
constexpr int kTokensPerRequest = 5;

template <class Predicate>
bool eventually(Predicate predicate) {
  const auto deadline = std::chrono::steady_clock::now() + kDeadline;
  while (!predicate()) {
    if (std::chrono::steady_clock::now() > deadline) return false;
    std::this_thread::sleep_for(1ms);  // polling a condition, with a deadline
  }
  return true;
}

// A SUBMIT as the worker decoded it.
struct Submit {
  std::uint64_t id;
  std::shared_ptr<msgpack::object_handle> record;
  const msgpack::object& field(std::size_t i) const { return record->get().via.array.ptr[i]; }
  std::string prompt() const { return field(2).as<std::string>(); }
  const msgpack::object& param(const std::string& key) const {
    const auto& map = field(4).via.map;
    for (std::uint32_t i = 0; i < map.size; ++i) {
      if (map.ptr[i].key.as<std::string>() == key) return map.ptr[i].val;
    }
    throw std::runtime_error("no param " + key);
  }
};

// GET http://127.0.0.1:port/metrics: the body, or "" when the endpoint does not answer.
std::string scrape(int port) {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return "";
  const timeval timeout{10, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof(timeout));
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_port = htons(static_cast<std::uint16_t>(port));
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  std::string response;
  const std::string request = "GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n";
  if (::connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) == 0 &&
      ::write(fd, request.data(), request.size()) == static_cast<ssize_t>(request.size())) {
    char buffer[4096];
    ssize_t n;
    while ((n = ::read(fd, buffer, sizeof(buffer))) > 0) response.append(buffer, static_cast<std::size_t>(n));
  }
  ::close(fd);
  const auto body = response.find("\r\n\r\n");
  return response.rfind("HTTP/1.", 0) == 0 && response.find(" 200 ") != std::string::npos && body != std::string::npos
             ? response.substr(body + 4)
             : "";
}

// The value of the sample `series` (a name with its labels, as exposed) in a scraped body; -1 when absent.
double sample(const std::string& body, const std::string& series) {
  const std::string prefix = series + " ";
  for (std::size_t at = 0; at < body.size();) {
    const auto end = body.find('\n', at);
    const std::string line = body.substr(at, end == std::string::npos ? std::string::npos : end - at);
    if (line.rfind(prefix, 0) == 0) return std::strtod(line.c_str() + prefix.size(), nullptr);
    if (end == std::string::npos) break;
    at = end + 1;
  }
  return -1;
}

// The other ends of both rings. It answers each SUBMIT by its prompt: one starting with "hold" gets one TOKENS
// and stays open until cancelled, "error" a FINISH with error 400, anything else kTokensPerRequest TOKENS and a
// FINISH. Like the model worker, it stamps the first TOKENS group of a request with the time it produced it
// (`[1, id, text, n, produced_ns]`), except for prompts starting with "unstamped" (produced_ns 0 throughout).
class FakeWorker {
 public:
  FakeWorker(const ring::RingFds& requests, const ring::RingFds& responses)
      : requests_(requests), responses_(responses), thread_([this] { run(); }) {}

  ~FakeWorker() {
    stop_ = true;
    resume();
    ring::signal_eventfd(requests_.data_fd());
    thread_.join();
  }

  void pause() {
    std::lock_guard lock(mutex_);
    paused_ = true;
  }
  void resume() {
    {
      std::lock_guard lock(mutex_);
      paused_ = false;
    }
    changed_.notify_all();
  }

  // Writes one response record built by `pack` (waiting for space; the replica always reads).
  template <class Pack>
  void send(Pack&& pack) {
    msgpack::sbuffer buffer;
    msgpack::packer<msgpack::sbuffer> pk(buffer);
    pack(pk);
    send_raw(buffer.data(), buffer.size());
  }
  void send_raw(const void* data, std::size_t size) {
    std::lock_guard lock(send_mutex_);
    while (!responses_.try_write(data, size)) responses_.wait_for_space(100ms);
  }
  // One TOKENS record of these groups, as the worker batches an event-loop iteration's tokens.
  void send_tokens(std::span<const TokensGroup> groups) {
    std::string record;
    encode_tokens(record, groups);
    send_raw(record.data(), record.size());
  }
  void send_tokens(std::uint64_t id, const std::string& text, std::uint32_t n, std::uint64_t produced_ns = 0) {
    const TokensGroup group{id, text, n, produced_ns};
    send_tokens(std::span(&group, 1));
  }
  void send_finish(std::uint64_t id, const std::string& reason, int prompt, int completion, int code,
                   const std::string& message) {
    send([&](auto& pk) {
      pk.pack_array(7);
      pk.pack(2);
      pk.pack(id);
      pk.pack(reason);
      pk.pack(prompt);
      pk.pack(completion);
      pk.pack(code);
      pk.pack(message);
    });
  }

  std::optional<Submit> submit_with_prompt(const std::string& prompt) {
    std::unique_lock lock(mutex_);
    std::optional<Submit> found;
    changed_.wait_for(lock, kDeadline, [&] {
      for (const auto& submit : submits_) {
        if (submit.prompt() == prompt) found = submit;
      }
      return found.has_value();
    });
    return found;
  }
  bool saw_cancel(std::uint64_t id) {
    std::unique_lock lock(mutex_);
    return changed_.wait_for(lock, kDeadline, [&] { return cancels_.count(id) > 0; });
  }
  std::size_t submits() {
    std::lock_guard lock(mutex_);
    return submits_.size();
  }
  std::vector<std::uint64_t> submit_ids() {
    std::lock_guard lock(mutex_);
    std::vector<std::uint64_t> ids;
    for (const auto& submit : submits_) ids.push_back(submit.id);
    return ids;
  }

 private:
  void run() {
    while (!stop_) {
      {
        std::unique_lock lock(mutex_);
        changed_.wait(lock, [&] { return !paused_; });
      }
      const auto record = requests_.peek();
      if (!record) {
        requests_.wait_for_data(100ms);
        continue;
      }
      auto handle = std::make_shared<msgpack::object_handle>(
          msgpack::unpack(reinterpret_cast<const char*>(record->data()), record->size()));
      requests_.release();
      const auto& array = handle->get().via.array;
      const int kind = array.ptr[0].as<int>();
      const auto id = array.ptr[1].as<std::uint64_t>();
      if (kind == 1) {
        Submit submit{id, handle};
        answer(submit);
        std::lock_guard lock(mutex_);
        submits_.push_back(std::move(submit));
      } else {
        send_finish(id, "abort", 3, 1, 0, "");  // the contract: a cancelled request still gets a FINISH
        std::lock_guard lock(mutex_);
        cancels_.insert(id);
      }
      changed_.notify_all();
    }
  }

  void answer(const Submit& submit) {
    const std::string prompt = submit.prompt();
    const bool stamped = prompt.rfind("unstamped", 0) != 0;
    if (prompt.rfind("hold", 0) == 0) {
      send_tokens(submit.id, "first", 1, wall_clock_ns());
    } else if (prompt == "error") {
      send_finish(submit.id, "error", 0, 0, 400, "prompt too long");
    } else {
      for (int i = 0; i < kTokensPerRequest; ++i) {
        send_tokens(submit.id, "tok" + std::to_string(i) + " ", 1, i == 0 && stamped ? wall_clock_ns() : 0);
      }
      send_finish(submit.id, "length", 7, kTokensPerRequest, 0, "");
    }
  }

  ring::Consumer requests_;
  ring::Producer responses_;
  std::mutex send_mutex_;  // the test thread and the worker thread both produce responses
  std::mutex mutex_;
  std::condition_variable changed_;
  std::vector<Submit> submits_;
  std::set<std::uint64_t> cancels_;
  bool paused_ = false;
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

struct Stream {
  std::vector<GenerateChunk> chunks;
  grpc::Status status;
  std::string text() const {
    std::string all;
    for (const auto& chunk : chunks) all += chunk.text();
    return all;
  }
  std::uint32_t tokens() const {
    std::uint32_t n = 0;
    for (const auto& chunk : chunks) n += chunk.tokens();
    return n;
  }
  std::size_t chunks_with_first_token_times() const {
    std::size_t n = 0;
    for (const auto& chunk : chunks) n += chunk.has_first_token_times();
    return n;
  }
};

class ReplicaServerTest : public ::testing::Test {
 protected:
  explicit ReplicaServerTest(std::size_t request_capacity = 1 << 16)
      : request_ring_(request_capacity), response_ring_(1 << 16) {
    ReplicaOptions options;
    options.replica_id = "test-replica";
    options.request_ring = request_ring_.fds();
    options.response_ring = response_ring_.fds();
    options.peer_check_interval = 50ms;
    server_ = std::make_unique<ReplicaServer>(options);
    std::string error;
    EXPECT_TRUE(server_->start(error)) << error;
    channel_ = grpc::CreateChannel("127.0.0.1:" + std::to_string(server_->port()), grpc::InsecureChannelCredentials());
    stub_ = tokenbus::v1::Replica::NewStub(channel_);
  }

  void TearDown() override {
    worker_.reset();
    server_->shutdown(1s);
  }

  void start_worker() { worker_ = std::make_unique<FakeWorker>(request_ring_.fds(), response_ring_.fds()); }

  Stream generate(const GenerateRequest& request) {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + kDeadline);
    Stream stream;
    auto reader = stub_->Generate(&context, request);
    GenerateChunk chunk;
    while (reader->Read(&chunk)) stream.chunks.push_back(chunk);
    stream.status = reader->Finish();
    return stream;
  }

  static GenerateRequest prompt_request(const std::string& prompt) {
    GenerateRequest request;
    request.set_request_id("req-" + prompt);
    request.set_prompt(prompt);
    request.mutable_params()->set_max_tokens(16);
    return request;
  }

  tokenbus::v1::HealthResponse health() {
    grpc::ClientContext context;
    tokenbus::v1::HealthResponse response;
    EXPECT_TRUE(stub_->Health(&context, {}, &response).ok());
    return response;
  }

  tokenbus::v1::StatsResponse stats() {
    grpc::ClientContext context;
    tokenbus::v1::StatsResponse response;
    EXPECT_TRUE(stub_->Stats(&context, {}, &response).ok());
    return response;
  }

  ring::OwnedRingFds request_ring_;
  ring::OwnedRingFds response_ring_;
  std::unique_ptr<ReplicaServer> server_;
  std::unique_ptr<FakeWorker> worker_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<tokenbus::v1::Replica::Stub> stub_;
};

TEST_F(ReplicaServerTest, StreamsTheTokensThenTheFinalChunk) {
  start_worker();
  const Stream stream = generate(prompt_request("hello"));
  ASSERT_TRUE(stream.status.ok()) << stream.status.error_message();
  ASSERT_FALSE(stream.chunks.empty());
  EXPECT_EQ(stream.text(), "tok0 tok1 tok2 tok3 tok4 ");
  EXPECT_EQ(stream.tokens(), static_cast<std::uint32_t>(kTokensPerRequest));
  const GenerateChunk& last = stream.chunks.back();
  EXPECT_EQ(last.finish_reason(), tokenbus::v1::FINISH_REASON_LENGTH);
  EXPECT_EQ(last.prompt_tokens(), 7u);
  EXPECT_EQ(last.completion_tokens(), static_cast<std::uint32_t>(kTokensPerRequest));
  EXPECT_EQ(last.error_code(), 0u);
  for (std::size_t i = 0; i + 1 < stream.chunks.size(); ++i) {
    EXPECT_EQ(stream.chunks[i].finish_reason(), tokenbus::v1::FINISH_REASON_NONE);
  }
}

TEST_F(ReplicaServerTest, TheFirstTextChunkCarriesTheFirstTokensStampsInOrder) {
  start_worker();
  const std::uint64_t before = wall_clock_ns();
  const Stream stream = generate(prompt_request("hello"));
  const std::uint64_t after = wall_clock_ns();
  ASSERT_TRUE(stream.status.ok()) << stream.status.error_message();
  ASSERT_FALSE(stream.chunks.empty());
  const GenerateChunk& first = stream.chunks.front();
  ASSERT_FALSE(first.text().empty());
  ASSERT_TRUE(first.has_first_token_times());
  const auto& times = first.first_token_times();
  const std::vector<std::uint64_t> stamps = {times.replica_received_ns(), times.ring_written_ns(),
                                             times.engine_produced_ns(), times.ring_read_ns()};
  EXPECT_GE(stamps.front(), before);
  EXPECT_LE(stamps.back(), after);
  for (std::size_t i = 1; i < stamps.size(); ++i) EXPECT_LE(stamps[i - 1], stamps[i]) << "stamp " << i;
  EXPECT_EQ(stream.chunks_with_first_token_times(), 1u);
}

TEST_F(ReplicaServerTest, FourFieldTokensRecordsStillStreamWithoutTheEngineStamp) {
  start_worker();
  const Stream stream = generate(prompt_request("unstamped"));
  ASSERT_TRUE(stream.status.ok()) << stream.status.error_message();
  EXPECT_EQ(stream.text(), "tok0 tok1 tok2 tok3 tok4 ");
  EXPECT_EQ(stream.chunks.back().finish_reason(), tokenbus::v1::FINISH_REASON_LENGTH);
  ASSERT_TRUE(stream.chunks.front().has_first_token_times());
  const auto& times = stream.chunks.front().first_token_times();
  EXPECT_EQ(times.engine_produced_ns(), 0u);  // not known: the proxy leaves the engine's hops out
  EXPECT_NE(times.replica_received_ns(), 0u);
  EXPECT_LE(times.replica_received_ns(), times.ring_written_ns());
  EXPECT_LE(times.ring_written_ns(), times.ring_read_ns());
  EXPECT_EQ(stream.chunks_with_first_token_times(), 1u);
}

TEST_F(ReplicaServerTest, TheMetricsEndpointCountsCallsAndRingTraffic) {
  start_worker();
  const std::string idle = scrape(server_->metrics_port());
  ASSERT_NE(idle, "");
  EXPECT_EQ(sample(idle, R"(tokenbus_replica_ring_records_total{ring="request"})"), 0);
  EXPECT_EQ(sample(idle, R"(tokenbus_replica_generate_calls_total{result="length"})"), 0);

  grpc::ClientContext context;
  auto reader = stub_->Generate(&context, prompt_request("hold"));
  GenerateChunk chunk;
  ASSERT_TRUE(reader->Read(&chunk));
  EXPECT_EQ(sample(scrape(server_->metrics_port()), "tokenbus_replica_open_calls"), 1);
  context.TryCancel();
  while (reader->Read(&chunk)) {
  }
  reader->Finish();
  ASSERT_TRUE(generate(prompt_request("hello")).status.ok());

  std::string body;
  // A call is counted in OnDone, which may run after the client saw its status; the hold call's CANCEL may be
  // written after hello's SUBMIT, and its FINISH read after hello ended.
  ASSERT_TRUE(eventually([&] {
    body = scrape(server_->metrics_port());
    return sample(body, R"(tokenbus_replica_generate_calls_total{result="cancelled"})") == 1 &&
           sample(body, R"(tokenbus_replica_generate_calls_total{result="length"})") == 1 &&
           // two SUBMITs and the hold call's CANCEL
           sample(body, R"(tokenbus_replica_ring_records_total{ring="request"})") == 3 &&
           // hold: TOKENS and the FINISH answering its CANCEL; hello: 5 TOKENS and a FINISH
           sample(body, R"(tokenbus_replica_ring_records_total{ring="response"})") == 8;
  })) << body;
  EXPECT_EQ(sample(body, "tokenbus_replica_open_calls"), 0);
  EXPECT_GT(sample(body, R"(tokenbus_replica_ring_bytes_total{ring="request"})"), 3 * 4);
  EXPECT_GT(sample(body, R"(tokenbus_replica_ring_bytes_total{ring="response"})"), 8 * 4);
  for (const char* hop : {"replica_to_ring", "engine", "ring_to_replica"}) {
    EXPECT_EQ(sample(body, std::string(R"(tokenbus_replica_first_token_hop_seconds_count{hop=")") + hop + R"("})"), 2)
        << hop;
  }
  EXPECT_GT(sample(body, "tokenbus_replica_response_ring_idle_seconds_total"), 0);
}

TEST_F(ReplicaServerTest, TheSubmitRecordCarriesTheRequest) {
  start_worker();
  GenerateRequest request;
  request.set_prompt("");
  auto* system = request.add_messages();
  system->set_role("system");
  system->set_content("be brief");
  auto* user = request.add_messages();
  user->set_role("user");
  user->set_content("chat-prompt");
  auto* params = request.mutable_params();
  params->set_max_tokens(32);
  params->set_temperature(0.5f);
  params->set_seed(42);
  params->add_stop("\n");
  params->set_ignore_eos(true);
  ASSERT_TRUE(generate(request).status.ok());

  const auto submit = worker_->submit_with_prompt("");  // a chat request's prompt field is empty
  ASSERT_TRUE(submit);
  EXPECT_EQ(submit->record->get().via.array.size, 5u);
  const auto messages = submit->field(3).as<std::vector<std::vector<std::string>>>();
  EXPECT_EQ(messages, (std::vector<std::vector<std::string>>{{"system", "be brief"}, {"user", "chat-prompt"}}));
  EXPECT_EQ(submit->param("max_tokens").as<int>(), 32);
  EXPECT_DOUBLE_EQ(submit->param("temperature").as<double>(), 0.5);
  EXPECT_DOUBLE_EQ(submit->param("top_p").as<double>(), 1.0);  // unset: off
  EXPECT_EQ(submit->param("seed").as<std::uint64_t>(), 42u);
  EXPECT_EQ(submit->param("stop").as<std::vector<std::string>>(), std::vector<std::string>{"\n"});
  EXPECT_EQ(submit->param("ignore_eos").as<bool>(), true);
  EXPECT_DOUBLE_EQ(submit->param("presence_penalty").as<double>(), 0.0);
  EXPECT_DOUBLE_EQ(submit->param("frequency_penalty").as<double>(), 0.0);

  ASSERT_TRUE(generate(prompt_request("plain")).status.ok());
  const auto plain = worker_->submit_with_prompt("plain");
  ASSERT_TRUE(plain);
  EXPECT_TRUE(plain->field(3).is_nil());
  EXPECT_TRUE(plain->param("seed").is_nil());
}

TEST_F(ReplicaServerTest, AnEngineErrorEndsTheStreamWithItsCodeAndMessage) {
  start_worker();
  const Stream stream = generate(prompt_request("error"));
  ASSERT_TRUE(stream.status.ok());
  ASSERT_EQ(stream.chunks.size(), 1u);
  EXPECT_EQ(stream.chunks[0].finish_reason(), tokenbus::v1::FINISH_REASON_ERROR);
  EXPECT_EQ(stream.chunks[0].error_code(), 400u);
  EXPECT_EQ(stream.chunks[0].error_message(), "prompt too long");
}

TEST_F(ReplicaServerTest, HealthServesOnlyAfterReady) {
  start_worker();
  EXPECT_FALSE(health().serving());
  worker_->send([](auto& pk) {
    pk.pack_array(2);
    pk.pack(4);
    pk.pack_map(4);
    pk.pack(std::string("engine"));
    pk.pack(std::string("sim"));
    pk.pack(std::string("model"));
    pk.pack(std::string("tiny"));
    pk.pack(std::string("future_field"));  // unknown keys are skipped
    pk.pack(std::vector<int>{1, 2});
    pk.pack(std::string("max_model_len"));
    pk.pack(2048);
  });
  ASSERT_TRUE(eventually([&] { return health().serving(); }));
  const auto response = health();
  EXPECT_EQ(response.engine(), "sim");
  EXPECT_EQ(response.model(), "tiny");
  EXPECT_EQ(response.max_model_len(), 2048u);
}

TEST_F(ReplicaServerTest, StatsReportTheLastStatsRecordAndOpenCalls) {
  start_worker();
  EXPECT_EQ(stats().running(), 0u);
  worker_->send([](auto& pk) {
    pk.pack_array(4);
    pk.pack(3);
    pk.pack(2);
    pk.pack(5);
    pk.pack(0.25);
  });
  ASSERT_TRUE(eventually([&] { return stats().running() == 2; }));
  EXPECT_EQ(stats().waiting(), 5u);
  EXPECT_FLOAT_EQ(stats().kv_usage(), 0.25f);
  EXPECT_EQ(stats().in_flight(), 0u);

  grpc::ClientContext context;
  auto reader = stub_->Generate(&context, prompt_request("hold"));
  GenerateChunk chunk;
  ASSERT_TRUE(reader->Read(&chunk));
  EXPECT_EQ(stats().in_flight(), 1u);
  context.TryCancel();
  while (reader->Read(&chunk)) {
  }
  reader->Finish();
  ASSERT_TRUE(eventually([&] { return stats().in_flight() == 0; }));
}

TEST_F(ReplicaServerTest, StatsAgeGrowsWithoutStatsRecordsAndRestartsWithEach) {
  start_worker();
  const auto send_stats = [&] {
    worker_->send([](auto& pk) {
      pk.pack_array(4);
      pk.pack(3);
      pk.pack(0);
      pk.pack(0);
      pk.pack(0.0);
    });
  };
  // no STATS yet: the age counts from the replica's start, and grows
  ASSERT_TRUE(eventually([&] { return stats().stats_age_ms() >= 200; }));
  send_stats();
  ASSERT_TRUE(eventually([&] { return stats().stats_age_ms() < 200; }));
  ASSERT_TRUE(eventually([&] { return stats().stats_age_ms() >= 300; }));  // a silent worker: the age grows
  send_stats();
  ASSERT_TRUE(eventually([&] { return stats().stats_age_ms() < 300; }));
}

TEST_F(ReplicaServerTest, HealthAndStatsCallsCountAsAnAgentsCalls) {
  start_worker();
  stats();
  EXPECT_LT(server_->since_last_control_call(), 5s);
  ASSERT_TRUE(eventually([&] { return server_->since_last_control_call() >= 200ms; }));
  health();
  EXPECT_LT(server_->since_last_control_call(), 200ms);
}

TEST_F(ReplicaServerTest, CancellingTheCallWritesCancelForItsId) {
  start_worker();
  grpc::ClientContext context;
  auto reader = stub_->Generate(&context, prompt_request("hold"));
  GenerateChunk chunk;
  ASSERT_TRUE(reader->Read(&chunk));
  EXPECT_EQ(chunk.text(), "first");
  const auto submit = worker_->submit_with_prompt("hold");
  ASSERT_TRUE(submit);
  context.TryCancel();
  EXPECT_TRUE(worker_->saw_cancel(submit->id));
  while (reader->Read(&chunk)) {
  }
  EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
}

TEST_F(ReplicaServerTest, OneTokensRecordFeedsEveryStreamItNamesInOrder) {
  start_worker();
  grpc::ClientContext context_a;
  grpc::ClientContext context_b;
  context_a.set_deadline(std::chrono::system_clock::now() + kDeadline);
  context_b.set_deadline(std::chrono::system_clock::now() + kDeadline);
  auto reader_a = stub_->Generate(&context_a, prompt_request("hold-a"));
  auto reader_b = stub_->Generate(&context_b, prompt_request("hold-b"));
  GenerateChunk chunk;
  ASSERT_TRUE(reader_a->Read(&chunk));
  ASSERT_TRUE(reader_b->Read(&chunk));
  const auto a = worker_->submit_with_prompt("hold-a");
  const auto b = worker_->submit_with_prompt("hold-b");
  ASSERT_TRUE(a && b);
  const std::vector<TokensGroup> groups = {{a->id, "x", 1, 0}, {b->id, "yy", 2, 0}, {a->id, "z", 1, 0}};
  worker_->send_tokens(groups);
  worker_->send_finish(a->id, "length", 3, 3, 0, "");
  worker_->send_finish(b->id, "stop", 3, 3, 0, "");
  const auto drain = [&](auto& reader, const std::string& first) {
    std::string text = first;
    std::uint32_t tokens = 1;
    GenerateChunk last;
    while (reader->Read(&last)) {
      text += last.text();
      tokens += last.tokens();
    }
    EXPECT_TRUE(reader->Finish().ok());
    return std::make_tuple(text, tokens, last.finish_reason());
  };
  EXPECT_EQ(drain(reader_a, "first"), std::make_tuple(std::string("firstxz"), 3u, tokenbus::v1::FINISH_REASON_LENGTH));
  EXPECT_EQ(drain(reader_b, "first"), std::make_tuple(std::string("firstyy"), 3u, tokenbus::v1::FINISH_REASON_STOP));
}

TEST_F(ReplicaServerTest, AMalformedResponseRecordIsDroppedAndStreamingContinues) {
  start_worker();
  const unsigned char garbage[] = {0x94, 0xc1, 0x00};
  worker_->send_raw(garbage, sizeof(garbage));
  worker_->send([](auto& pk) {  // well-formed msgpack, wrong shape
    pk.pack_array(2);
    pk.pack(1);
    pk.pack(std::string("not an id"));
  });
  const Stream stream = generate(prompt_request("after garbage"));
  ASSERT_TRUE(stream.status.ok());
  EXPECT_EQ(stream.text(), "tok0 tok1 tok2 tok3 tok4 ");
}

TEST_F(ReplicaServerTest, ConcurrentStreamsEachGetTheirOwnTokens) {
  start_worker();
  std::vector<std::thread> clients;
  std::atomic<int> good{0};
  for (int t = 0; t < 8; ++t) {
    clients.emplace_back([&, t] {
      for (int i = 0; i < 10; ++i) {
        const Stream stream = generate(prompt_request("c" + std::to_string(t) + "-" + std::to_string(i)));
        if (stream.status.ok() && stream.text() == "tok0 tok1 tok2 tok3 tok4 " &&
            stream.chunks.back().finish_reason() == tokenbus::v1::FINISH_REASON_LENGTH &&
            stream.chunks_with_first_token_times() == 1 &&
            stream.chunks.front().has_first_token_times()) {
          ++good;
        }
      }
    });
  }
  for (auto& client : clients) client.join();
  EXPECT_EQ(good.load(), 80);
  EXPECT_EQ(worker_->submits(), 80u);
}

TEST_F(ReplicaServerTest, ARequestTooLargeForTheRingIsRefused) {
  start_worker();
  const Stream stream = generate(prompt_request(std::string(1 << 15, 'x')));  // ring 64 KiB: 16 KiB at most
  EXPECT_EQ(stream.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_TRUE(generate(prompt_request("fine")).status.ok());
}

class SmallRequestRingTest : public ReplicaServerTest {
 protected:
  SmallRequestRingTest() : ReplicaServerTest(4096) {}

  // The request ring's write_pos (offset 0 of its header): it moves when the replica writes a record.
  std::uint64_t request_write_pos() {
    void* header = ::mmap(nullptr, ring::kHeaderSize, PROT_READ, MAP_SHARED, request_ring_.fds().mem_fd, 0);
    EXPECT_NE(header, MAP_FAILED);
    const std::uint64_t pos = std::atomic_ref<std::uint64_t>(*static_cast<std::uint64_t*>(header)).load();
    ::munmap(header, ring::kHeaderSize);
    return pos;
  }
};

TEST_F(SmallRequestRingTest, AFullRingRefusesSubmitsButQueuesCancelsUntilThereIsRoom) {
  start_worker();
  worker_->pause();  // reads nothing: the 4 KiB request ring fills up
  struct Call {
    std::unique_ptr<grpc::ClientContext> context = std::make_unique<grpc::ClientContext>();
    std::unique_ptr<grpc::ClientReader<GenerateChunk>> reader;
    std::future<bool> first_read;  // blocks while the call stays open
  };
  std::vector<Call> accepted;
  grpc::Status refused;
  while (refused.ok() && accepted.size() < 100) {
    const std::uint64_t before = request_write_pos();
    Call call;
    call.reader = stub_->Generate(call.context.get(), prompt_request(""));
    call.first_read = std::async(std::launch::async, [reader = call.reader.get()] {
      GenerateChunk chunk;
      return reader->Read(&chunk);
    });
    ASSERT_TRUE(eventually([&] {
      return request_write_pos() != before || call.first_read.wait_for(0s) == std::future_status::ready;
    }));
    if (request_write_pos() != before) {
      accepted.push_back(std::move(call));
    } else {
      EXPECT_FALSE(call.first_read.get());
      refused = call.reader->Finish();
    }
  }
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << refused.error_message();
  ASSERT_GT(accepted.size(), 10u);

  // Cancelling them all needs more room than the full ring has: most CANCELs must wait, in order.
  for (auto& call : accepted) call.context->TryCancel();
  for (auto& call : accepted) {
    EXPECT_FALSE(call.first_read.get());
    EXPECT_EQ(call.reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
  }
  ASSERT_TRUE(eventually([&] { return stats().in_flight() == 0; }));  // the replica did not wait for the worker
  worker_->resume();
  ASSERT_TRUE(eventually([&] { return worker_->submits() == accepted.size(); }));
  for (const std::uint64_t id : worker_->submit_ids()) EXPECT_TRUE(worker_->saw_cancel(id)) << "request " << id;

  std::string body;
  // each SUBMIT accepted and its CANCEL (the worker saw them all; each is counted just after it is written)
  ASSERT_TRUE(eventually([&] {
    body = scrape(server_->metrics_port());
    return sample(body, R"(tokenbus_replica_ring_records_total{ring="request"})") == 2.0 * accepted.size();
  })) << body;
  EXPECT_EQ(sample(body, R"(tokenbus_replica_generate_calls_total{result="ring_full"})"), 1);
  EXPECT_EQ(sample(body, R"(tokenbus_replica_generate_calls_total{result="cancelled"})"),
            static_cast<double>(accepted.size()));
  // the CANCELs that found the ring full waited for room
  ASSERT_TRUE(eventually([&] {
    return sample(scrape(server_->metrics_port()), "tokenbus_replica_request_ring_full_wait_seconds_count") > 0;
  }));
}

TEST(ReplicaWorkerGone, OpenStreamsFailAndTheServerSaysSo) {
  ring::OwnedRingFds request_ring(1 << 16);
  ring::OwnedRingFds response_ring(1 << 16);
  // The "worker" is a child process that attaches to the response ring when told to, then exits.
  int go[2];
  ASSERT_EQ(::pipe(go), 0);
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    char byte;
    if (::read(go[0], &byte, 1) == 1) ring::Producer producer(response_ring.fds());
    ::_exit(0);
  }
  ReplicaOptions options;
  options.replica_id = "orphan";
  options.request_ring = request_ring.fds();
  options.response_ring = response_ring.fds();
  options.peer_check_interval = 50ms;
  ReplicaServer server(options);
  std::string error;
  ASSERT_TRUE(server.start(error)) << error;
  auto stub = tokenbus::v1::Replica::NewStub(
      grpc::CreateChannel("127.0.0.1:" + std::to_string(server.port()), grpc::InsecureChannelCredentials()));
  ring::Consumer requests(request_ring.fds());

  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + kDeadline);
  GenerateRequest request;
  request.set_prompt("never answered");
  auto reader = stub->Generate(&context, request);
  ASSERT_TRUE(eventually([&] { return requests.peek().has_value(); }));  // SUBMIT written: the call is open

  ASSERT_EQ(::write(go[1], "x", 1), 1);
  ASSERT_EQ(::waitpid(child, nullptr, 0), child);
  GenerateChunk chunk;
  ASSERT_TRUE(reader->Read(&chunk));
  EXPECT_EQ(chunk.finish_reason(), tokenbus::v1::FINISH_REASON_ERROR);
  EXPECT_EQ(chunk.error_code(), 500u);
  EXPECT_FALSE(reader->Read(&chunk));
  EXPECT_TRUE(reader->Finish().ok());

  pollfd gone{server.worker_gone_fd(), POLLIN, 0};
  EXPECT_EQ(::poll(&gone, 1, 10000), 1);
  grpc::ClientContext late;
  auto late_reader = stub->Generate(&late, request);
  EXPECT_FALSE(late_reader->Read(&chunk));
  EXPECT_EQ(late_reader->Finish().error_code(), grpc::StatusCode::UNAVAILABLE);
  ::close(go[0]);
  ::close(go[1]);
  server.shutdown(1s);
}

// The binary, as the agent runs it: LISTENING, then METRICS, each a line of its own on stdout, and /metrics
// answering at the printed address.
TEST(ReplicaBinary, PrintsMetricsAfterListeningAndServesThere) {
  const auto binary = std::filesystem::read_symlink("/proc/self/exe").parent_path() / "tokenbus-replica";
  ASSERT_TRUE(std::filesystem::exists(binary)) << binary;
  ring::OwnedRingFds request_ring(1 << 16);
  ring::OwnedRingFds response_ring(1 << 16);
  const auto fds_arg = [](const ring::RingFds& fds) {
    return std::to_string(fds.mem_fd) + "," + std::to_string(fds.data_fd) + "," + std::to_string(fds.space_fd);
  };
  const std::vector<std::string> args = {binary.string(),
                                         "--listen",
                                         "127.0.0.1:0",
                                         "--replica-id",
                                         "binary-test",
                                         "--req-ring",
                                         fds_arg(request_ring.fds()),
                                         "--resp-ring",
                                         fds_arg(response_ring.fds()),
                                         "--metrics-bind",
                                         "127.0.0.1:0"};
  std::vector<char*> argv;
  for (const auto& arg : args) argv.push_back(const_cast<char*>(arg.c_str()));
  argv.push_back(nullptr);
  int out[2];
  ASSERT_EQ(::pipe2(out, O_CLOEXEC), 0);
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {  // only async-signal-safe calls until exec
    for (const auto* fds : {&request_ring.fds(), &response_ring.fds()}) {
      for (const int fd : {fds->mem_fd, fds->data_fd, fds->space_fd}) ::fcntl(fd, F_SETFD, 0);
    }
    ::dup2(out[1], STDOUT_FILENO);
    ::execv(argv[0], argv.data());
    ::_exit(127);
  }
  ::close(out[1]);
  // a failed assertion below must not leave the replica running
  struct Reaper {
    pid_t pid;
    ~Reaper() {
      if (pid > 0 && ::kill(pid, SIGKILL) == 0) ::waitpid(pid, nullptr, 0);
    }
  } reaper{child};
  // the replica's stdout until it closes or shows two lines
  std::string output;
  const auto deadline = std::chrono::steady_clock::now() + kDeadline;
  while (std::count(output.begin(), output.end(), '\n') < 2 && std::chrono::steady_clock::now() < deadline) {
    pollfd readable{out[0], POLLIN, 0};
    if (::poll(&readable, 1, 100) <= 0) continue;
    char buffer[256];
    const ssize_t n = ::read(out[0], buffer, sizeof(buffer));
    if (n <= 0) break;
    output.append(buffer, static_cast<std::size_t>(n));
  }
  const auto newline = output.find('\n');
  ASSERT_NE(newline, std::string::npos) << output;
  const std::string listening = output.substr(0, newline);
  const std::string metrics = output.substr(newline + 1, output.find('\n', newline + 1) - newline - 1);
  EXPECT_EQ(listening.rfind("LISTENING 127.0.0.1:", 0), 0u) << output;
  ASSERT_EQ(metrics.rfind("METRICS 127.0.0.1:", 0), 0u) << output;
  const int metrics_port = std::atoi(metrics.c_str() + metrics.rfind(':') + 1);
  EXPECT_NE(sample(scrape(metrics_port), "tokenbus_replica_open_calls"), -1);

  ASSERT_EQ(::kill(child, SIGTERM), 0);
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  reaper.pid = 0;
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << status;
  ::close(out[0]);
}

}  // namespace
}  // namespace tokenbus::replica
