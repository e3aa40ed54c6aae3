#pragma once
// A real in-process gRPC server implementing tokenbus.v1.Replica for the proxy's tests. What it streams
// depends on the request's text (the prompt, or the last chat message):
//   "hang"      one chunk "first ", then nothing until the call is cancelled
//   "silent"    nothing at all until the call is cancelled
//   "unavailable"  no chunk; the call fails with UNAVAILABLE at once
//   "abort"     a final chunk with finish_reason "abort" and no text
//   "abort-mid" one chunk "one ", then a final "abort" chunk
//   "error400"  a final chunk with finish_reason "error", error_code 400, error_message "prompt too long"
//   "fail-mid"  two chunks, then the call fails with UNAVAILABLE
//   "quote"     one chunk holding characters JSON must escape, then a final "stop" chunk
//   "big"       max_tokens chunks (8 when 0) of kFakeBigChunkBytes each, the i-th all of letter 'a' + i % 26,
//               then a final "length" chunk
//   otherwise   max_tokens chunks (8 when 0) "tok0 ", "tok1 ", ..., then a final "length" chunk with usage
// With stamp_first_token(true), the first chunk with text carries first_token_times, stamped (wall clock) in
// hop order as the call is taken, as a replica does.
#include <atomic>
#include <condition_variable>
#include <chrono>
#include <memory>
#include <mutex>
#include <string>

#include "tokenbus.grpc.pb.h"

namespace tokenbus::proxy::testing {

inline constexpr std::uint32_t kFakePromptTokens = 3;
inline constexpr std::size_t kFakeBigChunkBytes = 64 * 1024;
inline constexpr const char* kFakeQuoteText = "he said \"hi\"\n\t\\ ok \xc3\xa9";

class FakeReplica final : public v1::Replica::CallbackService {
 public:
  // Listens on 127.0.0.1, any port. With `forced` set, every request behaves as if its text were `forced`
  // (a replica that always fails, next to a healthy one).
  explicit FakeReplica(std::string forced = "");
  ~FakeReplica() override;

  std::string address() const { return "127.0.0.1:" + std::to_string(port_); }
  int port() const { return port_; }

  // Generate calls received in all.
  int calls();
  // The last Generate request received.
  v1::GenerateRequest last_request();
  // Whether the first text chunk of the calls from now on carries first_token_times.
  void stamp_first_token(bool on) { stamp_ = on; }
  // Waits until `count` calls in all have been cancelled by the client, or the deadline passes.
  bool wait_for_cancellations(int count, std::chrono::milliseconds timeout);

  grpc::ServerWriteReactor<v1::GenerateChunk>* Generate(grpc::CallbackServerContext* context,
                                                       const v1::GenerateRequest* request) override;

 private:
  class Writer;
  void note_cancelled();

  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;
  std::mutex mutex_;
  std::condition_variable cancelled_cv_;
  int cancelled_ = 0;
  int calls_ = 0;
  const std::string forced_;
  v1::GenerateRequest last_request_;
  std::atomic<bool> stamp_{false};
};

}  // namespace tokenbus::proxy::testing
