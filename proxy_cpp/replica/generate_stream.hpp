#pragma once
// One Generate stream (a gRPC ServerWriteReactor) and the registry that finds it by request id.
//
// Threads: gRPC threads run the reactions (OnWriteDone, OnCancel, OnDone); the response reader thread
// delivers TOKENS/FINISH through the registry. The registry's lock is held while the reader calls into a
// call, and OnDone takes it to unregister before deleting the call, so the reader never touches a deleted
// call. Each call's own mutex guards its stream state; gRPC operations are started after releasing it.
#include <grpcpp/grpcpp.h>

#include <atomic>
#include <cstdint>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>

#include "replica/metrics.hpp"
#include "replica/ring_records.hpp"
#include "tokenbus.grpc.pb.h"

namespace tokenbus::replica {

class GenerateStream;
class RequestWriter;

class CallRegistry {
 public:
  // False once closed (the worker is gone): the caller fails the call instead.
  bool add(std::uint64_t id, GenerateStream* call);
  void remove(std::uint64_t id);
  // Runs fn(call) under the registry lock; false when no open call has that id (it finished or was cancelled).
  template <class Fn>
  bool with_call(std::uint64_t id, Fn&& fn) {
    std::lock_guard lock(mutex_);
    const auto it = calls_.find(id);
    if (it == calls_.end()) return false;
    fn(*it->second);
    return true;
  }
  // Refuses new calls from now on and runs fn(call) on every open one; returns how many.
  template <class Fn>
  std::size_t close(Fn&& fn) {
    std::lock_guard lock(mutex_);
    closed_ = true;
    for (auto& [id, call] : calls_) fn(*call);
    return calls_.size();
  }
  std::size_t size();

 private:
  std::mutex mutex_;
  std::unordered_map<std::uint64_t, GenerateStream*> calls_;
  bool closed_ = false;
};

// The first chunk that carries text also carries the first token's stamps (tokenbus.proto FirstTokenTimes):
// the handler's entry, the SUBMIT's write, and those of the call's first TOKENS record.
class GenerateStream final : public grpc::ServerWriteReactor<tokenbus::v1::GenerateChunk> {
 public:
  // `received_ns`: the wall clock at the Generate handler's entry. Counts itself open in `metrics` until OnDone.
  GenerateStream(CallRegistry& registry, RequestWriter& writer, ReplicaMetrics& metrics, std::uint64_t id,
               std::uint64_t received_ns);

  // RequestWriter::submit stamps it.
  std::atomic<std::uint64_t>& ring_written_ns() { return ring_written_ns_; }

  // Ends a call the worker never saw (refused before or at SUBMIT) with a gRPC error status.
  void fail(grpc::Status status, CallResult result);
  // From the response reader, under the registry lock. `read_ns`: when the reader took the record.
  void on_tokens(const TokensGroup& tokens, std::uint64_t read_ns);
  void on_finish(const FinishRecord& finish, CallResult result);

  void OnWriteDone(bool ok) override;
  void OnCancel() override;
  void OnDone() override;

 private:
  struct Final {
    tokenbus::v1::FinishReason finish_reason;
    std::uint32_t prompt_tokens;
    std::uint32_t completion_tokens;
    std::uint32_t error_code;
    std::string error_message;
    CallResult result;
  };

  // Starts the next gRPC operation the state calls for, if none is in flight; releases `lock` first.
  void pump(std::unique_lock<std::mutex> lock);
  // The client is gone (cancelled, or a write failed): stop writing, tell the engine to abort.
  void abandon(std::unique_lock<std::mutex> lock);

  CallRegistry& registry_;
  RequestWriter& writer_;
  ReplicaMetrics& metrics_;
  const std::uint64_t id_;
  const std::uint64_t received_ns_;
  // Written by the submitting gRPC thread, read by whichever thread builds the first text chunk; the worker
  // answers only after reading the SUBMIT, so it is set by then.
  std::atomic<std::uint64_t> ring_written_ns_{0};

  std::mutex mutex_;
  std::string pending_text_;  // text not yet written: tokens that arrived while a write was in flight
  std::uint32_t pending_tokens_ = 0;
  std::optional<Final> final_;  // the FINISH record, once it came
  bool write_in_flight_ = false;
  bool finish_called_ = false;
  bool abandoned_ = false;
  bool worker_done_ = false;  // the worker sent FINISH or never saw the request: no CANCEL needed
  CallResult result_ = CallResult::kCancelled;  // how it ended, once Finish is started
  // The first TOKENS record's stamps, until the first chunk with text carries them.
  bool tokens_seen_ = false;
  bool first_token_times_sent_ = false;
  std::uint64_t engine_produced_ns_ = 0;
  std::uint64_t ring_read_ns_ = 0;
  tokenbus::v1::GenerateChunk chunk_;  // the message of the write in flight
};

}  // namespace tokenbus::replica
