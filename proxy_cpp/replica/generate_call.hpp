#pragma once
// One Generate stream (a gRPC ServerWriteReactor) and the registry that finds it by request id.
//
// Threads: gRPC threads run the reactions (OnWriteDone, OnCancel, OnDone); the response reader thread
// delivers TOKENS/FINISH through the registry. The registry's lock is held while the reader calls into a
// call, and OnDone takes it to unregister before deleting the call, so the reader never touches a deleted
// call. Each call's own mutex guards its stream state; gRPC operations are started after releasing it.
#include <grpcpp/grpcpp.h>

#include <cstdint>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>

#include "replica/ring_records.hpp"
#include "tokenbus.grpc.pb.h"

namespace tokenbus::replica {

class GenerateCall;
class RequestWriter;

class CallRegistry {
 public:
  // False once closed (the worker is gone): the caller fails the call instead.
  bool add(std::uint64_t id, GenerateCall* call);
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
  std::unordered_map<std::uint64_t, GenerateCall*> calls_;
  bool closed_ = false;
};

class GenerateCall final : public grpc::ServerWriteReactor<tokenbus::v1::GenerateChunk> {
 public:
  GenerateCall(CallRegistry& registry, RequestWriter& writer, std::uint64_t id);

  // Ends a call the worker never saw (refused before or at SUBMIT) with a gRPC error status.
  void fail(grpc::Status status);
  // From the response reader, under the registry lock.
  void on_tokens(std::string_view text, std::uint32_t tokens);
  void on_finish(const FinishRecord& finish);

  void OnWriteDone(bool ok) override;
  void OnCancel() override;
  void OnDone() override;

 private:
  struct Final {
    std::string finish_reason;
    std::uint32_t prompt_tokens;
    std::uint32_t completion_tokens;
    std::uint32_t error_code;
    std::string error_message;
  };

  // Starts the next gRPC operation the state calls for, if none is in flight; releases `lock` first.
  void pump(std::unique_lock<std::mutex> lock);
  // The client is gone (cancelled, or a write failed): stop writing, tell the engine to abort.
  void abandon(std::unique_lock<std::mutex> lock);

  CallRegistry& registry_;
  RequestWriter& writer_;
  const std::uint64_t id_;

  std::mutex mutex_;
  std::string pending_text_;  // text not yet written: tokens that arrived while a write was in flight
  std::uint32_t pending_tokens_ = 0;
  std::optional<Final> final_;  // the FINISH record, once it came
  bool write_in_flight_ = false;
  bool finish_called_ = false;
  bool abandoned_ = false;
  bool worker_done_ = false;  // the worker sent FINISH or never saw the request: no CANCEL needed
  tokenbus::v1::GenerateChunk chunk_;  // the message of the write in flight
};

}  // namespace tokenbus::replica
